// CPU soft cross-entropy (see soft_ce.h; shared arithmetic in soft_ce_math.h). Exponents are (z − max)/τ_s and
// (d − max)·2/τ_t: a difference before a product, which no fused multiply-add can round differently in the
// forward and the backward.
//
// Rows split into 2048-column chunks, one task per (row b, chunk), all
// S student and T teacher rows of that b at once so every teacher chunk is read (or exponentiated) once per b,
// not once per pair. Two passes per student chunk (max, then exp) run from L1/L2. Chunk records are merged in a
// fixed order, so results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/dk_cpu_simd.h"
#include "soft_ce.h"
#include "soft_ce_math.h"

namespace dk {
namespace soft_ce {
namespace {

constexpr int64_t kChunk = 2048;
constexpr const char* kOp = "dino_loss";

int64_t n_chunks(int64_t classes) { return (classes + kChunk - 1) / kChunk; }

struct Args {
  int64_t views, teachers, batch, classes;
  bool skip_same_view, teacher_logits;
  double student_temp, teacher_temp, scale;
};

void check_args(const Args& a, int dtype, std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t center) {
  check_dtype(dtype, dtype == kFloat32 || dtype == kFloat64, kOp, "student_logits");
  DK_CHECK_ARG(a.views >= 1 && a.teachers >= 1 && a.batch >= 1 && a.classes >= 1, kOp, "student_logits",
               "needs S, T, B, K >= 1, got S=", a.views, " T=", a.teachers, " B=", a.batch, " K=", a.classes);
  DK_CHECK_ARG(std::isfinite(a.student_temp) && a.student_temp > 0, kOp, "student_temp",
               "must be positive and finite, got ", a.student_temp);
  DK_CHECK_ARG(!a.teacher_logits || (std::isfinite(a.teacher_temp) && a.teacher_temp > 0), kOp, "teacher_temp",
               "must be positive and finite, got ", a.teacher_temp);
  DK_CHECK_ARG(std::isfinite(a.scale), kOp, "scale", "must be finite, got ", a.scale);
  // The exponent factors 1/τ_s and 2/τ_t must be finite in the kernel's dtype.
  const bool f32 = dtype == kFloat32;
  DK_CHECK_ARG(!f32 || std::isfinite(float(1.0 / a.student_temp)), kOp, "student_temp",
               "is too small for float32 (1/student_temp overflows), got ", a.student_temp);
  DK_CHECK_ARG(!a.teacher_logits || !f32 || std::isfinite(softmax_center::temperature_factor<float>(a.teacher_temp)),
               kOp, "teacher_temp", "is too small for float32 (2/teacher_temp overflows), got ", a.teacher_temp);
  check_pointer(as_ptr<void>(student), kOp, "student_logits");
  check_pointer(as_ptr<void>(teacher), kOp, "teacher");
  if (a.teacher_logits) check_pointer(as_ptr<void>(center), kOp, "center");
}

template <typename T>
T row_max(const T* x, int64_t n) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
  // Four accumulators: one would wait on the compare-and-blend latency of the previous vector.
  typename S::vec acc = S::splat(-INFINITY), acc1 = acc, acc2 = acc, acc3 = acc;
  int64_t k = 0;
  for (; k + 4 * L <= n; k += 4 * L) {
    acc = cpu::vmax(acc, S::load(x + k));
    acc1 = cpu::vmax(acc1, S::load(x + k + L));
    acc2 = cpu::vmax(acc2, S::load(x + k + 2 * L));
    acc3 = cpu::vmax(acc3, S::load(x + k + 3 * L));
  }
  acc = cpu::vmax(cpu::vmax(acc, acc1), cpu::vmax(acc2, acc3));
  for (; k + L <= n; k += L) acc = cpu::vmax(acc, S::load(x + k));
  T m = -INFINITY;
  for (int l = 0; l < L; ++l) m = std::max(m, acc[l]);
  for (; k < n; ++k) m = std::max(m, x[k]);
  return m;
}

// Teacher logits of one chunk → e = exp((d − m)·factor) into out, d = z/2 − center/2 and factor = 2/τ_t
// (softmax_center_math.h); returns (m, Σe).
template <typename T>
void teacher_chunk_exp(const T* z, const T* center, T factor, int64_t n, T* out, T& m, T& s) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
  int64_t k = 0;
  typename S::vec vm = S::splat(-INFINITY);
  for (; k + L <= n; k += L) {
    const typename S::vec d = softmax_center::half_centered(S::load(z + k), S::load(center + k));
    S::store(out + k, d);
    vm = cpu::vmax(vm, d);
  }
  m = -INFINITY;
  for (int l = 0; l < L; ++l) m = std::max(m, vm[l]);
  for (; k < n; ++k) {
    out[k] = softmax_center::half_centered(z[k], center[k]);
    m = std::max(m, out[k]);
  }
  typename S::vec vs{};
  for (k = 0; k + L <= n; k += L) {
    const typename S::vec e = cpu::vexp_nonpositive(softmax_center::exponent(S::load(out + k), m, factor));
    S::store(out + k, e);
    vs += e;
  }
  s = S::sum(vs);
  for (; k < n; ++k) {
    out[k] = std::exp(softmax_center::exponent(out[k], m, factor));
    s += out[k];
  }
}

// Lane-wise target_times_exponent: 0 where the target is 0, even against x = −inf.
template <typename V>
inline V vtarget_times_exponent(V p, V x) {
  const V zero{};
  return p == zero ? zero : p * x;
}

// One (b, chunk) task of the forward: fills the chunk record.
template <typename T>
void forward_chunk(const Args& a, const T* student, const T* teacher, const T* center, int64_t b, int64_t k0,
                   int64_t n, T* record, T* teacher_buffer /* (T, kChunk) */) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
  const RecordLayout layout{a.views, a.teachers};
  const T inv_ts = T(1.0 / a.student_temp);
  const int64_t row_stride = a.batch * a.classes;
  const T* teacher_rows[64];  // chunk starts of the teacher rows of b (T ≤ 64 checked by the caller)
  for (int64_t t = 0; t < a.teachers; ++t) {
    teacher_rows[t] = teacher + t * row_stride + b * a.classes + k0;
    if (a.teacher_logits) {
      T* e = teacher_buffer + t * kChunk;
      teacher_chunk_exp(teacher_rows[t], center + k0, softmax_center::temperature_factor<T>(a.teacher_temp), n, e,
                        record[layout.teacher(t)],
                        record[layout.teacher(t) + 1]);
      teacher_rows[t] = e;
    }
  }
  for (int64_t v = 0; v < a.views; ++v) {
    const T* z = student + v * row_stride + b * a.classes + k0;
    // The next view's chunk, fetched into L2 during this one's exponentials (see fused_sample).
    const T* z_next = v + 1 < a.views ? z + row_stride : nullptr;
    const T m = row_max(z, n);  // in the logits' space: x = (z − m)/τ_s
    T* rec = record + layout.student(v);
    typename S::vec vs{}, vd{}, vp{};
    int64_t k = 0;
    if (!a.teacher_logits) {
      // Targets of this view: the sum of its paired teacher rows.
      const T* paired_rows[64];
      int n_paired = 0;
      for (int64_t t = 0; t < a.teachers; ++t)
        if (paired(v, t, a.skip_same_view)) paired_rows[n_paired++] = teacher_rows[t];
      for (; k + L <= n; k += L) {
        if (z_next) __builtin_prefetch(z_next + k, 0, 2);
        const typename S::vec x = student_exponent(S::load(z + k), m, inv_ts);
        vs += cpu::vexp_nonpositive(x);
        typename S::vec p{};
        for (int j = 0; j < n_paired; ++j) p += S::load(paired_rows[j] + k);
        vd += vtarget_times_exponent(p, x);
        vp += p;
      }
      T s = S::sum(vs), d = S::sum(vd), mass = S::sum(vp);
      for (; k < n; ++k) {
        const T x = student_exponent(z[k], m, inv_ts);
        s += std::exp(x);
        T p = 0;
        for (int j = 0; j < n_paired; ++j) p += paired_rows[j][k];
        d += target_times_exponent(p, x);
        mass += p;
      }
      rec[0] = m, rec[1] = s, rec[2] = d, rec[3] = mass;
    } else {
      for (; k + L <= n; k += L) {
        if (z_next) __builtin_prefetch(z_next + k, 0, 2);
        vs += cpu::vexp_nonpositive(student_exponent(S::load(z + k), m, inv_ts));
      }
      T s = S::sum(vs);
      for (; k < n; ++k) s += std::exp(student_exponent(z[k], m, inv_ts));
      rec[0] = m, rec[1] = s, rec[2] = 0, rec[3] = 0;
      for (int64_t t = 0; t < a.teachers; ++t) {
        if (!paired(v, t, a.skip_same_view)) continue;
        const T* e = teacher_rows[t];
        typename S::vec acc{};
        for (k = 0; k + L <= n; k += L)
          acc += vtarget_times_exponent(S::load(e + k), student_exponent(S::load(z + k), m, inv_ts));
        T d = S::sum(acc);
        for (; k < n; ++k) d += target_times_exponent(e[k], student_exponent(z[k], m, inv_ts));
        record[layout.pair(v, t)] = d;
      }
    }
  }
}

template <typename T>
void forward_impl(const Args& a, const T* student, const T* teacher, const T* center, const T* weights, T* loss,
                  T* student_stats, T* target_sum, T* teacher_stats, T* records, int num_threads) {
  const RecordLayout layout{a.views, a.teachers};
  const int64_t chunks = n_chunks(a.classes), record_size = layout.size();
  const int64_t tasks = a.batch * chunks;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, tasks)));
#pragma omp parallel num_threads(threads)
  {
    cpu::FlushDenormals flush;
    std::vector<T> teacher_buffer(a.teacher_logits ? size_t(a.teachers * kChunk) : 0);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      const int64_t k0 = c * kChunk, n = std::min(kChunk, a.classes - k0);
      forward_chunk(a, student, teacher, center, b, k0, n, records + task * record_size, teacher_buffer.data());
    }
  }
  // Row b's records are contiguous: record (b, c) at (b·chunks + c)·record_size.
  std::vector<T> row_loss(size_t(a.batch));
  const int row_threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, a.batch)));
#pragma omp parallel for schedule(static) num_threads(row_threads)
  for (int64_t b = 0; b < a.batch; ++b) {
    const T l = combine_row(records + b * chunks * record_size, record_size, chunks, layout, a.skip_same_view,
                            a.teacher_logits, a.batch, b, RowStats<T>{student_stats, a.views, a.batch}, target_sum,
                            RowStats<T>{teacher_stats, a.teachers, a.batch}, T(1.0 / a.student_temp),
                            softmax_center::temperature_factor<T>(a.teacher_temp));
    row_loss[size_t(b)] = weights ? weights[b] * l : l;
  }
  double total = 0;
  for (int64_t b = 0; b < a.batch; ++b) total += double(row_loss[size_t(b)]);
  *loss = T(total * a.scale);
}

template <typename T>
void backward_impl(const Args& a, T grad_loss, const T* student, const T* teacher, const T* center,
                   const T* weights, const T* student_stats, const T* target_sum, const T* teacher_stats,
                   T* grad_student, int num_threads) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
  const int64_t chunks = n_chunks(a.classes), tasks = a.batch * chunks, row_stride = a.batch * a.classes;
  const T inv_ts = T(1.0 / a.student_temp), factor = softmax_center::temperature_factor<T>(a.teacher_temp);
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, tasks)));
#pragma omp parallel num_threads(threads)
  {
    cpu::FlushDenormals flush;
    std::vector<T> buffer(size_t((a.teacher_logits ? a.teachers : 0) + 1) * kChunk);
    T* target = buffer.data() + (a.teacher_logits ? a.teachers * kChunk : 0);  // P of one view, one chunk
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      const int64_t k0 = c * kChunk, n = std::min(kChunk, a.classes - k0);
      const T* rows[64];
      for (int64_t t = 0; t < a.teachers; ++t) {
        rows[t] = teacher + t * row_stride + b * a.classes + k0;
        if (a.teacher_logits) {  // p_t = exp((d − M)·2/τ_t − log Σ), recomputed instead of stored by the forward
          T* p = buffer.data() + t * kChunk;
          const T mx = teacher_stats[t * a.batch + b], ls = teacher_stats[(a.teachers + t) * a.batch + b];
          const T* z = rows[t];
          const T* cen = center + k0;
          int64_t k = 0;
          for (; k + L <= n; k += L)
            S::store(p + k, cpu::vexp_nonpositive(softmax_center::exponent(
                                          softmax_center::half_centered(S::load(z + k), S::load(cen + k)), mx,
                                          factor) - ls));
          for (; k < n; ++k)
            p[k] = std::exp(softmax_center::exponent(softmax_center::half_centered(z[k], cen[k]), mx, factor) - ls);
          rows[t] = p;
        }
      }
      const T coef = grad_loss * T(a.scale) * (weights ? weights[b] : T(1)) * inv_ts;
      for (int64_t v = 0; v < a.views; ++v) {
        const T* z = student + v * row_stride + b * a.classes + k0;
        T* g = grad_student + v * row_stride + b * a.classes + k0;
        const T mx = student_stats[v * a.batch + b], ls = student_stats[(a.views + v) * a.batch + b];
        const T mass = target_sum[v * a.batch + b];
        std::fill(target, target + n, T(0));
        for (int64_t t = 0; t < a.teachers; ++t) {
          if (!paired(v, t, a.skip_same_view)) continue;
          const T* p = rows[t];
          int64_t k = 0;
          for (; k + L <= n; k += L) S::store(target + k, S::load(target + k) + S::load(p + k));
          for (; k < n; ++k) target[k] += p[k];
        }
        int64_t k = 0;
        for (; k + L <= n; k += L) {
          const typename S::vec soft = cpu::vexp_nonpositive(student_exponent(S::load(z + k), mx, inv_ts) - ls);
          S::store(g + k, (soft * mass - S::load(target + k)) * coef);
        }
        for (; k < n; ++k) g[k] = (std::exp(student_exponent(z[k], mx, inv_ts) - ls) * mass - target[k]) * coef;
      }
    }
  }
}

// ---- Forward and backward in one pass (grad_loss taken as 1; the Python backward scales when it is not) ----
//
// One task per sample b: the T teacher rows of b are read once (in logits mode turned into probabilities in a
// per-thread buffer, with their statistics), the target row shared by the views that pair with every teacher is
// summed once, then each student row (v, b) is streamed once in 2048-column chunks: its max, then
// e = exp((z − max_c)/τ_s) into a per-thread row with the chunk's Σe, ⟨P, x⟩ and ΣP (one exponential per
// element). The chunk records merge with combine_row as in the forward; a last sweep over that row, still in L2,
// writes the gradient (ΣP·softmax − P)·scale·w_b/τ_s, once (non-temporal stores for large gradients). Samples are
// independent and each is reduced in a fixed order, so the result does not depend on the thread count.

// Teacher logits row → probabilities softmax((z − c)/τ_t) (softmax_center_math.h); returns (max d, log Σ).
template <typename T>
void teacher_row_probs(const T* z, const T* center, T factor, int64_t k, T* out, T& max_out, T& log_sum_out) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
  typename S::vec vm = S::splat(-INFINITY);
  int64_t j = 0;
  for (; j + L <= k; j += L) vm = cpu::vmax(vm, softmax_center::half_centered(S::load(z + j), S::load(center + j)));
  T m = -INFINITY;
  for (int l = 0; l < L; ++l) m = std::max(m, vm[l]);
  for (; j < k; ++j) m = std::max(m, softmax_center::half_centered(z[j], center[j]));
  typename S::vec vs{};
  for (j = 0; j + L <= k; j += L) {
    const typename S::vec e = cpu::vexp_nonpositive(
        softmax_center::exponent(softmax_center::half_centered(S::load(z + j), S::load(center + j)), m, factor));
    S::store(out + j, e);
    vs += e;
  }
  T s = S::sum(vs);
  for (; j < k; ++j) {
    out[j] = std::exp(softmax_center::exponent(softmax_center::half_centered(z[j], center[j]), m, factor));
    s += out[j];
  }
  const T inv_s = T(1) / s;
  for (j = 0; j + L <= k; j += L) S::store(out + j, S::load(out + j) * inv_s);
  for (; j < k; ++j) out[j] *= inv_s;
  max_out = m;
  log_sum_out = std::log(s);
}

// Σ of n rows into out.
template <typename T>
void sum_rows(const T* const* rows, int n, int64_t k, T* out) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
  int64_t j = 0;
  for (; j + L <= k; j += L) {
    typename S::vec acc = S::load(rows[0] + j);
    for (int r = 1; r < n; ++r) acc += S::load(rows[r] + j);
    S::store(out + j, acc);
  }
  for (; j < k; ++j) {
    T acc = rows[0][j];
    for (int r = 1; r < n; ++r) acc += rows[r][j];
    out[j] = acc;
  }
}

// Scratch of one thread: teacher probabilities (T, K) in logits mode, the all-teacher target row (K), a row of
// zeros (the target of a view paired with no teacher: S ≥ 2 views against T = 1), one row's chunk records, and
// one row's exponentials (K): reused for every row, so they stay in L2 and the gradient is written once, at the
// end, straight to memory.
template <typename T>
struct FusedScratch {
  std::vector<T> teacher_probs, all_targets, zeros, records, exps;
  explicit FusedScratch(const Args& a)
      : teacher_probs(a.teacher_logits ? size_t(a.teachers * a.classes) : 0),
        all_targets(a.teachers > 1 && a.views > a.teachers ? size_t(a.classes) : 0),
        zeros(a.skip_same_view && a.teachers == 1 ? size_t(a.classes) : 0, T(0)),
        records(size_t(4 * n_chunks(a.classes))),
        exps(size_t(a.classes)) {}
};

// Gradients at least this large are written with non-temporal stores: they exceed the caches anyway, and a plain
// store would first read every line of the fresh buffer from memory. Smaller ones stay cached for their reader.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// Returns Σ_v ℓ_vb (unweighted, unscaled), like combine_row; writes grad rows (v, b) for every v.
template <typename T>
T fused_sample(const Args& a, const T* student, const T* teacher, const T* center, const T* weights, int64_t b,
               T* student_stats, T* target_sum, T* teacher_stats, T* grad, bool stream, FusedScratch<T>& scratch) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
  const int64_t k_all = a.classes, row_stride = a.batch * a.classes, chunks = n_chunks(a.classes);
  const T inv_ts = T(1.0 / a.student_temp), factor = softmax_center::temperature_factor<T>(a.teacher_temp);
  const T* rows[64];
  for (int64_t t = 0; t < a.teachers; ++t) {
    rows[t] = teacher + t * row_stride + b * k_all;
    if (a.teacher_logits) {
      T* p = scratch.teacher_probs.data() + t * k_all;
      RowStats<T> ts{teacher_stats, a.teachers, a.batch};
      teacher_row_probs(rows[t], center, factor, k_all, p, ts.max(t, b), ts.log_sum(t, b));
      rows[t] = p;
    }
  }
  // Views paired with every teacher (the local crops) share one summed target row.
  bool all_summed = false;
  if (a.teachers > 1 && a.views > a.teachers) {
    sum_rows(rows, int(a.teachers), k_all, scratch.all_targets.data());
    all_summed = true;
  }
  const T coef = T(a.scale) * (weights ? weights[b] : T(1)) * inv_ts;
  T row_loss = 0;
  for (int64_t v = 0; v < a.views; ++v) {
    const T* paired_rows[64];
    int n_paired = 0;
    for (int64_t t = 0; t < a.teachers; ++t)
      if (paired(v, t, a.skip_same_view)) paired_rows[n_paired++] = rows[t];
    if (all_summed && n_paired == int(a.teachers)) {
      paired_rows[0] = scratch.all_targets.data();
      n_paired = 1;
    }
    if (n_paired == 0) paired_rows[n_paired++] = scratch.zeros.data();
    const T* zrow = student + v * row_stride + b * k_all;
    T* grow = grad + v * row_stride + b * k_all;
    T* rec = scratch.records.data();
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k0 = c * kChunk, n = std::min(kChunk, k_all - k0);
      const T* z = zrow + k0;
      T* g = scratch.exps.data() + k0;  // e, turned into the gradient below
      // The student chunk after this one, fetched into L2 while this one is exponentiated: the hardware
      // prefetcher follows a stream only while it is being read, and the max pass would wait for memory.
      const T* z_next = c + 1 < chunks ? z + n : v + 1 < a.views ? zrow + row_stride : nullptr;
      const T m = row_max(z, n);
      typename S::vec vs{}, vd{}, vp{};
      int64_t k = 0;
      for (; k + L <= n; k += L) {
        if (z_next) __builtin_prefetch(z_next + k, 0, 2);  // one line per iteration for 64-byte vectors
        const typename S::vec x = student_exponent(S::load(z + k), m, inv_ts);
        const typename S::vec e = cpu::vexp_nonpositive(x);
        S::store(g + k, e);
        vs += e;
        typename S::vec p = S::load(paired_rows[0] + k0 + k);
        for (int j = 1; j < n_paired; ++j) p += S::load(paired_rows[j] + k0 + k);
        vd += vtarget_times_exponent(p, x);
        vp += p;
      }
      T sum = S::sum(vs), d = S::sum(vd), mass = S::sum(vp);
      for (; k < n; ++k) {
        const T x = student_exponent(z[k], m, inv_ts);
        g[k] = std::exp(x);
        sum += g[k];
        T p = paired_rows[0][k0 + k];
        for (int j = 1; j < n_paired; ++j) p += paired_rows[j][k0 + k];
        d += target_times_exponent(p, x);
        mass += p;
      }
      rec[4 * c] = m, rec[4 * c + 1] = sum, rec[4 * c + 2] = d, rec[4 * c + 3] = mass;
    }
    // Row v alone through the forward's merge: stats and target sum at (v, b).
    row_loss += combine_row(rec, int64_t(4), chunks, RecordLayout{1, 0}, a.skip_same_view, false, a.batch, b,
                            RowStats<T>{student_stats + v * a.batch, a.views, a.batch}, target_sum + v * a.batch,
                            RowStats<T>{nullptr, 0, a.batch}, inv_ts, factor);
    const T mx = student_stats[v * a.batch + b], ls = student_stats[(a.views + v) * a.batch + b];
    const T row_mass = target_sum[v * a.batch + b];
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k0 = c * kChunk, n = std::min(kChunk, k_all - k0);
      const T* e = scratch.exps.data() + k0;
      T* g = grow + k0;
      // softmax = e·exp((m_c − M)/τ_s − log Σ); the gradient ΣP·softmax − P, times coef.
      const T scale_c = row_mass * std::exp(student_exponent(rec[4 * c], mx, inv_ts) - ls);
      const auto grad_at = [&](int64_t k) {
        typename S::vec p = S::load(paired_rows[0] + k0 + k);
        for (int j = 1; j < n_paired; ++j) p += S::load(paired_rows[j] + k0 + k);
        return (S::load(e + k) * scale_c - p) * coef;
      };
      const auto grad_scalar = [&](int64_t k) {
        T p = paired_rows[0][k0 + k];
        for (int j = 1; j < n_paired; ++j) p += paired_rows[j][k0 + k];
        return (e[k] * scale_c - p) * coef;
      };
      int64_t k = 0;
      if (stream) {  // plain stores up to the first vector-aligned element, then non-temporal ones
        for (const int64_t head = std::min(n, cpu::elements_to_alignment(g)); k < head; ++k) g[k] = grad_scalar(k);
        for (; k + L <= n; k += L) cpu::stream_store(g + k, grad_at(k));
      } else {
        for (; k + L <= n; k += L) S::store(g + k, grad_at(k));
      }
      for (; k < n; ++k) g[k] = grad_scalar(k);
    }
  }
  return row_loss;
}

template <typename T>
void forward_backward_impl(const Args& a, const T* student, const T* teacher, const T* center, const T* weights,
                           T* loss, T* student_stats, T* target_sum, T* teacher_stats, T* grad, int num_threads) {
  const int64_t grad_bytes = a.views * a.batch * a.classes * int64_t(sizeof(T));
  cpu::advise_huge_pages(grad, grad_bytes);
  const bool stream = grad_bytes >= kStreamBytes;
  std::vector<T> row_loss(size_t(a.batch));
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, a.batch)));
#pragma omp parallel num_threads(threads)
  {
    cpu::FlushDenormals flush;
    FusedScratch<T> scratch(a);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < a.batch; ++b) {
      const T l = fused_sample(a, student, teacher, center, weights, b, student_stats, target_sum, teacher_stats,
                               grad, stream, scratch);
      row_loss[size_t(b)] = weights ? weights[b] * l : l;
      if (stream) cpu::stream_fence();  // the gradient is complete before anyone reads it
    }
  }
  double total = 0;
  for (int64_t b = 0; b < a.batch; ++b) total += double(row_loss[size_t(b)]);
  *loss = T(total * a.scale);
}

template <typename Body>
void dispatch(int dtype, Body&& body) {
  if (dtype == kFloat64)
    body(static_cast<double*>(nullptr));
  else
    body(static_cast<float*>(nullptr));
}

}  // namespace

int64_t workspace_bytes_cpu(int64_t views, int64_t teachers, int64_t batch, int64_t classes, int dtype) {
  check_dtype(dtype, dtype == kFloat32 || dtype == kFloat64, kOp, "student_logits");
  DK_CHECK_ARG(views >= 1 && teachers >= 1 && batch >= 1 && classes >= 1, kOp, "student_logits",
               "needs S, T, B, K >= 1");
  const int64_t elem = dtype == kFloat64 ? 8 : 4;
  return batch * n_chunks(classes) * RecordLayout{views, teachers}.size() * elem;
}

void forward_cpu(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t center, std::uintptr_t weights,
                 int dtype, int64_t views, int64_t teachers, int64_t batch, int64_t classes, bool skip_same_view,
                 bool teacher_logits, double student_temp, double teacher_temp, double scale, std::uintptr_t loss,
                 std::uintptr_t student_stats, std::uintptr_t target_sum, std::uintptr_t teacher_stats,
                 std::uintptr_t workspace, int64_t workspace_bytes, int num_threads) {
  const Args a{views, teachers, batch, classes, skip_same_view, teacher_logits, student_temp, teacher_temp, scale};
  check_args(a, dtype, student, teacher, center);
  DK_CHECK_ARG(teachers <= 64, kOp, "teacher", "may have at most 64 views, got ", teachers);
  check_pointer(as_ptr<void>(loss), kOp, "loss");
  check_pointer(as_ptr<void>(student_stats), kOp, "student_stats");
  check_pointer(as_ptr<void>(target_sum), kOp, "target_sum");
  if (teacher_logits) check_pointer(as_ptr<void>(teacher_stats), kOp, "teacher_stats");
  const int64_t elem = dtype == kFloat64 ? 8 : 4;
  check_workspace(workspace, workspace_bytes, workspace_bytes_cpu(views, teachers, batch, classes, dtype), elem,
                  kOp);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    forward_impl<T>(a, as_ptr<const T>(student), as_ptr<const T>(teacher), as_ptr<const T>(center),
                    as_ptr<const T>(weights), as_ptr<T>(loss), as_ptr<T>(student_stats), as_ptr<T>(target_sum),
                    as_ptr<T>(teacher_stats), as_ptr<T>(workspace), num_threads);
  });
}

// The arguments the gradient entry points (forward+backward, backward) share: one list of checks for both.
static void check_gradient_args(const Args& a, int dtype, std::uintptr_t student, std::uintptr_t teacher,
                                std::uintptr_t center, std::uintptr_t scalar, const char* scalar_name,
                                std::uintptr_t student_stats, std::uintptr_t target_sum, std::uintptr_t teacher_stats,
                                std::uintptr_t grad_student) {
  check_args(a, dtype, student, teacher, center);
  DK_CHECK_ARG(a.teachers <= 64, kOp, "teacher", "may have at most 64 views, got ", a.teachers);
  check_pointer(as_ptr<void>(scalar), kOp, scalar_name);
  check_pointer(as_ptr<void>(student_stats), kOp, "student_stats");
  check_pointer(as_ptr<void>(target_sum), kOp, "target_sum");
  if (a.teacher_logits) check_pointer(as_ptr<void>(teacher_stats), kOp, "teacher_stats");
  check_pointer(as_ptr<void>(grad_student), kOp, "grad_student");
}

void forward_backward_cpu(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t center,
                          std::uintptr_t weights, int dtype, int64_t views, int64_t teachers, int64_t batch,
                          int64_t classes, bool skip_same_view, bool teacher_logits, double student_temp,
                          double teacher_temp, double scale, std::uintptr_t loss, std::uintptr_t student_stats,
                          std::uintptr_t target_sum, std::uintptr_t teacher_stats, std::uintptr_t grad_student,
                          int num_threads) {
  const Args a{views, teachers, batch, classes, skip_same_view, teacher_logits, student_temp, teacher_temp, scale};
  check_gradient_args(a, dtype, student, teacher, center, loss, "loss", student_stats, target_sum, teacher_stats,
                      grad_student);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    forward_backward_impl<T>(a, as_ptr<const T>(student), as_ptr<const T>(teacher), as_ptr<const T>(center),
                             as_ptr<const T>(weights), as_ptr<T>(loss), as_ptr<T>(student_stats),
                             as_ptr<T>(target_sum), as_ptr<T>(teacher_stats), as_ptr<T>(grad_student),
                             num_threads);
  });
}

void backward_cpu(std::uintptr_t grad_loss, std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t center,
                  std::uintptr_t weights, int dtype, int64_t views, int64_t teachers, int64_t batch,
                  int64_t classes, bool skip_same_view, bool teacher_logits, double student_temp,
                  double teacher_temp, double scale, std::uintptr_t student_stats, std::uintptr_t target_sum,
                  std::uintptr_t teacher_stats, std::uintptr_t grad_student, int num_threads) {
  const Args a{views, teachers, batch, classes, skip_same_view, teacher_logits, student_temp, teacher_temp, scale};
  check_gradient_args(a, dtype, student, teacher, center, grad_loss, "grad_loss", student_stats, target_sum,
                      teacher_stats, grad_student);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    backward_impl<T>(a, *as_ptr<const T>(grad_loss), as_ptr<const T>(student), as_ptr<const T>(teacher),
                     as_ptr<const T>(center), as_ptr<const T>(weights), as_ptr<const T>(student_stats),
                     as_ptr<const T>(target_sum), as_ptr<const T>(teacher_stats), as_ptr<T>(grad_student),
                     num_threads);
  });
}

}  // namespace soft_ce
}  // namespace dk
