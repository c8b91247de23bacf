// Bindings for csrc/soft_ce (the kernel under dino_loss, dino_loss_centered and ibot_patch_loss).
#include <pybind11/pybind11.h>

#include "../csrc/soft_ce/soft_ce.h"
#include "dk_bind.h"

namespace py = pybind11;
using namespace dk::soft_ce;

void init_soft_ce(py::module_& m) {
  m.def("soft_ce_workspace_bytes_cpu", &workspace_bytes_cpu, py::arg("views"), py::arg("teachers"),
        py::arg("batch"), py::arg("classes"), py::arg("dtype"));
  m.def("soft_ce_forward_cpu", dk_bind::without_gil(&forward_cpu), py::arg("student"), py::arg("teacher"),
        py::arg("center"), py::arg("weights"), py::arg("dtype"), py::arg("views"), py::arg("teachers"),
        py::arg("batch"), py::arg("classes"), py::arg("skip_same_view"), py::arg("teacher_logits"),
        py::arg("student_temp"), py::arg("teacher_temp"), py::arg("scale"), py::arg("loss"),
        py::arg("student_stats"), py::arg("target_sum"), py::arg("teacher_stats"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("num_threads"));
  m.def("soft_ce_forward_backward_cpu", dk_bind::without_gil(&forward_backward_cpu), py::arg("student"),
        py::arg("teacher"), py::arg("center"), py::arg("weights"), py::arg("dtype"), py::arg("views"),
        py::arg("teachers"), py::arg("batch"), py::arg("classes"), py::arg("skip_same_view"),
        py::arg("teacher_logits"), py::arg("student_temp"), py::arg("teacher_temp"), py::arg("scale"),
        py::arg("loss"), py::arg("student_stats"), py::arg("target_sum"), py::arg("teacher_stats"),
        py::arg("grad_student"), py::arg("num_threads"));
  m.def("soft_ce_backward_cpu", dk_bind::without_gil(&backward_cpu), py::arg("grad_loss"), py::arg("student"),
        py::arg("teacher"), py::arg("center"), py::arg("weights"), py::arg("dtype"), py::arg("views"),
        py::arg("teachers"), py::arg("batch"), py::arg("classes"), py::arg("skip_same_view"),
        py::arg("teacher_logits"), py::arg("student_temp"), py::arg("teacher_temp"), py::arg("scale"),
        py::arg("student_stats"), py::arg("target_sum"), py::arg("teacher_stats"), py::arg("grad_student"),
        py::arg("num_threads"));

  m.def("soft_ce_workspace_bytes_cuda", &workspace_bytes_cuda, py::arg("views"), py::arg("teachers"),
        py::arg("batch"), py::arg("classes"), py::arg("teacher_logits"));
  m.def("soft_ce_forward_cuda", dk_bind::without_gil(&forward_cuda), py::arg("student"), py::arg("teacher"),
        py::arg("center"), py::arg("weights"), py::arg("student_dtype"), py::arg("teacher_dtype"),
        py::arg("views"), py::arg("teachers"), py::arg("batch"), py::arg("classes"), py::arg("skip_same_view"),
        py::arg("teacher_logits"), py::arg("student_temp"), py::arg("teacher_temp"), py::arg("scale"),
        py::arg("loss"), py::arg("student_stats"), py::arg("target_sum"), py::arg("teacher_stats"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device_index"), py::arg("stream"));
  m.def("soft_ce_backward_cuda", dk_bind::without_gil(&backward_cuda), py::arg("grad_loss"), py::arg("student"),
        py::arg("teacher"), py::arg("center"), py::arg("weights"), py::arg("student_dtype"),
        py::arg("teacher_dtype"), py::arg("views"), py::arg("teachers"), py::arg("batch"), py::arg("classes"),
        py::arg("skip_same_view"), py::arg("teacher_logits"), py::arg("student_temp"), py::arg("teacher_temp"),
        py::arg("scale"), py::arg("student_stats"), py::arg("target_sum"), py::arg("teacher_stats"),
        py::arg("grad_student"), py::arg("device_index"), py::arg("stream"));
}
