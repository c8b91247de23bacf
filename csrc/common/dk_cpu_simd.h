// Portable SIMD for the CPU kernels: GCC/Clang vector extensions at the width of the ISA the file is compiled
// for (setup.py compiles for the host CPU unless DINOKERNELS_CPU_ARCH says otherwise), plus reductions with
// several independent accumulators. Without -ffast-math the compiler must keep a float sum in source order,
// i.e. one add per 4 cycles; these helpers fix a different, still deterministic, order that vectorises.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dk {
namespace cpu {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(kVecBytes)));
  static constexpr int kLanes = kVecBytes / int(sizeof(T));

  static inline vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof(vec));
    return v;
  }
  static inline void store(T* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
  static inline vec splat(T value) { return vec{} + value; }
  static inline T sum(vec v) {
    T s = T(0);
    for (int l = 0; l < kLanes; ++l) s += v[l];
    return s;
  }
};

// Bit l set when a[l] >= b[l] (false for NaN). The generic loop compiles to lane extracts, hence intrinsics.
inline uint32_t ge_mask(Simd<float>::vec a, Simd<float>::vec b) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(__m512(a), __m512(b), _CMP_GE_OQ);
#elif defined(__AVX__)
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(__m256(a), __m256(b), _CMP_GE_OQ)));
#else
  uint32_t m = 0;
  for (int l = 0; l < Simd<float>::kLanes; ++l) m |= uint32_t(a[l] >= b[l]) << l;
  return m;
#endif
}

inline uint32_t ge_mask(Simd<double>::vec a, Simd<double>::vec b) {
#if defined(__AVX512F__)
  return _mm512_cmp_pd_mask(__m512d(a), __m512d(b), _CMP_GE_OQ);
#elif defined(__AVX__)
  return uint32_t(_mm256_movemask_pd(_mm256_cmp_pd(__m256d(a), __m256d(b), _CMP_GE_OQ)));
#else
  uint32_t m = 0;
  for (int l = 0; l < Simd<double>::kLanes; ++l) m |= uint32_t(a[l] >= b[l]) << l;
  return m;
#endif
}

// Treats denormal inputs and results as zero (x86 MXCSR FTZ and DAZ) for its scope, on the calling thread only;
// construct one inside each OpenMP parallel region. Softmax targets are full of values below 1.2e-38, and each
// denormal operand costs the FPU ~100 cycles; zeroing them changes a result by less than 1.2e-38 per term.
class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

// Asks Linux to back the 2 MB-aligned interior of a fresh output buffer with transparent huge pages (a hint; a
// no-op where THP is off or elsewhere). torch's CPU allocator maps a large tensor afresh on every call, and
// first-touching 64 MB in 4 KB pages costs 16k page faults, as long as the kernel's own memory traffic; call
// before the first write.
inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(1) << 21;
  const std::uintptr_t begin = (reinterpret_cast<std::uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t end = (reinterpret_cast<std::uintptr_t>(data) + std::uintptr_t(bytes)) & ~(kHuge - 1);
  if (bytes >= int64_t(4 * kHuge) && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Lane-wise maximum. NaN lanes of b win, NaN lanes of a lose; callers rely on NaN reaching a later sum instead.
template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// Lane-wise exp. float: Cephes-style range reduction and degree-6 polynomial (≈1 ulp); inputs below −87 give
// 0 (true values there are < 1.7e-38, below the smallest normal float) and inputs above 88 give exp(88).
// NaN propagates. double: the library exp per lane (the float64 kernels exist for gradcheck, not for speed).
inline Simd<float>::vec vexp(Simd<float>::vec x) {
  using V = Simd<float>::vec;
  typedef int32_t IV __attribute__((vector_size(kVecBytes)));
  const V hi = Simd<float>::splat(88.0f), lo = Simd<float>::splat(-87.0f);
  V xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // n = round(x / ln 2) with the 1.5·2^23 trick (exact for |n| < 2^22); r = x − n·ln 2 in two pieces.
  const V magic = Simd<float>::splat(12582912.0f);
  V n = (xc * 1.44269504088896341f + magic) - magic;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V y = Simd<float>::splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  IV bits = (__builtin_convertvector(n, IV) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  y = y * scale;
  const V zero{};
  return x < lo ? zero : y;
}

inline Simd<double>::vec vexp(Simd<double>::vec x) {
  for (int l = 0; l < Simd<double>::kLanes; ++l) x[l] = std::exp(x[l]);
  return x;
}

// exp for x ≤ 0 (or NaN), with fewer instructions than vexp where AVX-512 is available: no upper clamp, one
// NaN-keeping max for the lower one, and VSCALEF for the 2^n factor. Same range reduction and polynomial as
// vexp: the same bits for x ≥ −87 (checked over all floats in [−88, 0] in steps of 7 ulps and 2.7e9 random
// ones), and between −87.34 and −87, where vexp cuts to 0, the normal float exp(x) is; below, a denormal (0
// under FlushDenormals, like vexp) and exactly 0 from −104 on. x > 0 is not handled.
inline Simd<float>::vec vexp_nonpositive(Simd<float>::vec xv) {
#if defined(__AVX512F__)
  // lo > x ? lo : x is one vmaxps (which returns its second operand when either is NaN), and keeps a NaN x.
  const Simd<float>::vec lo = Simd<float>::splat(-104.0f);
  const __m512 x = __m512(lo > xv ? lo : xv);
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic), magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  // (The masked form with every lane on: the unmasked intrinsic trips a GCC 12 maybe-uninitialized warning.)
  return Simd<float>::vec(_mm512_maskz_scalef_ps(__mmask16(0xFFFF), y, n));
#else
  return vexp(xv);
#endif
}

inline Simd<double>::vec vexp_nonpositive(Simd<double>::vec x) { return vexp(x); }

// Non-temporal stores: a result written once and not read again soon goes to memory without first reading the
// line into the cache (saving that read, a third of a streaming write's traffic) and without evicting the
// working set. p must be kVecBytes-aligned; call stream_fence() before the data is read by another thread.
inline void stream_store(float* p, Simd<float>::vec v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, __m512(v));
#elif defined(__AVX__)
  _mm256_stream_ps(p, __m256(v));
#elif defined(__SSE__)
  _mm_stream_ps(p, __m128(v));
#else
  Simd<float>::store(p, v);
#endif
}

inline void stream_store(double* p, Simd<double>::vec v) {
#if defined(__AVX512F__)
  _mm512_stream_pd(p, __m512d(v));
#elif defined(__AVX__)
  _mm256_stream_pd(p, __m256d(v));
#elif defined(__SSE2__)
  _mm_stream_pd(p, __m128d(v));
#else
  Simd<double>::store(p, v);
#endif
}

inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Elements of T before p reaches the next kVecBytes boundary (p must be T-aligned).
template <typename T>
inline int64_t elements_to_alignment(const T* p) {
  const std::uintptr_t misalign = reinterpret_cast<std::uintptr_t>(p) % std::uintptr_t(kVecBytes);
  return misalign ? int64_t((std::uintptr_t(kVecBytes) - misalign) / sizeof(T)) : 0;
}

// Σ_i a[i] * b[i].
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using S = Simd<T>;
  constexpr int L = S::kLanes;
  typename S::vec acc0{}, acc1{}, acc2{}, acc3{};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    acc0 += S::load(a + i) * S::load(b + i);
    acc1 += S::load(a + i + L) * S::load(b + i + L);
    acc2 += S::load(a + i + 2 * L) * S::load(b + i + 2 * L);
    acc3 += S::load(a + i + 3 * L) * S::load(b + i + 3 * L);
  }
  for (; i + L <= n; i += L) acc0 += S::load(a + i) * S::load(b + i);
  T total = S::sum((acc0 + acc1) + (acc2 + acc3));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

}  // namespace cpu
}  // namespace dk
