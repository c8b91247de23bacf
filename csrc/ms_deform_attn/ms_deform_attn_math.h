// Arithmetic shared by the CPU and CUDA kernels (DESIGN §2): the level table and its validation, the bilinear
// set-up of one sample, and the per-sample gradient formulas. CI runs only the CPU path, so everything here is
// verified there.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/dk_common.h"
#include "ms_deform_attn.h"

namespace dk {
namespace ms_deform_attn {

constexpr const char* kOp = "ms_deform_attn";
constexpr int64_t kMaxSide = int64_t(1) << 23;  // largest H or W of a level

// Level geometry, small enough to pass by value as a CUDA kernel parameter.
struct Levels {
  int count;
  int height[kMaxLevels], width[kMaxLevels];
  int64_t start[kMaxLevels];
};

struct Sizes {
  int64_t batch, spatial, heads, channels, queries, levels, points;
};

// Reads and checks the host level table against S; throws with the argument named.
inline Levels read_levels(std::uintptr_t spatial_shapes, std::uintptr_t level_start_index, const Sizes& s) {
  DK_CHECK_ARG(s.batch >= 0 && s.queries >= 0, kOp, "sampling_locations", "has negative sizes N=", s.batch,
               " Lq=", s.queries);
  DK_CHECK_ARG(s.spatial >= 1 && s.heads >= 1 && s.channels >= 1, kOp, "value",
               "needs S, M, D >= 1, got S=", s.spatial, " M=", s.heads, " D=", s.channels);
  DK_CHECK_ARG(s.levels >= 1 && s.levels <= kMaxLevels, kOp, "spatial_shapes", "must have 1 to ", kMaxLevels,
               " levels, got L=", s.levels);
  DK_CHECK_ARG(s.points >= 1 && s.points <= kMaxPoints, kOp, "sampling_locations", "must have 1 to ", kMaxPoints,
               " points per level, got P=", s.points);
  check_pointer(as_ptr<void>(spatial_shapes), kOp, "spatial_shapes");
  check_pointer(as_ptr<void>(level_start_index), kOp, "level_start_index");
  const int64_t* shapes = as_ptr<const int64_t>(spatial_shapes);
  const int64_t* starts = as_ptr<const int64_t>(level_start_index);
  Levels lv{};
  lv.count = int(s.levels);
  int64_t total = 0;
  for (int l = 0; l < lv.count; ++l) {
    const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
    // float32 pixel coordinates x·W − 0.5 are exact only while x·W < 2^23: beyond, the spacing of floats is 1
    // and the half-pixel offset rounds away (the sample lands half a pixel off).
    DK_CHECK_ARG(h >= 1 && w >= 1 && h <= kMaxSide && w <= kMaxSide, kOp, "spatial_shapes", "level ", l,
                 " has (H, W) = (", h, ", ", w, "); each must be in [1, 2^23] (float32 sampling coordinates lose the "
                 "half-pixel offset beyond)");
    DK_CHECK_ARG(starts[l] == total, kOp, "level_start_index", "must be the exclusive prefix sum of H·W; level ",
                 l, " starts at ", starts[l], ", expected ", total);
    lv.height[l] = int(h), lv.width[l] = int(w), lv.start[l] = total;
    total += h * w;
  }
  DK_CHECK_ARG(total == s.spatial, kOp, "value", "has S=", s.spatial, " rows but the levels hold Σ H·W = ", total);
  return lv;
}

DK_HOST_DEVICE DK_INLINE float dk_floor(float v) { return floorf(v); }
DK_HOST_DEVICE DK_INLINE double dk_floor(double v) { return floor(v); }

// One sample's bilinear footprint. Corner k = 2·dy + dx at (h0 + dy, w0 + dx); weight[k] is 0 and row[k] −1 for
// corners outside the level (zero padding). row[k] is the pixel's row inside the level (h·W + w).
template <typename A>
struct Footprint {
  A frac_y, frac_x;          // the sample's offset from corner 0 inside the cell: y_px − h0, x_px − w0
  A rest_y, rest_x;          // 1 − frac_y, 1 − frac_x
  A weight[4];
  int64_t row[4];
};

// False when the sample is skipped entirely (outside (−1, H) × (−1, W), or NaN).
template <typename A>
DK_HOST_DEVICE DK_INLINE bool footprint(A x, A y, int height, int width, Footprint<A>& f) {
  const A x_px = x * A(width) - A(0.5), y_px = y * A(height) - A(0.5);
  if (!(y_px > A(-1) && x_px > A(-1) && y_px < A(height) && x_px < A(width))) return false;
  const A y0f = dk_floor(y_px), x0f = dk_floor(x_px);
  const int h0 = int(y0f), w0 = int(x0f);
  f.frac_y = y_px - y0f, f.frac_x = x_px - x0f;
  f.rest_y = A(1) - f.frac_y, f.rest_x = A(1) - f.frac_x;
  const bool top = h0 >= 0, bottom = h0 + 1 <= height - 1, left = w0 >= 0, right = w0 + 1 <= width - 1;
  f.weight[0] = (top && left) ? f.rest_y * f.rest_x : A(0);
  f.weight[1] = (top && right) ? f.rest_y * f.frac_x : A(0);
  f.weight[2] = (bottom && left) ? f.frac_y * f.rest_x : A(0);
  f.weight[3] = (bottom && right) ? f.frac_y * f.frac_x : A(0);
  f.row[0] = (top && left) ? int64_t(h0) * width + w0 : -1;
  f.row[1] = (top && right) ? int64_t(h0) * width + w0 + 1 : -1;
  f.row[2] = (bottom && left) ? int64_t(h0 + 1) * width + w0 : -1;
  f.row[3] = (bottom && right) ? int64_t(h0 + 1) * width + w0 + 1 : -1;
  return true;
}

// Gradients of one sample from dot[k] = Σ_c g_c·V_k[c] over the present corners (0 for missing ones):
// grad_a = Σ_k w_k·dot_k; grad_x = W·a·∂v/∂x_px, grad_y = H·a·∂v/∂y_px (SPEC §4.2).
template <typename A>
DK_HOST_DEVICE DK_INLINE void sample_gradients(const Footprint<A>& f, const A dot[4], A a, int height, int width,
                                              A& grad_a, A& grad_x, A& grad_y) {
  grad_a = f.weight[0] * dot[0] + f.weight[1] * dot[1] + f.weight[2] * dot[2] + f.weight[3] * dot[3];
  const A d_h = -f.rest_x * dot[0] - f.frac_x * dot[1] + f.rest_x * dot[2] + f.frac_x * dot[3];
  const A d_w = -f.rest_y * dot[0] + f.rest_y * dot[1] - f.frac_y * dot[2] + f.frac_y * dot[3];
  grad_x = A(width) * a * d_w;
  grad_y = A(height) * a * d_h;
}

}  // namespace ms_deform_attn
}  // namespace dk
