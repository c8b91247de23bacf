// CPU Sinkhorn-Knopp (see sinkhorn_knopp.h). Single process: exponentiate once relative to the column maxima,
// then iterate on scaling vectors (scaling_impl); the log-domain stages below serve the distributed path and the
// rare inputs whose scalings leave the double range. The prototype step reduces over samples, so it
// runs on column panels (all rows, a few hundred columns, sized to stay in L2 for its two passes); the sample
// step and the output run per row. Every reduction has a fixed order: results do not depend on thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

// Log-domain output: row b is the softmax over k of c_bk = a_bk + α_k (sinkhorn_knopp_math.h), from the row's own
// max and sum, so every row sums to 1. c is stored before use: both passes see the same rounded value.
template <typename T>
void output(const T* z, int64_t n, int64_t k, T inv_temp, const T* alpha, T* out, int num_threads) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(num_threads, n))
  for (int64_t row = 0; row < n; ++row) {
    const T* x = z + row * k;
    T* y = out + row * k;
    typename S::vec vm = S::splat(-INFINITY);
    int64_t j = 0;
    for (; j + L <= k; j += L) {
      const typename S::vec c = S::load(x + j) * inv_temp + S::load(alpha + j);
      S::store(y + j, c);
      vm = cpu::vmax(vm, c);
    }
    T m = -INFINITY;
    for (int l = 0; l < L; ++l) m = std::max(m, vm[l]);
    for (; j < k; ++j) {
      y[j] = x[j] * inv_temp + alpha[j];
      m = std::max(m, y[j]);
    }
    typename S::vec vs{};
    for (j = 0; j + L <= k; j += L) {
      const typename S::vec e = cpu::vexp(S::load(y + j) - m);
      S::store(y + j, e);
      vs += e;
    }
    T s = S::sum(vs);
    for (; j < k; ++j) {
      y[j] = std::exp(y[j] - m);
      s += y[j];
    }
    const T inv_s = T(1) / s;
    for (j = 0; j + L <= k; j += L) S::store(y + j, S::load(y + j) * inv_s);
    for (; j < k; ++j) y[j] *= inv_s;
  }
}

template <typename T>
int64_t log_domain_impl(const T* z, int64_t n, int64_t k, T inv_temp, int64_t iterations, T* out,
                        int num_threads) {
  std::vector<T> alpha(static_cast<size_t>(k)), max_k(static_cast<size_t>(k)), sum_k(static_cast<size_t>(k));
  std::vector<T> beta(static_cast<size_t>(n), T(0));
  for (int64_t it = 0; it < iterations; ++it) {
    prototype_stats(z, n, k, inv_temp, beta.data(), max_k.data(), sum_k.data(), num_threads);
    for (int64_t j = 0; j < k; ++j) alpha[size_t(j)] = alpha_from_stats(max_k[size_t(j)], sum_k[size_t(j)]);
    if (it + 1 < iterations) sample_step(z, n, k, inv_temp, alpha.data(), beta.data(), num_threads);
  }
  int64_t bad = 0;
  for (T a : alpha) bad += !std::isfinite(a);
  output(z, n, k, inv_temp, alpha.data(), out, num_threads);
  for (int64_t row = 0; row < n && !bad; ++row) bad += !std::isfinite(out[row * k]);  // a NaN row is NaN throughout
  return bad;
}

// ---- Scaling path (single process): E = exp((z − M_k)/τ) once, then the iterations on scaling vectors ----

using DV = cpu::Simd<double>;

// kLanes values of T widened to double (T float or double).
template <typename T>
inline DV::vec load_double(const T* p) {
  typedef T TV __attribute__((vector_size(sizeof(T) * DV::kLanes)));
  TV v;
  std::memcpy(&v, p, sizeof(TV));
  return __builtin_convertvector(v, DV::vec);
}

template <typename T>
inline void store_from_double(T* p, DV::vec v) {
  typedef T TV __attribute__((vector_size(sizeof(T) * DV::kLanes)));
  const TV t = __builtin_convertvector(v, TV);
  std::memcpy(p, &t, sizeof(TV));
}

// Column panels: wide enough for whole cache lines per row, narrow enough that the accumulators stay in L1.
constexpr int64_t kPanel = 1024;

template <typename T>
void column_max(const T* z, int64_t n, int64_t k, T* max_out, int num_threads) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
  const int64_t panels = (k + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(num_threads, panels))
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t j0 = p * kPanel, w = std::min(kPanel, k - j0);
    T* m = max_out + j0;
    std::fill(m, m + w, T(-INFINITY));
    for (int64_t row = 0; row < n; ++row) {
      const T* x = z + row * k + j0;
      int64_t j = 0;
      for (; j + L <= w; j += L) S::store(m + j, cpu::vmax(S::load(m + j), S::load(x + j)));
      for (; j < w; ++j) m[j] = std::max(m[j], x[j]);
    }
  }
}

// e_bk = exp(x_bk), x = column_exponent(z, M); rows dominated everywhere are shifted (kRowShift). Writes the
// initial row scaling v_b (1, or exp(r_b) for a shifted row); returns false if a row's exponents are all −inf
// or NaN (the scaling path cannot represent it).
template <typename T>
bool exponentiate(const T* z, int64_t n, int64_t k, T inv_temp, double teacher_temp, const T* colmax, T* e,
                  double* v, int num_threads) {
  using S = cpu::Simd<T>;
  constexpr int L = S::kLanes;
  int64_t unusable = 0;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(num_threads, n)) reduction(+ : unusable)
  for (int64_t row = 0; row < n; ++row) {
    const T* x = z + row * k;
    T* y = e + row * k;
    typename S::vec vm = S::splat(-INFINITY);
    int64_t j = 0;
    for (; j + L <= k; j += L) {
      const typename S::vec a = column_exponent(S::load(x + j), S::load(colmax + j), inv_temp);
      vm = cpu::vmax(vm, a);
      S::store(y + j, cpu::vexp(a));
    }
    T r = -INFINITY;
    for (int l = 0; l < L; ++l) r = std::max(r, vm[l]);
    for (; j < k; ++j) {
      const T a = column_exponent(x[j], colmax[j], inv_temp);
      r = std::max(r, a);
      y[j] = std::exp(a);
    }
    v[row] = 1.0;
    if (r >= T(-kRowShift)) continue;
    if (!(r > T(-INFINITY))) {
      ++unusable;
      continue;
    }
    // Rare: recomputed in double, where z − M is exact (for float input) and the shift by the row's maximum
    // does not cancel away the row's own differences (float32 at an offset of 1e6 kept 5 % of them).
    const double inv = 1.0 / double(teacher_temp);
    double rd = -INFINITY;
    for (j = 0; j < k; ++j) rd = std::max(rd, column_exponent(double(x[j]), double(colmax[j]), inv));
    for (j = 0; j < k; ++j) y[j] = T(std::exp(column_exponent(double(x[j]), double(colmax[j]), inv) - rd));
    v[row] = std::exp(rd);
  }
  return unusable == 0;
}

// Prototype step: u_k = 1/Σ_b e_bk v_b (column panels, rows in order: deterministic).
template <typename T>
void column_step(const T* e, int64_t n, int64_t k, const double* v, double* u, int num_threads) {
  constexpr int L = DV::kLanes;
  const int64_t panels = (k + kPanel - 1) / kPanel;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(num_threads, panels))
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t j0 = p * kPanel, w = std::min(kPanel, k - j0);
    alignas(64) double acc[kPanel];
    std::fill(acc, acc + w, 0.0);
    for (int64_t row = 0; row < n; ++row) {
      const T* x = e + row * k + j0;
      const double vb = v[row];
      int64_t j = 0;
      for (; j + L <= w; j += L) DV::store(acc + j, DV::load(acc + j) + load_double(x + j) * vb);
      for (; j < w; ++j) acc[j] += double(x[j]) * vb;
    }
    for (int64_t j = 0; j < w; ++j) u[j0 + j] = 1.0 / acc[j];
  }
}

// Sample step: v_b = 1/Σ_k e_bk u_k; with write_output also e_bk ← e_bk·u_k·v_b (the targets, rows sum to 1).
template <typename T>
void row_step(T* e, int64_t n, int64_t k, const double* u, double* v, bool write_output, int num_threads) {
  constexpr int L = DV::kLanes;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(num_threads, n))
  for (int64_t row = 0; row < n; ++row) {
    T* x = e + row * k;
    DV::vec a0{}, a1{};
    int64_t j = 0;
    for (; j + 2 * L <= k; j += 2 * L) {
      a0 += load_double(x + j) * DV::load(u + j);
      a1 += load_double(x + j + L) * DV::load(u + j + L);
    }
    for (; j + L <= k; j += L) a0 += load_double(x + j) * DV::load(u + j);
    double s = DV::sum(a0 + a1);
    for (; j < k; ++j) s += double(x[j]) * u[j];
    const double vb = 1.0 / s;
    v[row] = vb;
    if (!write_output) continue;
    for (j = 0; j + L <= k; j += L) store_from_double(x + j, load_double(x + j) * DV::load(u + j) * vb);
    for (; j < k; ++j) x[j] = T(double(x[j]) * u[j] * vb);
  }
}

// Returns false when the scalings leave the double range or a row cannot be represented: the caller then runs
// the log-domain iterations instead (same result, slower).
template <typename T>
bool scaling_impl(const T* z, int64_t n, int64_t k, T inv_temp, double teacher_temp, int64_t iterations, T* out,
                  int num_threads) {
  cpu::advise_huge_pages(out, n * k * int64_t(sizeof(T)));
  std::vector<T> colmax(static_cast<size_t>(k));
  std::vector<double> u(static_cast<size_t>(k)), v(static_cast<size_t>(n));
  column_max(z, n, k, colmax.data(), num_threads);
  if (!exponentiate(z, n, k, inv_temp, teacher_temp, colmax.data(), out, v.data(), num_threads)) return false;
  const auto usable = [](const std::vector<double>& s) {
    for (double x : s)
      if (!(x > 0.0 && x < INFINITY)) return false;
    return true;
  };
  for (int64_t it = 0; it < iterations; ++it) {
    column_step(out, n, k, v.data(), u.data(), num_threads);
    if (!usable(u)) return false;
    const bool last = it + 1 == iterations;
    row_step(out, n, k, u.data(), v.data(), last, num_threads);
    if (!usable(v)) return false;
  }
  return true;
}

template <typename T>
int64_t forward_impl(const T* z, int64_t n, int64_t k, T inv_temp, double teacher_temp, int64_t iterations, T* out,
                     int num_threads) {
  if (scaling_impl(z, n, k, inv_temp, teacher_temp, iterations, out, num_threads)) return 0;
  return log_domain_impl(z, n, k, inv_temp, iterations, out, num_threads);
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
    return forward_impl<T>(as_ptr<const T>(z), n, k, inv_temp, teacher_temp, n_iterations, as_ptr<T>(out),
                           num_threads);
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
                std::uintptr_t out, int num_threads) {
  check_common(z, dtype, n, k, teacher_temp);
  check_pointer(as_ptr<void>(alpha), kOp, "alpha");
  if (n == 0) return;
  check_pointer(as_ptr<void>(out), kOp, "out");
  dispatch(dtype, teacher_temp, [&](auto* tag, auto inv_temp) {
    using T = std::remove_pointer_t<decltype(tag)>;
    output<T>(as_ptr<const T>(z), n, k, inv_temp, as_ptr<const T>(alpha), as_ptr<T>(out), num_threads);
  });
}

}  // namespace sinkhorn_knopp
}  // namespace dk
