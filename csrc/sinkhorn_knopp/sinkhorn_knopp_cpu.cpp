// CPU Sinkhorn-Knopp in the log domain (see sinkhorn_knopp.h). The prototype step reduces over samples, so it
// runs on column panels (all rows, a few hundred columns, sized to stay in L2 for its two passes); the sample
// step and the output run per row. Every reduction has a fixed order: results do not depend on thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/dk_cpu_simd.h"
#include "sinkhorn_knopp.h"
#include "sinkhorn_knopp_math.h"

namespace dk {
namespace sinkhorn_knopp {
namespace {

constexpr const char* kOp = "sinkhorn_knopp";

int clamp_threads(int num_threads, int64_t tasks) {
  return int(std::max<int64_t>(1, std::min<int64_t>(num_threads, tasks)));
}

template <typename T>
void prototype_stats(const T* z, int64_t n, int64_t k, T inv_temp, const T* beta, T* max_out, T* sum_out,
                     int num_threads) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
  // Panel width: the n × width panel read twice should fit in ~1 MB of L2.
  int64_t width = (int64_t(1) << 20) / std::max<int64_t>(1, n * int64_t(sizeof(T)));
  width = std::max<int64_t>(L, std::min<int64_t>(512, width / L * L));
  const int64_t panels = (k + width - 1) / width;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(num_threads, panels))
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t j0 = p * width, w = std::min(width, k - j0);
    T* m = max_out + j0;
    T* s = sum_out + j0;
    std::fill(m, m + w, T(-INFINITY));
    std::fill(s, s + w, T(0));
    for (int64_t row = 0; row < n; ++row) {
      const T* x = z + row * k + j0;
      const T shift = beta[row];
      int64_t j = 0;
      for (; j + L <= w; j += L) S::store(m + j, cpu::vmax(S::load(m + j), S::load(x + j) * inv_temp + shift));
      for (; j < w; ++j) m[j] = std::max(m[j], x[j] * inv_temp + shift);
    }
    for (int64_t row = 0; row < n; ++row) {
      const T* x = z + row * k + j0;
      const T shift = beta[row];
      int64_t j = 0;
      for (; j + L <= w; j += L)
        S::store(s + j, S::load(s + j) + cpu::vexp(S::load(x + j) * inv_temp + shift - S::load(m + j)));
      for (; j < w; ++j) s[j] += std::exp(x[j] * inv_temp + shift - m[j]);
    }
  }
}

template <typename T>
void sample_step(const T* z, int64_t n, int64_t k, T inv_temp, const T* alpha, T* beta_out, int num_threads) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(num_threads, n))
  for (int64_t row = 0; row < n; ++row) {
    const T* x = z + row * k;
    typename S::vec vm = S::splat(-INFINITY);
    int64_t j = 0;
    for (; j + L <= k; j += L) vm = cpu::vmax(vm, S::load(x + j) * inv_temp + S::load(alpha + j));
    T m = -INFINITY;
    for (int l = 0; l < L; ++l) m = std::max(m, vm[l]);
    for (; j < k; ++j) m = std::max(m, x[j] * inv_temp + alpha[j]);
    typename S::vec vs{};
    for (j = 0; j + L <= k; j += L) vs += cpu::vexp(S::load(x + j) * inv_temp + S::load(alpha + j) - m);
    T s = S::sum(vs);
    for (; j < k; ++j) s += std::exp(x[j] * inv_temp + alpha[j] - m);
    beta_out[row] = -(m + std::log(s));
  }
}

template <typename T>
void output(const T* z, int64_t n, int64_t k, T inv_temp, const T* alpha, const T* beta, T* out, int num_threads) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(num_threads, n))
  for (int64_t row = 0; row < n; ++row) {
    const T* x = z + row * k;
    T* y = out + row * k;
    const T shift = beta[row];
    int64_t j = 0;
    for (; j + L <= k; j += L)
      S::store(y + j, cpu::vexp(S::load(x + j) * inv_temp + S::load(alpha + j) + shift));
    for (; j < k; ++j) y[j] = std::exp(x[j] * inv_temp + alpha[j] + shift);
  }
}

template <typename T>
int64_t forward_impl(const T* z, int64_t n, int64_t k, T inv_temp, int64_t iterations, T* out, int num_threads) {
  std::vector<T> alpha(static_cast<size_t>(k)), max_k(static_cast<size_t>(k)), sum_k(static_cast<size_t>(k));
  std::vector<T> beta(static_cast<size_t>(n), T(0));
  for (int64_t it = 0; it < iterations; ++it) {
    prototype_stats(z, n, k, inv_temp, beta.data(), max_k.data(), sum_k.data(), num_threads);
    for (int64_t j = 0; j < k; ++j) alpha[size_t(j)] = alpha_from_stats(max_k[size_t(j)], sum_k[size_t(j)]);
    sample_step(z, n, k, inv_temp, alpha.data(), beta.data(), num_threads);
  }
  int64_t bad = 0;
  for (T a : alpha) bad += !std::isfinite(a);
  for (T b : beta) bad += !std::isfinite(b);
  output(z, n, k, inv_temp, alpha.data(), beta.data(), out, num_threads);
  return bad;
}

void check_common(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp) {
  check_dtype(dtype, dtype == kFloat32 || dtype == kFloat64, kOp, "teacher_logits");
  DK_CHECK_ARG(n >= 0 && k >= 1, kOp, "teacher_logits", "needs N >= 0 rows and K >= 1 columns, got N=", n,
               " K=", k);
  if (n > 0) check_pointer(as_ptr<void>(z), kOp, "teacher_logits");
  DK_CHECK_ARG(std::isfinite(teacher_temp) && teacher_temp > 0, kOp, "teacher_temp",
               "must be positive and finite, got ", teacher_temp);
}

template <typename Body>
auto dispatch(int dtype, double teacher_temp, Body&& body) {
  if (dtype == kFloat64) return body(static_cast<double*>(nullptr), 1.0 / teacher_temp);
  return body(static_cast<float*>(nullptr), float(1.0 / teacher_temp));
}

}  // namespace

int64_t forward_cpu(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp, int64_t n_iterations,
                    std::uintptr_t out, int num_threads) {
  check_common(z, dtype, n, k, teacher_temp);
  DK_CHECK_ARG(n >= 1, kOp, "teacher_logits", "needs at least one row, got 0");
  DK_CHECK_ARG(n_iterations >= 1, kOp, "n_iterations", "must be >= 1, got ", n_iterations);
  check_pointer(as_ptr<void>(out), kOp, "out");
  return dispatch(dtype, teacher_temp, [&](auto* tag, auto inv_temp) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return forward_impl<T>(as_ptr<const T>(z), n, k, inv_temp, n_iterations, as_ptr<T>(out), num_threads);
  });
}

void prototype_stats_cpu(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp, std::uintptr_t beta,
                         std::uintptr_t max_out, std::uintptr_t sumexp_out, int num_threads) {
  check_common(z, dtype, n, k, teacher_temp);
  if (n > 0) check_pointer(as_ptr<void>(beta), kOp, "beta");
  check_pointer(as_ptr<void>(max_out), kOp, "max_out");
  check_pointer(as_ptr<void>(sumexp_out), kOp, "sumexp_out");
  dispatch(dtype, teacher_temp, [&](auto* tag, auto inv_temp) {
    using T = std::remove_pointer_t<decltype(tag)>;
    prototype_stats<T>(as_ptr<const T>(z), n, k, inv_temp, as_ptr<const T>(beta), as_ptr<T>(max_out),
                       as_ptr<T>(sumexp_out), num_threads);
  });
}

void sample_step_cpu(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp, std::uintptr_t alpha,
                     std::uintptr_t beta_out, int num_threads) {
  check_common(z, dtype, n, k, teacher_temp);
  check_pointer(as_ptr<void>(alpha), kOp, "alpha");
  if (n == 0) return;
  check_pointer(as_ptr<void>(beta_out), kOp, "beta_out");
  dispatch(dtype, teacher_temp, [&](auto* tag, auto inv_temp) {
    using T = std::remove_pointer_t<decltype(tag)>;
    sample_step<T>(as_ptr<const T>(z), n, k, inv_temp, as_ptr<const T>(alpha), as_ptr<T>(beta_out), num_threads);
  });
}

void output_cpu(std::uintptr_t z, int dtype, int64_t n, int64_t k, double teacher_temp, std::uintptr_t alpha,
                std::uintptr_t beta, std::uintptr_t out, int num_threads) {
  check_common(z, dtype, n, k, teacher_temp);
  check_pointer(as_ptr<void>(alpha), kOp, "alpha");
  if (n == 0) return;
  check_pointer(as_ptr<void>(beta), kOp, "beta");
  check_pointer(as_ptr<void>(out), kOp, "out");
  dispatch(dtype, teacher_temp, [&](auto* tag, auto inv_temp) {
    using T = std::remove_pointer_t<decltype(tag)>;
    output<T>(as_ptr<const T>(z), n, k, inv_temp, as_ptr<const T>(alpha), as_ptr<const T>(beta), as_ptr<T>(out),
              num_threads);
  });
}

}  // namespace sinkhorn_knopp
}  // namespace dk
