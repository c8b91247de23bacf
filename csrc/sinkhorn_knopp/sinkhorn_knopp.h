// DINOv2's Sinkhorn-Knopp teacher targets (SPEC §3.3). The single-process CPU kernel exponentiates once relative
// to the column maxima and iterates on scaling vectors (sinkhorn_knopp_cpu.cpp); the stages below and the CUDA
// kernels work in the log domain. With a = z/τ_t the official
// iterations equal P_bk = exp(a_bk + α_k + β_b) where, starting from β = 0, each iteration sets
//   α_k = −LSE_b(a_bk + β_b)   (over the samples of every rank: the "prototype" step)
//   β_b = −LSE_k(a_bk + α_k)   (per sample: the "sample" step)
// The official /ΣQ, /K and /B_g are uniform scalings the next normalisation cancels. Unlike exp(a), these are
// finite for any finite logits. The distributed path calls the three stages from Python with all-reduces
// between them; sinkhorn_knopp_cpu/_cuda run every iteration in one call for a single process.
#pragma once

#include <cstdint>

#include "../common/dk_common.h"
#include "../common/dk_cuda_api.h"

namespace dk {
namespace sinkhorn_knopp {

// ---- CPU: z float32 / float64; α, β, statistics and output in z's dtype ----

// Single process, n_iterations >= 1. Returns the number of non-finite α/β entries (non-finite input).
int64_t forward_cpu(std::uintptr_t z,  // (N, K) dtype
                    int dtype, int64_t n, int64_t k, double teacher_temp, int64_t n_iterations,
                    std::uintptr_t out,  // (N, K) dtype
                    int num_threads);

// Prototype step, local part: max_k = max_b (a_bk + β_b), sumexp_k = Σ_b exp(a_bk + β_b − max_k).
void prototype_stats_cpu(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp,
                         std::uintptr_t beta,    // (N,) dtype
                         std::uintptr_t max_out,  // (K,) dtype
                         std::uintptr_t sumexp_out,  // (K,) dtype
                         int num_threads);
// Sample step: β_b = −LSE_k(a_bk + α_k).
void sample_step_cpu(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp,
                     std::uintptr_t alpha,     // (K,) dtype
                     std::uintptr_t beta_out,  // (N,) dtype
                     int num_threads);
// out_bk = exp(a_bk + α_k + β_b) with β from one more sample step, computed as the row softmax over k of
// a_bk + α_k (sinkhorn_knopp_math.h: rows sum to 1 for any finite input).
void output_cpu(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp, std::uintptr_t alpha,
                std::uintptr_t out, int num_threads);

// ---- CUDA: z float32/float16/bfloat16; α, β, statistics and output float32 ----

int64_t workspace_bytes_cuda(int64_t n, int64_t k);
void forward_cuda(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp, int64_t n_iterations,
                  std::uintptr_t out, std::uintptr_t nonfinite /* () int32 */, std::uintptr_t workspace,
                  int64_t workspace_bytes, int device_index, std::uintptr_t stream);
void prototype_stats_cuda(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp,
                          std::uintptr_t beta, std::uintptr_t max_out, std::uintptr_t sumexp_out, int device_index,
                          std::uintptr_t stream);
void sample_step_cuda(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp, std::uintptr_t alpha,
                      std::uintptr_t beta_out, int device_index, std::uintptr_t stream);
void output_cuda(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp, std::uintptr_t alpha,
                 std::uintptr_t out, int device_index, std::uintptr_t stream);

#ifndef DK_WITH_CUDA
inline int64_t workspace_bytes_cuda(int64_t, int64_t) { cuda::throw_not_compiled("sinkhorn_knopp_cuda"); }
inline void forward_cuda(std::uintptr_t, int, int64_t, int64_t, double, int64_t, std::uintptr_t, std::uintptr_t,
                         std::uintptr_t, int64_t, int, std::uintptr_t) {
  cuda::throw_not_compiled("sinkhorn_knopp_cuda");
}
inline void prototype_stats_cuda(std::uintptr_t, int, int64_t, int64_t, double, std::uintptr_t, std::uintptr_t,
                                 std::uintptr_t, int, std::uintptr_t) {
  cuda::throw_not_compiled("sinkhorn_knopp_prototype_stats_cuda");
}
inline void sample_step_cuda(std::uintptr_t, int, int64_t, int64_t, double, std::uintptr_t, std::uintptr_t, int,
                             std::uintptr_t) {
  cuda::throw_not_compiled("sinkhorn_knopp_sample_step_cuda");
}
inline void output_cuda(std::uintptr_t, int, int64_t, int64_t, double, std::uintptr_t, std::uintptr_t, int,
                        std::uintptr_t) {
  cuda::throw_not_compiled("sinkhorn_knopp_output_cuda");
}
#endif

}  // namespace sinkhorn_knopp
}  // namespace dk
