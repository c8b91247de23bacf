// Bindings for csrc/sinkhorn_knopp: the one-call single-process entry and the three stages of the
// distributed path.
#include <pybind11/pybind11.h>

#include "../csrc/sinkhorn_knopp/sinkhorn_knopp.h"
#include "dk_bind.h"

namespace py = pybind11;
using namespace dk::sinkhorn_knopp;

void init_sinkhorn_knopp(py::module_& m) {
  m.def("sinkhorn_knopp_cpu", dk_bind::without_gil(&forward_cpu), py::arg("z"), py::arg("dtype"), py::arg("n"),
        py::arg("k"), py::arg("teacher_temp"), py::arg("n_iterations"), py::arg("out"), py::arg("num_threads"));
  m.def("sinkhorn_knopp_prototype_stats_cpu", dk_bind::without_gil(&prototype_stats_cpu), py::arg("z"),
        py::arg("dtype"), py::arg("n"), py::arg("k"), py::arg("teacher_temp"), py::arg("beta"),
        py::arg("max_out"), py::arg("sumexp_out"), py::arg("num_threads"));
  m.def("sinkhorn_knopp_sample_step_cpu", dk_bind::without_gil(&sample_step_cpu), py::arg("z"), py::arg("dtype"),
        py::arg("n"), py::arg("k"), py::arg("teacher_temp"), py::arg("alpha"), py::arg("beta_out"),
        py::arg("num_threads"));
  m.def("sinkhorn_knopp_output_cpu", dk_bind::without_gil(&output_cpu), py::arg("z"), py::arg("dtype"),
        py::arg("n"), py::arg("k"), py::arg("teacher_temp"), py::arg("alpha"), py::arg("out"),
        py::arg("num_threads"));

  m.def("sinkhorn_knopp_workspace_bytes_cuda", &workspace_bytes_cuda, py::arg("n"), py::arg("k"));
  m.def("sinkhorn_knopp_cuda", dk_bind::without_gil(&forward_cuda), py::arg("z"), py::arg("dtype"), py::arg("n"),
        py::arg("k"), py::arg("teacher_temp"), py::arg("n_iterations"), py::arg("out"), py::arg("nonfinite"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device_index"), py::arg("stream"));
  m.def("sinkhorn_knopp_prototype_stats_cuda", dk_bind::without_gil(&prototype_stats_cuda), py::arg("z"),
        py::arg("dtype"), py::arg("n"), py::arg("k"), py::arg("teacher_temp"), py::arg("beta"),
        py::arg("max_out"), py::arg("sumexp_out"), py::arg("device_index"), py::arg("stream"));
  m.def("sinkhorn_knopp_sample_step_cuda", dk_bind::without_gil(&sample_step_cuda), py::arg("z"), py::arg("dtype"),
        py::arg("n"), py::arg("k"), py::arg("teacher_temp"), py::arg("alpha"), py::arg("beta_out"),
        py::arg("device_index"), py::arg("stream"));
  m.def("sinkhorn_knopp_output_cuda", dk_bind::without_gil(&output_cuda), py::arg("z"), py::arg("dtype"),
        py::arg("n"), py::arg("k"), py::arg("teacher_temp"), py::arg("alpha"), py::arg("out"),
        py::arg("device_index"), py::arg("stream"));
}
