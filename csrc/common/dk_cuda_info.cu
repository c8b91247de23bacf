// dk_cuda_api.h for CUDA builds. cudart is linked statically, so these work without a CUDA toolkit at run
// time; without a driver they report why.
#include <string>

#include "dk_cuda.cuh"

namespace dk {
namespace cuda {

int runtime_version() { return CUDART_VERSION; }

int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return version;
}

int device_count(std::string& reason) {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    reason = std::string("no usable CUDA driver or device: ") + cudaGetErrorName(status) + " (" +
             cudaGetErrorString(status) + ")";
    return 0;
  }
  if (count == 0) reason = "no CUDA device is visible";
  return count;
}

__global__ void dk_probe_kernel(int* out) { *out = 42; }

std::string probe(int device_index) {
  std::string reason;
  int count = device_count(reason);
  if (count == 0) return reason;
  if (device_index < 0 || device_index >= count)
    return "device index " + std::to_string(device_index) + " out of range (" + std::to_string(count) +
           " visible)";
  auto fail = [](const char* what, cudaError_t status) {
    cudaGetLastError();
    return std::string(what) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")";
  };
  int previous = 0;
  cudaGetDevice(&previous);
  cudaError_t status = cudaSetDevice(device_index);
  if (status != cudaSuccess) return fail("cudaSetDevice", status);
  int* buffer = nullptr;
  status = cudaMalloc(&buffer, sizeof(int));
  if (status != cudaSuccess) return fail("cudaMalloc", status);
  dk_probe_kernel<<<1, 1>>>(buffer);
  status = cudaGetLastError();
  if (status == cudaSuccess) status = cudaDeviceSynchronize();
  int value = 0;
  if (status == cudaSuccess) status = cudaMemcpy(&value, buffer, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(buffer);
  cudaSetDevice(previous);
  if (status != cudaSuccess) return fail("probe kernel (are this card's architecture's kernels compiled in?)", status);
  if (value != 42) return "probe kernel wrote a wrong value";
  return "";
}

void prepare_device(const char* op, int device_index) {
  std::string reason;
  int count = device_count(reason);
  if (count == 0) throw CudaError(std::string("dinokernels.") + op + ": CUDA unavailable: " + reason);
  if (device_index < 0 || device_index >= count)
    throw CudaError(std::string("dinokernels.") + op + ": device index " + std::to_string(device_index) +
                    " out of range (" + std::to_string(count) + " visible)");
  check(cudaSetDevice(device_index), op, "cudaSetDevice");
}

[[noreturn]] void throw_not_compiled(const char* op) {
  throw CudaError(std::string("dinokernels.") + op + ": this CUDA build has no such kernel");
}

}  // namespace cuda
}  // namespace dk
