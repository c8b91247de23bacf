// CUDA soft cross-entropy (see soft_ce.h, soft_ce_math.h). Forward: one block per (row b, chunk) handles all S
// student and T teacher rows of b over ≤ 2048 columns; each thread keeps its ≤ 8 columns (two packs of 4
// neighbours, read with 16-byte float32 / 8-byte 16-bit loads when K % 4 == 0 and the buffers are aligned) of the
// current student row in registers across the max and exp passes, sums s, ⟨P, x⟩ and ΣP in one block reduction,
// and in logits mode keeps the teacher exps of the chunk in shared memory (each thread reads back only the
// columns it wrote). A second kernel merges the chunk records, one block per row with the chunks split over
// lanes (add_chunk_dot shared with the CPU's combine_row); a third sums the rows in a fixed order. Backward: one
// block per (b, chunk), pure streaming with the same packs, no atomics. Exponents are (z − max)/τ_s and
// (d − max)·2/τ_t (soft_ce_math.h): a difference before a product, so no FMA can round the forward's and the
// backward's differently.
#include "../common/dk_cuda.cuh"
#include "soft_ce.h"
#include "soft_ce_math.h"

namespace dk {
namespace soft_ce {
namespace {

constexpr const char* kOp = "dino_loss";
constexpr int kThreads = 256, kMaxPerThread = 8;
constexpr int64_t kSharedFloats = 11264;  // 44 KB of teacher exps per block (48 KB with no opt-in, less scratch)
constexpr int64_t kMaxTeachers = kSharedFloats / kThreads;  // 44: at least one 256-column chunk fits

// Columns per chunk: 2048, fewer when the T rows of teacher exps (logits mode) would not fit in shared memory.
int64_t chunk_width(int64_t teachers, bool teacher_logits) {
  const int64_t widest = kThreads * kMaxPerThread;
  if (!teacher_logits) return widest;
  const int64_t fit = kSharedFloats / teachers / kThreads * kThreads;
  return fit < kThreads ? kThreads : (fit > widest ? widest : fit);
}

int64_t n_chunks(int64_t classes, int64_t teachers, bool teacher_logits) {
  const int64_t w = chunk_width(teachers, teacher_logits);
  return (classes + w - 1) / w;
}

struct Params {
  int64_t views, teachers, batch, classes, chunk;
  bool skip_same_view, teacher_logits;
  float inv_ts, tt_factor, scale;  // 1/τ_s, 2/τ_t (softmax_center_math.h), scale
};

constexpr int kWidth = 4, kPacks = kMaxPerThread / kWidth;  // a thread's ≤ 8 columns: 2 packs of 4 neighbours

// First column of a thread's pack g inside its chunk: packs of 4 consecutive columns, coalesced across the block.
// The forward and backward map a thread to the same columns in every loop, so each thread reads back only the
// shared-memory teacher values it wrote itself.
__device__ DK_INLINE int64_t pack_column(int g) { return (int64_t(g) * kThreads + threadIdx.x) * kWidth; }

template <typename T>
struct alignas(kWidth * sizeof(T)) Pack {
  T v[kWidth];
};

// Columns j .. j + 3 of x as float (fill past `width`). kVec: K % 4 == 0 and the row start 4-element aligned, so a
// pack is either inside the chunk or past it, and one aligned vector load (16 bytes for float32, 8 for 16-bit)
// reads it. Also used on the shared-memory teacher rows (chunk starts are multiples of 256: aligned), where the
// 16-byte accesses avoid the 4-way bank conflicts of strided scalar ones.
template <bool kVec, typename T>
__device__ DK_INLINE void load_pack(const T* x, int64_t j, int64_t width, float fill,
                                    float (&out)[kWidth]) {
  if (kVec && j < width) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(x + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) out[i] = to_float(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i) out[i] = j + i < width ? to_float(x[j + i]) : fill;
  }
}

template <bool kVec, typename T>
__device__ DK_INLINE void store_pack(T* y, int64_t j, int64_t width, const float (&in)[kWidth]) {
  if (kVec && j < width) {
    Pack<T> pack;
#pragma unroll
    for (int i = 0; i < kWidth; ++i) pack.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Pack<T>*>(y + j) = pack;
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i)
      if (j + i < width) y[j + i] = from_float<T>(in[i]);
  }
}

// Three block sums in one reduction (two barriers instead of six); every thread gets them. scratch: 96 floats.
__device__ DK_INLINE void block_sum3(float& a, float& b, float& c, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  a = warp_sum(a), b = warp_sum(b), c = warp_sum(c);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = a, scratch[32 + warp] = b, scratch[64 + warp] = c;
  __syncthreads();
  a = warp_sum(lane < n_warps ? scratch[lane] : 0.f);
  b = warp_sum(lane < n_warps ? scratch[32 + lane] : 0.f);
  c = warp_sum(lane < n_warps ? scratch[64 + lane] : 0.f);
}

template <bool kVec, typename TS, typename TT>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Params p, const TS* __restrict__ student,  // (S, B, K)
                   const TT* __restrict__ teacher,           // (T, B, K)
                   const float* __restrict__ center,         // (K,) or nullptr
                   float* __restrict__ records) {            // (B, chunks, R)
  extern __shared__ __align__(16) float teacher_exp[];  // (T, chunk) in logits mode; 16-byte packs
  __shared__ float scratch[96];
  const RecordLayout layout{p.views, p.teachers};
  const int64_t b = blockIdx.x, c = blockIdx.y, chunks = gridDim.y;
  const int64_t k0 = c * p.chunk, width = min(p.chunk, p.classes - k0);
  const int64_t row_stride = p.batch * p.classes;
  float* record = records + (b * chunks + c) * layout.size();
  // Teacher logits: chunk (max, Σ) per teacher row, and its exps kept in shared memory.
  if (p.teacher_logits) {
    for (int64_t t = 0; t < p.teachers; ++t) {
      const TT* zt = teacher + t * row_stride + b * p.classes + k0;
      float* e = teacher_exp + t * p.chunk;
      float m = -INFINITY, s = 0.f;
#pragma unroll
      for (int g = 0; g < kPacks; ++g) {
        const int64_t j = pack_column(g);
        float z4[kWidth], c4[kWidth], d4[kWidth];
        load_pack<kVec>(zt, j, width, 0.f, z4);
        load_pack<kVec>(center + k0, j, width, 0.f, c4);
#pragma unroll
        for (int i = 0; i < kWidth; ++i) {
          d4[i] = softmax_center::half_centered(z4[i], c4[i]);
          if (j + i < width) online_add(m, s, d4[i], p.tt_factor);
        }
        store_pack<kVec>(e, j, width, d4);
      }
      block_merge_max_sum(m, s, scratch, p.tt_factor);
#pragma unroll
      for (int g = 0; g < kPacks; ++g) {
        const int64_t j = pack_column(g);
        float e4[kWidth];
        load_pack<kVec>(e, j, width, 0.f, e4);
#pragma unroll
        for (int i = 0; i < kWidth; ++i) e4[i] = expf(softmax_center::exponent(e4[i], m, p.tt_factor));
        store_pack<kVec>(e, j, width, e4);
      }
      if (threadIdx.x == 0) record[layout.teacher(t)] = m, record[layout.teacher(t) + 1] = s;
    }
  }
  // Raw logits of view v (the max is taken before scaling); the next view's are loaded before this view's block
  // reductions, so their latency overlaps the barriers instead of following them.
  auto load_view = [&](int64_t v, float (&dst)[kPacks][kWidth]) {
    const TS* z = student + v * row_stride + b * p.classes + k0;
#pragma unroll
    for (int g = 0; g < kPacks; ++g) load_pack<kVec>(z, pack_column(g), width, -INFINITY, dst[g]);
  };
  float x[kPacks][kWidth], next[kPacks][kWidth] = {};
  load_view(0, x);
  for (int64_t v = 0; v < p.views; ++v) {
    if (v + 1 < p.views) load_view(v + 1, next);
    float local_max = -INFINITY;
#pragma unroll
    for (int g = 0; g < kPacks; ++g)
#pragma unroll
      for (int i = 0; i < kWidth; ++i) local_max = fmaxf(local_max, x[g][i]);
    // NaN is dropped by fmaxf here but reaches s below, so the loss still becomes NaN.
    const float m = block_max(local_max, scratch);
    float s = 0.f, d = 0.f, mass = 0.f;
#pragma unroll
    for (int g = 0; g < kPacks; ++g) {
      const int64_t j = pack_column(g);
      float target[kWidth] = {};
      if (!p.teacher_logits && j < width) {
        for (int64_t t = 0; t < p.teachers; ++t) {
          if (!paired(v, t, p.skip_same_view)) continue;
          float p4[kWidth];
          load_pack<kVec>(teacher + t * row_stride + b * p.classes + k0, j, width, 0.f, p4);
#pragma unroll
          for (int i = 0; i < kWidth; ++i) target[i] += p4[i];
        }
      }
#pragma unroll
      for (int i = 0; i < kWidth; ++i) {
        if (j + i < width) {
          const float shifted = student_exponent(x[g][i], m, p.inv_ts);
          s += expf(shifted);
          d += target_times_exponent(target[i], shifted);  // 0 in logits mode
          mass += target[i];
        }
      }
    }
    if (!p.teacher_logits) {
      block_sum3(s, d, mass, scratch);
      if (threadIdx.x == 0) {
        float* rec = record + layout.student(v);
        rec[0] = m, rec[1] = s, rec[2] = d, rec[3] = mass;
      }
    } else {
      s = block_sum(s, scratch);
      if (threadIdx.x == 0) {
        float* rec = record + layout.student(v);
        rec[0] = m, rec[1] = s, rec[2] = 0.f, rec[3] = 0.f;
      }
      for (int64_t t = 0; t < p.teachers; ++t) {
        if (!paired(v, t, p.skip_same_view)) continue;
        const float* e = teacher_exp + t * p.chunk;
        float dt = 0.f;
#pragma unroll
        for (int g = 0; g < kPacks; ++g) {
          const int64_t j = pack_column(g);
          float e4[kWidth];
          load_pack<kVec>(e, j, width, 0.f, e4);
#pragma unroll
          for (int i = 0; i < kWidth; ++i)
            if (j + i < width) dt += target_times_exponent(e4[i], student_exponent(x[g][i], m, p.inv_ts));
        }
        dt = block_sum(dt, scratch);
        if (threadIdx.x == 0) record[layout.pair(v, t)] = dt;
      }
    }
#pragma unroll
    for (int g = 0; g < kPacks; ++g)
#pragma unroll
      for (int i = 0; i < kWidth; ++i) x[g][i] = next[g][i];  // unused after the last view
  }
}

constexpr int kCombineWarps = 8;

// One block per row b (the serial one-thread-per-row merge ran on a single SM at B = 64): warp w takes the teacher
// rows t = w, w + 8, ... and then the student views v = w, w + 8, ...; lane l folds chunks l, l + 32, ... in order,
// the 32 lane partials merge in a fixed butterfly, and the view losses add up per warp in view order and over
// the warps in warp order. Every step is in a fixed order: the result is the same on every run.
__global__ void __launch_bounds__(kCombineWarps * 32)
    combine_kernel(Params p, int64_t chunks, const float* __restrict__ records, const float* __restrict__ weights,
                   float* __restrict__ student_stats, float* __restrict__ target_sum,
                   float* __restrict__ teacher_stats, float* __restrict__ row_loss) {
  __shared__ float teacher_max[kMaxTeachers], teacher_log_sum[kMaxTeachers];  // logits mode: T ≤ kMaxTeachers
  __shared__ float warp_loss[kCombineWarps];
  const RecordLayout layout{p.views, p.teachers};
  const int64_t b = blockIdx.x, stride = layout.size();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* row = records + b * chunks * stride;
  if (p.teacher_logits) {
    for (int64_t t = warp; t < p.teachers; t += kCombineWarps) {
      float m = -INFINITY, s = 0.f;
      for (int64_t c = lane; c < chunks; c += 32) {
        const float* r = row + c * stride + layout.teacher(t);
        merge_max_sum(m, s, r[0], r[1], p.tt_factor);
      }
      warp_merge_max_sum(m, s, p.tt_factor);
      if (lane == 0) {
        teacher_max[t] = m, teacher_log_sum[t] = logf(s);
        teacher_stats[t * p.batch + b] = m, teacher_stats[(p.teachers + t) * p.batch + b] = logf(s);
      }
    }
    __syncthreads();  // every view needs every teacher's statistics
  }
  float loss = 0.f;  // lane 0: Σ ℓ_vb over this warp's views, in view order
  for (int64_t v = warp; v < p.views; v += kCombineWarps) {
    float m = -INFINITY, s = 0.f;
    for (int64_t c = lane; c < chunks; c += 32) {
      const float* r = row + c * stride + layout.student(v);
      merge_max_sum(m, s, r[0], r[1], p.inv_ts);
    }
    warp_merge_max_sum(m, s, p.inv_ts);
    float dot = 0.f, mass = 0.f;  // ⟨P, x − M⟩ and ΣP
    for (int64_t c = lane; c < chunks; c += 32)
      add_chunk_dot(row + c * stride, layout, v, m, p.skip_same_view, p.teacher_logits, teacher_max,
                    teacher_log_sum, int64_t(1), p.inv_ts, p.tt_factor, dot, mass);
    dot = warp_sum(dot);
    mass = p.teacher_logits ? paired_teachers(v, p.teachers, p.skip_same_view) : warp_sum(mass);
    if (lane == 0) {
      const float log_sum = logf(s);
      student_stats[v * p.batch + b] = m, student_stats[(p.views + v) * p.batch + b] = log_sum;
      target_sum[v * p.batch + b] = mass;
      loss += mass * log_sum - dot;
    }
  }
  if (lane == 0) warp_loss[warp] = loss;
  __syncthreads();
  if (threadIdx.x == 0) {
    float l = 0.f;
    for (int w = 0; w < kCombineWarps; ++w) l += warp_loss[w];
    row_loss[b] = weights ? weights[b] * l : l;
  }
}

// One block: a fixed strided split and a fixed reduction tree, so the sum is deterministic.
__global__ void __launch_bounds__(kThreads) loss_kernel(const float* __restrict__ row_loss, int64_t batch,
                                                        float scale, float* __restrict__ loss) {
  __shared__ float scratch[64];
  float acc = 0.f;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) acc += row_loss[b];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) *loss = acc * scale;
}

template <bool kVec, typename TS, typename TT>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(Params p, const float* __restrict__ grad_loss, const TS* __restrict__ student,
                    const TT* __restrict__ teacher, const float* __restrict__ center,
                    const float* __restrict__ weights, const float* __restrict__ student_stats,
                    const float* __restrict__ target_sum, const float* __restrict__ teacher_stats,
                    TS* __restrict__ grad_student) {
  extern __shared__ __align__(16) float teacher_prob[];  // (T, chunk) in logits mode; 16-byte packs
  const int64_t b = blockIdx.x, c = blockIdx.y;
  const int64_t k0 = c * p.chunk, width = min(p.chunk, p.classes - k0);
  const int64_t row_stride = p.batch * p.classes;
  if (p.teacher_logits) {
    for (int64_t t = 0; t < p.teachers; ++t) {
      const TT* zt = teacher + t * row_stride + b * p.classes + k0;
      const float mx = teacher_stats[t * p.batch + b], ls = teacher_stats[(p.teachers + t) * p.batch + b];
      float* prob = teacher_prob + t * p.chunk;
#pragma unroll
      for (int g = 0; g < kPacks; ++g) {
        const int64_t j = pack_column(g);
        float z4[kWidth], c4[kWidth], p4[kWidth];
        load_pack<kVec>(zt, j, width, 0.f, z4);
        load_pack<kVec>(center + k0, j, width, 0.f, c4);
#pragma unroll
        for (int i = 0; i < kWidth; ++i)
          p4[i] = expf(softmax_center::exponent(softmax_center::half_centered(z4[i], c4[i]), mx, p.tt_factor) - ls);
        store_pack<kVec>(prob, j, width, p4);
      }
    }
  }
  const float coef = *grad_loss * p.scale * (weights ? weights[b] : 1.f) * p.inv_ts;
  for (int64_t v = 0; v < p.views; ++v) {
    const int64_t offset = v * row_stride + b * p.classes + k0;
    const float mx = student_stats[v * p.batch + b], ls = student_stats[(p.views + v) * p.batch + b];
    const float mass = target_sum[v * p.batch + b];
#pragma unroll
    for (int g = 0; g < kPacks; ++g) {
      const int64_t j = pack_column(g);
      if (j >= width) continue;
      float z4[kWidth], target[kWidth] = {}, grad[kWidth];
      load_pack<kVec>(student + offset, j, width, 0.f, z4);
      for (int64_t t = 0; t < p.teachers; ++t) {
        if (!paired(v, t, p.skip_same_view)) continue;
        float p4[kWidth];
        if (p.teacher_logits)
          load_pack<kVec>(teacher_prob + t * p.chunk, j, width, 0.f, p4);
        else
          load_pack<kVec>(teacher + t * row_stride + b * p.classes + k0, j, width, 0.f, p4);
#pragma unroll
        for (int i = 0; i < kWidth; ++i) target[i] += p4[i];
      }
#pragma unroll
      for (int i = 0; i < kWidth; ++i) {
        const float soft = expf(student_exponent(z4[i], mx, p.inv_ts) - ls);
        grad[i] = (soft * mass - target[i]) * coef;
      }
      store_pack<kVec>(grad_student + offset, j, width, grad);
    }
  }
}

Params make_params(int64_t views, int64_t teachers, int64_t batch, int64_t classes, bool skip_same_view,
                   bool teacher_logits, double student_temp, double teacher_temp, double scale) {
  DK_CHECK_ARG(views >= 1 && teachers >= 1 && batch >= 1 && classes >= 1, kOp, "student_logits",
               "needs S, T, B, K >= 1, got S=", views, " T=", teachers, " B=", batch, " K=", classes);
  DK_CHECK_ARG(batch <= 0x7fffffff, kOp, "student_logits", "has B=", batch, " rows per view, more than 2^31 - 1");
  DK_CHECK_ARG(!teacher_logits || teachers <= kMaxTeachers, kOp, "teacher", "has T=", teachers,
               " views; the CUDA kernel takes at most ", kMaxTeachers, " teacher-logit views");
  DK_CHECK_ARG(n_chunks(classes, teachers, teacher_logits) <= 65535, kOp, "student_logits",
               "has K=", classes, " classes, too many for the CUDA grid");
  DK_CHECK_ARG(std::isfinite(student_temp) && student_temp > 0, kOp, "student_temp",
               "must be positive and finite, got ", student_temp);
  DK_CHECK_ARG(!teacher_logits || (std::isfinite(teacher_temp) && teacher_temp > 0), kOp, "teacher_temp",
               "must be positive and finite, got ", teacher_temp);
  DK_CHECK_ARG(std::isfinite(scale), kOp, "scale", "must be finite, got ", scale);
  const float inv_ts = float(1.0 / student_temp), tt_factor = softmax_center::temperature_factor<float>(teacher_temp);
  DK_CHECK_ARG(std::isfinite(inv_ts), kOp, "student_temp", "is too small for float32 (1/student_temp overflows), got ",
               student_temp);
  DK_CHECK_ARG(!teacher_logits || std::isfinite(tt_factor), kOp, "teacher_temp",
               "is too small for float32 (2/teacher_temp overflows), got ", teacher_temp);
  return Params{views, teachers, batch, classes, chunk_width(teachers, teacher_logits), skip_same_view, teacher_logits,
                inv_ts, tt_factor, float(scale)};
}

// body(TS*, TT*) with the student's storage type and the teacher's (float32 or the student's).
template <typename Body>
void dispatch_types(int student_dtype, int teacher_dtype, Body&& body) {
  dispatch_cuda_float_types(student_dtype, kOp, "student_logits", [&](auto* tag) {
    using TS = std::remove_pointer_t<decltype(tag)>;
    if (teacher_dtype == kFloat32)
      body(static_cast<TS*>(nullptr), static_cast<float*>(nullptr));
    else {
      check_dtype(teacher_dtype, teacher_dtype == student_dtype, kOp, "teacher");
      body(static_cast<TS*>(nullptr), static_cast<TS*>(nullptr));
    }
  });
}

// 4-wide loads and stores: K a multiple of 4 (every row and chunk start stays aligned) and every buffer aligned to
// 4 of its elements (a tensor view can start anywhere in its storage).
bool vector_access(const Params& p, std::uintptr_t student, size_t student_size, std::uintptr_t teacher,
                   size_t teacher_size, std::uintptr_t center, std::uintptr_t grad_student) {
  return p.classes % kWidth == 0 && student % (kWidth * student_size) == 0 &&
         teacher % (kWidth * teacher_size) == 0 && (!p.teacher_logits || center % (kWidth * sizeof(float)) == 0) &&
         grad_student % (kWidth * student_size) == 0;
}

size_t shared_bytes(const Params& p) { return p.teacher_logits ? size_t(p.teachers * p.chunk) * sizeof(float) : 0; }

}  // namespace

int64_t workspace_bytes_cuda(int64_t views, int64_t teachers, int64_t batch, int64_t classes, bool teacher_logits) {
  DK_CHECK_ARG(views >= 1 && teachers >= 1 && batch >= 1 && classes >= 1, kOp, "student_logits",
               "needs S, T, B, K >= 1");
  const int64_t records = batch * n_chunks(classes, teachers, teacher_logits) * RecordLayout{views, teachers}.size();
  return (records + batch) * int64_t(sizeof(float));  // chunk records, then the row losses
}

void forward_cuda(std::uintptr_t student, std::uintptr_t teacher, std::uintptr_t center, std::uintptr_t weights,
                  int student_dtype, int teacher_dtype, int64_t views, int64_t teachers, int64_t batch,
                  int64_t classes, bool skip_same_view, bool teacher_logits, double student_temp,
                  double teacher_temp, double scale, std::uintptr_t loss, std::uintptr_t student_stats,
                  std::uintptr_t target_sum, std::uintptr_t teacher_stats, std::uintptr_t workspace,
                  int64_t workspace_bytes, int device_index, std::uintptr_t stream) {
  const Params p = make_params(views, teachers, batch, classes, skip_same_view, teacher_logits, student_temp,
                               teacher_temp, scale);
  check_pointer(as_ptr<void>(student), kOp, "student_logits");
  check_pointer(as_ptr<void>(teacher), kOp, "teacher");
  if (teacher_logits) check_pointer(as_ptr<void>(center), kOp, "center");
  check_pointer(as_ptr<void>(loss), kOp, "loss");
  check_pointer(as_ptr<void>(student_stats), kOp, "student_stats");
  check_pointer(as_ptr<void>(target_sum), kOp, "target_sum");
  if (teacher_logits) check_pointer(as_ptr<void>(teacher_stats), kOp, "teacher_stats");
  check_workspace(workspace, workspace_bytes, workspace_bytes_cuda(views, teachers, batch, classes, teacher_logits), 4,
                  kOp);
  cuda::prepare_device(kOp, device_index);
  cudaStream_t s = cuda::as_stream(stream);
  const int64_t chunks = n_chunks(classes, teachers, teacher_logits);
  float* records = as_ptr<float>(workspace);
  float* row_loss = records + batch * chunks * RecordLayout{views, teachers}.size();
  dispatch_types(student_dtype, teacher_dtype, [&](auto* ts_tag, auto* tt_tag) {
    using TS = std::remove_pointer_t<decltype(ts_tag)>;
    using TT = std::remove_pointer_t<decltype(tt_tag)>;
    const bool vec = vector_access(p, student, sizeof(TS), teacher, sizeof(TT), center, 0);
    auto launch = [&](auto vec_tag) {
      forward_kernel<decltype(vec_tag)::value, TS, TT>
          <<<dim3(unsigned(batch), unsigned(chunks)), kThreads, shared_bytes(p), s>>>(
              p, as_ptr<const TS>(student), as_ptr<const TT>(teacher), as_ptr<const float>(center), records);
    };
    if (vec)
      launch(std::true_type{});
    else
      launch(std::false_type{});
  });
  cuda::check_launch(kOp);
  combine_kernel<<<unsigned(batch), kCombineWarps * 32, 0, s>>>(p, chunks, records, as_ptr<const float>(weights),
                                                                as_ptr<float>(student_stats), as_ptr<float>(target_sum),
                                                                as_ptr<float>(teacher_stats), row_loss);
  cuda::check_launch(kOp);
  loss_kernel<<<1, kThreads, 0, s>>>(row_loss, batch, p.scale, as_ptr<float>(loss));
  cuda::check_launch(kOp);
}

void backward_cuda(std::uintptr_t grad_loss, std::uintptr_t student, std::uintptr_t teacher,
                   std::uintptr_t center, std::uintptr_t weights, int student_dtype, int teacher_dtype,
                   int64_t views, int64_t teachers, int64_t batch, int64_t classes, bool skip_same_view,
                   bool teacher_logits, double student_temp, double teacher_temp, double scale,
                   std::uintptr_t student_stats, std::uintptr_t target_sum, std::uintptr_t teacher_stats,
                   std::uintptr_t grad_student, int device_index, std::uintptr_t stream) {
  const Params p = make_params(views, teachers, batch, classes, skip_same_view, teacher_logits, student_temp,
                               teacher_temp, scale);
  check_pointer(as_ptr<void>(grad_loss), kOp, "grad_loss");
  check_pointer(as_ptr<void>(student), kOp, "student_logits");
  check_pointer(as_ptr<void>(teacher), kOp, "teacher");
  if (teacher_logits) check_pointer(as_ptr<void>(center), kOp, "center");
  check_pointer(as_ptr<void>(student_stats), kOp, "student_stats");
  check_pointer(as_ptr<void>(target_sum), kOp, "target_sum");
  if (teacher_logits) check_pointer(as_ptr<void>(teacher_stats), kOp, "teacher_stats");
  check_pointer(as_ptr<void>(grad_student), kOp, "grad_student");
  cuda::prepare_device(kOp, device_index);
  const int64_t chunks = n_chunks(classes, teachers, teacher_logits);
  dispatch_types(student_dtype, teacher_dtype, [&](auto* ts_tag, auto* tt_tag) {
    using TS = std::remove_pointer_t<decltype(ts_tag)>;
    using TT = std::remove_pointer_t<decltype(tt_tag)>;
    const bool vec = vector_access(p, student, sizeof(TS), teacher, sizeof(TT), center, grad_student);
    auto launch = [&](auto vec_tag) {
      backward_kernel<decltype(vec_tag)::value, TS, TT>
          <<<dim3(unsigned(batch), unsigned(chunks)), kThreads, shared_bytes(p), cuda::as_stream(stream)>>>(
              p, as_ptr<const float>(grad_loss), as_ptr<const TS>(student), as_ptr<const TT>(teacher),
              as_ptr<const float>(center), as_ptr<const float>(weights), as_ptr<const float>(student_stats),
              as_ptr<const float>(target_sum), as_ptr<const float>(teacher_stats), as_ptr<TS>(grad_student));
    };
    if (vec)
      launch(std::true_type{});
    else
      launch(std::false_type{});
  });
  cuda::check_launch(kOp);
}

}  // namespace soft_ce
}  // namespace dk
