// CPU multi-scale deformable attention (see ms_deform_attn.h, ms_deform_attn_math.h).
//
// Forward: one task per (n, q, m); its ≤ L·P·4 corner rows are listed once (pointer, a·w), then the D channels are
// swept in register blocks of up to 4 SIMD vectors with the corner list as the inner loop, so each output element is
// written once and nothing of size S×Lq (or Lq×L·P×D) is ever materialised.
// Backward: tasks over (n, m) own the grad_value slice (n, :, m, :) outright (scattered into a head-major copy), so
// the scatter needs no atomics and the sum order is fixed; when N·M tasks cannot fill the threads, the queries of a head are split into chunks, each
// accumulating into its own partial copy, reduced afterwards in chunk order (still deterministic for a given thread
// count). grad_locations and grad_weights of (n, q, m, l, p) come from four per-corner dot products with the upstream
// gradient, computed in the same pass over the channels as the scatter.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/dk_cpu_simd.h"
#include "ms_deform_attn.h"
#include "ms_deform_attn_math.h"

namespace dk {
namespace ms_deform_attn {
namespace {

constexpr int kMaxCorners = kMaxLevels * kMaxPoints * 4;

int clamp_threads(int num_threads, int64_t tasks) {
  return int(std::max<int64_t>(1, std::min<int64_t>(std::max(num_threads, 1), tasks)));
}

// W (1, 2 or 4) vectors of out = Σ_j w[j] · rows[j] from channel c, even and odd rows in separate accumulators:
// 2·W independent FMA chains, so the sum over up to L·P·4 rows is not bound by the FMA latency. Named variables,
// not arrays, keep the accumulators in registers.
template <typename T, int W>
inline typename cpu::Simd<T>::vec weighted_block(const T* const* rows, const T* w, int n_rows, int64_t c, T* out) {
  using S = cpu::Simd<T>;
  using V = typename S::vec;
  constexpr int VL = S::kLanes;
  V e0{}, e1{}, e2{}, e3{}, o0{}, o1{}, o2{}, o3{};
  int j = 0;
  for (; j + 2 <= n_rows; j += 2) {
    const V s0 = S::splat(w[j]), s1 = S::splat(w[j + 1]);
    const T* r0 = rows[j] + c;
    const T* r1 = rows[j + 1] + c;
    e0 += s0 * S::load(r0);
    o0 += s1 * S::load(r1);
    if constexpr (W >= 2) {
      e1 += s0 * S::load(r0 + VL);
      o1 += s1 * S::load(r1 + VL);
    }
    if constexpr (W == 4) {
      e2 += s0 * S::load(r0 + 2 * VL);
      o2 += s1 * S::load(r1 + 2 * VL);
      e3 += s0 * S::load(r0 + 3 * VL);
      o3 += s1 * S::load(r1 + 3 * VL);
    }
  }
  if (j < n_rows) {
    const V s0 = S::splat(w[j]);
    const T* r0 = rows[j] + c;
    e0 += s0 * S::load(r0);
    if constexpr (W >= 2) e1 += s0 * S::load(r0 + VL);
    if constexpr (W == 4) {
      e2 += s0 * S::load(r0 + 2 * VL);
      e3 += s0 * S::load(r0 + 3 * VL);
    }
  }
  e0 += o0;
  S::store(out + c, e0);
  V probe = e0 - e0;
  if constexpr (W >= 2) {
    e1 += o1;
    S::store(out + c + VL, e1);
    probe += e1 - e1;
  }
  if constexpr (W == 4) {
    e2 += o2;
    e3 += o3;
    S::store(out + c + 2 * VL, e2);
    S::store(out + c + 3 * VL, e3);
    probe += (e2 - e2) + (e3 - e3);
  }
  return probe;
}

// out[0, D) = Σ_j w[j] · rows[j][0, D). Returns Σ (out − out): 0 when every output is finite, else NaN (a
// finiteness probe that costs one subtract-add per vector; x − x is not folded without -ffinite-math-only).
template <typename T>
T weighted_rows(const T* const* rows, const T* w, int n_rows, int64_t d, T* out) {
  using S = cpu::Simd<T>;
  using V = typename S::vec;
  constexpr int VL = S::kLanes;
  V probe{};
  int64_t c = 0;
  for (; c + 4 * VL <= d; c += 4 * VL) probe += weighted_block<T, 4>(rows, w, n_rows, c, out);
  for (; c + 2 * VL <= d; c += 2 * VL) probe += weighted_block<T, 2>(rows, w, n_rows, c, out);
  for (; c + VL <= d; c += VL) probe += weighted_block<T, 1>(rows, w, n_rows, c, out);
  T scalar_probe = S::sum(probe);
  for (; c < d; ++c) {
    T even = T(0), odd = T(0);
    int j = 0;
    for (; j + 2 <= n_rows; j += 2) {
      even += w[j] * rows[j][c];
      odd += w[j + 1] * rows[j + 1][c];
    }
    if (j < n_rows) even += w[j] * rows[j][c];
    out[c] = even + odd;
    scalar_probe += out[c] - out[c];
  }
  return scalar_probe;
}

// Returns whether a location, a weight or an output is NaN/inf (the kernel skips NaN locations, so the output
// alone would not show them).
template <typename T>
bool forward_impl(const Sizes& s, const Levels& lv, const T* value, const T* loc, const T* attn, T* out,
                  int num_threads) {
  const int64_t tasks = s.batch * s.queries * s.heads, lp = s.levels * s.points;
  const int64_t pixel = s.heads * s.channels;  // stride between value rows
  const int threads = clamp_threads(num_threads, tasks);
  int nonfinite = 0;
#pragma omp parallel num_threads(threads) reduction(| : nonfinite)
  {
    cpu::FlushDenormals flush;
    T probe = T(0);
    const T* rows[kMaxCorners];
    T w[kMaxCorners];
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n = task / (s.queries * s.heads), m = task % s.heads;
      const T* base = value + n * s.spatial * pixel + m * s.channels;
      const T* xy = loc + task * lp * 2;
      const T* a = attn + task * lp;
      int n_rows = 0;
      for (int l = 0; l < lv.count; ++l) {
        const T* level = base + lv.start[l] * pixel;
        for (int64_t p = 0; p < s.points; ++p) {
          const int64_t i = l * s.points + p;
          probe += (xy[2 * i] - xy[2 * i]) + (xy[2 * i + 1] - xy[2 * i + 1]) + (a[i] - a[i]);
          Footprint<T> f;
          if (!footprint(xy[2 * i], xy[2 * i + 1], lv.height[l], lv.width[l], f)) continue;
          for (int k = 0; k < 4; ++k) {
            if (f.row[k] < 0) continue;
            rows[n_rows] = level + f.row[k] * pixel;
            w[n_rows++] = a[i] * f.weight[k];
          }
        }
      }
      probe += weighted_rows(rows, w, n_rows, s.channels, out + task * s.channels);
    }
    nonfinite |= int(probe != T(0));  // NaN != 0
  }
  return nonfinite != 0;
}

// Horizontal sum by halving (a fixed tree): log2(lanes) extract-and-add steps instead of Simd::sum's lane-by-lane
// chain, which the backward would pay four times per sample.
template <typename T, int Bytes>
T tree_sum(const void* v) {
  if constexpr (Bytes == int(sizeof(T))) {
    T x;
    std::memcpy(&x, v, sizeof(T));
    return x;
  } else if constexpr (Bytes == 2 * int(sizeof(T))) {
    T x[2];
    std::memcpy(x, v, sizeof(x));
    return x[0] + x[1];
  } else {
    typedef T H __attribute__((vector_size(Bytes / 2)));
    H lo, hi;
    std::memcpy(&lo, v, Bytes / 2);
    std::memcpy(&hi, static_cast<const char*>(v) + Bytes / 2, Bytes / 2);
    const H sum = lo + hi;
    return tree_sum<T, Bytes / 2>(&sum);
  }
}

template <typename T>
T hsum(typename cpu::Simd<T>::vec v) {
  return tree_sum<T, cpu::kVecBytes>(&v);
}

// gv[0, D) += alpha · g[0, D); returns Σ g·v.
template <typename T>
T dot_and_scatter(const T* g, const T* v, T* gv, T alpha, int64_t d) {
  using S = cpu::Simd<T>;
  using V = typename S::vec;
  constexpr int VL = S::kLanes;
  const V va = S::splat(alpha);
  V d0{}, d1{};
  int64_t c = 0;
  for (; c + 2 * VL <= d; c += 2 * VL) {
    const V g0 = S::load(g + c), g1 = S::load(g + c + VL);
    d0 += g0 * S::load(v + c);
    d1 += g1 * S::load(v + c + VL);
    S::store(gv + c, S::load(gv + c) + va * g0);
    S::store(gv + c + VL, S::load(gv + c + VL) + va * g1);
  }
  for (; c + VL <= d; c += VL) {
    const V g0 = S::load(g + c);
    d0 += g0 * S::load(v + c);
    S::store(gv + c, S::load(gv + c) + va * g0);
  }
  T total = hsum<T>(d0 + d1);
  for (; c < d; ++c) {
    total += g[c] * v[c];
    gv[c] += alpha * g[c];
  }
  return total;
}

// Each query chunk beyond the first costs a grad_value-sized accumulator: at most kMaxQueryChunks of them, so a
// 64-thread machine does not allocate 30 copies of grad_value for N·M = 2 (it leaves threads idle instead).
constexpr int64_t kMaxQueryChunks = 8;

int64_t query_chunks(int64_t batch, int64_t heads, int64_t queries, int num_threads) {
  const int64_t owners = batch * heads;
  if (owners <= 0 || owners >= num_threads || queries <= 1) return 1;
  return std::min<int64_t>(std::min<int64_t>((num_threads + owners - 1) / owners, queries), kMaxQueryChunks);
}

// Scratch of the backward, in elements of the value's dtype. With M > 1 heads the scatter can run on head-major copies,
// (N, M, S, D): the value rows of one head and their gradient rows are then contiguous, so a bilinear footprint
// touches neighbouring cache lines instead of lines 1 KB apart (about 2× faster at Grounding DINO's shapes).
// Layout: [value (N, M, S, D)] [accumulator 0] [accumulator 1] ... for M > 1; [accumulator 1] ... for M = 1, whose
// accumulator 0 is grad_value itself.
// The copies cost three passes over N·S·M·D, so they are made only when the samples outnumber the value rows (the
// encoder, Lq = S: yes; a decoder's 900 queries on 22k pixels: no).
bool use_head_major(int64_t spatial, int64_t heads, int64_t queries, int64_t levels, int64_t points) {
  return heads > 1 && queries * levels * points >= 2 * spatial;
}

int64_t backward_workspace_elements(int64_t batch, int64_t spatial, int64_t heads, int64_t channels,
                                    int64_t queries, int64_t levels, int64_t points, int num_threads) {
  const int64_t numel = batch * spatial * heads * channels, chunks = query_chunks(batch, heads, queries, num_threads);
  return use_head_major(spatial, heads, queries, levels, points) ? (1 + chunks) * numel : (chunks - 1) * numel;
}

template <typename T>
void backward_impl(const Sizes& s, const Levels& lv, const T* grad_out, const T* value, const T* loc, const T* attn,
                   T* grad_value, T* grad_loc, T* grad_attn, T* workspace, int num_threads) {
  const int64_t lp = s.levels * s.points, d = s.channels, plane = s.spatial * d;
  const int64_t numel = s.batch * s.heads * plane, rows_total = s.batch * s.spatial * s.heads;
  const int64_t chunks = query_chunks(s.batch, s.heads, s.queries, num_threads);
  const int64_t per_chunk = (s.queries + chunks - 1) / chunks;
  const int64_t tasks = s.batch * s.heads * chunks;
  const bool head_major = use_head_major(s.spatial, s.heads, s.queries, s.levels, s.points);
  const T* vsrc = head_major ? workspace : value;
  T* acc0 = head_major ? workspace + numel : grad_value;
  T* acc_rest = head_major ? workspace + 2 * numel : workspace;  // accumulators 1 .. chunks − 1
  const int64_t stride = head_major ? d : s.heads * d;            // between the value rows of one head
  const int threads = clamp_threads(num_threads, std::max(tasks, numel / 65536 + 1));
#pragma omp parallel num_threads(threads)
  {
    cpu::FlushDenormals flush;
    if (head_major) {
      // value (N, S, M, D) → (N, M, S, D)
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows_total; ++r) {
        const int64_t n = r / (s.spatial * s.heads), sp = (r / s.heads) % s.spatial, m = r % s.heads;
        std::memcpy(workspace + (n * s.heads + m) * plane + sp * d, value + r * d, size_t(d) * sizeof(T));
      }
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < numel; ++i) acc0[i] = T(0);
    if (chunks > 1) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < (chunks - 1) * numel; ++i) acc_rest[i] = T(0);
    }
    // Implicit barriers above: the copy is complete and every accumulator zero before any task starts.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t chunk = task % chunks, nm = task / chunks, n = nm / s.heads, m = nm % s.heads;
      const int64_t q0 = chunk * per_chunk, q1 = std::min(s.queries, q0 + per_chunk);
      // (n, m) slice: row r at r·stride
      const int64_t slice = head_major ? nm * plane : n * s.spatial * s.heads * d + m * d;
      const T* vbase = vsrc + slice;
      T* gbase = (chunk == 0 ? acc0 : acc_rest + (chunk - 1) * numel) + slice;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t row = (n * s.queries + q) * s.heads + m;
        const T* g = grad_out + row * d;
        const T* xy = loc + row * lp * 2;
        const T* a = attn + row * lp;
        T* gxy = grad_loc + row * lp * 2;
        T* ga = grad_attn + row * lp;
        for (int l = 0; l < lv.count; ++l) {
          const int64_t level = lv.start[l] * stride;
          for (int64_t p = 0; p < s.points; ++p) {
            const int64_t i = l * s.points + p;
            Footprint<T> f;
            if (!footprint(xy[2 * i], xy[2 * i + 1], lv.height[l], lv.width[l], f)) {
              gxy[2 * i] = gxy[2 * i + 1] = ga[i] = T(0);
              continue;
            }
            T dot[4];
            for (int k = 0; k < 4; ++k) {
              if (f.row[k] < 0) {
                dot[k] = T(0);
                continue;
              }
              const int64_t off = level + f.row[k] * stride;
              dot[k] = dot_and_scatter(g, vbase + off, gbase + off, a[i] * f.weight[k], d);
            }
            sample_gradients(f, dot, a[i], lv.height[l], lv.width[l], ga[i], gxy[2 * i], gxy[2 * i + 1]);
          }
        }
      }
    }
    if (head_major || chunks > 1) {
      // grad_value (N, S, M, D) = Σ_chunk accumulator, in chunk order. Without the head-major copies accumulator 0
      // is grad_value itself and this adds the others in place.
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows_total; ++r) {
        const int64_t n = r / (s.spatial * s.heads), sp = (r / s.heads) % s.spatial, m = r % s.heads;
        const int64_t src = head_major ? (n * s.heads + m) * plane + sp * d : r * d;
        T* dst = grad_value + r * d;
        for (int64_t c = 0; c < d; ++c) {
          T sum = acc0[src + c];
          for (int64_t k = 0; k + 1 < chunks; ++k) sum += acc_rest[k * numel + src + c];
          dst[c] = sum;
        }
      }
    }
  }
}

template <typename Body>
void dispatch(int dtype, Body&& body) {
  check_dtype(dtype, dtype == kFloat32 || dtype == kFloat64, kOp, "value");
  if (dtype == kFloat64)
    body(static_cast<double*>(nullptr));
  else
    body(static_cast<float*>(nullptr));
}

int64_t element_size(int dtype) { return dtype == kFloat64 ? 8 : 4; }

}  // namespace

bool forward_cpu(std::uintptr_t value, std::uintptr_t spatial_shapes, std::uintptr_t level_start_index,
                 std::uintptr_t sampling_locations, std::uintptr_t attention_weights, int dtype, int64_t batch,
                 int64_t spatial, int64_t heads, int64_t channels, int64_t queries, int64_t levels, int64_t points,
                 std::uintptr_t output, int num_threads) {
  const Sizes s{batch, spatial, heads, channels, queries, levels, points};
  const Levels lv = read_levels(spatial_shapes, level_start_index, s);
  check_dtype(dtype, dtype == kFloat32 || dtype == kFloat64, kOp, "value");
  if (batch * queries == 0) return false;
  check_pointer(as_ptr<void>(value), kOp, "value");
  check_pointer(as_ptr<void>(sampling_locations), kOp, "sampling_locations");
  check_pointer(as_ptr<void>(attention_weights), kOp, "attention_weights");
  check_pointer(as_ptr<void>(output), kOp, "output");
  bool nonfinite = false;
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    nonfinite = forward_impl<T>(s, lv, as_ptr<const T>(value), as_ptr<const T>(sampling_locations),
                    as_ptr<const T>(attention_weights), as_ptr<T>(output), num_threads);
  });
  return nonfinite;
}

int64_t backward_workspace_bytes_cpu(int64_t batch, int64_t spatial, int64_t heads, int64_t channels,
                                     int64_t queries, int64_t levels, int64_t points, int dtype, int num_threads) {
  check_dtype(dtype, dtype == kFloat32 || dtype == kFloat64, kOp, "value");
  DK_CHECK_ARG(batch >= 0 && spatial >= 0 && heads >= 0 && channels >= 0 && queries >= 0, kOp, "value",
               "has negative sizes");
  return backward_workspace_elements(batch, spatial, heads, channels, queries, levels, points, num_threads) *
         element_size(dtype);
}

void backward_cpu(std::uintptr_t grad_output, std::uintptr_t value, std::uintptr_t spatial_shapes,
                  std::uintptr_t level_start_index, std::uintptr_t sampling_locations,
                  std::uintptr_t attention_weights, int dtype, int64_t batch, int64_t spatial, int64_t heads,
                  int64_t channels, int64_t queries, int64_t levels, int64_t points, std::uintptr_t grad_value,
                  std::uintptr_t grad_locations, std::uintptr_t grad_weights, std::uintptr_t workspace,
                  int64_t workspace_bytes, int num_threads) {
  const Sizes s{batch, spatial, heads, channels, queries, levels, points};
  const Levels lv = read_levels(spatial_shapes, level_start_index, s);
  check_dtype(dtype, dtype == kFloat32 || dtype == kFloat64, kOp, "value");
  if (batch * queries == 0) {  // nothing is sampled: grad_value is zero (and empty when N = 0)
    if (batch > 0) {
      check_pointer(as_ptr<void>(grad_value), kOp, "grad_value");
      std::memset(as_ptr<void>(grad_value), 0, size_t(batch * spatial * heads * channels * element_size(dtype)));
    }
    return;
  }
  check_pointer(as_ptr<void>(grad_value), kOp, "grad_value");
  for (auto [ptr, name] : {std::pair{grad_output, "grad_output"}, {value, "value"},
                           {sampling_locations, "sampling_locations"}, {attention_weights, "attention_weights"},
                           {grad_locations, "grad_locations"}, {grad_weights, "grad_weights"}})
    check_pointer(as_ptr<void>(ptr), kOp, name);
  check_workspace(workspace, workspace_bytes,
                  backward_workspace_bytes_cpu(batch, spatial, heads, channels, queries, levels, points, dtype,
                                               num_threads),
                  element_size(dtype), kOp);
  dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    backward_impl<T>(s, lv, as_ptr<const T>(grad_output), as_ptr<const T>(value),
                     as_ptr<const T>(sampling_locations), as_ptr<const T>(attention_weights), as_ptr<T>(grad_value),
                     as_ptr<T>(grad_locations), as_ptr<T>(grad_weights), as_ptr<T>(workspace), num_threads);
  });
}

}  // namespace ms_deform_attn
}  // namespace dk
