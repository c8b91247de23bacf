// CUDA softmax_center: one block per row. Pass 1 folds a = (z − c)/τ into per-thread online (max, Σexp) pairs
// merged over the block; pass 2 (the row is now in L2) writes exp(a − LSE). The column sum is its own kernel:
// one thread per column walks the rows in order (deterministic, coalesced across the warp).
#include "../common/dk_cuda.cuh"
#include "softmax_center.h"

namespace dk {
namespace softmax_center {
namespace {

constexpr const char* kOp = "softmax_center";
constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    softmax_center_kernel(const T* __restrict__ z,            // (N, K)
                          const float* __restrict__ center,   // (K,)
                          int64_t k, float inv_temp,
                          float* __restrict__ out,            // (N, K)
                          int* __restrict__ nonfinite) {
  __shared__ float scratch[64];
  const T* x = z + int64_t(blockIdx.x) * k;
  float* y = out + int64_t(blockIdx.x) * k;
  float m = -INFINITY, s = 0.f;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) online_add(m, s, __fmul_rn(to_float(x[j]) - center[j], inv_temp));
  block_merge_max_sum(m, s, scratch);
  const float lse = m + logf(s);
  if (threadIdx.x == 0 && !isfinite(lse)) atomicAdd(nonfinite, 1);
  for (int64_t j = threadIdx.x; j < k; j += kThreads) y[j] = expf(__fmul_rn(to_float(x[j]) - center[j], inv_temp) - lse);
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
                  std::uintptr_t out, std::uintptr_t nonfinite, int device_index, std::uintptr_t stream) {
  check_common(z, n, k);
  if (n > 0) check_pointer(as_ptr<void>(out), kOp, "out");
  check_pointer(as_ptr<void>(center), kOp, "center");
  check_pointer(as_ptr<void>(nonfinite), kOp, "nonfinite");
  DK_CHECK_ARG(std::isfinite(teacher_temp) && teacher_temp > 0, kOp, "teacher_temp",
               "must be positive and finite, got ", teacher_temp);
  cuda::prepare_device(kOp, device_index);
  cudaStream_t s = cuda::as_stream(stream);
  cuda::check(cudaMemsetAsync(as_ptr<int>(nonfinite), 0, sizeof(int), s), kOp, "cudaMemsetAsync");
  if (n == 0) return;
  dispatch_cuda_float_types(dtype, kOp, "teacher_logits", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    softmax_center_kernel<T><<<unsigned(n), kThreads, 0, s>>>(as_ptr<const T>(z), as_ptr<const float>(center), k,
                                                              float(1.0 / teacher_temp), as_ptr<float>(out),
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
