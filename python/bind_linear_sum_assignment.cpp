// Bindings for csrc/linear_sum_assignment (dinokernels.ops.linear_sum_assignment).
#include <pybind11/pybind11.h>

#include "../csrc/linear_sum_assignment/linear_sum_assignment.h"
#include "dk_bind.h"

namespace py = pybind11;
using namespace dk::lsa;

void init_linear_sum_assignment(py::module_& m) {
  m.def("linear_sum_assignment_cpu", dk_bind::without_gil(&linear_sum_assignment_cpu), py::arg("cost"),
        py::arg("dtype"), py::arg("B"), py::arg("N"), py::arg("M"), py::arg("num_rows"), py::arg("num_cols"),
        py::arg("rows_out"), py::arg("cols_out"), py::arg("status"), py::arg("num_threads"));
  m.def("linear_sum_assignment_workspace_bytes_cuda", &workspace_bytes_cuda, py::arg("B"), py::arg("N"),
        py::arg("M"));
  m.def("linear_sum_assignment_cuda", dk_bind::without_gil(&linear_sum_assignment_cuda), py::arg("cost"),
        py::arg("dtype"), py::arg("B"), py::arg("N"), py::arg("M"), py::arg("num_rows"), py::arg("num_cols"),
        py::arg("rows_out"), py::arg("cols_out"), py::arg("status"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("device_index"), py::arg("stream"));
}
