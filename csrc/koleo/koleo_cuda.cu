// KoLeo and nearest-neighbour search on CUDA.
//
// Search: 64×64 tiles of inner products (shared-memory staged, 4×4 per thread, float32 FMA) fused with the
// row-wise arg-max, so no n×m matrix reaches global memory. Column tiles are split over gridDim.y to fill the
// GPU at small n; a second kernel merges the per-split winners in a fixed order (nn_better is a total order,
// so the result does not depend on scheduling). 16-bit inputs are converted to float32 while staging.
// KoLeo: rows are normalised once into a float32 workspace, searched against themselves, then distances and a
// deterministic block reduction give the loss. Backward: one block per row k gathers the rows that chose k
// (warp ballots over nn_index, ascending), so there are no atomics and the summation order is fixed.
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../common/dk_cuda.cuh"
#include "koleo.h"
#include "koleo_math.h"

namespace dk {
namespace koleo {
namespace {

constexpr int kTile = 64;        // rows and columns per search tile
constexpr int kTileK = 16;       // k-slice staged in shared memory
constexpr int kSearchThreads = 256;
constexpr int kRowThreads = 256;  // warp-per-row kernels: 8 rows per block
constexpr int kBackwardThreads = 128;
constexpr int kIndexChunk = 256;  // nn_index entries staged per step of the backward gather
constexpr int64_t kMaxBackwardDim = 8192;  // the row's gradient lives in shared memory (32 KB)

int64_t align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

struct SearchPlan {
  int64_t splits;           // gridDim.y
  int64_t cols_per_split;   // multiple of kTile
};

SearchPlan plan_search(int64_t n, int64_t m, int sm_count) {
  const int64_t row_blocks = (n + kTile - 1) / kTile, col_tiles = (m + kTile - 1) / kTile;
  const int64_t target_blocks = 2 * int64_t(sm_count);
  int64_t splits = (target_blocks + row_blocks - 1) / row_blocks;
  splits = splits < 1 ? 1 : (splits > col_tiles ? col_tiles : splits);
  const int64_t tiles_per_split = (col_tiles + splits - 1) / splits;
  return {(col_tiles + tiles_per_split - 1) / tiles_per_split, tiles_per_split * kTile};
}

int64_t search_workspace_bytes(int64_t n, const SearchPlan& plan) {
  return align256(plan.splits * n * int64_t(sizeof(float))) + align256(plan.splits * n * int64_t(sizeof(int64_t)));
}

// ---- kernels ----

// One warp per row: clamped norm, x * (1 / norm) in float32 (as the CPU kernel), count of non-finite entries.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    dk_koleo_normalize_kernel(const T* __restrict__ x,  // (n, dim)
                              int64_t n, int64_t dim, float eps,
                              float* __restrict__ unit,   // (n, dim)
                              float* __restrict__ norms,  // (n,)
                              int* __restrict__ nonfinite) {
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.x) * (kRowThreads / 32) + (threadIdx.x >> 5);
  if (i >= n) return;
  const T* row = x + i * dim;
  float sum_sq = 0.f;
  int bad = 0;
  for (int64_t d = lane; d < dim; d += 32) {
    const float v = to_float(row[d]);
    sum_sq += v * v;
    bad += isfinite(v) ? 0 : 1;
  }
  sum_sq = warp_sum(sum_sq);
  for (int offset = 16; offset > 0; offset >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, offset);
  const float norm = fmaxf(sqrtf(sum_sq), eps), inv = 1.f / norm;
  for (int64_t d = lane; d < dim; d += 32) unit[i * dim + d] = to_float(row[d]) * inv;
  if (lane == 0) {
    norms[i] = norm;
    if (bad) atomicAdd(nonfinite, bad);
  }
}

template <typename T>
__global__ void dk_count_nonfinite_kernel(const T* __restrict__ data, int64_t count, int* __restrict__ nonfinite) {
  int bad = 0;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x)
    bad += isfinite(to_float(data[e])) ? 0 : 1;
  for (int offset = 16; offset > 0; offset >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, offset);
  if ((threadIdx.x & 31) == 0 && bad) atomicAdd(nonfinite, bad);
}

// Per (row block, column split): the best candidate of each row among the split's columns.
template <typename T>
__global__ void __launch_bounds__(kSearchThreads)
    dk_nn_partial_kernel(const T* __restrict__ x,  // (n, dim) queries
                         const T* __restrict__ y,  // (m, dim) candidates
                         int64_t n, int64_t m, int64_t dim, bool exclude_self, int64_t cols_per_split,
                         float* __restrict__ part_sim,    // (splits, n)
                         int64_t* __restrict__ part_idx)  // (splits, n)
{
  __shared__ __align__(16) float xs[kTileK][kTile + 4];  // k-major, so a thread reads 4 rows with one float4
  __shared__ __align__(16) float ys[kTileK][kTile + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t row0 = int64_t(blockIdx.x) * kTile;
  const int64_t col_begin = int64_t(blockIdx.y) * cols_per_split;
  const int64_t col_end = min(m, col_begin + cols_per_split);
  const int load_row = tid >> 2, load_k = (tid & 3) * 4;

  float best_sim[4];
  int64_t best_idx[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    best_sim[r] = -INFINITY;
    best_idx[r] = -1;
  }

  for (int64_t col0 = col_begin; col0 < col_end; col0 += kTile) {
    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;

    for (int64_t k0 = 0; k0 < dim; k0 += kTileK) {
      const int64_t xr = row0 + load_row, yr = col0 + load_row;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t k = k0 + load_k + e;
        xs[load_k + e][load_row] = (xr < n && k < dim) ? to_float(x[xr * dim + k]) : 0.f;
        ys[load_k + e][load_row] = (yr < col_end && k < dim) ? to_float(y[yr * dim + k]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        const float4 a = *reinterpret_cast<const float4*>(&xs[kk][ty * 4]);
        const float4 b = *reinterpret_cast<const float4*>(&ys[kk][tx * 4]);
        const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t i = row0 + ty * 4 + r;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t j = col0 + tx * 4 + c;
        if (j < col_end && !(exclude_self && j == i) && nn_better<float>(acc[r][c], j, best_sim[r], best_idx[r])) {
          best_sim[r] = acc[r][c];
          best_idx[r] = j;
        }
      }
    }
  }
  // The 16 threads sharing a row are the 16 lanes of one half-warp.
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    for (int offset = 8; offset > 0; offset >>= 1) {
      const float other_sim = __shfl_xor_sync(0xffffffffu, best_sim[r], offset);
      const long long other_idx = __shfl_xor_sync(0xffffffffu, (long long)best_idx[r], offset);
      if (nn_better<float>(other_sim, other_idx, best_sim[r], best_idx[r])) {
        best_sim[r] = other_sim;
        best_idx[r] = other_idx;
      }
    }
    const int64_t i = row0 + ty * 4 + r;
    if (tx == 0 && i < n) {
      part_sim[int64_t(blockIdx.y) * n + i] = best_sim[r];
      part_idx[int64_t(blockIdx.y) * n + i] = best_idx[r];
    }
  }
}

__global__ void dk_nn_reduce_kernel(const float* __restrict__ part_sim, const int64_t* __restrict__ part_idx,
                                    int64_t splits, int64_t n,
                                    float* __restrict__ out_sim,    // (n,) or null
                                    int64_t* __restrict__ out_idx)  // (n,)
{
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float sim = -INFINITY;
  int64_t idx = -1;
  for (int64_t s = 0; s < splits; ++s)
    if (nn_better<float>(part_sim[s * n + i], part_idx[s * n + i], sim, idx)) {
      sim = part_sim[s * n + i];
      idx = part_idx[s * n + i];
    }
  if (out_sim) out_sim[i] = sim;
  out_idx[i] = idx;
}

// One warp per row: dist_i = ||unit_i - unit_nn(i) + 1e-8||.
__global__ void __launch_bounds__(kRowThreads)
    dk_koleo_dist_kernel(const float* __restrict__ unit, const int64_t* __restrict__ nn_index, int64_t n,
                         int64_t dim, float* __restrict__ dists) {
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.x) * (kRowThreads / 32) + (threadIdx.x >> 5);
  if (i >= n) return;
  const int64_t j = nn_index[i];
  const float delta = float(kPairwiseEps);
  float sum_sq = 0.f;
  for (int64_t d = lane; d < dim; d += 32) {
    const float v = unit[i * dim + d] - unit[j * dim + d] + delta;
    sum_sq += v * v;
  }
  sum_sq = warp_sum(sum_sq);
  if (lane == 0) dists[i] = sqrtf(sum_sq);
}

// One block: loss = mean_i -log(dist_i + eps), summed in double in a fixed order; NaN if the input had any
// non-finite entry.
__global__ void __launch_bounds__(256)
    dk_koleo_loss_kernel(const float* __restrict__ dists, int64_t n, float eps, const int* __restrict__ nonfinite,
                         float* __restrict__ loss) {
  __shared__ double partial[256];
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += double(koleo_term<float>(dists[i], eps));
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = *nonfinite > 0 ? __int_as_float(0x7fc00000) : float(partial[0] / double(n));
}

// One block per row k: grad_unit_k = coef_k v_k - Σ_{i: nn(i)=k} coef_i v_i, then the normalisation backward.
template <typename T>
__global__ void __launch_bounds__(kBackwardThreads)
    dk_koleo_backward_kernel(const float* __restrict__ grad_loss,  // ()
                             const T* __restrict__ x,              // (n, dim)
                             int64_t n, int64_t dim, float eps,
                             const int64_t* __restrict__ nn_index,  // (n,)
                             const float* __restrict__ norms,       // (n,)
                             const float* __restrict__ dists,       // (n,)
                             T* __restrict__ grad_x)                // (n, dim)
{
  extern __shared__ float grad_unit[];  // (dim,): each thread owns the channels d ≡ threadIdx.x (mod blockDim)
  __shared__ int64_t chunk[kIndexChunk];
  __shared__ float scratch[32];
  const int64_t k = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const float g = *grad_loss, delta = float(kPairwiseEps);
  const float nk = norms[k], inv_k = 1.f / nk;
  const T* xk = x + k * dim;
  {
    const int64_t j = nn_index[k];
    if (j < 0 || j >= n) {  // the kernel does not trust the index: a bad one poisons the row, never reads out of bounds
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) grad_x[k * dim + d] = from_float<T>(NAN);
      return;  // uniform across the block: no barrier has been reached yet
    }
    const float inv_j = 1.f / norms[j];
    const float coef = koleo_diff_coef<float>(g, dists[k], eps, n);
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x)
      // __fmul_rn: both products rounded (no FMA contraction), so identical rows give exactly δ as in the forward
      grad_unit[d] = coef * (__fmul_rn(to_float(xk[d]), inv_k) - __fmul_rn(to_float(x[j * dim + d]), inv_j) + delta);
  }
  for (int64_t c0 = 0; c0 < n; c0 += kIndexChunk) {
    __syncthreads();
    for (int e = threadIdx.x; e < kIndexChunk; e += blockDim.x) chunk[e] = c0 + e < n ? nn_index[c0 + e] : -1;
    __syncthreads();
    for (int e0 = 0; e0 < kIndexChunk; e0 += 32) {
      unsigned match = __ballot_sync(0xffffffffu, chunk[e0 + lane] == k);
      while (match) {  // ascending i: a fixed summation order
        const int e = e0 + __ffs(match) - 1;
        match &= match - 1;
        const int64_t i = c0 + e;
        const float inv_i = 1.f / norms[i];
        const float coef = koleo_diff_coef<float>(g, dists[i], eps, n);
        for (int64_t d = threadIdx.x; d < dim; d += blockDim.x)
          grad_unit[d] -= coef * (__fmul_rn(to_float(x[i * dim + d]), inv_i) - __fmul_rn(to_float(xk[d]), inv_k) +
                                  delta);
      }
    }
  }
  float dot = 0.f;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dot += (to_float(xk[d]) * inv_k) * grad_unit[d];
  dot = block_sum(dot, scratch);
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x)
    grad_x[k * dim + d] =
        from_float<T>(normalize_backward<float>(grad_unit[d], to_float(xk[d]) * inv_k, dot, nk, inv_k, eps));
}

// ---- host side ----

template <typename T>
void launch_search(const T* x, const T* y, int64_t n, int64_t m, int64_t dim, bool exclude_self,
                   const SearchPlan& plan, char* workspace, float* out_sim, int64_t* out_idx, cudaStream_t stream,
                   const char* op) {
  float* part_sim = reinterpret_cast<float*>(workspace);
  int64_t* part_idx = reinterpret_cast<int64_t*>(workspace + align256(plan.splits * n * int64_t(sizeof(float))));
  const dim3 grid(unsigned((n + kTile - 1) / kTile), unsigned(plan.splits));
  dk_nn_partial_kernel<T><<<grid, kSearchThreads, 0, stream>>>(x, y, n, m, dim, exclude_self, plan.cols_per_split,
                                                                part_sim, part_idx);
  cuda::check_launch(op);
  dk_nn_reduce_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(part_sim, part_idx, plan.splits, n, out_sim,
                                                                      out_idx);
  cuda::check_launch(op);
}

void check_common(const char* op, int64_t n, int64_t dim, double eps) {
  DK_CHECK_ARG(n >= 2, op, "x", "needs at least 2 rows (KoLeo is undefined for one sample), got ", n);
  DK_CHECK_ARG(dim >= 1, op, "x", "needs at least one column, got ", dim);
  DK_CHECK_ARG(eps > 0 && eps < 1e30, op, "eps", "must be positive and finite, got ", eps);
}

int64_t koleo_workspace_bytes(int64_t n, int64_t dim, int sm_count) {
  return align256(n * dim * int64_t(sizeof(float))) + search_workspace_bytes(n, plan_search(n, n, sm_count));
}

}  // namespace

int64_t koleo_forward_workspace_bytes_cuda(int64_t n, int64_t dim, int device_index) {
  const char* op = "koleo_forward_cuda";
  cuda::prepare_device(op, device_index);
  check_common(op, n, dim, 1.0);
  return koleo_workspace_bytes(n, dim, cuda::multiprocessor_count(op, device_index));
}

int64_t nearest_neighbors_workspace_bytes_cuda(int64_t n, int64_t m, int64_t dim, int device_index) {
  const char* op = "nearest_neighbors_cuda";
  cuda::prepare_device(op, device_index);
  DK_CHECK_ARG(n >= 0 && m >= 1 && dim >= 1, op, "x", "sizes must satisfy n >= 0, m >= 1, dim >= 1");
  return search_workspace_bytes(n, plan_search(n, m, cuda::multiprocessor_count(op, device_index)));
}

void koleo_forward_cuda(std::uintptr_t x, int dtype, int64_t n, int64_t dim, double eps, std::uintptr_t loss,
                        std::uintptr_t nn_index, std::uintptr_t norms, std::uintptr_t dists,
                        std::uintptr_t nonfinite, std::uintptr_t workspace, int64_t workspace_bytes,
                        int device_index, std::uintptr_t stream) {
  const char* op = "koleo_forward_cuda";
  cuda::prepare_device(op, device_index);
  check_common(op, n, dim, eps);
  for (auto [ptr, name] : {std::pair{x, "x"}, {loss, "loss"}, {nn_index, "nn_index"}, {norms, "norms"},
                           {dists, "dists"}, {nonfinite, "nonfinite"}})
    check_pointer(as_ptr<void>(ptr), op, name);
  const int sm_count = cuda::multiprocessor_count(op, device_index);
  check_workspace(workspace, workspace_bytes, koleo_workspace_bytes(n, dim, sm_count), 256, op);
  const cudaStream_t s = cuda::as_stream(stream);
  char* ws = as_ptr<char>(workspace);
  float* unit = reinterpret_cast<float*>(ws);
  char* search_ws = ws + align256(n * dim * int64_t(sizeof(float)));
  int* bad = as_ptr<int>(nonfinite);
  cuda::check(cudaMemsetAsync(bad, 0, sizeof(int), s), op, "cudaMemsetAsync");
  const unsigned row_blocks = unsigned((n + kRowThreads / 32 - 1) / (kRowThreads / 32));
  dispatch_cuda_float_types(dtype, op, "x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dk_koleo_normalize_kernel<T><<<row_blocks, kRowThreads, 0, s>>>(as_ptr<const T>(x), n, dim, float(eps), unit,
                                                                     as_ptr<float>(norms), bad);
    cuda::check_launch(op);
  });
  launch_search<float>(unit, unit, n, n, dim, /*exclude_self=*/true, plan_search(n, n, sm_count), search_ws,
                       nullptr, as_ptr<int64_t>(nn_index), s, op);
  dk_koleo_dist_kernel<<<row_blocks, kRowThreads, 0, s>>>(unit, as_ptr<const int64_t>(nn_index), n, dim,
                                                          as_ptr<float>(dists));
  cuda::check_launch(op);
  dk_koleo_loss_kernel<<<1, 256, 0, s>>>(as_ptr<const float>(dists), n, float(eps), bad, as_ptr<float>(loss));
  cuda::check_launch(op);
}

void koleo_backward_cuda(std::uintptr_t grad_loss, std::uintptr_t x, int dtype, int64_t n, int64_t dim, double eps,
                         std::uintptr_t nn_index, std::uintptr_t norms, std::uintptr_t dists, std::uintptr_t grad_x,
                         int device_index, std::uintptr_t stream) {
  const char* op = "koleo_backward_cuda";
  cuda::prepare_device(op, device_index);
  check_common(op, n, dim, eps);
  DK_CHECK_ARG(dim <= kMaxBackwardDim, op, "x", "has ", dim, " columns; the CUDA backward supports at most ",
               kMaxBackwardDim);
  for (auto [ptr, name] : {std::pair{grad_loss, "grad_loss"}, {x, "x"}, {nn_index, "nn_index"}, {norms, "norms"},
                           {dists, "dists"}, {grad_x, "grad_x"}})
    check_pointer(as_ptr<void>(ptr), op, name);
  const cudaStream_t s = cuda::as_stream(stream);
  dispatch_cuda_float_types(dtype, op, "x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dk_koleo_backward_kernel<T><<<unsigned(n), kBackwardThreads, size_t(dim) * sizeof(float), s>>>(
        as_ptr<const float>(grad_loss), as_ptr<const T>(x), n, dim, float(eps), as_ptr<const int64_t>(nn_index),
        as_ptr<const float>(norms), as_ptr<const float>(dists), as_ptr<T>(grad_x));
    cuda::check_launch(op);
  });
}

void nearest_neighbors_cuda(std::uintptr_t x, std::uintptr_t y, int dtype, int64_t n, int64_t m, int64_t dim,
                            bool exclude_self, std::uintptr_t out_sim, std::uintptr_t out_idx,
                            std::uintptr_t nonfinite, std::uintptr_t workspace, int64_t workspace_bytes,
                            int device_index, std::uintptr_t stream) {
  const char* op = "nearest_neighbors_cuda";
  cuda::prepare_device(op, device_index);
  DK_CHECK_ARG(n >= 0, op, "x", "has a negative row count ", n);
  DK_CHECK_ARG(m >= 1, op, "y", "needs at least one candidate row, got ", m);
  DK_CHECK_ARG(!exclude_self || m >= 2, op, "y", "needs at least 2 rows when exclude_self is set, got ", m);
  DK_CHECK_ARG(dim >= 1, op, "x", "needs at least one column, got ", dim);
  if (n == 0) return;
  for (auto [ptr, name] : {std::pair{x, "x"}, {y, "y"}, {out_sim, "out_sim"}, {out_idx, "out_idx"},
                           {nonfinite, "nonfinite"}})
    check_pointer(as_ptr<void>(ptr), op, name);
  const SearchPlan plan = plan_search(n, m, cuda::multiprocessor_count(op, device_index));
  check_workspace(workspace, workspace_bytes, search_workspace_bytes(n, plan), 256, op);
  const cudaStream_t s = cuda::as_stream(stream);
  int* bad = as_ptr<int>(nonfinite);
  cuda::check(cudaMemsetAsync(bad, 0, sizeof(int), s), op, "cudaMemsetAsync");
  dispatch_cuda_float_types(dtype, op, "x", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dk_count_nonfinite_kernel<T><<<264, 256, 0, s>>>(as_ptr<const T>(x), n * dim, bad);
    cuda::check_launch(op);
    if (y != x) {
      dk_count_nonfinite_kernel<T><<<264, 256, 0, s>>>(as_ptr<const T>(y), m * dim, bad);
      cuda::check_launch(op);
    }
    launch_search<T>(as_ptr<const T>(x), as_ptr<const T>(y), n, m, dim, exclude_self, plan, as_ptr<char>(workspace),
                     as_ptr<float>(out_sim), as_ptr<int64_t>(out_idx), s, op);
  });
}

}  // namespace koleo
}  // namespace dk
