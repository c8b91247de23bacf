// CUDA Sinkhorn-Knopp in the log domain (see sinkhorn_knopp.h). Prototype step: blocks of 32 columns × 8 row
// groups; each thread folds its rows into an online (max, Σexp) pair, the 8 pairs of a column merge in shared
// memory (fixed order: deterministic). Sample step: one block per row. Output: one block per row, normalising the
// row by its own sum. The row kernels read packs of 4 columns (one 16-byte load of float32) where aligned.
#include "../common/dk_cuda.cuh"
#include "sinkhorn_knopp.h"
#include "sinkhorn_knopp_math.h"

namespace dk {
namespace sinkhorn_knopp {
namespace {

constexpr const char* kOp = "sinkhorn_knopp";
constexpr int kColumns = 32, kRowGroups = 8, kRowThreads = 256;

// alpha != nullptr: write α = −LSE directly (single process); else the local (max, Σexp) for the all-reduce.
template <typename T>
__global__ void __launch_bounds__(kColumns * kRowGroups)
    prototype_kernel(const T* __restrict__ z,        // (N, K)
                     int64_t n, int64_t k, float inv_temp,
                     const float* __restrict__ beta,  // (N,)
                     float* __restrict__ alpha,       // (K,) or nullptr
                     float* __restrict__ max_out,     // (K,) or nullptr
                     float* __restrict__ sum_out) {   // (K,) or nullptr
  __shared__ float sm[kRowGroups][kColumns], ss[kRowGroups][kColumns];
  const int64_t j = int64_t(blockIdx.x) * kColumns + threadIdx.x;
  float m = -INFINITY, s = 0.f;
  if (j < k)
    for (int64_t row = threadIdx.y; row < n; row += kRowGroups)
      online_add(m, s, __fmul_rn(to_float(z[row * k + j]), inv_temp) + beta[row]);
  sm[threadIdx.y][threadIdx.x] = m;
  ss[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || j >= k) return;
  for (int g = 1; g < kRowGroups; ++g) merge_max_sum(m, s, sm[g][threadIdx.x], ss[g][threadIdx.x]);
  if (alpha) {
    alpha[j] = alpha_from_stats(m, s);
  } else {
    max_out[j] = m;
    sum_out[j] = s;
  }
}

// Row kernels read 4 neighbouring columns per load (16 bytes of float32 logits and α, 8 of 16-bit logits) when
// K % 4 == 0 and the pointers are aligned (kVec), element by element otherwise.
constexpr int kWidth = 4;

template <typename T>
struct alignas(kWidth * sizeof(T)) Pack {
  T v[kWidth];
};

// Columns j .. j + 3 of x as float (0 past k). kVec: the whole pack is inside the row whenever j < k.
template <bool kVec, typename T>
__device__ DK_INLINE void load_pack(const T* x, int64_t j, int64_t k, float (&out)[kWidth]) {
  if (kVec && j < k) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(x + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) out[i] = to_float(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i) out[i] = j + i < k ? to_float(x[j + i]) : 0.f;
  }
}

// c_bj = a_bj + α_j for the row's columns j .. j + 3 (a = z/τ, rounded as the prototype step rounds it).
template <bool kVec, typename T>
__device__ DK_INLINE void shifted_pack(const T* x, const float* alpha, int64_t j, int64_t k, float inv_temp,
                                       float (&c)[kWidth]) {
  float a[kWidth], shift[kWidth];
  load_pack<kVec>(x, j, k, a);
  load_pack<kVec>(alpha, j, k, shift);
#pragma unroll
  for (int i = 0; i < kWidth; ++i) c[i] = __fmul_rn(a[i], inv_temp) + shift[i];
}

// The row's online (max, Σexp) of c over the block; thread t folds packs t, t + 256, ... in order.
template <bool kVec, typename T>
__device__ DK_INLINE void row_max_sum(const T* x, const float* alpha, int64_t k, float inv_temp, float& m, float& s,
                                      float* scratch) {
  m = -INFINITY, s = 0.f;
#pragma unroll 2
  for (int64_t j = int64_t(threadIdx.x) * kWidth; j < k; j += int64_t(kRowThreads) * kWidth) {
    float c[kWidth];
    shifted_pack<kVec>(x, alpha, j, k, inv_temp, c);
#pragma unroll
    for (int i = 0; i < kWidth; ++i)
      if (j + i < k) online_add(m, s, c[i]);
  }
  block_merge_max_sum(m, s, scratch);
}

template <bool kVec, typename T>
__global__ void __launch_bounds__(kRowThreads)
    sample_kernel(const T* __restrict__ z, int64_t k, float inv_temp, const float* __restrict__ alpha,
                  float* __restrict__ beta) {
  __shared__ float scratch[64];
  float m, s;
  row_max_sum<kVec>(z + int64_t(blockIdx.x) * k, alpha, k, inv_temp, m, s, scratch);
  if (threadIdx.x == 0) beta[blockIdx.x] = -(m + logf(s));
}

// Row b of the targets: the softmax over k of c = a + α from the row's own (max, Σ) (sinkhorn_knopp_math.h).
template <bool kVec, typename T>
__global__ void __launch_bounds__(kRowThreads)
    output_kernel(const T* __restrict__ z, int64_t k, float inv_temp, const float* __restrict__ alpha,
                  float* __restrict__ out) {
  __shared__ float scratch[64];
  const int64_t offset = int64_t(blockIdx.x) * k;
  float m, s;
  row_max_sum<kVec>(z + offset, alpha, k, inv_temp, m, s, scratch);
  const float inv_s = 1.f / s;
  for (int64_t j = int64_t(threadIdx.x) * kWidth; j < k; j += int64_t(kRowThreads) * kWidth) {
    float c[kWidth];
    shifted_pack<kVec>(z + offset, alpha, j, k, inv_temp, c);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) c[i] = row_probability(c[i], m, inv_s);
    if (kVec && j < k) {
      __stwb(reinterpret_cast<float4*>(out + offset + j), make_float4(c[0], c[1], c[2], c[3]));  // one 16-byte store
    } else {
#pragma unroll
      for (int i = 0; i < kWidth; ++i)
        if (j + i < k) out[offset + j + i] = c[i];
    }
  }
}

// Whether the row kernels may use 4-wide accesses: K % 4 == 0 and every pointer aligned to 4 of its elements.
bool row_vectors(int64_t k, std::uintptr_t z, int dtype, std::uintptr_t alpha, std::uintptr_t out) {
  return k % kWidth == 0 && z % (kWidth * (dtype == kFloat32 ? 4 : 2)) == 0 && alpha % 16 == 0 && out % 16 == 0;
}

// Launches sample_kernel (out == 0: writes β) or output_kernel (writes the targets) on n rows.
template <typename T>
void launch_rows(bool vec, const T* z, int64_t n, int64_t k, float inv_temp, const float* alpha, float* beta,
                 float* out, cudaStream_t s) {
  auto launch = [&](auto vec_tag) {
    constexpr bool kVec = decltype(vec_tag)::value;
    if (out)
      output_kernel<kVec, T><<<unsigned(n), kRowThreads, 0, s>>>(z, k, inv_temp, alpha, out);
    else
      sample_kernel<kVec, T><<<unsigned(n), kRowThreads, 0, s>>>(z, k, inv_temp, alpha, beta);
  };
  if (vec)
    launch(std::true_type{});
  else
    launch(std::false_type{});
  cuda::check_launch(kOp);
}

__global__ void count_nonfinite_kernel(const float* __restrict__ values, int64_t count, int* __restrict__ flag) {
  int bad = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    bad += !isfinite(values[i]);
  if (bad) atomicAdd(flag, bad);
}

void check_common(std::uintptr_t z, int64_t n, int64_t k, double teacher_temp) {
  DK_CHECK_ARG(n >= 0 && k >= 1, kOp, "teacher_logits", "needs N >= 0 rows and K >= 1 columns, got N=", n,
               " K=", k);
  DK_CHECK_ARG(n <= 0x7fffffff, kOp, "teacher_logits", "has more than 2^31 - 1 rows: ", n);
  if (n > 0) check_pointer(as_ptr<void>(z), kOp, "teacher_logits");
  DK_CHECK_ARG(std::isfinite(teacher_temp) && teacher_temp > 0, kOp, "teacher_temp",
               "must be positive and finite, got ", teacher_temp);
}

unsigned column_blocks(int64_t k) { return unsigned((k + kColumns - 1) / kColumns); }

template <typename T>
void launch_prototype(const T* z, int64_t n, int64_t k, float inv_temp, const float* beta, float* alpha,
                      float* max_out, float* sum_out, cudaStream_t s) {
  prototype_kernel<T><<<column_blocks(k), dim3(kColumns, kRowGroups), 0, s>>>(z, n, k, inv_temp, beta, alpha,
                                                                              max_out, sum_out);
  cuda::check_launch(kOp);
}

}  // namespace

int64_t workspace_bytes_cuda(int64_t n, int64_t k) {
  DK_CHECK_ARG(n >= 0 && k >= 1, kOp, "teacher_logits", "needs N >= 0 rows and K >= 1 columns");
  return (k + n) * int64_t(sizeof(float));  // α (K,), β (N,)
}

void forward_cuda(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp, int64_t n_iterations,
                  std::uintptr_t out, std::uintptr_t nonfinite, std::uintptr_t workspace, int64_t workspace_bytes,
                  int device_index, std::uintptr_t stream) {
  check_common(z, n, k, teacher_temp);
  DK_CHECK_ARG(n >= 1, kOp, "teacher_logits", "needs at least one row, got 0");
  DK_CHECK_ARG(n_iterations >= 1, kOp, "n_iterations", "must be >= 1, got ", n_iterations);
  check_pointer(as_ptr<void>(out), kOp, "out");
  check_pointer(as_ptr<void>(nonfinite), kOp, "nonfinite");
  check_workspace(workspace, workspace_bytes, workspace_bytes_cuda(n, k), 4, kOp);
  cuda::prepare_device(kOp, device_index);
  cudaStream_t s = cuda::as_stream(stream);
  float* alpha = as_ptr<float>(workspace);
  float* beta = alpha + k;
  const float inv_temp = float(1.0 / teacher_temp);
  cuda::check(cudaMemsetAsync(beta, 0, size_t(n) * sizeof(float), s), kOp, "cudaMemsetAsync");
  cuda::check(cudaMemsetAsync(as_ptr<int>(nonfinite), 0, sizeof(int), s), kOp, "cudaMemsetAsync");
  dispatch_cuda_float_types(dtype, kOp, "teacher_logits", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* zt = as_ptr<const T>(z);
    const bool vec = row_vectors(k, z, dtype, workspace, out);  // α is at the workspace's start
    for (int64_t it = 0; it < n_iterations; ++it) {
      launch_prototype(zt, n, k, inv_temp, beta, alpha, nullptr, nullptr, s);
      launch_rows(vec, zt, n, k, inv_temp, alpha, beta, nullptr, s);
    }
    count_nonfinite_kernel<<<64, 256, 0, s>>>(alpha, k + n, as_ptr<int>(nonfinite));  // α and β are adjacent
    cuda::check_launch(kOp);
    launch_rows(vec, zt, n, k, inv_temp, alpha, nullptr, as_ptr<float>(out), s);
  });
}

void prototype_stats_cuda(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp,
                          std::uintptr_t beta, std::uintptr_t max_out, std::uintptr_t sumexp_out, int device_index,
                          std::uintptr_t stream) {
  check_common(z, n, k, teacher_temp);
  if (n > 0) check_pointer(as_ptr<void>(beta), kOp, "beta");
  check_pointer(as_ptr<void>(max_out), kOp, "max_out");
  check_pointer(as_ptr<void>(sumexp_out), kOp, "sumexp_out");
  cuda::prepare_device(kOp, device_index);
  dispatch_cuda_float_types(dtype, kOp, "teacher_logits", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_prototype(as_ptr<const T>(z), n, k, float(1.0 / teacher_temp), as_ptr<const float>(beta), nullptr,
                     as_ptr<float>(max_out), as_ptr<float>(sumexp_out), cuda::as_stream(stream));
  });
}

void sample_step_cuda(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp, std::uintptr_t alpha,
                      std::uintptr_t beta_out, int device_index, std::uintptr_t stream) {
  check_common(z, n, k, teacher_temp);
  check_pointer(as_ptr<void>(alpha), kOp, "alpha");
  if (n == 0) return;
  check_pointer(as_ptr<void>(beta_out), kOp, "beta_out");
  cuda::prepare_device(kOp, device_index);
  dispatch_cuda_float_types(dtype, kOp, "teacher_logits", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_rows(row_vectors(k, z, dtype, alpha, 0), as_ptr<const T>(z), n, k, float(1.0 / teacher_temp),
                as_ptr<const float>(alpha), as_ptr<float>(beta_out), nullptr, cuda::as_stream(stream));
  });
}

void output_cuda(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp, std::uintptr_t alpha,
                 std::uintptr_t out, int device_index, std::uintptr_t stream) {
  check_common(z, n, k, teacher_temp);
  check_pointer(as_ptr<void>(alpha), kOp, "alpha");
  if (n == 0) return;
  check_pointer(as_ptr<void>(out), kOp, "out");
  cuda::prepare_device(kOp, device_index);
  dispatch_cuda_float_types(dtype, kOp, "teacher_logits", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_rows(row_vectors(k, z, dtype, alpha, out), as_ptr<const T>(z), n, k, float(1.0 / teacher_temp),
                as_ptr<const float>(alpha), nullptr, as_ptr<float>(out), cuda::as_stream(stream));
  });
}

}  // namespace sinkhorn_knopp
}  // namespace dk
