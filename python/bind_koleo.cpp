// Bindings for csrc/koleo: names and argument names only; the GIL is released around every kernel.
#include <pybind11/pybind11.h>

#include "../csrc/koleo/koleo.h"
#include "dk_bind.h"

namespace py = pybind11;
using namespace dk::koleo;

void init_koleo(py::module_& m) {
  m.def("koleo_workspace_bytes_cpu", &workspace_bytes_cpu, py::arg("n_candidates"), py::arg("dim"),
        py::arg("dtype"));
  m.def("koleo_forward_cpu", dk_bind::without_gil(&koleo_forward_cpu), py::arg("x"), py::arg("dtype"), py::arg("n"),
        py::arg("dim"), py::arg("eps"), py::arg("loss"), py::arg("nn_index"), py::arg("norms"), py::arg("dists"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("num_threads"));
  m.def("koleo_backward_cpu", dk_bind::without_gil(&koleo_backward_cpu), py::arg("grad_loss"), py::arg("x"), py::arg("dtype"),
        py::arg("n"), py::arg("dim"), py::arg("eps"), py::arg("nn_index"), py::arg("norms"), py::arg("dists"),
        py::arg("grad_x"), py::arg("num_threads"));
  m.def("nearest_neighbors_cpu", dk_bind::without_gil(&nearest_neighbors_cpu), py::arg("x"), py::arg("y"), py::arg("dtype"),
        py::arg("n"), py::arg("m"), py::arg("dim"), py::arg("exclude_self"), py::arg("out_sim"),
        py::arg("out_idx"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("num_threads"));

  m.def("koleo_forward_workspace_bytes_cuda", &koleo_forward_workspace_bytes_cuda, py::arg("n"), py::arg("dim"),
        py::arg("device_index"));
  m.def("nearest_neighbors_workspace_bytes_cuda", &nearest_neighbors_workspace_bytes_cuda, py::arg("n"),
        py::arg("m"), py::arg("dim"), py::arg("device_index"));
  m.def("koleo_forward_cuda", dk_bind::without_gil(&koleo_forward_cuda), py::arg("x"), py::arg("dtype"), py::arg("n"),
        py::arg("dim"), py::arg("eps"), py::arg("loss"), py::arg("nn_index"), py::arg("norms"), py::arg("dists"),
        py::arg("nonfinite"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device_index"),
        py::arg("stream"));
  m.def("koleo_backward_cuda", dk_bind::without_gil(&koleo_backward_cuda), py::arg("grad_loss"), py::arg("x"), py::arg("dtype"),
        py::arg("n"), py::arg("dim"), py::arg("eps"), py::arg("nn_index"), py::arg("norms"), py::arg("dists"),
        py::arg("grad_x"), py::arg("device_index"), py::arg("stream"));
  m.def("nearest_neighbors_cuda", dk_bind::without_gil(&nearest_neighbors_cuda), py::arg("x"), py::arg("y"), py::arg("dtype"),
        py::arg("n"), py::arg("m"), py::arg("dim"), py::arg("exclude_self"), py::arg("out_sim"),
        py::arg("out_idx"), py::arg("nonfinite"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("device_index"), py::arg("stream"));
}
