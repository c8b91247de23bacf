// Multi-scale deformable attention (Deformable-DETR / Grounding DINO), SPEC §4.
//
// value (N, S, M, D): level l occupies rows [start_l, start_l + H_l·W_l), row-major h·W_l + w.
// sampling_locations (N, Lq, M, L, P, 2) normalised (x, y); attention_weights (N, Lq, M, L, P).
// out[n, q, m, c] = Σ_{l,p} a · bilinear(value[n, level l, m, c], x·W_l − 0.5, y·H_l − 0.5), zero padding; a sample
// counts only when −1 < y_px < H_l and −1 < x_px < W_l (the official kernel's rule, SPEC §4.2).
//
// spatial_shapes (L, 2) and level_start_index (L,) are int64 in HOST memory for every entry point (the CUDA ones
// too: they travel to the GPU inside the kernel parameters). Entry points validate everything they receive and
// throw dk::ArgumentError / dk::CudaError.
#pragma once

#include <cstdint>

#include "../common/dk_common.h"
#include "../common/dk_cuda_api.h"

namespace dk {
namespace ms_deform_attn {

constexpr int kMaxLevels = 8;
constexpr int kMaxPoints = 16;

// ---- CPU (value, locations, weights, output: one dtype, float32 or float64) ----

// Returns true when a location, a weight or an output is NaN/inf (for DINOKERNELS_CHECK_FINITE).
bool forward_cpu(std::uintptr_t value,               // (N, S, M, D) dtype
                 std::uintptr_t spatial_shapes,      // (L, 2) int64, host
                 std::uintptr_t level_start_index,   // (L,) int64, host
                 std::uintptr_t sampling_locations,  // (N, Lq, M, L, P, 2) dtype
                 std::uintptr_t attention_weights,   // (N, Lq, M, L, P) dtype
                 int dtype, int64_t batch, int64_t spatial, int64_t heads, int64_t channels, int64_t queries,
                 int64_t levels, int64_t points,
                 std::uintptr_t output,  // (N, Lq, M, D) dtype, written
                 int num_threads);

// Bytes of scratch backward_cpu needs: head-major copies of value and grad_value (M > 1), plus partial grad_value
// copies when N·M heads cannot keep the threads busy.
int64_t backward_workspace_bytes_cpu(int64_t batch, int64_t spatial, int64_t heads, int64_t channels,
                                     int64_t queries, int64_t levels, int64_t points, int dtype, int num_threads);

void backward_cpu(std::uintptr_t grad_output,  // (N, Lq, M, D) dtype
                  std::uintptr_t value, std::uintptr_t spatial_shapes, std::uintptr_t level_start_index,
                  std::uintptr_t sampling_locations, std::uintptr_t attention_weights, int dtype, int64_t batch,
                  int64_t spatial, int64_t heads, int64_t channels, int64_t queries, int64_t levels,
                  int64_t points,
                  std::uintptr_t grad_value,      // (N, S, M, D) dtype, written (zeroed here)
                  std::uintptr_t grad_locations,  // (N, Lq, M, L, P, 2) dtype, written
                  std::uintptr_t grad_weights,    // (N, Lq, M, L, P) dtype, written
                  std::uintptr_t workspace, int64_t workspace_bytes, int num_threads);

// ---- CUDA (value and output float32/float16/bfloat16; locations and weights float32 or value's dtype; all
// coordinates and sums in float32) ----

void forward_cuda(std::uintptr_t value, std::uintptr_t spatial_shapes, std::uintptr_t level_start_index,
                  std::uintptr_t sampling_locations, std::uintptr_t attention_weights, int value_dtype,
                  int location_dtype, int64_t batch, int64_t spatial, int64_t heads, int64_t channels,
                  int64_t queries, int64_t levels, int64_t points, std::uintptr_t output, int device_index,
                  std::uintptr_t stream);

// grad_value_f32 (N, S, M, D) float32 must be zero on entry (it is accumulated with atomics; the caller casts it to
// value's dtype). grad_locations / grad_weights have the locations' dtype.
void backward_cuda(std::uintptr_t grad_output, std::uintptr_t value, std::uintptr_t spatial_shapes,
                   std::uintptr_t level_start_index, std::uintptr_t sampling_locations,
                   std::uintptr_t attention_weights, int value_dtype, int location_dtype, int64_t batch,
                   int64_t spatial, int64_t heads, int64_t channels, int64_t queries, int64_t levels,
                   int64_t points, std::uintptr_t grad_value_f32, std::uintptr_t grad_locations,
                   std::uintptr_t grad_weights, int device_index, std::uintptr_t stream);

#ifndef DK_WITH_CUDA
inline void forward_cuda(std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int, int,
                         int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, std::uintptr_t, int,
                         std::uintptr_t) {
  cuda::throw_not_compiled("ms_deform_attn_forward_cuda");
}
inline void backward_cuda(std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                          std::uintptr_t, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                          std::uintptr_t, std::uintptr_t, std::uintptr_t, int, std::uintptr_t) {
  cuda::throw_not_compiled("ms_deform_attn_backward_cuda");
}
#endif

}  // namespace ms_deform_attn
}  // namespace dk
