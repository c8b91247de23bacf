// Matching cost on the CPU. Per image, only the tokens that some valid target uses ("active" tokens: the union
// of the positive maps' supports, typically a few dozen of 256) enter the class cost, so the focal terms
// (one exp, two logs each; vectorised for float32) are evaluated for B·Q·|active| logits instead of B·Q·T.
// Then OpenMP over (b, q) rows; within a row the class dot products and the box terms run over the targets in
// SIMD lanes (token-major weights, structure-of-arrays targets). Each output row is written once.
#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../common/dk_cpu_simd.h"
#include "matching_cost.h"
#include "matching_cost_math.h"

namespace dk {
namespace matching_cost {
namespace {

constexpr const char* kOp = "matching_cost";

using VF = cpu::Simd<float>::vec;
constexpr int kLanes = cpu::Simd<float>::kLanes;

// Lane-wise natural log of positive normal floats (here p + 1e-8 ∈ [1e-8, 1 + 1e-8]): Cephes logf's reduction
// to m ∈ [√½, √2) and its degree-8 polynomial (≈1 ulp). NaN propagates.
inline VF vlog_positive(VF x) {
  typedef int32_t IV __attribute__((vector_size(cpu::kVecBytes)));
  IV bits;
  std::memcpy(&bits, &x, sizeof(VF));
  IV e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  VF m;
  std::memcpy(&m, &bits, sizeof(VF));
  const auto small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const VF fe = __builtin_convertvector(e, VF);
  const VF z = m * m;
  VF y = cpu::Simd<float>::splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  const VF r = m + y + fe * 0.693359375f;
  return x != x ? x : r;
}

// focal_pos_minus_neg of kLanes logits at once (float, γ = 2): the same formula as the scalar version.
inline VF focal_pos_minus_neg_vec(VF x, float alpha) {
  const VF zero{};
  const VF ax = x < zero ? -x : x;
  const VF e = cpu::vexp(-ax);
  const VF inv = 1.0f / (1.0f + e);
  const auto nonneg = x >= zero;
  const VF p = nonneg ? inv : e * inv;
  const VF q = nonneg ? e * inv : inv;
  const VF pos = alpha * (q * q) * -vlog_positive(p + 1e-8f);
  const VF neg = (1.0f - alpha) * (p * p) * -vlog_positive(q + 1e-8f);
  return pos - neg;
}

// d[k] = focal (pos − neg) of the logits z[active[k]], k < a; d and the gather buffer hold ≥ a rounded up to lanes.
template <typename S>
inline void focal_row(const S* z, const int64_t* active, int64_t a, S alpha, S gamma, S* d, S* gathered) {
  for (int64_t k = 0; k < a; ++k) d[k] = focal_pos_minus_neg<S>(z[active[k]], alpha, gamma);
  (void)gathered;
}

template <>
inline void focal_row<float>(const float* z, const int64_t* active, int64_t a, float alpha, float gamma, float* d,
                             float* gathered) {
  if (gamma != 2.0f) {
    for (int64_t k = 0; k < a; ++k) d[k] = focal_pos_minus_neg<float>(z[active[k]], alpha, gamma);
    return;
  }
  const int64_t padded = (a + kLanes - 1) / kLanes * kLanes;
  for (int64_t k = 0; k < a; ++k) gathered[k] = z[active[k]];
  for (int64_t k = a; k < padded; ++k) gathered[k] = 0.0f;
  for (int64_t k = 0; k < padded; k += kLanes)
    cpu::Simd<float>::store(d + k, focal_pos_minus_neg_vec(cpu::Simd<float>::load(gathered + k), alpha));
}

template <typename S>
struct ImageTargets {
  std::vector<int64_t> active;  // token indices used by a valid target
  std::vector<S> weights_t;     // (|active|, n_b): m[g, t] / Σ_t m[g, t] (0 for an all-zero map), token-major
  std::vector<S> box;           // (9, n_b) structure of arrays: cx, cy, w, h, x0, y0, x1, y1, area
};

// Row q against the n targets of its image, vectorised over targets (structure-of-arrays, branch-free):
// box_costs of matching_cost_math.h written lane-wise, the divisions guarded by selecting a safe denominator.
template <typename S>
inline void row_against_targets(const S* pb, const ImageTargets<S>& img, int64_t n, const S* cls, S w_class,
                                S w_bbox, S w_giou, S* o) {
  const S pcx = pb[0], pcy = pb[1], pw = pb[2], ph = pb[3];
  const S px0 = pcx - S(0.5) * pw, py0 = pcy - S(0.5) * ph, px1 = pcx + S(0.5) * pw, py1 = pcy + S(0.5) * ph;
  const S parea = (px1 - px0) * (py1 - py0);
  const S *cx = img.box.data(), *cy = cx + n, *w = cy + n, *h = w + n, *x0 = h + n, *y0 = x0 + n, *x1 = y0 + n,
          *y1 = x1 + n, *area = y1 + n;
#pragma omp simd
  for (int64_t g = 0; g < n; ++g) {
    const S l1 = m_abs(pcx - cx[g]) + m_abs(pcy - cy[g]) + m_abs(pw - w[g]) + m_abs(ph - h[g]);
    const S iw = m_max(m_min(px1, x1[g]) - m_max(px0, x0[g]), S(0));
    const S ih = m_max(m_min(py1, y1[g]) - m_max(py0, y0[g]), S(0));
    const S inter = iw * ih, uni = parea + area[g] - inter;
    const S cw = m_max(m_max(px1, x1[g]) - m_min(px0, x0[g]), S(0));
    const S ch = m_max(m_max(py1, y1[g]) - m_min(py0, y0[g]), S(0));
    const S hull = cw * ch;
    const S iou = uni == S(0) ? S(0) : inter / (uni == S(0) ? S(1) : uni);
    const S enclose = hull == S(0) ? S(0) : (hull - uni) / (hull == S(0) ? S(1) : hull);
    o[g] = w_bbox * l1 + w_class * cls[g] - w_giou * (iou - enclose);
  }
}

template <typename S>
void run(const S* logits, const S* pred_boxes, const S* tgt_boxes, const int64_t* counts, const S* map, int64_t B,
         int64_t Q, int64_t T, int64_t G, S w_class, S w_bbox, S w_giou, S alpha, S gamma, S pad, S* out,
         int num_threads) {
  std::vector<ImageTargets<S>> images(static_cast<size_t>(B));
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t b = 0; b < B; ++b) {
    ImageTargets<S>& img = images[size_t(b)];
    const int64_t n = counts[b];
    const S* mb = map + b * G * T;
    for (int64_t t = 0; t < T; ++t) {
      bool used = false;
      for (int64_t g = 0; g < n && !used; ++g) used = mb[g * T + t] != S(0);
      if (used) img.active.push_back(t);
    }
    const int64_t a = int64_t(img.active.size());
    img.weights_t.assign(size_t(a * n), S(0));
    img.box.assign(size_t(9 * n), S(0));
    for (int64_t g = 0; g < n; ++g) {
      S sum = S(0);
      for (int64_t t = 0; t < T; ++t) sum += mb[g * T + t];
      for (int64_t k = 0; k < a; ++k) img.weights_t[size_t(k * n + g)] = safe_div(mb[g * T + img.active[size_t(k)]], sum);
      const S* tb = tgt_boxes + (b * G + g) * 4;
      const S x0 = tb[0] - S(0.5) * tb[2], y0 = tb[1] - S(0.5) * tb[3], x1 = tb[0] + S(0.5) * tb[2],
              y1 = tb[1] + S(0.5) * tb[3];
      const S soa[9] = {tb[0], tb[1], tb[2], tb[3], x0, y0, x1, y1, (x1 - x0) * (y1 - y0)};
      for (int f = 0; f < 9; ++f) img.box[size_t(f * n + g)] = soa[f];
    }
  }
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<S> d(static_cast<size_t>(T + kLanes)), gathered(static_cast<size_t>(T + kLanes));
    std::vector<S> cls(static_cast<size_t>(G));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < B * Q; ++row) {
      const int64_t b = row / Q;
      const ImageTargets<S>& img = images[size_t(b)];
      const int64_t n = counts[b], a = int64_t(img.active.size());
      focal_row<S>(logits + row * T, img.active.data(), a, alpha, gamma, d.data(), gathered.data());
      std::fill(cls.begin(), cls.begin() + n, S(0));
      for (int64_t k = 0; k < a; ++k) {  // Σ_k d[k]·w[k, g], vectorised over g
        const S dk = d[size_t(k)];
        const S* wk = img.weights_t.data() + k * n;
        S* c = cls.data();
#pragma omp simd
        for (int64_t g = 0; g < n; ++g) c[g] += dk * wk[g];
      }
      S* o = out + row * G;
      row_against_targets<S>(pred_boxes + row * 4, img, n, cls.data(), w_class, w_bbox, w_giou, o);
      for (int64_t g = n; g < G; ++g) o[g] = pad;
    }
  }
}

}  // namespace

void matching_cost_cpu(std::uintptr_t pred_logits, std::uintptr_t pred_boxes, std::uintptr_t tgt_boxes,
                       std::uintptr_t tgt_counts, std::uintptr_t positive_map, int dtype, int64_t B, int64_t Q,
                       int64_t T, int64_t G, double w_class, double w_bbox, double w_giou, double alpha,
                       double gamma, double pad_value, std::uintptr_t out, int num_threads) {
  check_sizes(kOp, B, Q, T, G, alpha, gamma);
  check_dtype(dtype, dtype == kFloat32 || dtype == kFloat64, kOp, "pred_logits");
  if (B == 0) return;
  check_pointer(as_ptr<void>(tgt_counts), kOp, "tgt_counts");
  const int64_t* counts = as_ptr<const int64_t>(tgt_counts);
  for (int64_t b = 0; b < B; ++b)
    DK_CHECK_ARG(counts[b] >= 0 && counts[b] <= G, kOp, "tgt_counts", "entry ", b, " is ", counts[b],
                 ", must be in [0, G=", G, "]");
  if (Q == 0 || G == 0) return;  // empty output
  for (auto [ptr, name] : {std::pair{pred_logits, "pred_logits"}, {pred_boxes, "pred_boxes"}, {out, "out"},
                           {tgt_boxes, "tgt_boxes"}, {positive_map, "positive_map"}})
    check_pointer(as_ptr<void>(ptr), kOp, name);
  // Threads only for enough work (≈ 64K row × (token + target) units per thread, ~0.2 ms).
  const double work = double(B) * double(Q) * double(T / 8 + G);
  num_threads = int(std::max<double>(1, std::min<double>(double(num_threads), work / 65536.0)));
  if (dtype == kFloat32)
    run<float>(as_ptr<const float>(pred_logits), as_ptr<const float>(pred_boxes), as_ptr<const float>(tgt_boxes),
               counts, as_ptr<const float>(positive_map), B, Q, T, G, float(w_class), float(w_bbox), float(w_giou),
               float(alpha), float(gamma), float(pad_value), as_ptr<float>(out), num_threads);
  else
    run<double>(as_ptr<const double>(pred_logits), as_ptr<const double>(pred_boxes), as_ptr<const double>(tgt_boxes),
                counts, as_ptr<const double>(positive_map), B, Q, T, G, w_class, w_bbox, w_giou, alpha, gamma,
                pad_value, as_ptr<double>(out), num_threads);
}

}  // namespace matching_cost
}  // namespace dk
