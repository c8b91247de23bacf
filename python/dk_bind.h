// Binding helper shared by the bind_<op>.cpp files.
#pragma once

#include <pybind11/pybind11.h>

#include <exception>
#include <type_traits>

namespace dk_bind {

// Wraps a kernel entry point so that it runs with the GIL released. An exception is caught while the GIL is
// released and rethrown once it is held again, so pybind11 translates it (ValueError, CudaError) on a thread
// that owns the interpreter, whatever the pybind11 version.
template <typename R, typename... Args>
auto without_gil(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    std::exception_ptr error;
    if constexpr (std::is_void_v<R>) {
      {
        pybind11::gil_scoped_release released;
        try {
          fn(args...);
        } catch (...) {
          error = std::current_exception();
        }
      }
      if (error) std::rethrow_exception(error);
    } else {
      R result{};
      {
        pybind11::gil_scoped_release released;
        try {
          result = fn(args...);
        } catch (...) {
          error = std::current_exception();
        }
      }
      if (error) std::rethrow_exception(error);
      return result;
    }
  };
}

}  // namespace dk_bind
