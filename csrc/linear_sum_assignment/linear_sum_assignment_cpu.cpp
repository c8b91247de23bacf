// Batched LSA on the CPU: one problem per OpenMP iteration (dynamic schedule: sizes differ). Each problem is
// copied, transposed when tall, into a float64 buffer (checking for NaN/−inf on the way), then solved with
// scipy's shortest-augmenting-path loop, including its column order and tie-break (prefer a free column), so
// continuous-valued problems give scipy's assignment, not only its cost.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "linear_sum_assignment.h"

namespace dk {
namespace lsa {
namespace {

constexpr const char* kOp = "linear_sum_assignment";

struct Solver {
  std::vector<double> c, u, v, spc;
  std::vector<int64_t> path, col4row, row4col, remaining;
  std::vector<char> SR, SC;

  // Shortest augmenting path from cur_row; returns the sink column or −1 (infeasible).
  int64_t augmenting_path(int64_t nr, int64_t nc, int64_t cur_row, double& min_val) {
    min_val = 0;
    int64_t num_remaining = nc;
    for (int64_t it = 0; it < nc; ++it) remaining[size_t(it)] = nc - it - 1;  // scipy's order
    std::fill(SR.begin(), SR.begin() + nr, 0);
    std::fill(SC.begin(), SC.begin() + nc, 0);
    std::fill(spc.begin(), spc.begin() + nc, std::numeric_limits<double>::infinity());
    int64_t sink = -1, i = cur_row;
    while (sink == -1) {
      int64_t index = -1;
      double lowest = std::numeric_limits<double>::infinity();
      SR[size_t(i)] = 1;
      const double* ci = c.data() + i * nc;
      const double ui = u[size_t(i)];
      for (int64_t it = 0; it < num_remaining; ++it) {
        const int64_t j = remaining[size_t(it)];
        const double r = min_val + ci[j] - ui - v[size_t(j)];  // scipy's evaluation order
        if (r < spc[size_t(j)]) {
          path[size_t(j)] = i;
          spc[size_t(j)] = r;
        }
        if (spc[size_t(j)] < lowest || (spc[size_t(j)] == lowest && row4col[size_t(j)] == -1)) {
          lowest = spc[size_t(j)];
          index = it;
        }
      }
      min_val = lowest;
      if (min_val == std::numeric_limits<double>::infinity()) return -1;
      const int64_t j = remaining[size_t(index)];
      if (row4col[size_t(j)] == -1)
        sink = j;
      else
        i = row4col[size_t(j)];
      SC[size_t(j)] = 1;
      remaining[size_t(index)] = remaining[size_t(--num_remaining)];
    }
    return sink;
  }

  template <typename T>
  int solve(const T* cost, int64_t n, int64_t m, int64_t M, int64_t* rows_out, int64_t* cols_out) {
    const bool tall = n > m;
    const int64_t nr = tall ? m : n, nc = tall ? n : m;
    c.resize(size_t(nr * nc));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) {
        const double x = double(cost[i * M + j]);
        if (std::isnan(x) || x == -std::numeric_limits<double>::infinity()) return kInvalid;
        c[size_t(tall ? j * nc + i : i * nc + j)] = x;
      }
    u.assign(size_t(nr), 0.0);
    v.assign(size_t(nc), 0.0);
    spc.resize(size_t(nc));
    path.assign(size_t(nc), -1);
    col4row.assign(size_t(nr), -1);
    row4col.assign(size_t(nc), -1);
    remaining.resize(size_t(nc));
    SR.resize(size_t(nr));
    SC.resize(size_t(nc));
    for (int64_t cur = 0; cur < nr; ++cur) {
      double min_val;
      const int64_t sink = augmenting_path(nr, nc, cur, min_val);
      if (sink < 0) return kInfeasible;
      u[size_t(cur)] += min_val;
      for (int64_t i = 0; i < nr; ++i)
        if (SR[size_t(i)] && i != cur) u[size_t(i)] += min_val - spc[size_t(col4row[size_t(i)])];
      for (int64_t j = 0; j < nc; ++j)
        if (SC[size_t(j)]) v[size_t(j)] -= min_val - spc[size_t(j)];
      for (int64_t j = sink;;) {  // augment along the path back to cur
        const int64_t i = path[size_t(j)];
        row4col[size_t(j)] = i;
        std::swap(col4row[size_t(i)], j);
        if (i == cur) break;
      }
    }
    if (!tall) {
      for (int64_t i = 0; i < nr; ++i) rows_out[i] = i, cols_out[i] = col4row[size_t(i)];
    } else {  // original rows are the columns here: walking them in order gives ascending rows
      int64_t k = 0;
      for (int64_t j = 0; j < nc; ++j)
        if (row4col[size_t(j)] >= 0) rows_out[k] = j, cols_out[k] = row4col[size_t(j)], ++k;
    }
    return kSolved;
  }
};

template <typename T>
void run(const T* cost, int64_t B, int64_t N, int64_t M, const int64_t* nrows, const int64_t* ncols,
         int64_t* rows_out, int64_t* cols_out, int32_t* status, int num_threads) {
  const int64_t K = std::min(N, M);
#pragma omp parallel num_threads(num_threads)
  {
    Solver solver;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      int64_t* r = rows_out + b * K;
      int64_t* c = cols_out + b * K;
      std::fill(r, r + K, int64_t(-1));
      std::fill(c, c + K, int64_t(-1));
      const int64_t n = nrows[b], m = ncols[b];
      status[b] = (n == 0 || m == 0) ? int32_t(kSolved) : int32_t(solver.solve<T>(cost + b * N * M, n, m, M, r, c));
      if (status[b] != kSolved) {  // no partial answers
        std::fill(r, r + K, int64_t(-1));
        std::fill(c, c + K, int64_t(-1));
      }
    }
  }
}

}  // namespace

void linear_sum_assignment_cpu(std::uintptr_t cost, int dtype, int64_t B, int64_t N, int64_t M,
                               std::uintptr_t num_rows, std::uintptr_t num_cols, std::uintptr_t rows_out,
                               std::uintptr_t cols_out, std::uintptr_t status, int num_threads) {
  check_sizes(kOp, B, N, M);
  check_dtype(dtype, dtype == kFloat32 || dtype == kFloat64, kOp, "cost");
  if (B == 0) return;
  check_pointer(as_ptr<void>(num_rows), kOp, "num_rows");
  check_pointer(as_ptr<void>(num_cols), kOp, "num_cols");
  check_pointer(as_ptr<void>(status), kOp, "status");
  const int64_t *nr = as_ptr<const int64_t>(num_rows), *nc = as_ptr<const int64_t>(num_cols);
  for (int64_t b = 0; b < B; ++b) {
    DK_CHECK_ARG(nr[b] >= 0 && nr[b] <= N, kOp, "num_rows", "entry ", b, " is ", nr[b], ", must be in [0, N=", N, "]");
    DK_CHECK_ARG(nc[b] >= 0 && nc[b] <= M, kOp, "num_cols", "entry ", b, " is ", nc[b], ", must be in [0, M=", M, "]");
  }
  if (N * M > 0) check_pointer(as_ptr<void>(cost), kOp, "cost");
  if (std::min(N, M) > 0) {
    check_pointer(as_ptr<void>(rows_out), kOp, "rows_out");
    check_pointer(as_ptr<void>(cols_out), kOp, "cols_out");
  }
  // Threads only for enough work (≈ Σ n·m·min(n, m), 2M ≈ 0.3 ms per thread): waking a team for a few
  // 50 µs problems costs more than it saves, and much more when the cores are shared with other processes.
  double work = 0;
  for (int64_t b = 0; b < B; ++b) work += double(nr[b]) * double(nc[b]) * double(std::min(nr[b], nc[b]));
  num_threads = int(std::max<double>(1, std::min<double>({double(num_threads), double(B), work / double(1 << 21)})));
  if (dtype == kFloat32)
    run<float>(as_ptr<const float>(cost), B, N, M, nr, nc, as_ptr<int64_t>(rows_out), as_ptr<int64_t>(cols_out),
               as_ptr<int32_t>(status), num_threads);
  else
    run<double>(as_ptr<const double>(cost), B, N, M, nr, nc, as_ptr<int64_t>(rows_out), as_ptr<int64_t>(cols_out),
                as_ptr<int32_t>(status), num_threads);
}

}  // namespace lsa
}  // namespace dk
