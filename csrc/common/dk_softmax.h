// Online-softmax statistics shared by the CPU and CUDA kernels: a row (or a piece of one) is summarised by
// (max, Σ exp(x − max)); two summaries merge exactly, so a row can be split across threads or blocks.
#pragma once

#include <cmath>

#include "dk_common.h"

namespace dk {

// Merge (m2, s2) into (m, s). An empty piece is (−inf, 0); two empty pieces stay empty instead of making
// exp(−inf − (−inf)) = NaN. A NaN sum propagates, whichever side holds it. With scale ≠ 1 the maxima live in an
// unscaled space and the sums are Σ exp((x − max)·scale): the difference is taken before scaling, so it is exact
// to its own size however large x·scale is.
template <typename T>
DK_HOST_DEVICE DK_INLINE void merge_max_sum(T& m, T& s, T m2, T s2, T scale = T(1)) {
  const T big = m > m2 ? m : m2;
  if (big == -INFINITY) {  // both empty, or all −inf: nothing to add, but a NaN sum must survive
    s += s2;
    return;
  }
  const T a = (s == T(0)) ? T(0) : s * std::exp((m - big) * scale);
  const T b = (s2 == T(0)) ? T(0) : s2 * std::exp((m2 - big) * scale);
  m = big;
  s = a + b;
}

}  // namespace dk
