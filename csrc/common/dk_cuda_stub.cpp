// dk_cuda_api.h for builds without CUDA: every query says so, every CUDA entry point raises.
#include "dk_common.h"
#include "dk_cuda_api.h"

namespace dk {
namespace cuda {

int runtime_version() { return 0; }
int driver_version() { return 0; }

int device_count(std::string& reason) {
  reason = "dinokernels was built without CUDA (nvcc not found at build time, or DINOKERNELS_CUDA=0)";
  return 0;
}

std::string probe(int) {
  std::string reason;
  device_count(reason);
  return reason;
}

[[noreturn]] void throw_not_compiled(const char* op) {
  std::string reason;
  device_count(reason);
  throw CudaError(std::string("dinokernels.") + op + ": CUDA kernel unavailable: " + reason);
}

void prepare_device(const char* op, int) { throw_not_compiled(op); }

}  // namespace cuda
}  // namespace dk
