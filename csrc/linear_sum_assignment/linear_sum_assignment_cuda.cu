// Batched LSA on CUDA: one block per problem, every problem in one launch, no host round trip. Each block
// copies its problem (transposed when tall) into a float64 workspace, checking for NaN/−inf, then runs the
// CPU's shortest-augmenting-path loop with the column scan of every Dijkstra step spread over the block and the
// minimum found by a block reduction on (path length, column taken, column index): on ties a free column, then the
// lowest index. The CPU (scipy) breaks ties by its scan order instead, so on ties the two may return different
// assignments of the same, optimal, total cost. Bookkeeping (path augmentation, output compaction) is serial on
// thread 0: O(path length) per augmentation.
#include <cstdint>

#include "../common/dk_cuda.cuh"
#include "linear_sum_assignment.h"

namespace dk {
namespace lsa {
namespace {

constexpr const char* kOp = "linear_sum_assignment";
constexpr int kThreads = 256, kWarps = kThreads / 32;

__device__ DK_INLINE double load_double(float x) { return double(x); }
__device__ DK_INLINE double load_double(double x) { return x; }
__device__ DK_INLINE double load_double(__half x) { return double(__half2float(x)); }
__device__ DK_INLINE double load_double(__nv_bfloat16 x) { return double(__bfloat162float(x)); }

struct Layout {  // per-problem slices of the workspace
  int64_t doubles, ints;
};

__host__ __device__ DK_INLINE Layout layout(int64_t N, int64_t M) {
  const int64_t L = N > M ? N : M, S = N > M ? M : N;
  return {N * M + 2 * L + S, 3 * L + 2 * S};  // c, v, spc, u | path, row4col, SC, col4row, SR
}

// Lexicographic (value, taken · 2³² + column): smaller wins.
__device__ DK_INLINE bool better(double a, int64_t ka, double b, int64_t kb) {
  return a < b || (a == b && ka < kb);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lsa_kernel(const T* __restrict__ cost,       // (B, N, M)
               int64_t N, int64_t M,
               const int64_t* __restrict__ nrows,  // (B,)
               const int64_t* __restrict__ ncols,  // (B,)
               double* __restrict__ wsd, int* __restrict__ wsi,
               int64_t* __restrict__ rows_out,     // (B, K)
               int64_t* __restrict__ cols_out,     // (B, K)
               int* __restrict__ status) {         // (B,)
  __shared__ double red_val[kWarps];
  __shared__ int64_t red_key[kWarps];
  __shared__ double s_min;
  __shared__ int s_i, s_sink, s_infeasible;
  const int64_t b = blockIdx.x, K = N < M ? N : M;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t n = nrows[b], m = ncols[b];
  int64_t* r_out = rows_out + b * K;
  int64_t* c_out = cols_out + b * K;
  for (int64_t k = tid; k < K; k += kThreads) r_out[k] = -1, c_out[k] = -1;
  if (n == 0 || m == 0) {
    if (tid == 0) status[b] = kSolved;
    return;
  }
  const bool tall = n > m;
  const int64_t nr = tall ? m : n, nc = tall ? n : m;
  const Layout lay = layout(N, M);
  double* c = wsd + b * lay.doubles;
  double* v = c + N * M;
  double* spc = v + (N > M ? N : M);
  double* u = spc + (N > M ? N : M);
  int* path = wsi + b * lay.ints;
  int* row4col = path + (N > M ? N : M);
  int* SC = row4col + (N > M ? N : M);
  int* col4row = SC + (N > M ? N : M);
  int* SR = col4row + K;

  const T* cb = cost + b * N * M;
  int bad = 0;
  for (int64_t idx = tid; idx < n * m; idx += kThreads) {
    const int64_t i = idx / m, j = idx - i * m;
    const double x = load_double(cb[i * M + j]);
    bad |= (isnan(x) || x == -INFINITY) ? 1 : 0;
    c[tall ? j * nc + i : i * nc + j] = x;
  }
  for (int64_t j = tid; j < nc; j += kThreads) v[j] = 0.0, path[j] = -1, row4col[j] = -1;
  for (int64_t i = tid; i < nr; i += kThreads) u[i] = 0.0, col4row[i] = -1;
  if (__syncthreads_or(bad)) {  // also publishes the copies and initialisation
    if (tid == 0) status[b] = kInvalid;
    return;
  }
  for (int64_t cur = 0; cur < nr; ++cur) {
    for (int64_t j = tid; j < nc; j += kThreads) spc[j] = INFINITY, SC[j] = 0;
    for (int64_t i = tid; i < nr; i += kThreads) SR[i] = 0;
    if (tid == 0) s_min = 0.0, s_i = int(cur), s_sink = -1, s_infeasible = 0;
    __syncthreads();
    while (true) {
      const int i = s_i;
      const double min_val = s_min;
      if (tid == 0) SR[i] = 1;
      const double ui = u[i];
      const double* ci = c + int64_t(i) * nc;
      double best = INFINITY;
      int64_t best_key = INT64_MAX;
      for (int64_t j = tid; j < nc; j += kThreads) {
        if (SC[j]) continue;
        const double r = min_val + ci[j] - ui - v[j];  // the CPU's evaluation order
        double s = spc[j];
        if (r < s) spc[j] = r, path[j] = i, s = r;
        const int64_t key = (int64_t(row4col[j] != -1) << 32) | j;
        if (better(s, key, best, best_key)) best = s, best_key = key;
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        const double ob = __shfl_xor_sync(0xffffffffu, best, offset);
        const int64_t ok = __shfl_xor_sync(0xffffffffu, best_key, offset);
        if (better(ob, ok, best, best_key)) best = ob, best_key = ok;
      }
      if (lane == 0) red_val[warp] = best, red_key[warp] = best_key;
      __syncthreads();
      if (tid == 0) {
        for (int w = 1; w < kWarps; ++w)
          if (better(red_val[w], red_key[w], best, best_key)) best = red_val[w], best_key = red_key[w];
        if (best == INFINITY) {
          s_infeasible = 1;
        } else {
          const int j = int(best_key & 0xffffffff);
          s_min = best;
          SC[j] = 1;
          if (row4col[j] == -1)
            s_sink = j;
          else
            s_i = row4col[j];
        }
      }
      __syncthreads();
      if (s_infeasible || s_sink >= 0) break;
    }
    if (s_infeasible) {
      if (tid == 0) status[b] = kInfeasible;
      return;
    }
    const double min_val = s_min;
    if (tid == 0) u[cur] += min_val;
    for (int64_t i = tid; i < nr; i += kThreads)
      if (SR[i] && i != cur) u[i] += min_val - spc[col4row[i]];
    for (int64_t j = tid; j < nc; j += kThreads)
      if (SC[j]) v[j] -= min_val - spc[j];
    __syncthreads();
    if (tid == 0) {
      for (int j = s_sink;;) {
        const int i = path[j];
        row4col[j] = i;
        const int previous = col4row[i];
        col4row[i] = j;
        j = previous;
        if (i == cur) break;
      }
    }
    __syncthreads();
  }
  if (!tall) {
    for (int64_t i = tid; i < nr; i += kThreads) r_out[i] = i, c_out[i] = col4row[i];
  } else if (tid == 0) {  // original rows are this problem's columns: in order, so rows come out ascending
    int64_t k = 0;
    for (int64_t j = 0; j < nc; ++j)
      if (row4col[j] >= 0) r_out[k] = j, c_out[k] = row4col[j], ++k;
  }
  if (tid == 0) status[b] = kSolved;
}

}  // namespace

int64_t workspace_bytes_cuda(int64_t B, int64_t N, int64_t M) {
  check_sizes(kOp, B, N, M);
  const Layout lay = layout(N, M);
  return B * lay.doubles * 8 + B * lay.ints * 4;
}

void linear_sum_assignment_cuda(std::uintptr_t cost, int dtype, int64_t B, int64_t N, int64_t M,
                                std::uintptr_t num_rows, std::uintptr_t num_cols, std::uintptr_t rows_out,
                                std::uintptr_t cols_out, std::uintptr_t status, std::uintptr_t workspace,
                                int64_t workspace_bytes, int device_index, std::uintptr_t stream) {
  check_sizes(kOp, B, N, M);
  cuda::prepare_device(kOp, device_index);
  if (B == 0) return;
  DK_CHECK_ARG(B < (int64_t(1) << 31), kOp, "cost", "holds too many problems: ", B);
  check_pointer(as_ptr<void>(num_rows), kOp, "num_rows");
  check_pointer(as_ptr<void>(num_cols), kOp, "num_cols");
  check_pointer(as_ptr<void>(status), kOp, "status");
  if (N * M > 0) {
    check_pointer(as_ptr<void>(cost), kOp, "cost");
    check_pointer(as_ptr<void>(rows_out), kOp, "rows_out");
    check_pointer(as_ptr<void>(cols_out), kOp, "cols_out");
  }
  const int64_t needed = workspace_bytes_cuda(B, N, M);
  check_workspace(workspace, workspace_bytes, needed, 8, kOp);
  const Layout lay = layout(N, M);
  double* wsd = as_ptr<double>(workspace);
  int* wsi = reinterpret_cast<int*>(wsd + B * lay.doubles);
  auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    lsa_kernel<T><<<unsigned(B), kThreads, 0, cuda::as_stream(stream)>>>(
        as_ptr<const T>(cost), N, M, as_ptr<const int64_t>(num_rows), as_ptr<const int64_t>(num_cols), wsd, wsi,
        as_ptr<int64_t>(rows_out), as_ptr<int64_t>(cols_out), as_ptr<int>(status));
  };
  if (dtype == kFloat64)
    launch(static_cast<double*>(nullptr));
  else
    dispatch_cuda_float_types(dtype, kOp, "cost", launch);
  cuda::check_launch(kOp);
}

}  // namespace lsa
}  // namespace dk
