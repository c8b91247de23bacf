// Arithmetic shared by the CPU and CUDA soft cross-entropy kernels: the per-chunk record layout and the exact
// merge of chunk records into per-row statistics and the row loss.
//
// Rows are split into chunks of columns so that one row can be worked on by several threads or blocks. With
// x = z/τ_s, a chunk c of student row (v, b) is summarised by its max m_vc, s_vc = Σ exp(x − m_vc) and, for
// probability targets, d_vc = Σ P·(x − m_vc) and ΣP over the chunk. For teacher logits, teacher chunk t has
// m_tc, s_tc = Σ e_t with e_t = exp(a_t − m_tc), a_t = (z_t − center)/τ_t, and each pair has
// d_vtc = Σ e_t·(x_v − m_vc). Working with x − m (never x itself) keeps ℓ = ΣP·log s − ⟨P, x − M⟩ accurate for
// logits of any magnitude: no LSE of 1e5 is subtracted from another 1e5.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/dk_common.h"
#include "../common/dk_softmax.h"

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

// Per-row statistics are kept as (max, log Σexp(x − max)) pairs, never as their sum: LSE = max + log s rounds to
// the spacing of max (2.4e-4 at 2500), while exp((x − max) − log s) stays accurate for offsets of any size.
// stats (2, R, B): stats[r·B + b] = max, stats[R·B + r·B + b] = log-sum.
template <typename A>
struct RowStats {
  A* stats;
  int64_t rows, batch;
  DK_HOST_DEVICE A& max(int64_t r, int64_t b) const { return stats[r * batch + b]; }
  DK_HOST_DEVICE A& log_sum(int64_t r, int64_t b) const { return stats[(rows + r) * batch + b]; }
};

// Merges the n_chunks records of row b (record c at records + c·chunk_stride) into the student statistics,
// target_sum[v·B + b], the teacher statistics (logits only) and returns Σ_v ℓ_vb (unweighted, unscaled).
template <typename A>
DK_HOST_DEVICE A combine_row(const A* records, int64_t chunk_stride, int64_t n_chunks, RecordLayout layout,
                             bool skip_same_view, bool teacher_logits, int64_t batch, int64_t b,
                             RowStats<A> student_stats, A* target_sum, RowStats<A> teacher_stats) {
  if (teacher_logits) {
    for (int64_t t = 0; t < layout.teachers; ++t) {
      A m = -INFINITY, s = 0;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const A* r = records + c * chunk_stride + layout.teacher(t);
        merge_max_sum(m, s, r[0], r[1]);
      }
      teacher_stats.max(t, b) = m;
      teacher_stats.log_sum(t, b) = std::log(s);
    }
  }
  A row_loss = 0;
  for (int64_t v = 0; v < layout.views; ++v) {
    A m = -INFINITY, s = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const A* r = records + c * chunk_stride + layout.student(v);
      merge_max_sum(m, s, r[0], r[1]);
    }
    A mass = 0, dot = 0;  // ΣP and ⟨P, x − m⟩
    for (int64_t c = 0; c < n_chunks; ++c) {
      const A* r = records + c * chunk_stride;
      const A shift = r[layout.student(v)] - m;  // m_vc − M ≤ 0
      if (teacher_logits) {
        for (int64_t t = 0; t < layout.teachers; ++t) {
          if (!paired(v, t, skip_same_view)) continue;
          // exp(m_tc − LSE_t) ≤ 1, from the max and the log-sum separately
          const A weight = std::exp((r[layout.teacher(t)] - teacher_stats.max(t, b)) - teacher_stats.log_sum(t, b));
          dot += weight * (r[layout.pair(v, t)] + shift * r[layout.teacher(t) + 1]);
        }
      } else {
        dot += r[layout.student(v) + 2] + shift * r[layout.student(v) + 3];
        mass += r[layout.student(v) + 3];
      }
    }
    if (teacher_logits) {
      for (int64_t t = 0; t < layout.teachers; ++t) mass += A(paired(v, t, skip_same_view));
    }
    student_stats.max(v, b) = m;
    student_stats.log_sum(v, b) = std::log(s);
    target_sum[v * batch + b] = mass;
    row_loss += mass * std::log(s) - dot;
  }
  return row_loss;
}

}  // namespace soft_ce
}  // namespace dk
