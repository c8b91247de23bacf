// KoLeo and nearest-neighbour search on the CPU: OpenMP over row blocks, a register-blocked inner-product
// micro-kernel, and the arg-max folded into the tiles so no n×m similarity matrix is ever formed.
//
// Candidate rows are packed once into panels of W rows stored k-major (panel p, element (r, k) at
// P[p*W*dim + k*W + r]), so the micro-kernel reads W consecutive similarities' worth of candidates with two
// vector loads per k and broadcasts one query value per row. When x is searched against itself only the tiles
// on and above the diagonal are computed: each off-diagonal tile updates the row winners of its query block
// and, transposed, the column winners of its candidate block.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/dk_cpu_simd.h"
#include "koleo.h"
#include "koleo_math.h"

namespace dk {
namespace koleo {
namespace {

// 8 rows × 2 vectors = 16 of the 32 zmm registers as accumulators; 8 of 16 below AVX-512.
constexpr int kRowsPerMicroTile = cpu::kVecBytes == 64 ? 8 : 4;

template <typename T>
struct Tiling {
  typedef typename cpu::Simd<T>::vec vec;
  static constexpr int kLanes = cpu::Simd<T>::kLanes;
  static constexpr int kWidth = 2 * kLanes;  // W: rows per panel = columns per tile
  // k-chunk: one chunk of a panel is 16 KB, so a query panel, a candidate panel and the tile sit in L1.
  static constexpr int kChunk = 16384 / (kWidth * int(sizeof(T)));
  static_assert(kWidth % kRowsPerMicroTile == 0, "tile rows must split into micro-tiles");
};

template <typename T>
int64_t padded_rows(int64_t rows) {
  const int64_t w = Tiling<T>::kWidth;
  return (rows + w - 1) / w * w;
}

// acc[r][·] (+)= Σ_k a(r, k) · b[k][·] for r < kRowsPerMicroTile. a(r, k) = a[r*a_row_stride + k*a_k_stride];
// b is a panel (k-major, W wide); c is the tile, row stride W.
template <typename T>
inline void micro_tile(const T* a, int64_t a_row_stride, int64_t a_k_stride, const T* b, int64_t k_count, T* c,
                       bool accumulate) {
  using V = typename Tiling<T>::vec;
  constexpr int L = Tiling<T>::kLanes, W = Tiling<T>::kWidth, R = kRowsPerMicroTile;
  V acc[R][2];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (accumulate) {
      std::memcpy(&acc[r][0], c + r * W, sizeof(V));
      std::memcpy(&acc[r][1], c + r * W + L, sizeof(V));
    } else {
      acc[r][0] = V{};
      acc[r][1] = V{};
    }
  }
  for (int64_t k = 0; k < k_count; ++k) {
    V b0, b1;
    std::memcpy(&b0, b + k * W, sizeof(V));
    std::memcpy(&b1, b + k * W + L, sizeof(V));
    const T* ak = a + k * a_k_stride;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T av = ak[r * a_row_stride];
      acc[r][0] += av * b0;
      acc[r][1] += av * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    std::memcpy(c + r * W, &acc[r][0], sizeof(V));
    std::memcpy(c + r * W + L, &acc[r][1], sizeof(V));
  }
}

// tile[r][c] = Σ_k a(r, k) · panel[k][c] over the full dim, for the W query rows at `a`.
template <typename T>
void compute_tile(const T* a, int64_t a_row_stride, int64_t a_k_stride, const T* panel, int64_t dim, T* tile) {
  constexpr int W = Tiling<T>::kWidth, R = kRowsPerMicroTile, KC = Tiling<T>::kChunk;
  for (int64_t k0 = 0; k0 < dim; k0 += KC) {
    const int64_t kk = std::min<int64_t>(KC, dim - k0);
    for (int r0 = 0; r0 < W; r0 += R)
      micro_tile<T>(a + r0 * a_row_stride + k0 * a_k_stride, a_row_stride, a_k_stride, panel + k0 * W, kk,
                    tile + r0 * W, k0 > 0);
  }
}

template <typename T>
struct Winners {  // best candidate per row, kept in separate arrays for the vector filter below
  T* sim;
  int64_t* idx;
};

template <typename T>
inline void offer(Winners<T> w, int64_t row, T sim, int64_t candidate) {
  if (nn_better<T>(sim, candidate, w.sim[row], w.idx[row])) {
    w.sim[row] = sim;
    w.idx[row] = candidate;
  }
}

// Bit c set when p[c] >= q[c], for the W = 2 vectors of a tile row.
template <typename T>
inline uint64_t ge_mask_row(const T* p, typename Tiling<T>::vec q0, typename Tiling<T>::vec q1) {
  using S = cpu::Simd<T>;
  return uint64_t(cpu::ge_mask(S::load(p), q0)) | (uint64_t(cpu::ge_mask(S::load(p + S::kLanes), q1)) << S::kLanes);
}

// Row winners from one tile: rows i0 + r (r < rows), candidates j0 + c (c < cols).
template <typename T>
void update_rows(const T* tile, int64_t i0, int rows, int64_t j0, int cols, bool exclude_self, Winners<T> w) {
  using S = cpu::Simd<T>;
  constexpr int W = Tiling<T>::kWidth;
  const bool full = cols == W && !(exclude_self && i0 < j0 + cols && j0 < i0 + rows);
  for (int r = 0; r < rows; ++r) {
    const T* row = tile + r * W;
    const int64_t i = i0 + r;
    if (full) {
      // Most tiles hold nothing as good as the current winner; ">=" keeps ties for nn_better's index rule.
      // NaN never passes: search_* repairs rows left without a candidate.
      const auto threshold = S::splat(w.sim[i]);
      for (uint64_t hits = ge_mask_row<T>(row, threshold, threshold); hits; hits &= hits - 1) {
        const int c = __builtin_ctzll(hits);
        offer(w, i, row[c], j0 + c);
      }
      continue;
    }
    for (int c = 0; c < cols; ++c) {
      const int64_t j = j0 + c;
      if (exclude_self && j == i) continue;
      offer(w, i, row[c], j);
    }
  }
}

// Column winners from one tile of the symmetric search: S[j][i] = tile[i - i0][j - j0] for candidate rows j.
template <typename T>
void update_columns(const T* tile, int64_t i0, int rows, int64_t j0, int cols, Winners<T> w) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes, W = Tiling<T>::kWidth;
  auto m0 = S::load(tile), m1 = S::load(tile + L);
  for (int r = 1; r < rows; ++r) {
    const auto v0 = S::load(tile + r * W), v1 = S::load(tile + r * W + L);
    m0 = v0 > m0 ? v0 : m0;
    m1 = v1 > m1 ? v1 : m1;
  }
  alignas(64) T colmax[W];
  S::store(colmax, m0);
  S::store(colmax + L, m1);
  uint64_t candidates;
  if (cols == W) {
    candidates = ge_mask_row<T>(colmax, S::load(w.sim + j0), S::load(w.sim + j0 + L));
  } else {
    candidates = 0;
    for (int c = 0; c < cols; ++c) candidates |= uint64_t(colmax[c] >= w.sim[j0 + c]) << c;
  }
  for (; candidates; candidates &= candidates - 1) {
    const int c = __builtin_ctzll(candidates);
    for (int r = 0; r < rows; ++r) offer(w, j0 + c, tile[r * W + c], i0 + r);
  }
}

// Rows whose every similarity was NaN never passed the filters: give them the first allowed candidate, so
// indices are always in range.
inline void repair_missing(int64_t n, int64_t m, bool exclude_self, int64_t* idx) {
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] < 0) idx[i] = (exclude_self && i == 0 && m > 1) ? 1 : 0;
}

template <typename T>
int64_t count_nonfinite_serial(const T* row, int64_t count) {
  int64_t bad = 0;
  for (int64_t k = 0; k < count; ++k) bad += std::isfinite(row[k]) ? 0 : 1;
  return bad;
}

// Packs rows [0, rows) of src (rows × dim) into panels; padding rows are zero. With `norms`, rows are normalised
// on the way: norms[i] = max(||x_i||, eps), panel row x_i * (1 / norms[i]). Returns the number of non-finite
// entries of src.
template <typename T>
int64_t pack_panels(const T* src, int64_t rows, int64_t dim, T* packed, int num_threads, T* norms = nullptr,
                    T eps = T(0)) {
  constexpr int W = Tiling<T>::kWidth;
  const int64_t n_panels = padded_rows<T>(rows) / W;
  int64_t nonfinite = 0;
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : nonfinite)
  for (int64_t p = 0; p < n_panels; ++p) {
    T* panel = packed + p * W * dim;
    for (int r = 0; r < W; ++r) {
      const int64_t i = p * W + r;
      if (i >= rows) {
        for (int64_t k = 0; k < dim; ++k) panel[k * W + r] = T(0);
        continue;
      }
      const T* row = src + i * dim;
      const T sum_sq = cpu::dot(row, row, dim);
      if (!std::isfinite(sum_sq))  // cheap test first; it also trips on overflow, so count exactly
        nonfinite += count_nonfinite_serial(row, dim);
      T scale = T(1);
      if (norms) {
        norms[i] = std::max(std::sqrt(sum_sq), eps);
        scale = T(1) / norms[i];
      }
      for (int64_t k = 0; k < dim; ++k) panel[k * W + r] = row[k] * scale;
    }
  }
  return nonfinite;
}

// Non-finite entries of a query matrix that is not packed, row by row as pack_panels does.
template <typename T>
int64_t count_nonfinite(const T* src, int64_t rows, int64_t dim, int num_threads) {
  int64_t nonfinite = 0;
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : nonfinite)
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = src + i * dim;
    if (!std::isfinite(cpu::dot(row, row, dim))) nonfinite += count_nonfinite_serial(row, dim);
  }
  return nonfinite;
}

// x (n × dim), already packed, against itself: only tiles with panel_j >= panel_i are computed.
template <typename T>
void search_symmetric(const T* packed, int64_t n, int64_t dim, bool exclude_self, T* out_sim, int64_t* out_idx,
                      int num_threads) {
  constexpr int W = Tiling<T>::kWidth;
  const int64_t n_panels = padded_rows<T>(n) / W;
  const T lowest = -std::numeric_limits<T>::infinity();
  std::fill(out_sim, out_sim + n, lowest);
  std::fill(out_idx, out_idx + n, int64_t(-1));
  const int threads = std::max(1, std::min<int>(num_threads, int(n_panels)));
  // Column winners are private per thread (another thread owns those rows), merged at the end.
  std::vector<T> col_sim(size_t(threads) * n, lowest);
  std::vector<int64_t> col_idx(size_t(threads) * n, -1);
  Winners<T> rows_w{out_sim, out_idx};
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    Winners<T> cols_w{col_sim.data() + size_t(t) * n, col_idx.data() + size_t(t) * n};
    alignas(64) T tile[W * W];
    // Panel i has n_panels - i tiles to do: dynamic scheduling from the heaviest row down balances the triangle.
#pragma omp for schedule(dynamic, 1)
    for (int64_t pi = 0; pi < n_panels; ++pi) {
      const T* a = packed + pi * W * dim;
      const int64_t i0 = pi * W;
      const int rows = int(std::min<int64_t>(W, n - i0));
      for (int64_t pj = pi; pj < n_panels; ++pj) {
        const int64_t j0 = pj * W;
        const int cols = int(std::min<int64_t>(W, n - j0));
        compute_tile<T>(a, 1, W, packed + pj * W * dim, dim, tile);
        update_rows<T>(tile, i0, rows, j0, cols, exclude_self, rows_w);
        if (pj != pi) update_columns<T>(tile, i0, rows, j0, cols, cols_w);
      }
    }
  }
  for (int t = 0; t < threads; ++t)
    for (int64_t i = 0; i < n; ++i) offer(rows_w, i, col_sim[size_t(t) * n + i], col_idx[size_t(t) * n + i]);
  repair_missing(n, n, exclude_self, out_idx);
}

// Queries x (n × dim, row-major) against packed candidates (m rows).
template <typename T>
void search_general(const T* x, int64_t n, const T* packed, int64_t m, int64_t dim, bool exclude_self,
                    T* out_sim, int64_t* out_idx, int num_threads) {
  constexpr int W = Tiling<T>::kWidth;
  const int64_t n_blocks = (n + W - 1) / W, m_panels = padded_rows<T>(m) / W;
  std::fill(out_sim, out_sim + n, -std::numeric_limits<T>::infinity());
  std::fill(out_idx, out_idx + n, int64_t(-1));
  Winners<T> w{out_sim, out_idx};
#pragma omp parallel num_threads(num_threads)
  {
    alignas(64) T tile[W * W];
    std::vector<T> tail;  // the last, partial query block, zero-padded to W rows
#pragma omp for schedule(dynamic, 1)
    for (int64_t bi = 0; bi < n_blocks; ++bi) {
      const int64_t i0 = bi * W;
      const int rows = int(std::min<int64_t>(W, n - i0));
      const T* a = x + i0 * dim;
      if (rows < W) {
        tail.assign(size_t(W) * dim, T(0));
        std::copy(a, a + rows * dim, tail.begin());
        a = tail.data();
      }
      for (int64_t pj = 0; pj < m_panels; ++pj) {
        const int64_t j0 = pj * W;
        compute_tile<T>(a, dim, 1, packed + pj * W * dim, dim, tile);
        update_rows<T>(tile, i0, rows, j0, int(std::min<int64_t>(W, m - j0)), exclude_self, w);
      }
    }
  }
  repair_missing(n, m, exclude_self, out_idx);
}

// out[d] = a[d]·sa − b[d]·sb + δ with both products rounded before the subtraction. The build contracts a·sa − b·sb
// into a fused multiply-add, which keeps one product unrounded: two identical rows then differ by a rounding error
// instead of exactly 0, and log(d + 1e-8) magnifies it (a batch with a duplicated image got a wrong loss).
#if defined(__clang__)
#define DK_NO_FP_CONTRACT __attribute__((noinline))
#elif defined(__GNUC__)
#define DK_NO_FP_CONTRACT __attribute__((noinline, optimize("fp-contract=off")))
#else
#define DK_NO_FP_CONTRACT
#endif
template <typename T>
DK_NO_FP_CONTRACT void scaled_difference(const T* __restrict__ a, T sa, const T* __restrict__ b, T sb, T delta,
                                         T* __restrict__ out, int64_t dim) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t d = 0; d < dim; ++d) out[d] = a[d] * sa - b[d] * sb + delta;
}

template <typename T>
int64_t koleo_forward_impl(const T* x, int64_t n, int64_t dim, T eps, T* loss, int64_t* nn_index, T* norms,
                           T* dists, T* packed, int num_threads) {
  const int64_t nonfinite = pack_panels<T>(x, n, dim, packed, num_threads, norms, eps);
  if (nonfinite > 0) {
    *loss = std::numeric_limits<T>::quiet_NaN();
    for (int64_t i = 0; i < n; ++i) {
      nn_index[i] = i == 0 ? 1 : 0;  // in range, so nothing downstream can read out of bounds
      dists[i] = std::numeric_limits<T>::quiet_NaN();
    }
    return nonfinite;
  }
  std::vector<T> sims(n);
  search_symmetric<T>(packed, n, dim, /*exclude_self=*/true, sims.data(), nn_index, num_threads);
  const T delta = T(kPairwiseEps);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<T> diff_row(dim);
    T* __restrict__ diff = diff_row.data();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = nn_index[i];
      const T *__restrict__ xi = x + i * dim, *__restrict__ xj = x + j * dim;
      const T inv_i = T(1) / norms[i], inv_j = T(1) / norms[j];
      scaled_difference<T>(xi, inv_i, xj, inv_j, delta, diff, dim);
      dists[i] = std::sqrt(cpu::dot(diff, diff, dim));
    }
  }
  double total = 0.0;  // serial and in double: deterministic whatever the thread count
  for (int64_t i = 0; i < n; ++i) total += double(koleo_term<T>(dists[i], eps));
  *loss = T(total / double(n));
  return 0;
}

template <typename T>
void koleo_backward_impl(T grad_loss, const T* x, int64_t n, int64_t dim, T eps, const int64_t* nn_index,
                         const T* norms, const T* dists, T* grad_x, int num_threads) {
  // Rows that chose k as their neighbour, in ascending order (counting sort): the scatter of the pairwise
  // term becomes a gather per row, with no atomics and a fixed summation order.
  std::vector<int64_t> start(n + 1, 0), chosen_by(n);
  for (int64_t i = 0; i < n; ++i) ++start[nn_index[i] + 1];
  for (int64_t k = 0; k < n; ++k) start[k + 1] += start[k];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) chosen_by[fill[nn_index[i]]++] = i;
  }
  const T delta = T(kPairwiseEps);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<T> scratch(3 * dim);
    T* __restrict__ grad_unit = scratch.data();  // (dim,) dL/dx̂_k
    T* __restrict__ unit_k = scratch.data() + dim;  // (dim,) x̂_k
    T* __restrict__ pair = scratch.data() + 2 * dim;  // (dim,) x̂_a − x̂_b + δ of one pair
#pragma omp for schedule(static)
    for (int64_t k = 0; k < n; ++k) {
      const T* __restrict__ xk = x + k * dim;
      const T inv_k = T(1) / norms[k];
      for (int64_t d = 0; d < dim; ++d) unit_k[d] = xk[d] * inv_k;
      {  // k's own term: + coef_k (x̂_k - x̂_nn(k) + δ)
        const T* __restrict__ xj = x + nn_index[k] * dim;
        const T inv_j = T(1) / norms[nn_index[k]];
        const T coef = koleo_diff_coef<T>(grad_loss, dists[k], eps, n);
        scaled_difference<T>(xk, inv_k, xj, inv_j, delta, pair, dim);
        for (int64_t d = 0; d < dim; ++d) grad_unit[d] = coef * pair[d];
      }
      for (int64_t e = start[k]; e < start[k + 1]; ++e) {  // rows i with nn(i) = k: - coef_i (x̂_i - x̂_k + δ)
        const int64_t i = chosen_by[e];
        const T* __restrict__ xi = x + i * dim;
        const T inv_i = T(1) / norms[i];
        const T coef = koleo_diff_coef<T>(grad_loss, dists[i], eps, n);
        scaled_difference<T>(xi, inv_i, xk, inv_k, delta, pair, dim);
        for (int64_t d = 0; d < dim; ++d) grad_unit[d] -= coef * pair[d];
      }
      const T dot = cpu::dot(unit_k, grad_unit, dim);
      T* __restrict__ gk = grad_x + k * dim;
      const T nk = norms[k];
      for (int64_t d = 0; d < dim; ++d) gk[d] = normalize_backward<T>(grad_unit[d], unit_k[d], dot, nk, inv_k, eps);
    }
  }
}

template <typename Body>
void dispatch_cpu_float_types(int dtype, const char* op, Body&& body) {
  switch (dtype) {
    case kFloat32: body(float(0)); break;
    case kFloat64: body(double(0)); break;
    default: check_dtype(dtype, false, op, "x");
  }
}

int resolve_threads(int num_threads) { return num_threads > 0 ? num_threads : omp_get_max_threads(); }

}  // namespace

int64_t workspace_bytes_cpu(int64_t n_candidates, int64_t dim, int dtype) {
  int64_t bytes = 0;
  dispatch_cpu_float_types(dtype, "koleo_workspace", [&](auto zero) {
    using T = decltype(zero);
    bytes = padded_rows<T>(n_candidates) * dim * int64_t(sizeof(T));
  });
  return bytes;
}

int64_t koleo_forward_cpu(std::uintptr_t x, int dtype, int64_t n, int64_t dim, double eps, std::uintptr_t loss,
                          std::uintptr_t nn_index, std::uintptr_t norms, std::uintptr_t dists,
                          std::uintptr_t workspace, int64_t workspace_bytes, int num_threads) {
  const char* op = "koleo_forward_cpu";
  DK_CHECK_ARG(n >= 2, op, "x", "needs at least 2 rows (KoLeo is undefined for one sample), got ", n);
  DK_CHECK_ARG(dim >= 1, op, "x", "needs at least one column, got ", dim);
  DK_CHECK_ARG(eps > 0 && std::isfinite(eps), op, "eps", "must be positive and finite, got ", eps);
  check_pointer(as_ptr<void>(x), op, "x");
  check_pointer(as_ptr<void>(loss), op, "loss");
  check_pointer(as_ptr<void>(nn_index), op, "nn_index");
  check_pointer(as_ptr<void>(norms), op, "norms");
  check_pointer(as_ptr<void>(dists), op, "dists");
  int64_t nonfinite = 0;
  dispatch_cpu_float_types(dtype, op, [&](auto zero) {
    using T = decltype(zero);
    check_workspace(workspace, workspace_bytes, padded_rows<T>(n) * dim * int64_t(sizeof(T)), 64, op);
    nonfinite = koleo_forward_impl<T>(as_ptr<const T>(x), n, dim, T(eps), as_ptr<T>(loss), as_ptr<int64_t>(nn_index),
                                      as_ptr<T>(norms), as_ptr<T>(dists), as_ptr<T>(workspace),
                                      resolve_threads(num_threads));
  });
  return nonfinite;
}

void koleo_backward_cpu(std::uintptr_t grad_loss, std::uintptr_t x, int dtype, int64_t n, int64_t dim, double eps,
                        std::uintptr_t nn_index, std::uintptr_t norms, std::uintptr_t dists, std::uintptr_t grad_x,
                        int num_threads) {
  const char* op = "koleo_backward_cpu";
  DK_CHECK_ARG(n >= 2, op, "x", "needs at least 2 rows, got ", n);
  DK_CHECK_ARG(dim >= 1, op, "x", "needs at least one column, got ", dim);
  DK_CHECK_ARG(eps > 0 && std::isfinite(eps), op, "eps", "must be positive and finite, got ", eps);
  for (auto [ptr, name] : {std::pair{grad_loss, "grad_loss"}, {x, "x"}, {nn_index, "nn_index"}, {norms, "norms"},
                           {dists, "dists"}, {grad_x, "grad_x"}})
    check_pointer(as_ptr<void>(ptr), op, name);
  const int64_t* index = as_ptr<const int64_t>(nn_index);
  for (int64_t i = 0; i < n; ++i)
    DK_CHECK_ARG(index[i] >= 0 && index[i] < n, op, "nn_index", "entry ", i, " is ", index[i], ", outside [0, ",
                 n, ")");
  dispatch_cpu_float_types(dtype, op, [&](auto zero) {
    using T = decltype(zero);
    koleo_backward_impl<T>(*as_ptr<const T>(grad_loss), as_ptr<const T>(x), n, dim, T(eps), index,
                           as_ptr<const T>(norms), as_ptr<const T>(dists), as_ptr<T>(grad_x),
                           resolve_threads(num_threads));
  });
}

int64_t nearest_neighbors_cpu(std::uintptr_t x, std::uintptr_t y, int dtype, int64_t n, int64_t m, int64_t dim,
                              bool exclude_self, std::uintptr_t out_sim, std::uintptr_t out_idx,
                              std::uintptr_t workspace, int64_t workspace_bytes, int num_threads) {
  const char* op = "nearest_neighbors_cpu";
  DK_CHECK_ARG(n >= 0, op, "x", "has a negative row count ", n);
  DK_CHECK_ARG(m >= 1, op, "y", "needs at least one candidate row, got ", m);
  DK_CHECK_ARG(!exclude_self || m >= 2, op, "y", "needs at least 2 rows when exclude_self is set, got ", m);
  DK_CHECK_ARG(dim >= 1, op, "x", "needs at least one column, got ", dim);
  if (n == 0) return 0;
  for (auto [ptr, name] : {std::pair{x, "x"}, {y, "y"}, {out_sim, "out_sim"}, {out_idx, "out_idx"}})
    check_pointer(as_ptr<void>(ptr), op, name);
  const int threads = resolve_threads(num_threads);
  int64_t nonfinite = 0;
  dispatch_cpu_float_types(dtype, op, [&](auto zero) {
    using T = decltype(zero);
    check_workspace(workspace, workspace_bytes, padded_rows<T>(m) * dim * int64_t(sizeof(T)), 64, op);
    const T *xs = as_ptr<const T>(x), *ys = as_ptr<const T>(y);
    T* packed = as_ptr<T>(workspace);
    nonfinite = pack_panels<T>(ys, m, dim, packed, threads);
    const bool self_search = x == y && n == m;
    if (!self_search) nonfinite += count_nonfinite<T>(xs, n, dim, threads);
    if (self_search)
      search_symmetric<T>(packed, n, dim, exclude_self, as_ptr<T>(out_sim), as_ptr<int64_t>(out_idx), threads);
    else
      search_general<T>(xs, n, packed, m, dim, exclude_self, as_ptr<T>(out_sim), as_ptr<int64_t>(out_idx), threads);
  });
  return nonfinite;
}

}  // namespace koleo
}  // namespace dk
