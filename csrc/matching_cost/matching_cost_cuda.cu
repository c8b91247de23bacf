// Matching cost on CUDA: one block per (b, q) row. The block evaluates the focal (pos − neg) terms of the row's
// logits chunk by chunk into shared memory; warp w owns targets g ≡ w (mod warps) and accumulates its dot
// products in the output row itself (only this block writes it, and each g always has the same owner, so no
// races). A last pass per target adds the box terms and the 1/Σm normalisation.
#include "../common/dk_cuda.cuh"
#include "matching_cost.h"
#include "matching_cost_math.h"

namespace dk {
namespace matching_cost {
namespace {

constexpr const char* kOp = "matching_cost";
constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int64_t kChunk = 2048;  // tokens per chunk: 8 KB of shared memory

struct Params {
  int64_t Q, T, G;
  float w_class, w_bbox, w_giou, alpha, gamma, pad;
};

template <typename TL>
__global__ void __launch_bounds__(kThreads)
    matching_cost_kernel(Params p, const TL* __restrict__ logits,   // (B, Q, T)
                         const float* __restrict__ pred_boxes,      // (B, Q, 4)
                         const float* __restrict__ tgt_boxes,       // (B, G, 4)
                         const int64_t* __restrict__ counts,        // (B,)
                         const float* __restrict__ map,             // (B, G, T)
                         float* __restrict__ out) {                 // (B, Q, G)
  __shared__ float d[kChunk];
  const int64_t row = blockIdx.x, b = row / p.Q;
  const int64_t n = counts[b];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const TL* z = logits + row * p.T;
  const float* mb = map + b * p.G * p.T;
  float* o = out + row * p.G;
  for (int64_t t0 = 0; t0 < p.T; t0 += kChunk) {
    const int64_t width = min(kChunk, p.T - t0);
    __syncthreads();  // the previous chunk's readers are done
    for (int64_t k = threadIdx.x; k < width; k += kThreads)
      d[k] = focal_pos_minus_neg<float>(to_float(z[t0 + k]), p.alpha, p.gamma);
    __syncthreads();
    for (int64_t g = warp; g < n; g += kWarps) {
      const float* m = mb + g * p.T + t0;
      float acc = 0.f;
      for (int64_t k = lane; k < width; k += 32) acc += d[k] * m[k];
      acc = warp_sum(acc);
      if (lane == 0) o[g] = (t0 == 0 ? 0.f : o[g]) + acc;
    }
  }
  for (int64_t g = warp; g < n; g += kWarps) {
    const float* m = mb + g * p.T;
    float sum = 0.f;
    for (int64_t t = lane; t < p.T; t += 32) sum += m[t];
    sum = warp_sum(sum);
    if (lane == 0) {
      float pb[4], tb[4];
      for (int c = 0; c < 4; ++c) pb[c] = pred_boxes[row * 4 + c], tb[c] = tgt_boxes[(b * p.G + g) * 4 + c];
      float l1, giou;
      box_costs<float>(pb, tb, l1, giou);
      o[g] = p.w_bbox * l1 + p.w_class * safe_div(o[g], sum) - p.w_giou * giou;
    }
  }
  for (int64_t g = n + threadIdx.x; g < p.G; g += kThreads) o[g] = p.pad;
}

}  // namespace

void matching_cost_cuda(std::uintptr_t pred_logits, std::uintptr_t pred_boxes, std::uintptr_t tgt_boxes,
                        std::uintptr_t tgt_counts, std::uintptr_t positive_map, int dtype, int64_t B, int64_t Q,
                        int64_t T, int64_t G, double w_class, double w_bbox, double w_giou, double alpha,
                        double gamma, double pad_value, std::uintptr_t out, int device_index,
                        std::uintptr_t stream) {
  check_sizes(kOp, B, Q, T, G, alpha, gamma);
  cuda::prepare_device(kOp, device_index);
  if (B * Q == 0 || G == 0) return;
  for (auto [ptr, name] : {std::pair{pred_logits, "pred_logits"}, {pred_boxes, "pred_boxes"},
                           {tgt_counts, "tgt_counts"}, {out, "out"}, {tgt_boxes, "tgt_boxes"},
                           {positive_map, "positive_map"}})
    check_pointer(as_ptr<void>(ptr), kOp, name);
  DK_CHECK_ARG(B * Q < (int64_t(1) << 31), kOp, "pred_logits", "has too many rows B·Q=", B * Q);
  const Params p{Q, T, G, float(w_class), float(w_bbox), float(w_giou), float(alpha), float(gamma), float(pad_value)};
  dispatch_cuda_float_types(dtype, kOp, "pred_logits", [&](auto* tag) {
    using TL = std::remove_pointer_t<decltype(tag)>;
    matching_cost_kernel<TL><<<unsigned(B * Q), kThreads, 0, cuda::as_stream(stream)>>>(
        p, as_ptr<const TL>(pred_logits), as_ptr<const float>(pred_boxes), as_ptr<const float>(tgt_boxes),
        as_ptr<const int64_t>(tgt_counts), as_ptr<const float>(positive_map), as_ptr<float>(out));
  });
  cuda::check_launch(kOp);
}

}  // namespace matching_cost
}  // namespace dk
