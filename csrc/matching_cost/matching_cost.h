// Hungarian matching cost of DETR-family detectors with Grounding DINO's token-level focal class cost
// (SPEC §6.2, Open-GroundingDino / HF variant), fused in one kernel:
//
//   C[b, q, g] = w_class · Σ_t (pos − neg)[b, q, t] · m[b, g, t] / Σ_t m[b, g, t]
//              + w_bbox  · ‖pred_box[b, q] − tgt_box[b, g]‖₁            (cxcywh)
//              − w_giou  · GIoU(xyxy(pred_box[b, q]), xyxy(tgt_box[b, g]))
//
// for g < tgt_counts[b]; columns g ≥ tgt_counts[b] hold `pad_value`. A target whose map sums to 0 has class
// cost 0. Math shared by both devices is in matching_cost_math.h.
#pragma once

#include <cstdint>

#include "../common/dk_common.h"
#include "../common/dk_cuda_api.h"

namespace dk {
namespace matching_cost {

// CPU: float32 or float64 for every floating input and the output (one dtype), computed in that dtype.
void matching_cost_cpu(std::uintptr_t pred_logits,  // (B, Q, T) dtype
                       std::uintptr_t pred_boxes,   // (B, Q, 4) dtype, cxcywh
                       std::uintptr_t tgt_boxes,    // (B, G, 4) dtype, cxcywh, rows ≥ tgt_counts[b] ignored
                       std::uintptr_t tgt_counts,   // (B,) int64, each in [0, G]
                       std::uintptr_t positive_map, // (B, G, T) dtype, nonnegative token weights
                       int dtype, int64_t B, int64_t Q, int64_t T, int64_t G, double w_class, double w_bbox,
                       double w_giou, double alpha, double gamma, double pad_value,
                       std::uintptr_t out,          // (B, Q, G) dtype
                       int num_threads);

// CUDA: pred_logits float32/float16/bfloat16 (dtype), everything else float32, output float32. The counts are
// read on the device (not validated there: the caller checks them).
void matching_cost_cuda(std::uintptr_t pred_logits, std::uintptr_t pred_boxes, std::uintptr_t tgt_boxes,
                        std::uintptr_t tgt_counts, std::uintptr_t positive_map, int dtype, int64_t B, int64_t Q,
                        int64_t T, int64_t G, double w_class, double w_bbox, double w_giou, double alpha,
                        double gamma, double pad_value, std::uintptr_t out, int device_index,
                        std::uintptr_t stream);

#ifndef DK_WITH_CUDA
inline void matching_cost_cuda(std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int,
                               int64_t, int64_t, int64_t, int64_t, double, double, double, double, double, double,
                               std::uintptr_t, int, std::uintptr_t) {
  cuda::throw_not_compiled("matching_cost_cuda");
}
#endif

// Shape checks shared by both entry points.
inline void check_sizes(const char* op, int64_t B, int64_t Q, int64_t T, int64_t G, double alpha, double gamma) {
  DK_CHECK_ARG(B >= 0 && Q >= 0 && G >= 0, op, "pred_logits", "sizes must be nonnegative, got B=", B, " Q=", Q,
               " G=", G);
  DK_CHECK_ARG(T >= 1, op, "pred_logits", "needs at least one token, got T=", T);
  DK_CHECK_ARG(alpha >= 0 && alpha <= 1, op, "alpha", "must be in [0, 1], got ", alpha);
  DK_CHECK_ARG(gamma >= 0 && gamma < 1e6, op, "gamma", "must be nonnegative and finite, got ", gamma);
}

}  // namespace matching_cost
}  // namespace dk
