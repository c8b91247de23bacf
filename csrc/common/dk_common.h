// Shared by every kernel: dtype codes, argument checks that throw, host/device macros.
// Plain C++17; no libtorch, no Python. CUDA-only helpers live in dk_cuda.cuh.
#pragma once

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__CUDACC__)
#define DK_HOST_DEVICE __host__ __device__
#define DK_INLINE __forceinline__
#else
#define DK_HOST_DEVICE
#define DK_INLINE inline
#endif

namespace dk {

// Dtype codes passed from Python as integers. Python reads them from _C.dtype_codes, so this enum is the
// only place the numbers are written down.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

// A bad argument reached a kernel entry point. pybind11 turns std::invalid_argument into ValueError.
class ArgumentError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// CUDA is not compiled in, no usable device, or a CUDA call failed. Registered with Python as
// dinokernels._C.CudaError, a RuntimeError subclass.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
// Message pieces: strings and numbers, formatted without iostreams (no locale machinery on the error path).
inline void append(std::string& out, const char* text) { out += text; }
inline void append(std::string& out, const std::string& text) { out += text; }
template <typename T>
inline void append(std::string& out, T value) {
  char buffer[64];
  if constexpr (std::is_floating_point_v<T>)
    std::snprintf(buffer, sizeof(buffer), "%g", double(value));
  else if constexpr (std::is_signed_v<T>)
    std::snprintf(buffer, sizeof(buffer), "%lld", static_cast<long long>(value));
  else
    std::snprintf(buffer, sizeof(buffer), "%llu", static_cast<unsigned long long>(value));
  out += buffer;
}
}  // namespace detail

// Message format shared with the Python checks: "dinokernels.<op>: argument '<arg>' <what>".
template <typename... Parts>
[[noreturn]] void throw_argument_error(const char* op, const char* arg, const Parts&... what) {
  std::string message = std::string("dinokernels.") + op + ": argument '" + arg + "' ";
  (detail::append(message, what), ...);
  throw ArgumentError(message);
}

#define DK_CHECK_ARG(cond, op, arg, ...)                     \
  do {                                                       \
    if (!(cond)) ::dk::throw_argument_error(op, arg, __VA_ARGS__); \
  } while (0)

inline void check_pointer(const void* ptr, const char* op, const char* arg) {
  DK_CHECK_ARG(ptr != nullptr, op, arg, "is a null pointer");
}

inline void check_dtype(int code, bool allowed, const char* op, const char* arg) {
  DK_CHECK_ARG(allowed, op, arg, "has unsupported dtype ", dtype_name(code), " (code ", code, ")");
}

// Scratch allocated by the caller: present, large enough, aligned.
inline void check_workspace(std::uintptr_t workspace, int64_t bytes, int64_t needed, int64_t alignment,
                            const char* op) {
  DK_CHECK_ARG(workspace != 0 || needed == 0, op, "workspace", "is a null pointer");
  DK_CHECK_ARG(bytes >= needed, op, "workspace", "holds ", bytes, " bytes, needs ", needed);
  DK_CHECK_ARG(workspace % alignment == 0, op, "workspace", "must be ", alignment, "-byte aligned");
}

// The stream and pointers arrive as Python integers.
template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace dk
