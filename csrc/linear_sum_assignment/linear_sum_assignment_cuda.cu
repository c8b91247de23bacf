// Batched linear sum assignment on CUDA; the contract is in linear_sum_assignment.h and the method (shortest
// augmenting paths, one Dijkstra search per row, then a potential shift and a flip along the path) is described
// in linear_sum_assignment_cpu.cpp.
//
// One block solves one problem, every problem in one launch, with no host round trip. The block loads its
// problem (transposed when tall) into a float64 workspace, checking for NaN/−inf on the way. In each Dijkstra
// step the threads share the scan over the unreached columns, and the nearest column is found by a warp-shuffle
// then cross-warp reduction on (distance, held?, column): among equal distances a free column, then the lowest
// index. That tie rule is not the CPU's (which follows scipy's scan order), so where several assignments are
// optimal the two devices may return different ones, of the same total cost. The serial bookkeeping (flipping
// the path, compacting a transposed answer) runs on thread 0: O(path length) per row.
#include <cstdint>

#include "../common/dk_cuda.cuh"
#include "linear_sum_assignment.h"

namespace dk {
namespace lsa {
namespace {

constexpr const char* kOp = "linear_sum_assignment";
constexpr int kThreads = 256, kWarps = kThreads / 32;
// Ask for 4 resident blocks per SM: that caps the kernel at 64 registers (it compiles without spills), so
// many small problems run side by side; left free, nvcc takes ~120 and halves the resident problems.
constexpr int kMinBlocksPerSM = 4;

__device__ DK_INLINE double to_double(float x) { return double(x); }
__device__ DK_INLINE double to_double(double x) { return x; }
__device__ DK_INLINE double to_double(__half x) { return double(__half2float(x)); }
__device__ DK_INLINE double to_double(__nv_bfloat16 x) { return double(__bfloat162float(x)); }

// Workspace elements per problem, with L = max(N, M) and S = min(N, M):
//   float64: cost (N·M), distance (L), col_potential (L), row_potential (S);
//   int32:   entered_from (L), row_of_col (L), col_in_tree (L), col_of_row (S), row_in_tree (S).
struct WorkspaceSize {
  int64_t doubles, ints;
};

__host__ __device__ DK_INLINE WorkspaceSize workspace_size(int64_t N, int64_t M) {
  const int64_t longer = N > M ? N : M, shorter = N > M ? M : N;
  return {N * M + 2 * longer + shorter, 3 * longer + 2 * shorter};
}

// One problem's slices of the workspace, seen with rows ≤ columns.
struct ProblemView {
  int64_t rows, cols;
  bool transposed;
  double *cost, *distance, *col_potential, *row_potential;
  int *entered_from, *row_of_col, *col_in_tree, *col_of_row, *row_in_tree;
};

__device__ DK_INLINE ProblemView carve(double* ws_f64, int* ws_i32, int64_t b, int64_t N, int64_t M, int64_t n,
                                       int64_t m) {
  const int64_t longer = N > M ? N : M, shorter = N > M ? M : N;
  const WorkspaceSize size = workspace_size(N, M);
  ProblemView p;
  p.transposed = n > m;
  p.rows = p.transposed ? m : n;
  p.cols = p.transposed ? n : m;
  double* f = ws_f64 + b * size.doubles;
  p.cost = f;
  p.distance = f += N * M;
  p.col_potential = f += longer;
  p.row_potential = f += longer;
  int* k = ws_i32 + b * size.ints;
  p.entered_from = k;
  p.row_of_col = k += longer;
  p.col_in_tree = k += longer;
  p.col_of_row = k += longer;
  p.row_in_tree = k += shorter;
  return p;
}

// Copies cost[:n, :m] into the view (transposed when tall) and clears potentials and matching. Returns, to every
// thread, whether some entry is NaN or −inf; the barrier doing so also publishes the writes.
template <typename T>
__device__ bool load_problem(const T* src, int64_t n, int64_t m, int64_t stride, const ProblemView& p) {
  int bad = 0;
  for (int64_t idx = threadIdx.x; idx < n * m; idx += kThreads) {
    const int64_t i = idx / m, j = idx - i * m;
    const double x = to_double(src[i * stride + j]);
    bad |= (isnan(x) || x == -INFINITY) ? 1 : 0;
    p.cost[p.transposed ? j * p.cols + i : i * p.cols + j] = x;
  }
  for (int64_t col = threadIdx.x; col < p.cols; col += kThreads)
    p.col_potential[col] = 0.0, p.entered_from[col] = -1, p.row_of_col[col] = -1;
  for (int64_t row = threadIdx.x; row < p.rows; row += kThreads) p.row_potential[row] = 0.0, p.col_of_row[row] = -1;
  return __syncthreads_or(bad) != 0;
}

// A candidate for the nearest unreached column. rank = held · 2³² + column, so that among equal distances a
// free column wins, then the lower index.
struct Nearest {
  double distance;
  int64_t rank;
};

__device__ DK_INLINE bool closer(const Nearest& a, const Nearest& b) {
  return a.distance < b.distance || (a.distance == b.distance && a.rank < b.rank);
}

__device__ DK_INLINE Nearest warp_nearest(Nearest x) {
  for (int lanes = 16; lanes > 0; lanes >>= 1) {
    const Nearest other{__shfl_xor_sync(0xffffffffu, x.distance, lanes), __shfl_xor_sync(0xffffffffu, x.rank, lanes)};
    if (closer(other, x)) x = other;
  }
  return x;
}

// Shared by the block during one search; written by thread 0 between barriers.
struct SearchState {
  double reached;  // distance of the column most recently added to the tree
  int row;         // the tree row to scan next
  int free_col;    // the free column reached, −1 until then
  int dead_end;    // every unreached column is at infinite distance
};

// Dijkstra from `root` over reduced costs until a free column is reached (state.free_col, at distance
// state.reached) or none can be (state.dead_end).
__device__ void grow_tree(const ProblemView& p, int root, SearchState& state, Nearest* warp_best) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int64_t col = tid; col < p.cols; col += kThreads) p.distance[col] = INFINITY, p.col_in_tree[col] = 0;
  for (int64_t row = tid; row < p.rows; row += kThreads) p.row_in_tree[row] = 0;
  if (tid == 0) state = {0.0, root, -1, 0};
  __syncthreads();
  while (true) {
    const int row = state.row;
    const double reached = state.reached;
    if (tid == 0) p.row_in_tree[row] = 1;
    const double u_row = p.row_potential[row];
    const double* row_cost = p.cost + int64_t(row) * p.cols;
    Nearest mine{INFINITY, INT64_MAX};
    for (int64_t col = tid; col < p.cols; col += kThreads) {
      if (p.col_in_tree[col]) continue;
      const double via_row = reached + row_cost[col] - u_row - p.col_potential[col];  // the CPU's summation order
      double d = p.distance[col];
      if (via_row < d) {
        d = via_row;
        p.distance[col] = d;
        p.entered_from[col] = row;
      }
      const Nearest candidate{d, (int64_t(p.row_of_col[col] != -1) << 32) | col};
      if (closer(candidate, mine)) mine = candidate;
    }
    mine = warp_nearest(mine);
    if (lane == 0) warp_best[warp] = mine;
    __syncthreads();
    if (tid == 0) {
      Nearest best = warp_best[0];
      for (int w = 1; w < kWarps; ++w)
        if (closer(warp_best[w], best)) best = warp_best[w];
      if (best.distance == INFINITY) {
        state.dead_end = 1;
      } else {
        const int col = int(best.rank & 0xffffffff);
        state.reached = best.distance;
        p.col_in_tree[col] = 1;
        const int holder = p.row_of_col[col];
        if (holder == -1)
          state.free_col = col;
        else
          state.row = holder;  // continue from the row holding this column
      }
    }
    __syncthreads();
    if (state.dead_end || state.free_col >= 0) return;
  }
}

// Keeps the tree's edges tight: u grows and v shrinks by how much shorter than the augmenting path the tree
// reached each node. Reads the matching from before the flip.
__device__ void shift_potentials(const ProblemView& p, int root, double path_length) {
  if (threadIdx.x == 0) p.row_potential[root] += path_length;
  for (int64_t row = threadIdx.x; row < p.rows; row += kThreads)
    if (row != root && p.row_in_tree[row]) p.row_potential[row] += path_length - p.distance[p.col_of_row[row]];
  for (int64_t col = threadIdx.x; col < p.cols; col += kThreads)
    if (p.col_in_tree[col]) p.col_potential[col] -= path_length - p.distance[col];
  __syncthreads();
}

// Thread 0 only: walks back from the free column to the root; each row on the path takes the column it was
// reached through.
__device__ void flip_along_path(const ProblemView& p, int root, int free_col) {
  for (int col = free_col;;) {
    const int row = p.entered_from[col];
    const int given_up = p.col_of_row[row];
    p.row_of_col[col] = row;
    p.col_of_row[row] = col;
    if (row == root) return;
    col = given_up;
  }
}

// The pairs (original row, original column), rows ascending.
__device__ void write_pairs(const ProblemView& p, int64_t* rows_b, int64_t* cols_b) {
  if (!p.transposed) {
    for (int64_t row = threadIdx.x; row < p.rows; row += kThreads) rows_b[row] = row, cols_b[row] = p.col_of_row[row];
  } else if (threadIdx.x == 0) {  // the view's columns are the original rows: walking them in order sorts the rows
    int64_t k = 0;
    for (int64_t col = 0; col < p.cols; ++col)
      if (p.row_of_col[col] >= 0) rows_b[k] = col, cols_b[k] = p.row_of_col[col], ++k;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    lsa_kernel(const T* __restrict__ cost,           // (B, N, M)
               int64_t N, int64_t M,
               const int64_t* __restrict__ num_rows,  // (B,)
               const int64_t* __restrict__ num_cols,  // (B,)
               double* __restrict__ ws_f64, int* __restrict__ ws_i32,
               int64_t* __restrict__ rows_out,        // (B, K)
               int64_t* __restrict__ cols_out,        // (B, K)
               int* __restrict__ status) {            // (B,)
  __shared__ SearchState state;
  __shared__ Nearest warp_best[kWarps];
  const int64_t b = blockIdx.x, K = N < M ? N : M;
  const int tid = threadIdx.x;
  int64_t* rows_b = rows_out + b * K;
  int64_t* cols_b = cols_out + b * K;
  for (int64_t k = tid; k < K; k += kThreads) rows_b[k] = -1, cols_b[k] = -1;
  const int64_t n = num_rows[b], m = num_cols[b];
  if (n == 0 || m == 0) {
    if (tid == 0) status[b] = kSolved;
    return;
  }
  const ProblemView p = carve(ws_f64, ws_i32, b, N, M, n, m);
  if (load_problem(cost + b * N * M, n, m, M, p)) {
    if (tid == 0) status[b] = kInvalid;
    return;
  }
  for (int root = 0; root < p.rows; ++root) {
    grow_tree(p, root, state, warp_best);
    if (state.dead_end) {  // the same value in every thread: the block leaves together
      if (tid == 0) status[b] = kInfeasible;
      return;
    }
    shift_potentials(p, root, state.reached);
    if (tid == 0) flip_along_path(p, root, state.free_col);
    __syncthreads();
  }
  write_pairs(p, rows_b, cols_b);
  if (tid == 0) status[b] = kSolved;
}

}  // namespace

int64_t workspace_bytes_cuda(int64_t B, int64_t N, int64_t M) {
  check_sizes(kOp, B, N, M);
  const WorkspaceSize size = workspace_size(N, M);
  return B * size.doubles * 8 + B * size.ints * 4;
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
  check_workspace(workspace, workspace_bytes, workspace_bytes_cuda(B, N, M), 8, kOp);
  // float64 slices of every problem first, then the int32 ones: the doubles stay 8-byte aligned.
  double* ws_f64 = as_ptr<double>(workspace);
  int* ws_i32 = reinterpret_cast<int*>(ws_f64 + B * workspace_size(N, M).doubles);
  auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    lsa_kernel<T><<<unsigned(B), kThreads, 0, cuda::as_stream(stream)>>>(
        as_ptr<const T>(cost), N, M, as_ptr<const int64_t>(num_rows), as_ptr<const int64_t>(num_cols), ws_f64,
        ws_i32, as_ptr<int64_t>(rows_out), as_ptr<int64_t>(cols_out), as_ptr<int>(status));
  };
  if (dtype == kFloat64)
    launch(static_cast<double*>(nullptr));
  else
    dispatch_cuda_float_types(dtype, kOp, "cost", launch);
  cuda::check_launch(kOp);
}

}  // namespace lsa
}  // namespace dk
