// KoLeo regulariser (DINOv2, SPEC §3.5) and the inner-product nearest-neighbour search it is built on.
//
// Every entry point takes addresses of contiguous row-major buffers allocated by the caller, sizes and a dtype
// code, validates them and throws dk::ArgumentError / dk::CudaError. Accumulation type ("acc"): float64 for
// float64 input, float32 otherwise.
#pragma once

#include <cstdint>

#include "../common/dk_common.h"
#include "../common/dk_cuda_api.h"

namespace dk {
namespace koleo {

// ---- CPU (float32, float64) ----

// Bytes of scratch koleo_forward_cpu / nearest_neighbors_cpu need: the candidate rows packed into panels.
int64_t workspace_bytes_cpu(int64_t n_candidates, int64_t dim, int dtype);

// loss = -mean_i log(||x̂_i - x̂_nn(i) + 1e-8|| + eps), x̂ = x / max(||x||, eps), nn(i) = argmax_{j != i} x̂_i·x̂_j.
// Returns the number of non-finite entries of x; when it is > 0 the search is skipped and loss is NaN.
int64_t koleo_forward_cpu(std::uintptr_t x,         // (n, dim) dtype
                          int dtype, int64_t n, int64_t dim, double eps,
                          std::uintptr_t loss,      // () dtype
                          std::uintptr_t nn_index,  // (n,) int64
                          std::uintptr_t norms,     // (n,) dtype: max(||x_i||, eps)
                          std::uintptr_t dists,     // (n,) dtype: ||x̂_i - x̂_nn(i) + 1e-8||
                          std::uintptr_t workspace, int64_t workspace_bytes, int num_threads);

void koleo_backward_cpu(std::uintptr_t grad_loss,  // () dtype
                        std::uintptr_t x,          // (n, dim) dtype
                        int dtype, int64_t n, int64_t dim, double eps,
                        std::uintptr_t nn_index,   // (n,) int64, from the forward
                        std::uintptr_t norms,      // (n,) dtype, from the forward
                        std::uintptr_t dists,      // (n,) dtype, from the forward
                        std::uintptr_t grad_x,     // (n, dim) dtype, written
                        int num_threads);

// For each query row x_i: the candidate y_j with the largest inner product (ties: smallest j), skipping j == i
// when exclude_self. y == x (same address and n == m) searches x against itself. Returns the number of
// non-finite entries of x and y (outputs are then unspecified but in range).
int64_t nearest_neighbors_cpu(std::uintptr_t x,  // (n, dim) dtype
                              std::uintptr_t y,  // (m, dim) dtype
                              int dtype, int64_t n, int64_t m, int64_t dim, bool exclude_self,
                              std::uintptr_t out_sim,  // (n,) dtype
                              std::uintptr_t out_idx,  // (n,) int64
                              std::uintptr_t workspace, int64_t workspace_bytes, int num_threads);

// ---- CUDA (float32, float16, bfloat16 storage; float32 arithmetic) ----

int64_t koleo_forward_workspace_bytes_cuda(int64_t n, int64_t dim, int device_index);
int64_t nearest_neighbors_workspace_bytes_cuda(int64_t n, int64_t m, int64_t dim, int device_index);

// As the CPU version; loss, norms and dists are float32. The non-finite count is written to the device
// int32 `nonfinite` (the caller decides whether to synchronise on it); loss is NaN when it is > 0.
void koleo_forward_cuda(std::uintptr_t x, int dtype, int64_t n, int64_t dim, double eps,
                        std::uintptr_t loss,       // () float32
                        std::uintptr_t nn_index,   // (n,) int64
                        std::uintptr_t norms,      // (n,) float32
                        std::uintptr_t dists,      // (n,) float32
                        std::uintptr_t nonfinite,  // () int32
                        std::uintptr_t workspace, int64_t workspace_bytes, int device_index,
                        std::uintptr_t stream);

void koleo_backward_cuda(std::uintptr_t grad_loss,  // () float32
                         std::uintptr_t x, int dtype, int64_t n, int64_t dim, double eps,
                         std::uintptr_t nn_index, std::uintptr_t norms, std::uintptr_t dists,
                         std::uintptr_t grad_x,  // (n, dim) dtype
                         int device_index, std::uintptr_t stream);

void nearest_neighbors_cuda(std::uintptr_t x, std::uintptr_t y, int dtype, int64_t n, int64_t m, int64_t dim,
                            bool exclude_self,
                            std::uintptr_t out_sim,    // (n,) float32
                            std::uintptr_t out_idx,    // (n,) int64
                            std::uintptr_t nonfinite,  // () int32
                            std::uintptr_t workspace, int64_t workspace_bytes, int device_index,
                            std::uintptr_t stream);

#ifndef DK_WITH_CUDA
// CPU-only build: the CUDA entry points exist and raise dk::CudaError.
inline int64_t koleo_forward_workspace_bytes_cuda(int64_t, int64_t, int) {
  cuda::throw_not_compiled("koleo_forward_cuda");
}
inline int64_t nearest_neighbors_workspace_bytes_cuda(int64_t, int64_t, int64_t, int) {
  cuda::throw_not_compiled("nearest_neighbors_cuda");
}
inline void koleo_forward_cuda(std::uintptr_t, int, int64_t, int64_t, double, std::uintptr_t, std::uintptr_t,
                               std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int,
                               std::uintptr_t) {
  cuda::throw_not_compiled("koleo_forward_cuda");
}
inline void koleo_backward_cuda(std::uintptr_t, std::uintptr_t, int, int64_t, int64_t, double, std::uintptr_t,
                                std::uintptr_t, std::uintptr_t, std::uintptr_t, int, std::uintptr_t) {
  cuda::throw_not_compiled("koleo_backward_cuda");
}
inline void nearest_neighbors_cuda(std::uintptr_t, std::uintptr_t, int, int64_t, int64_t, int64_t, bool,
                                   std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int,
                                   std::uintptr_t) {
  cuda::throw_not_compiled("nearest_neighbors_cuda");
}
#endif

}  // namespace koleo
}  // namespace dk
