// Arithmetic shared by the CPU and CUDA soft cross-entropy kernels: the per-chunk record layout and the exact
// merge of chunk records into per-row statistics and the row loss.
//
// Rows are split into chunks of columns so that one row can be worked on by several threads or blocks. Maxima are
// kept in the logits' own space, never scaled: for a student chunk c of row (v, b), m_vc = max z and
// x = (z − m_vc)/τ_s (student_exponent), so x is exact to its own size and exactly 0 at the maximum, however
// large z/τ_s is (z·(1/τ_s) − round(max·(1/τ_s)) with an FMA gave exp(±512) at z ~ 1e9). The chunk keeps
// s_vc = Σ exp(x) and, for probability targets, d_vc = Σ P·x and ΣP. For teacher logits, teacher chunk t has
// d = z_t/2 − center/2 (softmax_center_math.h), m_tc = max d, s_tc = Σ e_t with e_t = exp((d − m_tc)·2/τ_t),
// and each pair has d_vtc = Σ e_t·x_v. ℓ = ΣP·log s − ⟨P, x − M⟩ then needs no LSE of 1e5 subtracted from
// another 1e5.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/dk_common.h"
#include "../common/dk_softmax.h"
#include "../softmax_center/softmax_center_math.h"

namespace dk {
namespace soft_ce {

// Offsets inside one chunk record of acc values.
struct RecordLayout {
  int64_t views, teachers;
  DK_HOST_DEVICE int64_t size() const { return 4 * views + 2 * teachers + views * teachers; }
  DK_HOST_DEVICE int64_t student(int64_t v) const { return 4 * v; }                  // m, s, d, ΣP
  DK_HOST_DEVICE int64_t teacher(int64_t t) const { return 4 * views + 2 * t; }      // m, s
  DK_HOST_DEVICE int64_t pair(int64_t v, int64_t t) const { return 4 * views + 2 * teachers + v * teachers + t; }
};

DK_HOST_DEVICE DK_INLINE bool paired(int64_t v, int64_t t, bool skip_same_view) { return !(skip_same_view && v == t); }

// x = (z − max)/τ_s ≤ 0 (V: a scalar or a CPU SIMD vector).
template <typename V, typename A>
DK_HOST_DEVICE DK_INLINE V student_exponent(V z, A max, A inv_student_temp) {
  return (z - max) * inv_student_temp;
}

// P·x with 0·x = 0 even where x is −inf (z − max overflowed): a zero target contributes nothing.
template <typename A>
DK_HOST_DEVICE DK_INLINE A target_times_exponent(A p, A x) {
  return p == A(0) ? A(0) : p * x;
}

// Per-row statistics are kept as (max, log Σexp(x)) pairs with x the scaled exponent above, never as one LSE:
// max/τ + log s rounds to the spacing of max/τ (2.4e-4 at 2500, 1024 at 1e10), while exp(x − log s) stays
// accurate for offsets of any size.
// stats (2, R, B): stats[r·B + b] = max, stats[R·B + r·B + b] = log-sum.
template <typename A>
struct RowStats {
  A* stats;
  int64_t rows, batch;
  DK_HOST_DEVICE A& max(int64_t r, int64_t b) const { return stats[r * batch + b]; }
  DK_HOST_DEVICE A& log_sum(int64_t r, int64_t b) const { return stats[(rows + r) * batch + b]; }
};

// exp((m − M)·2/τ_t − log Σ) ≤ 1: the factor that turns exp((d − m)·2/τ_t) into the probability exp((d − M)·2/τ_t)/Σ
// (m = M gives a teacher probability itself). Max and log-sum are applied separately: their sum would round.
template <typename A>
DK_HOST_DEVICE DK_INLINE A teacher_probability_scale(A m, A row_max, A row_log_sum, A teacher_factor) {
  return std::exp(softmax_center::exponent(m, row_max, teacher_factor) - row_log_sum);
}

// Adds chunk record r's share of ⟨P_vb, x − M⟩ (M = row_max: the row's student maximum) to dot and, for
// probability targets, its target mass to mass. Teacher logits: teacher t's row statistics are
// teacher_max[t·teacher_stride] and teacher_log_sum[t·teacher_stride]. Shared by the CPU's serial merge and the
// CUDA merge that splits a row's chunks over lanes.
template <typename A>
DK_HOST_DEVICE DK_INLINE void add_chunk_dot(const A* r, RecordLayout layout, int64_t v, A row_max,
                                            bool skip_same_view, bool teacher_logits, const A* teacher_max,
                                            const A* teacher_log_sum, int64_t teacher_stride, A inv_student_temp,
                                            A teacher_factor, A& dot, A& mass) {
  const A shift = student_exponent(r[layout.student(v)], row_max, inv_student_temp);  // (m_vc − M)/τ_s ≤ 0
  if (teacher_logits) {
    for (int64_t t = 0; t < layout.teachers; ++t) {
      if (!paired(v, t, skip_same_view)) continue;
      const A weight = teacher_probability_scale(r[layout.teacher(t)], teacher_max[t * teacher_stride],
                                                 teacher_log_sum[t * teacher_stride], teacher_factor);
      dot += weight * (r[layout.pair(v, t)] + target_times_exponent(r[layout.teacher(t) + 1], shift));
    }
  } else {
    dot += r[layout.student(v) + 2] + target_times_exponent(r[layout.student(v) + 3], shift);
    mass += r[layout.student(v) + 3];
  }
}

// ΣP_vb for teacher logits: one unit of probability per paired teacher row.
template <typename A = float>
DK_HOST_DEVICE DK_INLINE A paired_teachers(int64_t v, int64_t teachers, bool skip_same_view) {
  A mass = 0;
  for (int64_t t = 0; t < teachers; ++t) mass += A(paired(v, t, skip_same_view));
  return mass;
}

// Merges the n_chunks records of row b (record c at records + c·chunk_stride) into the student statistics,
// target_sum[v·B + b], the teacher statistics (logits only) and returns Σ_v ℓ_vb (unweighted, unscaled).
// inv_student_temp = 1/τ_s and teacher_factor = 2/τ_t: the scales of the student and teacher exponents.
template <typename A>
DK_HOST_DEVICE A combine_row(const A* records, int64_t chunk_stride, int64_t n_chunks, RecordLayout layout,
                             bool skip_same_view, bool teacher_logits, int64_t batch, int64_t b,
                             RowStats<A> student_stats, A* target_sum, RowStats<A> teacher_stats,
                             A inv_student_temp, A teacher_factor) {
  if (teacher_logits) {
    for (int64_t t = 0; t < layout.teachers; ++t) {
      A m = -INFINITY, s = 0;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const A* r = records + c * chunk_stride + layout.teacher(t);
        merge_max_sum(m, s, r[0], r[1], teacher_factor);
      }
      teacher_stats.max(t, b) = m;
      teacher_stats.log_sum(t, b) = std::log(s);
    }
  }
  // Teacher t's statistics at teacher_max[t·batch] (logits only: the buffer is null for probability targets).
  const A* teacher_max = teacher_logits ? &teacher_stats.max(0, b) : nullptr;
  const A* teacher_log_sum = teacher_logits ? &teacher_stats.log_sum(0, b) : nullptr;
  A row_loss = 0;
  for (int64_t v = 0; v < layout.views; ++v) {
    A m = -INFINITY, s = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const A* r = records + c * chunk_stride + layout.student(v);
      merge_max_sum(m, s, r[0], r[1], inv_student_temp);
    }
    A mass = 0, dot = 0;  // ΣP and ⟨P, x − m⟩
    for (int64_t c = 0; c < n_chunks; ++c)
      add_chunk_dot(records + c * chunk_stride, layout, v, m, skip_same_view, teacher_logits,
                    teacher_max, teacher_log_sum, batch, inv_student_temp, teacher_factor, dot, mass);
    if (teacher_logits) mass = paired_teachers<A>(v, layout.teachers, skip_same_view);
    student_stats.max(v, b) = m;
    student_stats.log_sum(v, b) = std::log(s);
    target_sum[v * batch + b] = mass;
    row_loss += mass * std::log(s) - dot;
  }
  return row_loss;
}

}  // namespace soft_ce
}  // namespace dk
