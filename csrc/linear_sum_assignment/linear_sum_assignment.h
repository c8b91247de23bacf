// Exact batched rectangular linear sum assignment (minimum total cost), scipy.optimize.linear_sum_assignment's
// contract per problem: problem b uses cost[b, :num_rows[b], :num_cols[b]]; it is solved on its transpose when
// it is tall, so the number of augmentations is min(n, m). Method: shortest augmenting paths (Crouse 2016, the
// method scipy uses since 1.4; SPEC §6.3), with dual potentials and path lengths in float64.
//
// Outputs per problem: rows_out[b, :k] ascending and cols_out[b, :k] with k = min(n, m), the rest −1;
// status[b] = 0 solved, 1 infeasible (+inf entries leave no complete assignment), 2 invalid entries
// (NaN or −inf; scipy's "matrix contains invalid numeric entries").
#pragma once

#include <cstdint>

#include "../common/dk_common.h"
#include "../common/dk_cuda_api.h"

namespace dk {
namespace lsa {

enum Status : int { kSolved = 0, kInfeasible = 1, kInvalid = 2 };

// CPU: float32 or float64 costs; problems are spread over OpenMP threads.
void linear_sum_assignment_cpu(std::uintptr_t cost,      // (B, N, M) dtype
                               int dtype, int64_t B, int64_t N, int64_t M,
                               std::uintptr_t num_rows,  // (B,) int64, each in [0, N]
                               std::uintptr_t num_cols,  // (B,) int64, each in [0, M]
                               std::uintptr_t rows_out,  // (B, min(N, M)) int64
                               std::uintptr_t cols_out,  // (B, min(N, M)) int64
                               std::uintptr_t status,    // (B,) int32
                               int num_threads);

// CUDA: float32/float64/float16/bfloat16 costs (converted to float64 on load); one block per problem, all
// problems in one launch. The counts are read on the device and must be in range (the caller checks).
int64_t workspace_bytes_cuda(int64_t B, int64_t N, int64_t M);
void linear_sum_assignment_cuda(std::uintptr_t cost, int dtype, int64_t B, int64_t N, int64_t M,
                                std::uintptr_t num_rows, std::uintptr_t num_cols, std::uintptr_t rows_out,
                                std::uintptr_t cols_out, std::uintptr_t status, std::uintptr_t workspace,
                                int64_t workspace_bytes, int device_index, std::uintptr_t stream);

#ifndef DK_WITH_CUDA
inline int64_t workspace_bytes_cuda(int64_t, int64_t, int64_t) {
  cuda::throw_not_compiled("linear_sum_assignment_cuda");
}
inline void linear_sum_assignment_cuda(std::uintptr_t, int, int64_t, int64_t, int64_t, std::uintptr_t, std::uintptr_t,
                                       std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int,
                                       std::uintptr_t) {
  cuda::throw_not_compiled("linear_sum_assignment_cuda");
}
#endif

inline void check_sizes(const char* op, int64_t B, int64_t N, int64_t M) {
  DK_CHECK_ARG(B >= 0 && N >= 0 && M >= 0, op, "cost", "sizes must be nonnegative, got B=", B, " N=", N, " M=", M);
  DK_CHECK_ARG(N < (int64_t(1) << 31) && M < (int64_t(1) << 31), op, "cost", "has too many rows or columns");
}

}  // namespace lsa
}  // namespace dk
