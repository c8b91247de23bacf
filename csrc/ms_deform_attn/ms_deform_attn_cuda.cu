// CUDA multi-scale deformable attention (see ms_deform_attn.h, ms_deform_attn_math.h).
//
// A group of G threads (a power of 2 ≤ 32, aligned inside a warp) owns one (n, q, m); each thread handles VEC
// channels per step with one 16-byte load per corner when D·sizeof(T) and the pointers allow (4 × fp32 or
// 8 × fp16/bf16), else VEC = 1. Locations, bilinear weights and sums are float32 whatever the value dtype. L and P
// are template parameters for the common (4, 4), with a runtime-sized generic instance; offsets are 64-bit.
// Backward: the same mapping; each thread scatters a·w·g into a float32 grad_value buffer with atomics (128-bit
// vector atomics on sm_90) and forms partial per-corner dot products Σ g·V, which a warp-shuffle reduction over the
// group turns into grad_locations and grad_weights (sample_gradients, shared with the CPU).
#include "../common/dk_cuda.cuh"
#include "ms_deform_attn.h"
#include "ms_deform_attn_math.h"

namespace dk {
namespace ms_deform_attn {
namespace {

constexpr int kThreads = 256;

struct Params {
  Levels lv;
  int64_t spatial, heads, channels, queries;
  int levels, points;
  int group, group_shift;  // threads per (n, q, m) and log2 of it
  int64_t groups;          // N·Lq·M
};

// VEC channels from p into float; one 16-byte load when VEC·sizeof(T) == 16 (p is then 16-byte aligned).
template <typename T, int VEC>
__device__ DK_INLINE void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(p[i]);
  }
}

template <typename T, int VEC>
__device__ DK_INLINE void store_vec(T* __restrict__ p, const float (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_float<T>(v[i]);
  }
}

// dst[0, VEC) += alpha·g (float32 buffer). dst is 16-byte aligned when VEC > 1 (D is then a multiple of 4).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kVectorAtomics = true;
#else
constexpr bool kVectorAtomics = false;
#endif

template <int VEC>
__device__ DK_INLINE void atomic_add_vec(float* dst, float alpha, const float (&g)[VEC]) {
  if constexpr (kVectorAtomics && VEC % 4 == 0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#pragma unroll
    for (int i = 0; i < VEC; i += 4)
      atomicAdd(reinterpret_cast<float4*>(dst + i),
                make_float4(alpha * g[i], alpha * g[i + 1], alpha * g[i + 2], alpha * g[i + 3]));
#endif
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, alpha * g[i]);
  }
}

template <typename T, typename TL, int VEC, int L_, int P_>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const Params p, const T* __restrict__ value,  // (N, S, M, D)
                   const TL* __restrict__ loc,                   // (N, Lq, M, L, P, 2)
                   const TL* __restrict__ attn,                  // (N, Lq, M, L, P)
                   T* __restrict__ out) {                        // (N, Lq, M, D)
  const int levels = L_ > 0 ? L_ : p.levels, points = P_ > 0 ? P_ : p.points;
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = thread >> p.group_shift;
  const int lane = int(thread & (p.group - 1));
  if (g >= p.groups) return;  // no shuffles in the forward
  const int64_t n = g / (p.queries * p.heads), m = g % p.heads, pixel = p.heads * p.channels;
  const T* base = value + n * p.spatial * pixel + m * p.channels;
  const TL* xy = loc + g * int64_t(levels * points) * 2;
  const TL* a = attn + g * int64_t(levels * points);
  for (int64_t c0 = int64_t(lane) * VEC; c0 < p.channels; c0 += int64_t(p.group) * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
#pragma unroll
    for (int l = 0; l < levels; ++l) {
      const int height = p.lv.height[l], width = p.lv.width[l];
      const T* level = base + p.lv.start[l] * pixel + c0;
#pragma unroll
      for (int pt = 0; pt < points; ++pt) {
        const int i = l * points + pt;
        Footprint<float> f;
        if (!footprint(to_float(xy[2 * i]), to_float(xy[2 * i + 1]), height, width, f)) continue;
        const float aw = to_float(a[i]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (f.row[k] < 0) continue;
          float v[VEC];
          load_vec<T, VEC>(level + f.row[k] * pixel, v);
          const float w = aw * f.weight[k];
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] = fmaf(w, v[j], acc[j]);
        }
      }
    }
    store_vec<T, VEC>(out + g * p.channels + c0, acc);
  }
}

template <typename T, typename TL, int VEC, int L_, int P_>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const Params p, const T* __restrict__ grad_out,  // (N, Lq, M, D)
                    const T* __restrict__ value,                     // (N, S, M, D)
                    const TL* __restrict__ loc, const TL* __restrict__ attn,
                    float* __restrict__ grad_value,  // (N, S, M, D) float32, zero on entry
                    TL* __restrict__ grad_loc,       // (N, Lq, M, L, P, 2)
                    TL* __restrict__ grad_attn) {    // (N, Lq, M, L, P)
  const int levels = L_ > 0 ? L_ : p.levels, points = P_ > 0 ? P_ : p.points;
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = int(thread & (p.group - 1));
  // Every lane of a warp must reach the shuffles: groups past the end compute on the last group's data (valid
  // memory) and write nothing.
  const bool active = (thread >> p.group_shift) < p.groups;
  const int64_t g = active ? (thread >> p.group_shift) : p.groups - 1;
  const int64_t n = g / (p.queries * p.heads), m = g % p.heads, pixel = p.heads * p.channels;
  const int64_t head_offset = n * p.spatial * pixel + m * p.channels;
  const T* gout = grad_out + g * p.channels;
  const TL* xy = loc + g * int64_t(levels * points) * 2;
  const TL* a = attn + g * int64_t(levels * points);
  // The first channel step's upstream gradient stays in registers (for D ≤ G·VEC the only step).
  const int64_t first = int64_t(lane) * VEC;
  float g_first[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) g_first[j] = 0.f;
  if (first < p.channels) load_vec<T, VEC>(gout + first, g_first);
#pragma unroll
  for (int l = 0; l < levels; ++l) {
    const int height = p.lv.height[l], width = p.lv.width[l];
    const int64_t level = head_offset + p.lv.start[l] * pixel;
#pragma unroll
    for (int pt = 0; pt < points; ++pt) {
      const int i = l * points + pt;
      Footprint<float> f;
      const bool inside = footprint(to_float(xy[2 * i]), to_float(xy[2 * i + 1]), height, width, f);
      const float aw = to_float(a[i]);
      float dot[4] = {0.f, 0.f, 0.f, 0.f};
      if (inside) {
        for (int64_t c0 = first; c0 < p.channels; c0 += int64_t(p.group) * VEC) {
          float gv[VEC];
          if (c0 == first) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) gv[j] = g_first[j];
          } else {
            load_vec<T, VEC>(gout + c0, gv);
          }
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (f.row[k] < 0) continue;
            const int64_t off = level + f.row[k] * pixel + c0;
            float v[VEC];
            load_vec<T, VEC>(value + off, v);
#pragma unroll
            for (int j = 0; j < VEC; ++j) dot[k] = fmaf(gv[j], v[j], dot[k]);
            if (active) atomic_add_vec<VEC>(grad_value + off, aw * f.weight[k], gv);
          }
        }
      }
      // Group-wide sums of the partial dots (xor offsets < G stay inside the group).
      for (int offset = p.group >> 1; offset > 0; offset >>= 1) {
#pragma unroll
        for (int k = 0; k < 4; ++k) dot[k] += __shfl_xor_sync(0xffffffffu, dot[k], offset);
      }
      if (active && lane == 0) {
        float ga = 0.f, gx = 0.f, gy = 0.f;
        if (inside) sample_gradients(f, dot, aw, height, width, ga, gx, gy);
        grad_attn[g * int64_t(levels * points) + i] = from_float<TL>(ga);
        grad_loc[(g * int64_t(levels * points) + i) * 2] = from_float<TL>(gx);
        grad_loc[(g * int64_t(levels * points) + i) * 2 + 1] = from_float<TL>(gy);
      }
    }
  }
}

Params make_params(const Levels& lv, const Sizes& s, int vec) {
  Params p{};
  p.lv = lv;
  p.spatial = s.spatial, p.heads = s.heads, p.channels = s.channels, p.queries = s.queries;
  p.levels = int(s.levels), p.points = int(s.points);
  const int64_t lanes = (s.channels + vec - 1) / vec;
  p.group = 1, p.group_shift = 0;
  while (p.group < 32 && p.group < lanes) p.group <<= 1, ++p.group_shift;
  p.groups = s.batch * s.queries * s.heads;
  return p;
}

dim3 grid_for(const Params& p) {
  const int64_t blocks = (p.groups * p.group + kThreads - 1) / kThreads;
  DK_CHECK_ARG(blocks <= 0x7fffffff, kOp, "sampling_locations", "has N·Lq·M = ", p.groups,
               " (query, head) pairs, too many for one CUDA grid");
  return dim3(unsigned(blocks));
}

// body(T*, TL*) with value's storage type and the locations' (float32 or value's).
template <typename Body>
void dispatch_types(int value_dtype, int location_dtype, Body&& body) {
  dispatch_cuda_float_types(value_dtype, kOp, "value", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (location_dtype == kFloat32) {
      body(static_cast<T*>(nullptr), static_cast<float*>(nullptr));
    } else {
      check_dtype(location_dtype, location_dtype == value_dtype, kOp, "sampling_locations");
      if constexpr (!std::is_same_v<T, float>) body(static_cast<T*>(nullptr), static_cast<T*>(nullptr));
    }
  });
}

// body(integral_constant VEC, L_, P_): 16-byte vectors when `aligned`, (L, P) = (4, 4) specialised.
template <typename T, typename Body>
void dispatch_shape(bool aligned, const Sizes& s, Body&& body) {
  constexpr int kVec = 16 / int(sizeof(T));
  auto with_lp = [&](auto vec) {
    if (s.levels == 4 && s.points == 4)
      body(vec, std::integral_constant<int, 4>{}, std::integral_constant<int, 4>{});
    else
      body(vec, std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
  };
  if (aligned)
    with_lp(std::integral_constant<int, kVec>{});
  else
    with_lp(std::integral_constant<int, 1>{});
}

bool aligned16(std::initializer_list<std::uintptr_t> ptrs) {
  for (std::uintptr_t ptr : ptrs)
    if (ptr % 16 != 0) return false;
  return true;
}

void check_common(const Sizes& s, int value_dtype, int location_dtype) {
  check_dtype(value_dtype, value_dtype == kFloat32 || value_dtype == kFloat16 || value_dtype == kBFloat16, kOp,
              "value");
  check_dtype(location_dtype, location_dtype == kFloat32 || location_dtype == value_dtype, kOp,
              "sampling_locations");
  (void)s;
}

int element_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

}  // namespace

void forward_cuda(std::uintptr_t value, std::uintptr_t spatial_shapes, std::uintptr_t level_start_index,
                  std::uintptr_t sampling_locations, std::uintptr_t attention_weights, int value_dtype,
                  int location_dtype, int64_t batch, int64_t spatial, int64_t heads, int64_t channels,
                  int64_t queries, int64_t levels, int64_t points, std::uintptr_t output, int device_index,
                  std::uintptr_t stream) {
  const Sizes s{batch, spatial, heads, channels, queries, levels, points};
  const Levels lv = read_levels(spatial_shapes, level_start_index, s);
  check_common(s, value_dtype, location_dtype);
  if (batch * queries == 0) return;
  for (auto [ptr, name] : {std::pair{value, "value"}, {sampling_locations, "sampling_locations"},
                           {attention_weights, "attention_weights"}, {output, "output"}})
    check_pointer(as_ptr<void>(ptr), kOp, name);
  cuda::prepare_device(kOp, device_index);
  const bool aligned = (channels * element_size(value_dtype)) % 16 == 0 && aligned16({value, output});
  dispatch_types(value_dtype, location_dtype, [&](auto* vtag, auto* ltag) {
    using T = std::remove_pointer_t<decltype(vtag)>;
    using TL = std::remove_pointer_t<decltype(ltag)>;
    dispatch_shape<T>(aligned, s, [&](auto vec, auto lc, auto pc) {
      constexpr int VEC = decltype(vec)::value, L_ = decltype(lc)::value, P_ = decltype(pc)::value;
      const Params p = make_params(lv, s, VEC);
      forward_kernel<T, TL, VEC, L_, P_><<<grid_for(p), kThreads, 0, cuda::as_stream(stream)>>>(
          p, as_ptr<const T>(value), as_ptr<const TL>(sampling_locations), as_ptr<const TL>(attention_weights),
          as_ptr<T>(output));
      cuda::check_launch(kOp);
    });
  });
}

void backward_cuda(std::uintptr_t grad_output, std::uintptr_t value, std::uintptr_t spatial_shapes,
                   std::uintptr_t level_start_index, std::uintptr_t sampling_locations,
                   std::uintptr_t attention_weights, int value_dtype, int location_dtype, int64_t batch,
                   int64_t spatial, int64_t heads, int64_t channels, int64_t queries, int64_t levels,
                   int64_t points, std::uintptr_t grad_value_f32, std::uintptr_t grad_locations,
                   std::uintptr_t grad_weights, int device_index, std::uintptr_t stream) {
  const Sizes s{batch, spatial, heads, channels, queries, levels, points};
  const Levels lv = read_levels(spatial_shapes, level_start_index, s);
  check_common(s, value_dtype, location_dtype);
  if (batch * queries == 0) return;
  for (auto [ptr, name] : {std::pair{grad_output, "grad_output"}, {value, "value"},
                           {sampling_locations, "sampling_locations"}, {attention_weights, "attention_weights"},
                           {grad_value_f32, "grad_value"}, {grad_locations, "grad_locations"},
                           {grad_weights, "grad_weights"}})
    check_pointer(as_ptr<void>(ptr), kOp, name);
  cuda::prepare_device(kOp, device_index);
  // The float32 buffer must also take 16-byte vector atomics: D·4 % 16 == 0 follows from D·sizeof(T) % 16 == 0.
  const bool aligned = (channels * element_size(value_dtype)) % 16 == 0 &&
                       aligned16({value, grad_output, grad_value_f32});
  dispatch_types(value_dtype, location_dtype, [&](auto* vtag, auto* ltag) {
    using T = std::remove_pointer_t<decltype(vtag)>;
    using TL = std::remove_pointer_t<decltype(ltag)>;
    dispatch_shape<T>(aligned, s, [&](auto vec, auto lc, auto pc) {
      constexpr int VEC = decltype(vec)::value, L_ = decltype(lc)::value, P_ = decltype(pc)::value;
      const Params p = make_params(lv, s, VEC);
      backward_kernel<T, TL, VEC, L_, P_><<<grid_for(p), kThreads, 0, cuda::as_stream(stream)>>>(
          p, as_ptr<const T>(grad_output), as_ptr<const T>(value), as_ptr<const TL>(sampling_locations),
          as_ptr<const TL>(attention_weights), as_ptr<float>(grad_value_f32), as_ptr<TL>(grad_locations),
          as_ptr<TL>(grad_weights));
      cuda::check_launch(kOp);
    });
  });
}

}  // namespace ms_deform_attn
}  // namespace dk
