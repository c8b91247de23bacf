// CPU softmax_center (math in softmax_center_math.h): per row, pass 1 finds the max of d = z/2 − c/2 (and adds
// the raw row into a column-sum partial), pass 2 writes e = exp((d − m)·2/τ) and sums it, pass 3 scales by 1/Σe.
// The row (≤ 512 KB) stays in L2 between passes.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/dk_cpu_simd.h"
#include "softmax_center.h"
#include "softmax_center_math.h"

namespace dk {
namespace softmax_center {
namespace {

constexpr const char* kOp = "softmax_center";
// Row groups for the fused column sum: enough for the threads of a big CPU, few enough for small scratch.
constexpr int64_t kSumGroups = 16;

// Softmax of one row (math in softmax_center_math.h); when partial is given, also partial += z (the raw row, read
// while it is in L1/L2). Returns whether the row's statistics are finite.
template <typename T>
bool softmax_row(const T* x, const T* center, int64_t k, T two_inv_temp, T* y, T* partial) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
  typename S::vec vm = S::splat(-INFINITY);
  int64_t j = 0;
  if (partial) {
    for (; j + L <= k; j += L) {
      const typename S::vec raw = S::load(x + j);
      S::store(partial + j, S::load(partial + j) + raw);
      vm = cpu::vmax(vm, half_centered(raw, S::load(center + j)));
    }
  } else {
    for (; j + L <= k; j += L) vm = cpu::vmax(vm, half_centered(S::load(x + j), S::load(center + j)));
  }
  T m = -INFINITY;
  for (int l = 0; l < L; ++l) m = std::max(m, vm[l]);
  for (; j < k; ++j) {
    if (partial) partial[j] += x[j];
    m = std::max(m, half_centered(x[j], center[j]));
  }
  typename S::vec vs{};
  for (j = 0; j + L <= k; j += L) {
    const typename S::vec d = half_centered(S::load(x + j), S::load(center + j));
    const typename S::vec e = cpu::vexp(exponent(d, m, two_inv_temp));
    S::store(y + j, e);
    vs += e;
  }
  T s = S::sum(vs);
  for (; j < k; ++j) {
    y[j] = std::exp(exponent(half_centered(x[j], center[j]), m, two_inv_temp));
    s += y[j];
  }
  const T inv_s = T(1) / s;
  for (j = 0; j + L <= k; j += L) S::store(y + j, S::load(y + j) * inv_s);
  for (; j < k; ++j) y[j] *= inv_s;
  return row_ok(m, s);
}

// Rows in `groups` fixed contiguous ranges (independent of the thread count, so the column sum is
// deterministic): with a column sum, each group adds its raw rows into its own partial (groups × K scratch),
// and the partials are added in group order in double.
template <typename T>
int64_t forward_impl(const T* z, const T* center, int64_t n, int64_t k, T two_inv_temp, T* out, T* column_sum,
                     T* partials, int64_t groups, int num_threads) {
  int64_t bad_rows = 0;
  if (column_sum) std::fill(partials, partials + groups * k, T(0));
#pragma omp parallel num_threads(int(std::max<int64_t>(1, std::min<int64_t>(num_threads, groups)))) reduction(+ : bad_rows)
  {
    cpu::FlushDenormals flush;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t r0 = n * g / groups, r1 = n * (g + 1) / groups;
      T* partial = column_sum ? partials + g * k : nullptr;
      for (int64_t row = r0; row < r1; ++row)
        bad_rows += !softmax_row(z + row * k, center, k, two_inv_temp, out + row * k, partial);
    }
  }
  if (column_sum) {
#pragma omp parallel for schedule(static) num_threads(int(std::max<int64_t>(1, std::min<int64_t>(num_threads, k / 256 + 1))))
    for (int64_t j = 0; j < k; ++j) {
      double acc = 0;
      for (int64_t g = 0; g < groups; ++g) acc += double(partials[g * k + j]);
      column_sum[j] = T(acc);
    }
  }
  return bad_rows;
}

template <typename T>
void column_sum_impl(const T* z, int64_t n, int64_t k, T* out, int num_threads) {
  // Columns in blocks of 64 per task; each block is summed over all rows in order, in double.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (k + kBlock - 1) / kBlock;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, blocks)));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j0 = blk * kBlock, width = std::min(kBlock, k - j0);
    double acc[kBlock] = {};
    for (int64_t row = 0; row < n; ++row) {
      const T* x = z + row * k + j0;
      for (int64_t j = 0; j < width; ++j) acc[j] += double(x[j]);
    }
    for (int64_t j = 0; j < width; ++j) out[j0 + j] = T(acc[j]);
  }
}

void check_common(std::uintptr_t z, int dtype, int64_t n, int64_t k) {
  check_dtype(dtype, dtype == kFloat32 || dtype == kFloat64, kOp, "teacher_logits");
  DK_CHECK_ARG(n >= 0 && k >= 1, kOp, "teacher_logits", "needs N >= 0 rows and K >= 1 columns, got N=", n,
               " K=", k);
  if (n > 0) check_pointer(as_ptr<void>(z), kOp, "teacher_logits");
}

}  // namespace

static int64_t sum_groups(int64_t n) { return std::min<int64_t>(n, kSumGroups); }

int64_t workspace_bytes_cpu(int64_t n, int64_t k, int dtype, bool with_sum) {
  check_dtype(dtype, dtype == kFloat32 || dtype == kFloat64, kOp, "teacher_logits");
  DK_CHECK_ARG(n >= 0 && k >= 1, kOp, "teacher_logits", "needs N >= 0 rows and K >= 1 columns");
  return with_sum ? sum_groups(n) * k * (dtype == kFloat64 ? 8 : 4) : 0;
}

int64_t forward_cpu(std::uintptr_t z, std::uintptr_t center, int dtype, int64_t n, int64_t k, double teacher_temp,
                    std::uintptr_t out, std::uintptr_t column_sum, std::uintptr_t workspace,
                    int64_t workspace_bytes, int num_threads) {
  check_common(z, dtype, n, k);
  if (n > 0) check_pointer(as_ptr<void>(out), kOp, "out");
  check_pointer(as_ptr<void>(center), kOp, "center");
  DK_CHECK_ARG(std::isfinite(teacher_temp) && teacher_temp > 0, kOp, "teacher_temp",
               "must be positive and finite, got ", teacher_temp);
  DK_CHECK_ARG(dtype == kFloat64 ? std::isfinite(temperature_factor<double>(teacher_temp))
                                 : std::isfinite(temperature_factor<float>(teacher_temp)),
               kOp, "teacher_temp", "is too small for ", dtype_name(dtype), " (2/teacher_temp overflows), got ",
               teacher_temp);
  const bool with_sum = column_sum != 0;
  check_workspace(workspace, workspace_bytes, workspace_bytes_cpu(n, k, dtype, with_sum),
                  dtype == kFloat64 ? 8 : 4, kOp);
  if (n == 0) {
    if (with_sum) column_sum_cpu(z, dtype, n, k, column_sum, num_threads);  // zeros
    return 0;
  }
  const int64_t groups = with_sum ? sum_groups(n) : n;
  cpu::advise_huge_pages(as_ptr<void>(out), n * k * (dtype == kFloat64 ? 8 : 4));
  if (dtype == kFloat64)
    return forward_impl(as_ptr<const double>(z), as_ptr<const double>(center), n, k,
                        temperature_factor<double>(teacher_temp),
                        as_ptr<double>(out), as_ptr<double>(column_sum), as_ptr<double>(workspace), groups,
                        num_threads);
  return forward_impl(as_ptr<const float>(z), as_ptr<const float>(center), n, k,
                      temperature_factor<float>(teacher_temp),
                      as_ptr<float>(out), as_ptr<float>(column_sum), as_ptr<float>(workspace), groups,
                      num_threads);
}

void column_sum_cpu(std::uintptr_t z, int dtype, int64_t n, int64_t k, std::uintptr_t out, int num_threads) {
  check_common(z, dtype, n, k);
  check_pointer(as_ptr<void>(out), kOp, "out");
  if (dtype == kFloat64)
    column_sum_impl(as_ptr<const double>(z), n, k, as_ptr<double>(out), num_threads);
  else
    column_sum_impl(as_ptr<const float>(z), n, k, as_ptr<float>(out), num_threads);
}

}  // namespace softmax_center
}  // namespace dk
