// Bindings for csrc/softmax_center.
#include <pybind11/pybind11.h>

#include "../csrc/softmax_center/softmax_center.h"
#include "dk_bind.h"

namespace py = pybind11;
using namespace dk::softmax_center;

void init_softmax_center(py::module_& m) {
  m.def("softmax_center_workspace_bytes_cpu", &workspace_bytes_cpu, py::arg("n"), py::arg("k"), py::arg("dtype"),
        py::arg("with_sum"));
  m.def("softmax_center_cpu", dk_bind::without_gil(&forward_cpu), py::arg("z"), py::arg("center"),
        py::arg("dtype"), py::arg("n"), py::arg("k"), py::arg("teacher_temp"), py::arg("out"),
        py::arg("column_sum"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("num_threads"));
  m.def("softmax_center_column_sum_cpu", dk_bind::without_gil(&column_sum_cpu), py::arg("z"), py::arg("dtype"),
        py::arg("n"), py::arg("k"), py::arg("out"), py::arg("num_threads"));
  m.def("softmax_center_cuda", dk_bind::without_gil(&forward_cuda), py::arg("z"), py::arg("center"),
        py::arg("dtype"), py::arg("n"), py::arg("k"), py::arg("teacher_temp"), py::arg("out"),
        py::arg("column_sum"), py::arg("nonfinite"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device_index"),
        py::arg("stream"));
  m.def("softmax_center_workspace_bytes_cuda", &workspace_bytes_cuda, py::arg("n"), py::arg("k"),
        py::arg("with_sum"));
  m.def("softmax_center_column_sum_cuda", dk_bind::without_gil(&column_sum_cuda), py::arg("z"), py::arg("dtype"),
        py::arg("n"), py::arg("k"), py::arg("out"), py::arg("device_index"), py::arg("stream"));
}
