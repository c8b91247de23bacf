// Teacher targets softmax((z − center)/τ_t) in one pass per row (fused centering and sharpening), and the raw
// column sum Σ_n z_n that the DINO / iBOT center update needs (SPEC §2.1, §3.2, §3.4).
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/dk_common.h"
#include "../common/dk_cuda_api.h"

namespace dk {
namespace softmax_center {

// CPU: float32 / float64; out has z's dtype. Returns the number of rows whose statistics are not finite (a NaN
// or +inf logit or center entry); those rows are NaN. With column_sum != 0 also writes Σ_n z_n from the same
// pass (deterministic: fixed row groups, partials added in order in double).
int64_t workspace_bytes_cpu(int64_t n, int64_t k, int dtype, bool with_sum);
int64_t forward_cpu(std::uintptr_t z,           // (N, K) dtype
                    std::uintptr_t center,      // (K,) dtype
                    int dtype, int64_t n, int64_t k, double teacher_temp,
                    std::uintptr_t out,         // (N, K) dtype
                    std::uintptr_t column_sum,  // (K,) dtype, or 0
                    std::uintptr_t workspace, int64_t workspace_bytes, int num_threads);

// out_k = Σ_n z_nk, summed in float64 in row order (deterministic for any thread count).
void column_sum_cpu(std::uintptr_t z,    // (N, K) dtype
                    int dtype, int64_t n, int64_t k,
                    std::uintptr_t out,  // (K,) dtype
                    int num_threads);

// CUDA (see softmax_center_cuda.cu): row statistics per chunk of kChunk columns; the write pass takes rows in
// groups, and with the column sum each group leaves a float64 partial sum per column (at most kMaxSumGroups of
// them, so they stay small next to z).
constexpr int64_t kChunk = 4096, kTileRows = 8, kMaxSumGroups = 8;

// Rows per group of the write pass: one tile of 8, or with the column sum ⌈N / min(⌈N/8⌉, 8)⌉.
inline int64_t rows_per_group_cuda(int64_t n, bool with_sum) {
  if (!with_sum || n <= 0) return kTileRows;
  const int64_t groups = std::min<int64_t>((n + kTileRows - 1) / kTileRows, kMaxSumGroups);
  return (n + groups - 1) / groups;
}

inline int64_t row_groups_cuda(int64_t n, bool with_sum) {
  const int64_t rows = rows_per_group_cuda(n, with_sum);
  return (n + rows - 1) / rows;
}

// Bytes of device workspace forward_cuda needs: a (max, Σexp) float pair per chunk of each row, then with the
// column sum a float64 partial per row group and column.
inline int64_t workspace_bytes_cuda(int64_t n, int64_t k, bool with_sum) {
  if (n <= 0 || k <= 0) return 0;
  const int64_t chunks = (k + kChunk - 1) / kChunk;
  return n * chunks * 2 * int64_t(sizeof(float)) + (with_sum ? row_groups_cuda(n, true) * k * 8 : 0);
}

// CUDA: z float32/float16/bfloat16, center float32, out float32. The count of non-finite rows is added to the
// device int32 `nonfinite` (zeroed here). With column_sum != 0 also writes Σ_n z_n from the same pass
// (deterministic: fixed row groups, partials added in group order in float64; zeros for N = 0).
void forward_cuda(std::uintptr_t z, std::uintptr_t center, int dtype, int64_t n, int64_t k, double teacher_temp,
                  std::uintptr_t out,         // (N, K) float32
                  std::uintptr_t column_sum,  // (K,) float32, or 0
                  std::uintptr_t nonfinite,
                  std::uintptr_t workspace, int64_t workspace_bytes,  // workspace_bytes_cuda(n, k, with_sum), 8-aligned
                  int device_index, std::uintptr_t stream);
void column_sum_cuda(std::uintptr_t z, int dtype, int64_t n, int64_t k,
                     std::uintptr_t out,  // (K,) float32
                     int device_index, std::uintptr_t stream);

#ifndef DK_WITH_CUDA
inline void forward_cuda(std::uintptr_t, std::uintptr_t, int, int64_t, int64_t, double, std::uintptr_t,
                         std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int, std::uintptr_t) {
  cuda::throw_not_compiled("softmax_center_cuda");
}
inline void column_sum_cuda(std::uintptr_t, int, int64_t, int64_t, std::uintptr_t, int, std::uintptr_t) {
  cuda::throw_not_compiled("softmax_center_column_sum_cuda");
}
#endif

}  // namespace softmax_center
}  // namespace dk
