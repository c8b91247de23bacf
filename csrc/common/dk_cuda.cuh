// CUDA-only helpers: error checks that throw, 16-bit conversions, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "dk_common.h"
#include "dk_cuda_api.h"

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
