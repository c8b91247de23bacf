// Arithmetic shared by the CPU and CUDA softmax_center kernels (and the teacher side of soft_ce):
//   d = z/2 − c/2,   m = max_k d,   p = exp((d − m)·(2/τ)) / Σ_k exp((d − m)·(2/τ)).
// Why not a = (z − c)/τ and exp(a − max a): at |a| ≳ 2^24 the float32 spacing of a exceeds 1, so two rounded
// a's differ by whole ulps (an H100 row summed to 0.9947), and with a fused multiply-add the maximum itself
// gives exp(a − round(a)) = exp(±512) (a row of 1e9 raised). d − m is exact (or rounded to its own size) and
// is 0 at the maximum, so exp(0) = 1 and 1 ≤ Σ ≤ K for any finite input. Halving z and c (exact: powers of
// two) keeps d finite even when z − c would overflow; the 2 goes into the temperature factor.
#pragma once

#include <cmath>

#include "../common/dk_common.h"

namespace dk {
namespace softmax_center {

// V: a scalar or a CPU SIMD vector of A. Multiplications by 0.5 are exact, so whether the compiler fuses one
// into the subtraction does not change d (both passes over a row see identical values).
template <typename V>
DK_HOST_DEVICE DK_INLINE V half_centered(V z, V c) {
  return z * 0.5f - c * 0.5f;
}

// The exponent (d − m)·(2/τ) ≤ 0: exactly 0 at the maximum.
template <typename V, typename A>
DK_HOST_DEVICE DK_INLINE V exponent(V d, A m, A two_inv_temp) {
  return (d - m) * two_inv_temp;
}

// 2/τ in the accumulation type; the kernels check that it is finite (τ ≥ 5.9e-39 for float32).
template <typename A>
DK_HOST_DEVICE DK_INLINE A temperature_factor(double teacher_temp) {
  return A(2.0 / teacher_temp);
}

// One target probability from the row's (m, Σ) with inv_sum = 1/Σ.
template <typename A>
DK_HOST_DEVICE DK_INLINE A probability(A d, A m, A two_inv_temp, A inv_sum) {
  return std::exp(exponent(d, m, two_inv_temp)) * inv_sum;
}

// A row's statistics are usable when its maximum is finite (no +inf/NaN logit, not all −inf) and its sum is
// (no NaN); otherwise the row's probabilities are NaN and the op reports non-finite input.
template <typename A>
DK_HOST_DEVICE DK_INLINE bool row_ok(A m, A s) {
  return std::isfinite(m) && std::isfinite(s);
}

}  // namespace softmax_center
}  // namespace dk
