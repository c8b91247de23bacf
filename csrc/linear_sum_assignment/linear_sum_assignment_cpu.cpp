// Batched linear sum assignment on the CPU; the contract is in linear_sum_assignment.h.
//
// Method (shortest augmenting paths, Crouse 2016). A problem is held as a float64 matrix with no more rows than
// columns (a tall one is transposed on load). Rows join the matching one at a time. For a new row, a Dijkstra
// search over the reduced costs c[i][j] − u[i] − v[j] (never negative) grows an alternating tree from that row
// until it reaches a column that no row holds; then the dual potentials u, v are moved so that the tree's edges
// stay tight, and the matching is flipped along the path found. One search per row: O(rows² · cols) in all.
//
// When several assignments are optimal, scipy's choice is a fact of its behaviour, and we make the same one:
//  - the columns not yet in the tree are kept in a list filled from the last column down, from which a column
//    is taken by moving the list's last entry into its slot; the scan for the nearest column follows that list;
//  - among the nearest columns, a free one is preferred (the last free one scanned), else the first scanned;
//  - a tentative distance is summed as reached + c − u − v, left to right, so that ties compare equal as in
//    scipy.
// Problems are spread over OpenMP threads, each thread reusing one solver's buffers.
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
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kNone = -1;

// The columns a search has not reached yet, scanned by position; taking one fills its slot with the last entry.
class UnreachedColumns {
 public:
  void refill(int64_t n_cols) {
    ids_.resize(size_t(n_cols));
    for (int64_t pos = 0; pos < n_cols; ++pos) ids_[size_t(pos)] = n_cols - 1 - pos;  // the last column first
    count_ = n_cols;
  }
  int64_t count() const { return count_; }
  int64_t at(int64_t pos) const { return ids_[size_t(pos)]; }
  const int64_t* ids() const { return ids_.data(); }
  void take(int64_t pos) { ids_[size_t(pos)] = ids_[size_t(--count_)]; }

 private:
  std::vector<int64_t> ids_;
  int64_t count_ = 0;
};

// Minimum-cost assignment of every row of one problem, rows ≤ columns after loading.
class AugmentingPathSolver {
 public:
  // Reads cost[:n, :m] (row stride `stride`) into float64, transposed when n > m. False on a NaN or −inf entry.
  template <typename T>
  bool load(const T* cost, int64_t n, int64_t m, int64_t stride) {
    transposed_ = n > m;
    rows_ = std::min(n, m);
    cols_ = std::max(n, m);
    cost_.resize(size_t(rows_ * cols_));
    for (int64_t i = 0; i < n; ++i) {
      const T* src = cost + i * stride;
      for (int64_t j = 0; j < m; ++j) {
        const double x = double(src[j]);
        if (std::isnan(x) || x == -kInf) return false;
        cost_[size_t(transposed_ ? j * cols_ + i : i * cols_ + j)] = x;
      }
    }
    row_potential_.assign(size_t(rows_), 0.0);
    col_potential_.assign(size_t(cols_), 0.0);
    distance_.resize(size_t(cols_));
    entered_from_.assign(size_t(cols_), kNone);
    col_of_row_.assign(size_t(rows_), kNone);
    row_of_col_.assign(size_t(cols_), kNone);
    row_in_tree_.resize(size_t(rows_));
    col_in_tree_.resize(size_t(cols_));
    return true;
  }

  // Adds the rows one by one. False when a row cannot be matched at finite cost (+inf entries block it).
  bool solve() {
    for (int64_t root = 0; root < rows_; ++root) {
      double path_length = 0.0;
      const int64_t free_col = grow_tree(root, path_length);
      if (free_col == kNone) return false;
      shift_potentials(root, path_length);
      flip_along_path(root, free_col);
    }
    return true;
  }

  // The min(n, m) pairs (original row, original column), rows ascending.
  void write_pairs(int64_t* rows_out, int64_t* cols_out) const {
    if (!transposed_) {
      for (int64_t row = 0; row < rows_; ++row) {
        rows_out[row] = row;
        cols_out[row] = col_of_row_[size_t(row)];
      }
      return;
    }
    // Transposed: the solver's columns are the original rows, so walking them in order lists the rows ascending.
    int64_t k = 0;
    for (int64_t col = 0; col < cols_; ++col) {
      const int64_t row = row_of_col_[size_t(col)];
      if (row == kNone) continue;
      rows_out[k] = col;
      cols_out[k] = row;
      ++k;
    }
  }

 private:
  // Dijkstra from `root` over reduced costs until a free column is reached; returns it (and its distance in
  // path_length), or kNone when every column left is at infinite distance.
  int64_t grow_tree(int64_t root, double& path_length) {
    std::fill(row_in_tree_.begin(), row_in_tree_.end(), char(0));
    std::fill(col_in_tree_.begin(), col_in_tree_.end(), char(0));
    std::fill(distance_.begin(), distance_.end(), kInf);
    unreached_.refill(cols_);
    double reached = 0.0;  // distance of the column most recently added to the tree
    int64_t row = root;
    // Local pointers and count: the int64 stores below may alias members, which would force a reload per column.
    double* distance = distance_.data();
    int64_t* entered_from = entered_from_.data();
    const double* col_potential = col_potential_.data();
    const int64_t* row_of_col = row_of_col_.data();
    while (true) {
      row_in_tree_[size_t(row)] = 1;
      const double* row_cost = cost_.data() + row * cols_;
      const double u_row = row_potential_[size_t(row)];
      const int64_t* scan_order = unreached_.ids();
      const int64_t n_unreached = unreached_.count();
      int64_t nearest_pos = kNone;
      double nearest = kInf;
      for (int64_t pos = 0; pos < n_unreached; ++pos) {
        const int64_t col = scan_order[pos];
        const double via_row = reached + row_cost[col] - u_row - col_potential[col];
        if (via_row < distance[col]) {
          distance[col] = via_row;
          entered_from[col] = row;
        }
        const double d = distance[col];
        if (d < nearest || (d == nearest && row_of_col[col] == kNone)) {
          nearest = d;
          nearest_pos = pos;
        }
      }
      if (nearest == kInf) return kNone;
      reached = nearest;
      const int64_t col = unreached_.at(nearest_pos);
      unreached_.take(nearest_pos);
      col_in_tree_[size_t(col)] = 1;
      const int64_t holder = row_of_col_[size_t(col)];
      if (holder == kNone) {
        path_length = reached;
        return col;
      }
      row = holder;  // continue the search from the row that holds this column
    }
  }

  // Keeps every tree edge tight after the search: u grows and v shrinks by how much shorter than the augmenting
  // path the tree reached each node. Uses the matching from before the flip.
  void shift_potentials(int64_t root, double path_length) {
    row_potential_[size_t(root)] += path_length;
    for (int64_t row = 0; row < rows_; ++row)
      if (row != root && row_in_tree_[size_t(row)])
        row_potential_[size_t(row)] += path_length - distance_[size_t(col_of_row_[size_t(row)])];
    for (int64_t col = 0; col < cols_; ++col)
      if (col_in_tree_[size_t(col)]) col_potential_[size_t(col)] -= path_length - distance_[size_t(col)];
  }

  // Walks back from the free column to the root; each row on the path takes the column it was reached through.
  void flip_along_path(int64_t root, int64_t free_col) {
    int64_t col = free_col;
    while (true) {
      const int64_t row = entered_from_[size_t(col)];
      const int64_t given_up = col_of_row_[size_t(row)];
      row_of_col_[size_t(col)] = row;
      col_of_row_[size_t(row)] = col;
      if (row == root) return;
      col = given_up;
    }
  }

  bool transposed_ = false;
  int64_t rows_ = 0, cols_ = 0;
  std::vector<double> cost_;                    // (rows_, cols_) row-major
  std::vector<double> row_potential_;           // u (rows_,)
  std::vector<double> col_potential_;           // v (cols_,)
  std::vector<double> distance_;                // (cols_,) reduced distance from the root, this search
  std::vector<int64_t> entered_from_;           // (cols_,) the tree row each column was reached from
  std::vector<int64_t> col_of_row_, row_of_col_;  // the matching so far, kNone where unmatched
  std::vector<char> row_in_tree_, col_in_tree_;
  UnreachedColumns unreached_;
};

template <typename T>
Status solve_problem(AugmentingPathSolver& solver, const T* cost, int64_t n, int64_t m, int64_t stride,
                     int64_t* rows_out, int64_t* cols_out) {
  if (n == 0 || m == 0) return kSolved;
  if (!solver.load(cost, n, m, stride)) return kInvalid;
  if (!solver.solve()) return kInfeasible;
  solver.write_pairs(rows_out, cols_out);
  return kSolved;
}

template <typename T>
void solve_batch(const T* cost, int64_t B, int64_t N, int64_t M, const int64_t* num_rows, const int64_t* num_cols,
                 int64_t* rows_out, int64_t* cols_out, int32_t* status, int num_threads) {
  const int64_t K = std::min(N, M);
#pragma omp parallel num_threads(num_threads)
  {
    AugmentingPathSolver solver;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      int64_t* rows_b = rows_out + b * K;
      int64_t* cols_b = cols_out + b * K;
      std::fill(rows_b, rows_b + K, kNone);
      std::fill(cols_b, cols_b + K, kNone);
      const Status result = solve_problem(solver, cost + b * N * M, num_rows[b], num_cols[b], M, rows_b, cols_b);
      status[b] = int32_t(result);
      if (result != kSolved) {  // an unsolved problem reports no pairs, not a partial matching
        std::fill(rows_b, rows_b + K, kNone);
        std::fill(cols_b, cols_b + K, kNone);
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
    solve_batch<float>(as_ptr<const float>(cost), B, N, M, nr, nc, as_ptr<int64_t>(rows_out),
                       as_ptr<int64_t>(cols_out), as_ptr<int32_t>(status), num_threads);
  else
    solve_batch<double>(as_ptr<const double>(cost), B, N, M, nr, nc, as_ptr<int64_t>(rows_out),
                        as_ptr<int64_t>(cols_out), as_ptr<int32_t>(status), num_threads);
}

}  // namespace lsa
}  // namespace dk
