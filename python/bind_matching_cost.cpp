// Bindings for csrc/matching_cost (dinokernels.ops.matching_cost).
#include <pybind11/pybind11.h>

#include "../csrc/matching_cost/matching_cost.h"
#include "dk_bind.h"

namespace py = pybind11;
using namespace dk::matching_cost;

void init_matching_cost(py::module_& m) {
  m.def("matching_cost_cpu", dk_bind::without_gil(&matching_cost_cpu), py::arg("pred_logits"),
        py::arg("pred_boxes"), py::arg("tgt_boxes"), py::arg("tgt_counts"), py::arg("positive_map"),
        py::arg("dtype"), py::arg("B"), py::arg("Q"), py::arg("T"), py::arg("G"), py::arg("w_class"),
        py::arg("w_bbox"), py::arg("w_giou"), py::arg("alpha"), py::arg("gamma"), py::arg("pad_value"),
        py::arg("out"), py::arg("num_threads"));
  m.def("matching_cost_cuda", dk_bind::without_gil(&matching_cost_cuda), py::arg("pred_logits"),
        py::arg("pred_boxes"), py::arg("tgt_boxes"), py::arg("tgt_counts"), py::arg("positive_map"),
        py::arg("dtype"), py::arg("B"), py::arg("Q"), py::arg("T"), py::arg("G"), py::arg("w_class"),
        py::arg("w_bbox"), py::arg("w_giou"), py::arg("alpha"), py::arg("gamma"), py::arg("pad_value"),
        py::arg("out"), py::arg("device_index"), py::arg("stream"));
}
