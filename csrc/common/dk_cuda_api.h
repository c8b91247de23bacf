// Host-side CUDA queries used by the bindings and by every CUDA entry point. Declared for every build:
// without CUDA the definitions (dk_cuda_stub.cpp) report that CUDA was not compiled in.
#pragma once

#include <string>

namespace dk {
namespace cuda {

// CUDA runtime version this module was built against as major*1000 + minor*10, or 0 without CUDA.
int runtime_version();

// Version of the installed driver's CUDA API (0 when no driver is found or CUDA is not compiled).
int driver_version();

// Number of visible devices; on failure returns 0 and fills `reason`.
int device_count(std::string& reason);

// Runs a one-thread kernel on `device_index` and synchronises: proves that the driver, the device and the
// compiled architectures fit together. Returns "" when usable, else why not.
std::string probe(int device_index);

// Throws CudaError("dinokernels.<op>: ...") unless `device_index` is usable; makes it current.
void prepare_device(const char* op, int device_index);

// Throws CudaError saying that this build has no CUDA support.
[[noreturn]] void throw_not_compiled(const char* op);

}  // namespace cuda
}  // namespace dk
