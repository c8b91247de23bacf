// Bindings for csrc/ms_deform_attn (multi-scale deformable attention).
#include <pybind11/pybind11.h>

#include "../csrc/ms_deform_attn/ms_deform_attn.h"
#include "dk_bind.h"

namespace py = pybind11;
using namespace dk::ms_deform_attn;

void init_ms_deform_attn(py::module_& m) {
  m.attr("ms_deform_attn_max_levels") = kMaxLevels;
  m.attr("ms_deform_attn_max_points") = kMaxPoints;
  m.def("ms_deform_attn_forward_cpu", dk_bind::without_gil(&forward_cpu), py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("dtype"), py::arg("batch"), py::arg("spatial"), py::arg("heads"),
        py::arg("channels"), py::arg("queries"), py::arg("levels"), py::arg("points"), py::arg("output"),
        py::arg("num_threads"));
  m.def("ms_deform_attn_backward_workspace_bytes_cpu", &backward_workspace_bytes_cpu, py::arg("batch"),
        py::arg("spatial"), py::arg("heads"), py::arg("channels"), py::arg("queries"), py::arg("levels"),
        py::arg("points"), py::arg("dtype"), py::arg("num_threads"));
  m.def("ms_deform_attn_backward_cpu", dk_bind::without_gil(&backward_cpu), py::arg("grad_output"), py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("dtype"), py::arg("batch"), py::arg("spatial"), py::arg("heads"),
        py::arg("channels"), py::arg("queries"), py::arg("levels"), py::arg("points"), py::arg("grad_value"),
        py::arg("grad_locations"), py::arg("grad_weights"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("num_threads"));
  m.def("ms_deform_attn_forward_cuda", dk_bind::without_gil(&forward_cuda), py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("value_dtype"), py::arg("location_dtype"), py::arg("batch"),
        py::arg("spatial"), py::arg("heads"), py::arg("channels"), py::arg("queries"), py::arg("levels"),
        py::arg("points"), py::arg("output"), py::arg("device_index"), py::arg("stream"));
  m.def("ms_deform_attn_backward_cuda", dk_bind::without_gil(&backward_cuda), py::arg("grad_output"),
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("value_dtype"), py::arg("location_dtype"), py::arg("batch"),
        py::arg("spatial"), py::arg("heads"), py::arg("channels"), py::arg("queries"), py::arg("levels"),
        py::arg("points"), py::arg("grad_value_f32"), py::arg("grad_locations"), py::arg("grad_weights"),
        py::arg("device_index"), py::arg("stream"));
}
