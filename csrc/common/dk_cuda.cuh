// CUDA-only helpers: error checks that throw, 16-bit conversions, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "dk_common.h"
#include "dk_cuda_api.h"
#include "dk_softmax.h"

namespace dk {
namespace cuda {

inline void check(cudaError_t status, const char* op, const char* what) {
  if (status != cudaSuccess) {
    throw CudaError(std::string("dinokernels.") + op + ": " + what + " failed: " + cudaGetErrorName(status) +
                    " (" + cudaGetErrorString(status) + ")");
  }
}

// After every launch: configuration errors and missing kernel images surface here.
inline void check_launch(const char* op) { check(cudaGetLastError(), op, "kernel launch"); }

inline cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline int multiprocessor_count(const char* op, int device_index) {
  int count = 0;
  check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device_index), op,
        "cudaDeviceGetAttribute");
  return count;
}

}  // namespace cuda

template <typename T>
__device__ DK_INLINE float to_float(T v);
template <>
__device__ DK_INLINE float to_float<float>(float v) { return v; }
template <>
__device__ DK_INLINE float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ DK_INLINE float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ DK_INLINE T from_float(float v);
template <>
__device__ DK_INLINE float from_float<float>(float v) { return v; }
template <>
__device__ DK_INLINE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ DK_INLINE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ DK_INLINE float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp (≤ 32).
__device__ DK_INLINE float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

__device__ DK_INLINE float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Max over the block; every thread gets the result. NaN is dropped by fmaxf: callers detect NaN through sums.
__device__ DK_INLINE float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// Online-softmax step: fold one value a into the running (m, s) = (max, Σexp((· − max)·scale)).
__device__ DK_INLINE void online_add(float& m, float& s, float a, float scale = 1.f) {
  if (a > m) {
    s = s * expf((m - a) * scale) + 1.f;  // m = −inf on the first value: s·0 + 1
    m = a;
  } else if (a != -INFINITY) {  // −inf adds nothing (and −inf − (−inf) would be NaN); NaN falls through
    s += expf((a - m) * scale);
  }
}

// Merge the (m, s) pairs of the warp in a fixed butterfly; every lane gets the same result (merge_max_sum is
// symmetric). scale as in merge_max_sum.
__device__ DK_INLINE void warp_merge_max_sum(float& m, float& s, float scale = 1.f) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset), s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    merge_max_sum(m, s, m2, s2, scale);
  }
}

// Merge the (m, s) pairs of the whole block; every thread gets the result. `scratch` holds 64 floats. scale as
// in merge_max_sum.
__device__ DK_INLINE void block_merge_max_sum(float& m, float& s, float* scratch, float scale = 1.f) {
  warp_merge_max_sum(m, s, scale);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = m, scratch[32 + warp] = s;
  __syncthreads();
  m = lane < n_warps ? scratch[lane] : -INFINITY;
  s = lane < n_warps ? scratch[32 + lane] : 0.f;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset), s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    merge_max_sum(m, s, m2, s2, scale);
  }
}

// Calls body(static_cast<T*>(nullptr)) with T the storage type of a CUDA dtype code.
template <typename Body>
void dispatch_cuda_float_types(int dtype, const char* op, const char* arg, Body&& body) {
  switch (dtype) {
    case kFloat32: body(static_cast<float*>(nullptr)); break;
    case kFloat16: body(static_cast<__half*>(nullptr)); break;
    case kBFloat16: body(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: check_dtype(dtype, false, op, arg);
  }
}

}  // namespace dk
