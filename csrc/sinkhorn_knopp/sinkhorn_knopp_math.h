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

}  // namespace sinkhorn_knopp
}  // namespace dk
