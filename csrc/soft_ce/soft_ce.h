// Soft-target cross-entropy between student logits and teacher targets: the kernel under
// dinokernels.ops.dino_loss, dino_loss_centered and ibot_patch_loss (one csrc folder for three Python ops,
// because they are one computation with different pairings and weights).
//
// Student views v < S and teacher views t < T over the same B rows and K classes. Student row (v, b) pairs with
// the teacher rows (t, b), t < T, skipping t == v when skip_same_view. With P_vb = Σ_{paired t} p_tb and
// x = z_vb/τ_s (SPEC §2.1, derived form):
//   loss = scale · Σ_{v,b} w_b · (ΣP_vb · LSE(x) − ⟨P_vb, x⟩)
//   ∂loss/∂z_vb = scale · w_b · (ΣP_vb · softmax(x) − P_vb) / τ_s
// ΣP is the actual target mass (1 per paired teacher up to rounding), which keeps the loss equal to
// −Σ p·log_softmax for any targets. Teacher rows are target probabilities, or, when teacher_logits, raw logits
// turned into p_t = softmax((z_t − center)/τ_t) on the fly (never written to memory).
//
// Every entry point takes addresses of contiguous buffers, validates them and throws dk::ArgumentError /
// dk::CudaError. "acc" is float64 for float64 input, else float32.
#pragma once

#include <cstdint>

#include "../common/dk_common.h"
#include "../common/dk_cuda_api.h"

namespace dk {
namespace soft_ce {

// ---- CPU (float32, float64; student, teacher, center and weights share the dtype) ----

int64_t workspace_bytes_cpu(int64_t views, int64_t teachers, int64_t batch, int64_t classes, int dtype);

// Writes loss and the per-row statistics the backward needs. The loss is non-finite when any input is.
void forward_cpu(std::uintptr_t student,  // (S, B, K) dtype
                 std::uintptr_t teacher,  // (T, B, K) dtype: targets, or logits when teacher_logits
                 std::uintptr_t center,   // (K,) dtype when teacher_logits, else 0
                 std::uintptr_t weights,  // (B,) dtype, or 0 for all ones
                 int dtype, int64_t views, int64_t teachers, int64_t batch, int64_t classes,
                 bool skip_same_view, bool teacher_logits, double student_temp, double teacher_temp, double scale,
                 std::uintptr_t loss,         // () acc
                 std::uintptr_t student_stats,  // (2, S, B) acc: max and log Σexp(· − max) of z_vb/τ_s
                 std::uintptr_t target_sum,   // (S, B) acc: ΣP_vb
                 std::uintptr_t teacher_stats,  // (2, T, B) acc: the same of (z_tb − c)/τ_t, teacher_logits only
                 std::uintptr_t workspace, int64_t workspace_bytes, int num_threads);

// forward_cpu and backward_cpu with grad_loss = 1 in one pass over the student (one exponential per element):
// writes what forward_cpu writes (teacher_stats in logits mode too) and grad_student (S, B, K) dtype.
void forward_backward_cpu(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t center,
                          std::uintptr_t weights, int dtype, int64_t views, int64_t teachers, int64_t batch,
                          int64_t classes, bool skip_same_view, bool teacher_logits, double student_temp,
                          double teacher_temp, double scale, std::uintptr_t loss, std::uintptr_t student_stats,
                          std::uintptr_t target_sum, std::uintptr_t teacher_stats, std::uintptr_t grad_student,
                          int num_threads);

void backward_cpu(std::uintptr_t grad_loss,  // () acc
                  std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t center, std::uintptr_t weights,
                  int dtype, int64_t views, int64_t teachers, int64_t batch, int64_t classes, bool skip_same_view,
                  bool teacher_logits, double student_temp, double teacher_temp, double scale,
                  std::uintptr_t student_stats, std::uintptr_t target_sum, std::uintptr_t teacher_stats,  // forward's
                  std::uintptr_t grad_student,  // (S, B, K) dtype, written
                  int num_threads);

// ---- CUDA (student float32/float16/bfloat16; teacher float32 or the student's dtype; center and weights
// float32; statistics and loss float32) ----

int64_t workspace_bytes_cuda(int64_t views, int64_t teachers, int64_t batch, int64_t classes, bool teacher_logits);

void forward_cuda(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t center, std::uintptr_t weights,
                  int student_dtype, int teacher_dtype, int64_t views, int64_t teachers, int64_t batch,
                  int64_t classes, bool skip_same_view, bool teacher_logits, double student_temp,
                  double teacher_temp, double scale, std::uintptr_t loss, std::uintptr_t student_stats,
                  std::uintptr_t target_sum, std::uintptr_t teacher_stats, std::uintptr_t workspace,
                  int64_t workspace_bytes, int device_index, std::uintptr_t stream);

void backward_cuda(std::uintptr_t grad_loss, std::uintptr_t student, std::uintptr_t teacher,
                   std::uintptr_t center, std::uintptr_t weights, int student_dtype, int teacher_dtype,
                   int64_t views, int64_t teachers, int64_t batch, int64_t classes, bool skip_same_view,
                   bool teacher_logits, double student_temp, double teacher_temp, double scale,
                   std::uintptr_t student_stats, std::uintptr_t target_sum, std::uintptr_t teacher_stats,
                   std::uintptr_t grad_student, int device_index, std::uintptr_t stream);

#ifndef DK_WITH_CUDA
inline int64_t workspace_bytes_cuda(int64_t, int64_t, int64_t, int64_t, bool) {
  cuda::throw_not_compiled("soft_ce_forward_cuda");
}
inline void forward_cuda(std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int, int, int64_t,
                         int64_t, int64_t, int64_t, bool, bool, double, double, double, std::uintptr_t,
                         std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int,
                         std::uintptr_t) {
  cuda::throw_not_compiled("soft_ce_forward_cuda");
}
inline void backward_cuda(std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int,
                          int, int64_t, int64_t, int64_t, int64_t, bool, bool, double, double, double,
                          std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int, std::uintptr_t) {
  cuda::throw_not_compiled("soft_ce_backward_cuda");
}
#endif

}  // namespace soft_ce
}  // namespace dk
