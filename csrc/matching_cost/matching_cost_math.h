// Arithmetic shared by the CPU and CUDA matching-cost kernels (float or double).
#pragma once

#include <cmath>

#include "../common/dk_common.h"

namespace dk {
namespace matching_cost {

DK_HOST_DEVICE DK_INLINE float m_exp(float x) { return expf(x); }
DK_HOST_DEVICE DK_INLINE double m_exp(double x) { return exp(x); }
DK_HOST_DEVICE DK_INLINE float m_log(float x) { return logf(x); }
DK_HOST_DEVICE DK_INLINE double m_log(double x) { return log(x); }
DK_HOST_DEVICE DK_INLINE float m_pow(float x, float y) { return powf(x, y); }
DK_HOST_DEVICE DK_INLINE double m_pow(double x, double y) { return pow(x, y); }
DK_HOST_DEVICE DK_INLINE float m_abs(float x) { return fabsf(x); }
DK_HOST_DEVICE DK_INLINE double m_abs(double x) { return fabs(x); }
template <typename S>
DK_HOST_DEVICE DK_INLINE S m_max(S a, S b) { return a > b ? a : b; }
template <typename S>
DK_HOST_DEVICE DK_INLINE S m_min(S a, S b) { return a < b ? a : b; }

// n / d with 0/0 := 0 (and any n/0 := 0): degenerate boxes give finite IoU and GIoU instead of NaN.
template <typename S>
DK_HOST_DEVICE DK_INLINE S safe_div(S n, S d) {
  return d == S(0) ? S(0) : n / d;
}

template <typename S>
DK_HOST_DEVICE DK_INLINE S focal_pow(S x, S gamma) {
  return gamma == S(2) ? x * x : m_pow(x, gamma);  // γ = 2 everywhere in practice: skip pow
}

// (pos − neg) of the focal cost for one logit. p = σ(x) and 1 − p = σ(−x) are both formed from exp(−|x|), so
// 1 − p keeps its relative precision for large x (plain 1 − σ(x) rounds to 0 in float32 above x ≈ 17).
template <typename S>
DK_HOST_DEVICE DK_INLINE S focal_pos_minus_neg(S x, S alpha, S gamma) {
  const S e = m_exp(-m_abs(x));  // in (0, 1]; 0 for ±inf
  const S inv = S(1) / (S(1) + e);
  const S p = x >= S(0) ? inv : e * inv;
  const S q = x >= S(0) ? e * inv : inv;  // 1 − p
  const S pos = alpha * focal_pow(q, gamma) * -m_log(p + S(1e-8));
  const S neg = (S(1) - alpha) * focal_pow(p, gamma) * -m_log(q + S(1e-8));
  return pos - neg;
}

// L1 distance of two cxcywh boxes and their GIoU (torchvision's formula on xyxy = (c ∓ s/2), with safe_div).
template <typename S>
DK_HOST_DEVICE DK_INLINE void box_costs(const S a[4], const S b[4], S& l1, S& giou) {
  l1 = m_abs(a[0] - b[0]) + m_abs(a[1] - b[1]) + m_abs(a[2] - b[2]) + m_abs(a[3] - b[3]);
  const S ax0 = a[0] - S(0.5) * a[2], ay0 = a[1] - S(0.5) * a[3], ax1 = a[0] + S(0.5) * a[2],
          ay1 = a[1] + S(0.5) * a[3];
  const S bx0 = b[0] - S(0.5) * b[2], by0 = b[1] - S(0.5) * b[3], bx1 = b[0] + S(0.5) * b[2],
          by1 = b[1] + S(0.5) * b[3];
  const S area_a = (ax1 - ax0) * (ay1 - ay0), area_b = (bx1 - bx0) * (by1 - by0);
  const S iw = m_max(m_min(ax1, bx1) - m_max(ax0, bx0), S(0)), ih = m_max(m_min(ay1, by1) - m_max(ay0, by0), S(0));
  const S inter = iw * ih, uni = area_a + area_b - inter;
  const S cw = m_max(m_max(ax1, bx1) - m_min(ax0, bx0), S(0)), ch = m_max(m_max(ay1, by1) - m_min(ay0, by0), S(0));
  const S hull = cw * ch;
  giou = safe_div(inter, uni) - safe_div(hull - uni, hull);
}

}  // namespace matching_cost
}  // namespace dk
