// Arithmetic shared by the CPU and CUDA KoLeo kernels (CI runs the CPU path, so this is what it verifies).
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/dk_common.h"

namespace dk {
namespace koleo {

// nn.PairwiseDistance(eps=1e-8) adds eps to the difference before the norm (SPEC §1 eps register).
constexpr double kPairwiseEps = 1e-8;

DK_HOST_DEVICE DK_INLINE float log_(float v) { return logf(v); }
DK_HOST_DEVICE DK_INLINE double log_(double v) { return log(v); }

// Total order on nearest-neighbour candidates (index < 0 = no candidate yet): a real candidate beats none;
// any finite or infinite similarity beats NaN; larger similarity wins; equal similarity → smaller index.
// Being total makes merging partial results (threads, CUDA splits) order-independent.
template <typename S>
DK_HOST_DEVICE DK_INLINE bool nn_better(S sim_a, int64_t idx_a, S sim_b, int64_t idx_b) {
  if (idx_a < 0) return false;
  if (idx_b < 0) return true;
  const bool a_nan = sim_a != sim_a, b_nan = sim_b != sim_b;
  if (a_nan || b_nan) return !a_nan || (b_nan && idx_a < idx_b);
  return sim_a > sim_b || (sim_a == sim_b && idx_a < idx_b);
}

// One row's loss term, -log(d + eps).
template <typename S>
DK_HOST_DEVICE DK_INLINE S koleo_term(S dist, S eps) {
  return -log_(dist + eps);
}

// For L = grad_loss * mean_i -log(d_i + eps): dL/dv_i = coef_i * v_i with v_i = x̂_i - x̂_nn(i) + 1e-8,
// coef_i = dL/dd_i / d_i; 0 when d_i == 0, as torch's norm backward. A NaN distance (non-finite input with the
// finite check off) stays NaN, so the gradient never looks clean.
template <typename S>
DK_HOST_DEVICE DK_INLINE S koleo_diff_coef(S grad_loss, S dist, S eps, int64_t n) {
  if (dist == S(0)) return S(0);
  return -grad_loss / (S(n) * (dist + eps) * dist);
}

// Backward of x̂ = x / c, c = max(||x||, eps), for one element: g_x = (g - x̂ (x̂·g)) / c while ||x|| > eps,
// else g / c (the clamp passes no gradient to the norm). The kernels normalise as x * (1 / c).
template <typename S>
DK_HOST_DEVICE DK_INLINE S normalize_backward(S grad_unit, S unit, S unit_dot_grad, S clamped_norm, S inv_norm,
                                              S eps) {
  // Branch-free, so the loops around it vectorise.
  const S projection = clamped_norm > eps ? unit_dot_grad : S(0);
  return (grad_unit - unit * projection) * inv_norm;
}

}  // namespace koleo
}  // namespace dk
