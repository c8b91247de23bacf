// CUDA softmax_center (math in softmax_center_math.h). Rows are split over blocks (one block per row left most
// SMs idle at DINO's shapes: N = 64 rows of K = 65,536 on 132 SMs).
//   stats_kernel, grid (N, chunks of kChunk columns): each thread holds its 16 columns of d = z/2 − c/2 in
//     registers, so the chunk's (max, Σexp((d − max)·2/τ)) is a block max and a block sum, not a serial online
//     update per element; written to the workspace.
//   write_kernel, grid (row groups, 1024-column tiles): per tile of 8 rows, warp w merges row w's chunk pairs
//     (lanes over chunks, fixed butterfly: the same (max, Σ) in every block, so deterministic) and every thread
//     writes its 4 columns of the 8 rows; with the column sum it also adds its raw z into float64 registers
//     and stores the group's partial sums (groups ≤ kMaxGroups, so the partials stay small next to z).
//   column_reduce_kernel: Σ over the groups' partials in group order, in float64 (deterministic).
// Loads and stores are 4 columns wide (16 bytes for float32, 8 for 16-bit input) when K % 4 == 0 and the
// pointers are aligned, else element by element. The separate column_sum_kernel below stays for the teacher
// sum of dino_loss_centered.
#include "../common/dk_cuda.cuh"
#include "softmax_center.h"
#include "softmax_center_math.h"

namespace dk {
namespace softmax_center {
namespace {

constexpr const char* kOp = "softmax_center";
constexpr int kThreads = 256, kWarps = kThreads / 32;
static_assert(kWarps == kTileRows, "write_kernel: one warp merges the statistics of one row of a tile");
constexpr int kWidth = 4;                                       // columns per thread per load
constexpr int64_t kTile = int64_t(kThreads) * kWidth;          // write_kernel: columns per block
constexpr int kChunkLoads = int(kChunk / kTile);                // stats_kernel: loads per thread (4)
static_assert(kChunk % kTile == 0, "a stats chunk is a whole number of write tiles");

template <typename T>
struct alignas(kWidth * sizeof(T)) Pack {
  T v[kWidth];
};

// Columns j .. j + 3 of row x as float (fill past k). kVec: K % 4 == 0 and x 4-element aligned, so j < k means the
// whole pack is inside the row and one aligned vector load reads it.
template <bool kVec, typename T>
__device__ DK_INLINE void load_pack(const T* __restrict__ x, int64_t j, int64_t k, float fill, float (&out)[kWidth]) {
  if (kVec && j < k) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(x + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) out[i] = to_float(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i) out[i] = j + i < k ? to_float(x[j + i]) : fill;
  }
}

template <bool kVec>
__device__ DK_INLINE void store_pack(float* __restrict__ y, int64_t j, int64_t k, const float (&in)[kWidth]) {
  if (kVec && j < k) {
    static_assert(kWidth == 4, "one float4 per pack");
    // __stwb: a plain store, but always one 16-byte st.global.v4 (a float4 assignment here came out as four
    // scalar stores).
    __stwb(reinterpret_cast<float4*>(y + j), make_float4(in[0], in[1], in[2], in[3]));
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i)
      if (j + i < k) y[j + i] = in[i];
  }
}

template <bool kVec, typename T>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ z,            // (N, K)
                 const float* __restrict__ center,   // (K,)
                 int64_t k, float two_inv_temp,
                 float2* __restrict__ stats) {       // (N, chunks): (max, Σexp) of each chunk
  __shared__ float scratch[64];
  // blockIdx.x = row (up to 2^31 - 1), blockIdx.y = chunk.
  const T* x = z + int64_t(blockIdx.x) * k;
  float d[kChunkLoads][kWidth];
  float local_max = -INFINITY;
#pragma unroll
  for (int g = 0; g < kChunkLoads; ++g) {
    const int64_t j = int64_t(blockIdx.y) * kChunk + (int64_t(g) * kThreads + threadIdx.x) * kWidth;
    float c[kWidth];
    load_pack<kVec>(x, j, k, 0.f, d[g]);
    load_pack<kVec>(center, j, k, 0.f, c);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      d[g][i] = j + i < k ? half_centered(d[g][i], c[i]) : -INFINITY;
      local_max = fmaxf(local_max, d[g][i]);
    }
  }
  // NaN is dropped by fmaxf here but reaches the sum, so the row is reported non-finite.
  const float m = block_max(local_max, scratch);
  float s = 0.f;
#pragma unroll
  for (int g = 0; g < kChunkLoads; ++g)
#pragma unroll
    for (int i = 0; i < kWidth; ++i)
      s += d[g][i] == -INFINITY ? 0.f : expf(exponent(d[g][i], m, two_inv_temp));  // −inf (and padding) adds 0
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) stats[int64_t(blockIdx.x) * gridDim.y + blockIdx.y] = make_float2(m, s);
}

template <bool kVec, typename T>
__global__ void __launch_bounds__(kThreads)
    write_kernel(const T* __restrict__ z,              // (N, K)
                 const float* __restrict__ center,     // (K,)
                 int64_t n, int64_t k, int64_t chunks, int64_t rows_per_group, float two_inv_temp,
                 const float2* __restrict__ stats,     // (N, chunks)
                 float* __restrict__ out,              // (N, K)
                 double* __restrict__ partials,        // (groups, K) or nullptr: Σ of the group's raw rows
                 int* __restrict__ nonfinite) {
  __shared__ float row_max[kWarps], row_inv_sum[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t j = int64_t(blockIdx.y) * kTile + int64_t(threadIdx.x) * kWidth;
  const int64_t r0 = int64_t(blockIdx.x) * rows_per_group, r1 = min(r0 + rows_per_group, n);
  float c[kWidth];
  load_pack<kVec>(center, j, k, 0.f, c);
  double acc[kWidth] = {};
  for (int64_t tile = r0; tile < r1; tile += kWarps) {
    const int64_t merged_row = tile + warp;
    if (merged_row < r1) {
      float m = -INFINITY, s = 0.f;
      for (int64_t chunk = lane; chunk < chunks; chunk += 32) {
        const float2 pair = stats[merged_row * chunks + chunk];
        merge_max_sum(m, s, pair.x, pair.y, two_inv_temp);
      }
      warp_merge_max_sum(m, s, two_inv_temp);
      if (lane == 0) {
        row_max[warp] = m, row_inv_sum[warp] = 1.f / s;
        if (blockIdx.y == 0 && !row_ok(m, s)) atomicAdd(nonfinite, 1);
      }
    }
    __syncthreads();
    const int tile_rows = int(min(int64_t(kWarps), r1 - tile));
    float x[kWarps][kWidth];  // the tile's rows loaded first: 8 loads in flight per thread
#pragma unroll
    for (int r = 0; r < kWarps; ++r)
      if (r < tile_rows) load_pack<kVec>(z + (tile + r) * k, j, k, 0.f, x[r]);
#pragma unroll
    for (int r = 0; r < kWarps; ++r) {
      if (r < tile_rows) {  // rows in order: the float64 column partials add up in row order
        float y[kWidth];
#pragma unroll
        for (int i = 0; i < kWidth; ++i) {
          y[i] = probability(half_centered(x[r][i], c[i]), row_max[r], two_inv_temp, row_inv_sum[r]);
          acc[i] += double(x[r][i]);  // 0 past k
        }
        store_pack<kVec>(out + (tile + r) * k, j, k, y);
      }
    }
    __syncthreads();  // the next tile overwrites row_max / row_inv_sum
  }
  if (partials) {
#pragma unroll
    for (int i = 0; i < kWidth; ++i)
      if (j + i < k) partials[int64_t(blockIdx.x) * k + j + i] = acc[i];
  }
}

__global__ void __launch_bounds__(kThreads)
    column_reduce_kernel(const double* __restrict__ partials, int64_t groups, int64_t k, float* __restrict__ out) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= k) return;
  double acc = 0;
  for (int64_t g = 0; g < groups; ++g) acc += partials[g * k + j];
  out[j] = float(acc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(const T* __restrict__ z, int64_t n, int64_t k, float* __restrict__ out) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= k) return;
  double acc = 0;
  for (int64_t row = 0; row < n; ++row) acc += double(to_float(z[row * k + j]));
  out[j] = float(acc);
}

void check_common(std::uintptr_t z, int64_t n, int64_t k) {
  DK_CHECK_ARG(n >= 0 && k >= 1, kOp, "teacher_logits", "needs N >= 0 rows and K >= 1 columns, got N=", n,
               " K=", k);
  DK_CHECK_ARG(n <= 0x7fffffff, kOp, "teacher_logits", "has more than 2^31 - 1 rows: ", n);
  if (n > 0) check_pointer(as_ptr<void>(z), kOp, "teacher_logits");
}

}  // namespace

void forward_cuda(std::uintptr_t z, std::uintptr_t center, int dtype, int64_t n, int64_t k, double teacher_temp,
                  std::uintptr_t out, std::uintptr_t column_sum, std::uintptr_t nonfinite, std::uintptr_t workspace,
                  int64_t workspace_bytes, int device_index, std::uintptr_t stream) {
  check_common(z, n, k);
  if (n > 0) check_pointer(as_ptr<void>(out), kOp, "out");
  check_pointer(as_ptr<void>(center), kOp, "center");
  check_pointer(as_ptr<void>(nonfinite), kOp, "nonfinite");
  DK_CHECK_ARG(std::isfinite(teacher_temp) && teacher_temp > 0, kOp, "teacher_temp",
               "must be positive and finite, got ", teacher_temp);
  const float two_inv_temp = temperature_factor<float>(teacher_temp);
  DK_CHECK_ARG(std::isfinite(two_inv_temp), kOp, "teacher_temp",
               "is too small for float32 (2/teacher_temp overflows), got ", teacher_temp);
  const int64_t tiles = (k + kTile - 1) / kTile;
  DK_CHECK_ARG(tiles <= 65535, kOp, "teacher_logits", "has more than 65,535 x ", kTile, " columns: ", k);
  const bool with_sum = column_sum != 0;
  const int64_t needed = workspace_bytes_cuda(n, k, with_sum);
  DK_CHECK_ARG(workspace_bytes >= needed, kOp, "workspace", "holds ", workspace_bytes, " bytes, needs ", needed);
  if (needed > 0) {
    check_pointer(as_ptr<void>(workspace), kOp, "workspace");
    DK_CHECK_ARG(workspace % 8 == 0, kOp, "workspace", "must be 8-byte aligned");
  }
  cuda::prepare_device(kOp, device_index);
  cudaStream_t s = cuda::as_stream(stream);
  cuda::check(cudaMemsetAsync(as_ptr<int>(nonfinite), 0, sizeof(int), s), kOp, "cudaMemsetAsync");
  if (n == 0) {
    if (with_sum) cuda::check(cudaMemsetAsync(as_ptr<float>(column_sum), 0, k * sizeof(float), s), kOp,
                              "cudaMemsetAsync");  // Σ over no rows
    return;
  }
  const int64_t chunks = (k + kChunk - 1) / kChunk;
  const int64_t rows_per_group = rows_per_group_cuda(n, with_sum), groups = row_groups_cuda(n, with_sum);
  float2* stats = as_ptr<float2>(workspace);
  double* partials = with_sum ? reinterpret_cast<double*>(stats + n * chunks) : nullptr;
  // 4-wide loads and stores: K a multiple of 4 and every pointer aligned to 4 elements.
  const int64_t z_align = 4 * int64_t(dtype == kFloat32 ? 4 : 2);
  const bool vec = k % kWidth == 0 && z % z_align == 0 && center % 16 == 0 && out % 16 == 0;
  dispatch_cuda_float_types(dtype, kOp, "teacher_logits", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto launch = [&](auto vec_tag) {
      constexpr bool kVec = decltype(vec_tag)::value;
      stats_kernel<kVec, T><<<dim3(unsigned(n), unsigned(chunks)), kThreads, 0, s>>>(
          as_ptr<const T>(z), as_ptr<const float>(center), k, two_inv_temp, stats);
      write_kernel<kVec, T><<<dim3(unsigned(groups), unsigned(tiles)), kThreads, 0, s>>>(
          as_ptr<const T>(z), as_ptr<const float>(center), n, k, chunks, rows_per_group, two_inv_temp, stats,
          as_ptr<float>(out), partials, as_ptr<int>(nonfinite));
    };
    if (vec)
      launch(std::true_type{});
    else
      launch(std::false_type{});
  });
  cuda::check_launch(kOp);
  if (with_sum) {
    column_reduce_kernel<<<unsigned((k + kThreads - 1) / kThreads), kThreads, 0, s>>>(partials, groups, k,
                                                                                   as_ptr<float>(column_sum));
    cuda::check_launch(kOp);
  }
}

void column_sum_cuda(std::uintptr_t z, int dtype, int64_t n, int64_t k, std::uintptr_t out, int device_index,
                     std::uintptr_t stream) {
  check_common(z, n, k);
  check_pointer(as_ptr<void>(out), kOp, "out");
  cuda::prepare_device(kOp, device_index);
  const unsigned blocks = unsigned((k + kThreads - 1) / kThreads);
  dispatch_cuda_float_types(dtype, kOp, "teacher_logits", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    column_sum_kernel<T><<<blocks, kThreads, 0, cuda::as_stream(stream)>>>(as_ptr<const T>(z), n, k,
                                                                          as_ptr<float>(out));
  });
  cuda::check_launch(kOp);
}

}  // namespace softmax_center
}  // namespace dk
