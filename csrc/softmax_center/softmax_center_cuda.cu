// CUDA softmax_center (math in softmax_center_math.h). A row of at most kChunk columns is one block: pass 1 folds
// d = z/2 − c/2 into per-thread online (max, Σexp((d − max)·2/τ)) pairs merged over the block; pass 2 (the row
// is now in L2) writes exp((d − m)·2/τ)/Σ. Longer rows
// are split over several blocks, since one block per row left most SMs idle at DINO's shapes (N = 64 rows of
// K = 65,536 on 132 SMs ran at 5 % of copy bandwidth): a stats kernel writes each chunk's (max, Σexp) to the
// workspace, then every block of the row merges its row's pairs (in chunk order, so deterministic) and writes its
// chunk. The column sum is its own kernel: one thread per column walks the rows in order (deterministic,
// coalesced across the warp).
#include "../common/dk_cuda.cuh"
#include "softmax_center.h"
#include "softmax_center_math.h"

namespace dk {
namespace softmax_center {
namespace {

constexpr const char* kOp = "softmax_center";
constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    softmax_center_kernel(const T* __restrict__ z,            // (N, K)
                          const float* __restrict__ center,   // (K,)
                          int64_t k, float two_inv_temp,
                          float* __restrict__ out,            // (N, K)
                          int* __restrict__ nonfinite) {
  __shared__ float scratch[64];
  const T* x = z + int64_t(blockIdx.x) * k;
  float* y = out + int64_t(blockIdx.x) * k;
  float m = -INFINITY, s = 0.f;
  for (int64_t j = threadIdx.x; j < k; j += kThreads)
    online_add(m, s, half_centered(to_float(x[j]), center[j]), two_inv_temp);
  block_merge_max_sum(m, s, scratch, two_inv_temp);
  if (threadIdx.x == 0 && !row_ok(m, s)) atomicAdd(nonfinite, 1);
  const float inv_s = 1.f / s;
  for (int64_t j = threadIdx.x; j < k; j += kThreads)
    y[j] = probability(half_centered(to_float(x[j]), center[j]), m, two_inv_temp, inv_s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_stats_kernel(const T* __restrict__ z,            // (N, K)
                       const float* __restrict__ center,   // (K,)
                       int64_t k, float two_inv_temp,
                       float2* __restrict__ stats) {       // (N, chunks): (max, Σexp) of each chunk
  __shared__ float scratch[64];
  // blockIdx.x = row (up to 2^31 - 1), blockIdx.y = chunk.
  const int64_t begin = int64_t(blockIdx.y) * kChunk, end = begin + kChunk < k ? begin + kChunk : k;
  const T* x = z + int64_t(blockIdx.x) * k;
  float m = -INFINITY, s = 0.f;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads)
    online_add(m, s, half_centered(to_float(x[j]), center[j]), two_inv_temp);
  block_merge_max_sum(m, s, scratch, two_inv_temp);
  if (threadIdx.x == 0) stats[int64_t(blockIdx.x) * gridDim.y + blockIdx.y] = make_float2(m, s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_write_kernel(const T* __restrict__ z,             // (N, K)
                       const float* __restrict__ center,    // (K,)
                       int64_t k, float two_inv_temp,
                       const float2* __restrict__ stats,    // (N, chunks)
                       float* __restrict__ out,             // (N, K)
                       int* __restrict__ nonfinite) {
  __shared__ float scratch[64];
  const float2* row_stats = stats + int64_t(blockIdx.x) * gridDim.y;
  // Thread t merges chunks t, t + kThreads, ... in order; the block merge is a fixed tree: same LSE in every block.
  float m = -INFINITY, s = 0.f;
  for (int c = threadIdx.x; c < int(gridDim.y); c += kThreads)
    merge_max_sum(m, s, row_stats[c].x, row_stats[c].y, two_inv_temp);
  block_merge_max_sum(m, s, scratch, two_inv_temp);
  if (blockIdx.y == 0 && threadIdx.x == 0 && !row_ok(m, s)) atomicAdd(nonfinite, 1);
  const float inv_s = 1.f / s;
  const int64_t begin = int64_t(blockIdx.y) * kChunk, end = begin + kChunk < k ? begin + kChunk : k;
  const T* x = z + int64_t(blockIdx.x) * k;
  float* y = out + int64_t(blockIdx.x) * k;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads)
    y[j] = probability(half_centered(to_float(x[j]), center[j]), m, two_inv_temp, inv_s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(const T* __restrict__ z, int64_t n, int64_t k, float* __restrict__ out) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= k) return;
  double acc = 0;
  for (int64_t row = 0; row < n; ++row) acc += double(to_float(z[row * k + j]));
  out[j] = float(acc);
}

void check_common(std::uintptr_t z, int64_t n, int64_t k) {
  DK_CHECK_ARG(n >= 0 && k >= 1, kOp, "teacher_logits", "needs N >= 0 rows and K >= 1 columns, got N=", n,
               " K=", k);
  DK_CHECK_ARG(n <= 0x7fffffff, kOp, "teacher_logits", "has more than 2^31 - 1 rows: ", n);
  if (n > 0) check_pointer(as_ptr<void>(z), kOp, "teacher_logits");
}

}  // namespace

void forward_cuda(std::uintptr_t z, std::uintptr_t center, int dtype, int64_t n, int64_t k, double teacher_temp,
                  std::uintptr_t out, std::uintptr_t nonfinite, std::uintptr_t workspace, int64_t workspace_bytes,
                  int device_index, std::uintptr_t stream) {
  check_common(z, n, k);
  if (n > 0) check_pointer(as_ptr<void>(out), kOp, "out");
  check_pointer(as_ptr<void>(center), kOp, "center");
  check_pointer(as_ptr<void>(nonfinite), kOp, "nonfinite");
  DK_CHECK_ARG(std::isfinite(teacher_temp) && teacher_temp > 0, kOp, "teacher_temp",
               "must be positive and finite, got ", teacher_temp);
  const float two_inv_temp = temperature_factor<float>(teacher_temp);
  DK_CHECK_ARG(std::isfinite(two_inv_temp), kOp, "teacher_temp",
               "is too small for float32 (2/teacher_temp overflows), got ", teacher_temp);
  cuda::prepare_device(kOp, device_index);
  cudaStream_t s = cuda::as_stream(stream);
  cuda::check(cudaMemsetAsync(as_ptr<int>(nonfinite), 0, sizeof(int), s), kOp, "cudaMemsetAsync");
  if (n == 0) return;
  const int64_t chunks = (k + kChunk - 1) / kChunk;
  DK_CHECK_ARG(chunks <= 65535, kOp, "teacher_logits", "has more than 65,535 x ", kChunk, " columns: ", k);
  if (chunks > 1) {
    DK_CHECK_ARG(workspace_bytes >= workspace_bytes_cuda(n, k), kOp, "workspace", "holds ", workspace_bytes,
                 " bytes, needs ", workspace_bytes_cuda(n, k));
    check_pointer(as_ptr<void>(workspace), kOp, "workspace");
  }
  dispatch_cuda_float_types(dtype, kOp, "teacher_logits", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (chunks == 1) {
      softmax_center_kernel<T><<<unsigned(n), kThreads, 0, s>>>(as_ptr<const T>(z), as_ptr<const float>(center), k,
                                                                two_inv_temp, as_ptr<float>(out),
                                                                as_ptr<int>(nonfinite));
      return;
    }
    const dim3 grid{unsigned(n), unsigned(chunks)};
    chunk_stats_kernel<T><<<grid, kThreads, 0, s>>>(as_ptr<const T>(z), as_ptr<const float>(center), k, two_inv_temp,
                                                    as_ptr<float2>(workspace));
    chunk_write_kernel<T><<<grid, kThreads, 0, s>>>(as_ptr<const T>(z), as_ptr<const float>(center), k,
                                                    two_inv_temp,
                                                    as_ptr<const float2>(workspace), as_ptr<float>(out),
                                                    as_ptr<int>(nonfinite));
  });
  cuda::check_launch(kOp);
}

void column_sum_cuda(std::uintptr_t z, int dtype, int64_t n, int64_t k, std::uintptr_t out, int device_index,
                     std::uintptr_t stream) {
  check_common(z, n, k);
  check_pointer(as_ptr<void>(out), kOp, "out");
  cuda::prepare_device(kOp, device_index);
  const unsigned blocks = unsigned((k + kThreads - 1) / kThreads);
  dispatch_cuda_float_types(dtype, kOp, "teacher_logits", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    column_sum_kernel<T><<<blocks, kThreads, 0, cuda::as_stream(stream)>>>(as_ptr<const T>(z), n, k,
                                                                          as_ptr<float>(out));
  });
  cuda::check_launch(kOp);
}

}  // namespace softmax_center
}  // namespace dk
