// Arithmetic shared by the CPU and CUDA Sinkhorn-Knopp kernels.
#pragma once

#include <cmath>

#include "../common/dk_common.h"

namespace dk {
namespace sinkhorn_knopp {

// α_k from the (max, Σexp) of a_bk + β_b over all samples: α = −(max + log Σ). A prototype with no samples
// (max −inf) cannot occur once the global batch is non-empty.
template <typename A>
DK_HOST_DEVICE DK_INLINE A alpha_from_stats(A max, A sumexp) {
  return -(max + std::log(sumexp));
}

// Output of the log-domain path: the final sample step makes row b the softmax over k of c_bk = a_bk + α_k, so
// it is written as exp(c − max_k c)/Σ_k exp(c − max_k c) from that row's own statistics. The former
// exp(a + α + β) with β = −(max + log Σ) rounded the log-sum-exp: at |a| ~ 1e10 rows summed to 1.006…2.
template <typename A>
DK_HOST_DEVICE DK_INLINE A row_probability(A c, A row_max, A inv_row_sum) {
  return std::exp(c - row_max) * inv_row_sum;
}

// Scaling path (single process): E_bk = exp((z_bk − M_k)/τ) with M_k = max_b z_bk. The difference is taken
// before the product, so the exponent is exact to its own size and 0 at each column's maximum: every column of
// E holds a 1 and no entry overflows, for any finite logits.
template <typename V, typename A>
DK_HOST_DEVICE DK_INLINE V column_exponent(V z, V column_max, A inv_temp) {
  return (z - column_max) * inv_temp;
}

// A row whose largest exponent is below −kRowShift (it is dominated in every column) is stored as
// exp(x − r_b), r_b its largest exponent, with its initial scaling exp(r_b): no row of E underflows to zeros.
constexpr double kRowShift = 64.0;

}  // namespace sinkhorn_knopp
}  // namespace dk
