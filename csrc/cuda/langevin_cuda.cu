// CUDA kernels of the fused Langevin step and its per-sample reduction.
//
// The specification is vaebm/ops/langevin_ref.py (maths) and vaebm/ops/philox.py (noise); the
// scalar maths lives in langevin_common.h, shared with the C++ CPU backend. No torch headers: this
// file compiles on its own with nvcc (tests/ops/test_cuda_build.py), and with
// -DVAEBM_CUDA_EMULATE it runs its kernel bodies on the host, so the indexing is tested without
// a GPU.
//
// Multi-tensor launch: a whole state (a list of (B, ...) tensors) is updated in one launch. The
// per-tensor metadata travels by value as a kernel argument (no host-to-device copy, so a launch
// can be captured in a CUDA graph and replayed); each block finds its tensor by a binary search
// over the tensors' first block indices. A list longer than kMaxSegs is split over launches.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../langevin_common.h"
#include "langevin_cuda.h"
#include "pack_io.cuh"

// Limits, overridable so the host emulation test can exercise the splitting paths.
#ifndef VAEBM_CUDA_MAX_SEG_GROUPS  // 4-element groups in one update segment (< 2^31)
#define VAEBM_CUDA_MAX_SEG_GROUPS 0x7fffffffLL
#endif
#ifndef VAEBM_CUDA_MAX_LAUNCH_BLOCKS  // blocks in one launch (gridDim.x limit)
#define VAEBM_CUDA_MAX_LAUNCH_BLOCKS 0x7fffffffLL
#endif

#if defined(VAEBM_CUDA_EMULATE)
#define VAEBM_CUDA_HD inline
#else
#define VAEBM_CUDA_HD __host__ __device__ __forceinline__
#endif

namespace vaebm {
namespace cuda {
namespace {

constexpr int kThreads = 256;     // threads per block of both passes
constexpr int kMaxSegs = 36;      // segments (tensors, or row ranges of one) per launch
constexpr int kReduceGroups = 4;  // 4-element groups per thread in one reduce block
constexpr int64_t kReduceChunk = int64_t(kThreads) * kReduceGroups * 4;  // elements per block
constexpr int kFinishThreads = 128;
constexpr int64_t kMaxSegGroups = VAEBM_CUDA_MAX_SEG_GROUPS;
constexpr int64_t kMaxLaunchBlocks = VAEBM_CUDA_MAX_LAUNCH_BLOCKS;
static_assert(kMaxSegGroups > 0 && kMaxSegGroups <= 0x7fffffffLL, "groups index as uint32 < 2^31");

using cuda_io::Io;
using cuda_io::Pack4;
using cuda_io::load4;
using cuda_io::pack_aligned;
using cuda_io::store4;

// Raw copy (a kept chain is bit-identical to its old state, whatever the dtype or NaN payload).
template <class T>
VAEBM_CUDA_HD void copy4(const T* src, T* dst, bool vec, int cnt) {
  if (vec) {
    *reinterpret_cast<Pack4<T>*>(dst) = *reinterpret_cast<const Pack4<T>*>(src);
  } else {
    for (int l = 0; l < cnt; ++l) dst[l] = src[l];
  }
}

VAEBM_CUDA_HD bool not_finite(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x7f800000u) == 0x7f800000u;
}

// ---------------------------------------------------------------------------------------------
// Division by a per-segment constant d (the groups of one sample row) without a hardware divide:
// q / d = (mulhi(q, mul) + q) >> shift with shift = ceil(log2 d), mul = floor(2^32 (2^shift - d)
// / d) + 1 (Granlund & Montgomery, PLDI'94, round-up variant). Exact for q < 2^31 (then the sum
// cannot overflow 32 bits); tests/ops/test_cuda_build.py checks it against plain division.

struct FastDiv {
  uint32_t d, mul, shift;
};

inline FastDiv make_fastdiv(uint32_t d) {
  uint32_t shift = 0;
  while ((uint64_t(1) << shift) < d) ++shift;
  const uint64_t mul = ((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1;
  return FastDiv{d, uint32_t(mul), shift};
}

VAEBM_CUDA_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * b) >> 32);
#endif
}

VAEBM_CUDA_HD uint32_t fast_div(uint32_t q, const FastDiv& f) {
  return (mulhi32(q, f.mul) + q) >> f.shift;
}

// ---------------------------------------------------------------------------------------------
// Update. Paper Eq. 2 (Langevin dynamics), run in eps-space with the standard-normal base density
// of Eq. 9 (lam = 1), per element j of sample i of state tensor k:
//
//   y = x - a * (s_i * clip(g) + lam * x) + b * xi,     a = eta / 2,  b = sigma * sqrt(eta)
//   xi = lane (j & 3) of Philox4x32-10(key = seed, counter = (j >> 2, offset + i, step, k))
//        through Box-Muller (philox.py);  clip(g) = clamp(g, -c, c) when c > 0
//
// then per sample, mode KEEP writes the old x (bit for bit), RESET writes fresh noise from
// stream 2, and UPDATE / RESET results are clamped to [lo, hi] keeping NaN. One thread handles
// one group of 4 consecutive elements of one sample row, so one Philox call serves 4 elements
// and the group is one vector access when the tensor's rows are whole, aligned packs.
//
// A segment is a range of rows of one tensor with fewer than 2^31 groups (so the in-segment
// group index is a uint32 and the row division is a multiply-high); element offsets are int64.

struct UpdateSeg {
  const void* x;
  const void* g;
  void* o;
  int64_t n;        // elements per sample
  int64_t row0;     // first sample row of the segment
  uint32_t groups;  // rows * per_row.d, < 2^31
  FastDiv per_row;  // 4-element groups per sample row: ceil(n / 4)
  int32_t tensor;   // position in the state list (Philox counter word 3)
  int32_t block0;   // first block of the segment in its launch
  int32_t vec;      // n % 4 == 0 and x, g, o aligned to a pack: every group is one access
  int32_t alias;    // o == x: a kept sample needs no store
};

struct UpdateMeta {
  UpdateSeg seg[kMaxSegs];
  int32_t count;
};

struct ReduceSeg {
  const void* x;
  const void* g;
  const void* o;   // nullptr: column 3 stays 0
  int64_t n;       // elements per sample
  int64_t row0;    // first sample row of the segment
  int32_t chunks;  // blocks per sample row: ceil(n / kReduceChunk)
  int32_t col0;    // first partial column of this tensor
  int32_t block0;  // first block of the segment in its launch
  int32_t vec;
};

struct ReduceMeta {
  ReduceSeg seg[kMaxSegs];
  int32_t count;
  int32_t columns;  // partial columns per sample (all tensors)
};

// Kernel parameters are limited to 4 KiB on older drivers; stay well inside.
static_assert(sizeof(UpdateMeta) + sizeof(UpdateScalars) <= 3800, "update kernel arguments");
static_assert(sizeof(ReduceMeta) + sizeof(ReduceScalars) + sizeof(float*) <= 3800,
              "reduce kernel arguments");

// The segment holding `block`: the last one whose block0 <= block (block0 ascends, seg 0 has 0).
template <class Meta>
VAEBM_CUDA_HD int find_seg(const Meta& m, int32_t block) {
  int lo = 0, hi = m.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (m.seg[mid].block0 <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <class T>
VAEBM_CUDA_HD void update_thread(const UpdateMeta& m, const UpdateScalars& p, int32_t block,
                                 int32_t tid) {
  const UpdateSeg& s = m.seg[find_seg(m, block)];
  const int64_t q64 = int64_t(block - s.block0) * kThreads + tid;
  if (q64 >= int64_t(s.groups)) return;
  const uint32_t q = uint32_t(q64);
  const uint32_t r = fast_div(q, s.per_row);
  const uint32_t gi = q - r * s.per_row.d;  // group index within the row: j >> 2
  const int64_t row = s.row0 + r;
  const int32_t mode = p.mode ? p.mode[row] : int32_t(kModeUpdate);
  if (mode == kModeKeep && s.alias) return;  // the state already holds the kept value

  const int64_t j0 = int64_t(gi) * 4;
  const int cnt = int(s.n - j0 < 4 ? s.n - j0 : 4);
  const int64_t off = row * s.n + j0;
  const bool vec = s.vec != 0;
  T* o = static_cast<T*>(s.o) + off;
  if (mode == kModeKeep) {
    copy4(static_cast<const T*>(s.x) + off, o, vec, cnt);
    return;
  }
  const uint64_t step = uint64_t(*p.step);
  const uint64_t sample = uint64_t(p.sample_offset + row);
  float y[4];
  if (mode == kModeReset) {
    philox_normal4(p.seed, philox_counter(gi, sample, step, uint32_t(s.tensor), kStreamReset), y);
#pragma unroll
    for (int l = 0; l < 4; ++l) y[l] = clamp_keep_nan(y[l], p.lo, p.hi);
  } else {
    float x[4], g[4], xi[4];
    load4(static_cast<const T*>(s.x) + off, vec, cnt, x);  // issued before the Philox maths
    load4(static_cast<const T*>(s.g) + off, vec, cnt, g);
    const float gs = p.gscale ? p.gscale[row] : 1.f;
    philox_normal4(p.seed, philox_counter(gi, sample, step, uint32_t(s.tensor), kStreamNoise), xi);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const float v = langevin_elem(x[l], effective_grad(g[l], p.clip_value, gs), xi[l], p.a, p.b,
                                    p.lam);
      y[l] = clamp_keep_nan(v, p.lo, p.hi);
    }
  }
  store4(o, vec, cnt, y);
}

// ---------------------------------------------------------------------------------------------
// Reduce: per-sample sums of langevin_ref.reduce_ref, with c = clip(g):
//   col 0: sum c^2    col 1: #non-finite x and g (before clipping)    col 2: sum x^2
//   col 3: sum (o - x + a (s_i c + lam x))^2  (MALA's proposal log-density; 0 without o)
// Pass 1: one block per kReduceChunk elements of one sample row of one tensor writes its four
// sums to partial[row, column, :] (fixed shuffle tree). Pass 2: one block per sample adds its
// columns in double, in a fixed order. No atomics, so the result is bitwise reproducible.

template <class T>
VAEBM_CUDA_HD void reduce_thread(const ReduceMeta& m, const ReduceScalars& p, int32_t block,
                                 int32_t tid, float acc[4], int64_t* slot) {
  const ReduceSeg& s = m.seg[find_seg(m, block)];
  const int32_t b = block - s.block0;
  const int64_t r = b / s.chunks;
  const int32_t c = int32_t(b - r * s.chunks);
  const int64_t row = s.row0 + r;
  *slot = (row * m.columns + s.col0 + c) * 4;
  const int64_t j_begin = int64_t(c) * kReduceChunk;
  const int len = int(s.n - j_begin < kReduceChunk ? s.n - j_begin : kReduceChunk);
  const int64_t base = row * s.n + j_begin;
  const T* x = static_cast<const T*>(s.x) + base;
  const T* g = static_cast<const T*>(s.g) + base;
  const T* o = s.o ? static_cast<const T*>(s.o) + base : nullptr;
  const bool vec = s.vec != 0;
  const float gs = p.gscale ? p.gscale[row] : 1.f;
  for (int j = tid * 4; j < len; j += kThreads * 4) {
    const int cnt = len - j < 4 ? len - j : 4;
    float xv[4], gv[4], ov[4];
    load4(x + j, vec, cnt, xv);
    load4(g + j, vec, cnt, gv);
    if (s.o) load4(o + j, vec, cnt, ov);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (l >= cnt) break;
      const float gc = effective_grad(gv[l], p.clip_value, 1.f);
      acc[0] += gc * gc;
      acc[1] += float(not_finite(xv[l])) + float(not_finite(gv[l]));  // g before clipping
      acc[2] += xv[l] * xv[l];
      if (s.o) {
        const float d = ov[l] - xv[l] + p.a * (gc * gs + p.lam * xv[l]);
        acc[3] += d * d;
      }
    }
  }
}

#if !defined(VAEBM_CUDA_EMULATE)

template <class T>
__global__ void __launch_bounds__(kThreads) update_kernel(const UpdateMeta m,
                                                          const UpdateScalars p) {
  update_thread<T>(m, p, int32_t(blockIdx.x), int32_t(threadIdx.x));
}

template <class T>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const ReduceMeta m,
                                                          const ReduceScalars p, float* partial) {
  __shared__ float warp_sums[kThreads / 32][4];
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t slot;
  reduce_thread<T>(m, p, int32_t(blockIdx.x), int32_t(threadIdx.x), acc, &slot);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    float v = acc[c];
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
    if (lane == 0) warp_sums[warp][c] = v;
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) t += warp_sums[w][threadIdx.x];
    partial[slot + threadIdx.x] = t;
  }
}

__global__ void __launch_bounds__(kFinishThreads)
    reduce_finish_kernel(const float* partial, int32_t columns, float* out) {
  __shared__ double sums[4][kFinishThreads];
  const int64_t row = blockIdx.x;
  const float* src = partial + row * columns * 4;
  double acc[4] = {0., 0., 0., 0.};
  for (int32_t c = threadIdx.x; c < columns; c += kFinishThreads) {
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[k] += double(src[int64_t(c) * 4 + k]);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) sums[k][threadIdx.x] = acc[k];
  __syncthreads();
  for (int w = kFinishThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) {
#pragma unroll
      for (int k = 0; k < 4; ++k) sums[k][threadIdx.x] += sums[k][threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x < 4) out[row * 4 + threadIdx.x] = float(sums[threadIdx.x][0]);
}

#else  // VAEBM_CUDA_EMULATE: the same bodies, one (block, thread) at a time on the host

int64_t g_emulated_launches = 0;

template <class T>
void emulate_update(const UpdateMeta& m, const UpdateScalars& p, int32_t blocks) {
  ++g_emulated_launches;
  for (int32_t b = 0; b < blocks; ++b)
    for (int32_t t = 0; t < kThreads; ++t) update_thread<T>(m, p, b, t);
}

template <class T>
void emulate_reduce(const ReduceMeta& m, const ReduceScalars& p, float* partial, int32_t blocks) {
  ++g_emulated_launches;
  for (int32_t b = 0; b < blocks; ++b) {
    float sum[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t slot = 0;
    for (int32_t t = 0; t < kThreads; ++t) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      reduce_thread<T>(m, p, b, t, acc, &slot);
      for (int k = 0; k < 4; ++k) sum[k] += acc[k];
    }
    for (int k = 0; k < 4; ++k) partial[slot + k] = sum[k];
  }
}

void emulate_finish(const float* partial, int32_t columns, float* out, int64_t batch) {
  ++g_emulated_launches;
  for (int64_t row = 0; row < batch; ++row)
    for (int k = 0; k < 4; ++k) {
      double t = 0.;
      for (int32_t c = 0; c < columns; ++c) t += partial[(row * columns + c) * 4 + k];
      out[row * 4 + k] = float(t);
    }
}

#endif  // VAEBM_CUDA_EMULATE

cudaError_t launch_status() {
#if defined(VAEBM_CUDA_EMULATE)
  return cudaSuccess;
#else
  return cudaGetLastError();
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side: fill the by-value metadata, launching whenever it is full.

template <class T>
cudaError_t update_impl(const TensorArgs* t, int count, int64_t batch, const UpdateScalars& p,
                        cudaStream_t stream) {
  UpdateMeta m;
  std::memset(&m, 0, sizeof(m));
  int64_t blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (m.count == 0) return cudaSuccess;
#if defined(VAEBM_CUDA_EMULATE)
    (void)stream;
    emulate_update<T>(m, p, int32_t(blocks));
#else
    update_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(m, p);
#endif
    m.count = 0;
    blocks = 0;
    return launch_status();
  };
  const int64_t max_groups = std::min(kMaxSegGroups, kMaxLaunchBlocks * kThreads);
  for (int k = 0; k < count; ++k) {
    const int64_t n = t[k].n;
    const int64_t per_row = (n + 3) / 4;
    if (n <= 0 || per_row > max_groups) return cudaErrorInvalidValue;
    const int64_t rows_per_seg = max_groups / per_row;
    const bool vec = n % 4 == 0 && pack_aligned<T>(t[k].x) && pack_aligned<T>(t[k].g) &&
                     pack_aligned<T>(t[k].o);
    const FastDiv div = make_fastdiv(uint32_t(per_row));
    for (int64_t row0 = 0; row0 < batch; row0 += rows_per_seg) {
      const int64_t groups = std::min(batch - row0, rows_per_seg) * per_row;
      const int64_t seg_blocks = (groups + kThreads - 1) / kThreads;
      if (m.count == kMaxSegs || blocks + seg_blocks > kMaxLaunchBlocks) {
        const cudaError_t e = flush();
        if (e != cudaSuccess) return e;
      }
      UpdateSeg& s = m.seg[m.count++];
      s.x = t[k].x;
      s.g = t[k].g;
      s.o = const_cast<void*>(t[k].o);
      s.n = n;
      s.row0 = row0;
      s.groups = uint32_t(groups);
      s.per_row = div;
      s.tensor = k;
      s.block0 = int32_t(blocks);
      s.vec = vec;
      s.alias = t[k].o == t[k].x;
      blocks += seg_blocks;
    }
  }
  return flush();
}

int64_t chunks_per_row(int64_t n) { return (n + kReduceChunk - 1) / kReduceChunk; }

template <class T>
cudaError_t reduce_impl(const TensorArgs* t, int count, int64_t batch, const ReduceScalars& p,
                        float* partial, float* out, cudaStream_t stream) {
  const int64_t columns = reduce_columns(t, count);
  if (columns <= 0 || columns > 0x7fffffffLL || batch <= 0 || batch > kMaxLaunchBlocks)
    return cudaErrorInvalidValue;
  ReduceMeta m;
  std::memset(&m, 0, sizeof(m));
  m.columns = int32_t(columns);
  int64_t blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (m.count == 0) return cudaSuccess;
#if defined(VAEBM_CUDA_EMULATE)
    emulate_reduce<T>(m, p, partial, int32_t(blocks));
#else
    reduce_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(m, p, partial);
#endif
    m.count = 0;
    blocks = 0;
    return launch_status();
  };
  int64_t col = 0;
  for (int k = 0; k < count; ++k) {
    const int64_t n = t[k].n;
    const int64_t chunks = chunks_per_row(n);
    if (chunks > kMaxLaunchBlocks) return cudaErrorInvalidValue;
    const int64_t rows_per_seg = kMaxLaunchBlocks / chunks;
    const bool vec = n % 4 == 0 && pack_aligned<T>(t[k].x) && pack_aligned<T>(t[k].g) &&
                     pack_aligned<T>(t[k].o);
    for (int64_t row0 = 0; row0 < batch; row0 += rows_per_seg) {
      const int64_t seg_blocks = std::min(batch - row0, rows_per_seg) * chunks;
      if (m.count == kMaxSegs || blocks + seg_blocks > kMaxLaunchBlocks) {
        const cudaError_t e = flush();
        if (e != cudaSuccess) return e;
      }
      ReduceSeg& s = m.seg[m.count++];
      s.x = t[k].x;
      s.g = t[k].g;
      s.o = t[k].o;
      s.n = n;
      s.row0 = row0;
      s.chunks = int32_t(chunks);
      s.col0 = int32_t(col);
      s.block0 = int32_t(blocks);
      s.vec = vec;
      blocks += seg_blocks;
    }
    col += chunks;
  }
  const cudaError_t e = flush();
  if (e != cudaSuccess) return e;
#if defined(VAEBM_CUDA_EMULATE)
  emulate_finish(partial, int32_t(columns), out, batch);
#else
  reduce_finish_kernel<<<unsigned(batch), kFinishThreads, 0, stream>>>(partial, int32_t(columns),
                                                                       out);
#endif
  return launch_status();
}

}  // namespace

int64_t reduce_columns(const TensorArgs* t, int count) {
  int64_t columns = 0;
  for (int k = 0; k < count; ++k) columns += chunks_per_row(t[k].n);
  return columns;
}

cudaError_t launch_update(DType dtype, const TensorArgs* tensors, int count, int64_t batch,
                          const UpdateScalars& s, cudaStream_t stream) {
  if (count <= 0 || batch <= 0 || s.step == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return update_impl<float>(tensors, count, batch, s, stream);
    case DType::kFloat16:
      return update_impl<__half>(tensors, count, batch, s, stream);
    case DType::kBFloat16:
      return update_impl<__nv_bfloat16>(tensors, count, batch, s, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_reduce(DType dtype, const TensorArgs* tensors, int count, int64_t batch,
                          const ReduceScalars& s, float* partial, float* out,
                          cudaStream_t stream) {
  if (count <= 0 || batch <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return reduce_impl<float>(tensors, count, batch, s, partial, out, stream);
    case DType::kFloat16:
      return reduce_impl<__half>(tensors, count, batch, s, partial, out, stream);
    case DType::kBFloat16:
      return reduce_impl<__nv_bfloat16>(tensors, count, batch, s, partial, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace vaebm
