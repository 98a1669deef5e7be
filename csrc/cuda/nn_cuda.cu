// CUDA kernels of the scaled Swish (fused bias add) and of the weight-norm reparameterisation.
//
// Specs: _torch_fwd / _torch_bwd / _torch_bwd2 in vaebm/ops/swish.py and _torch_fwd / _torch_bwd
// in vaebm/ops/weight_norm.py; the CPU twins are csrc/cpu/swish_cpu.cpp and weight_norm_cpu.cpp.
// No torch headers: this file compiles on its own with nvcc (tests/ops/test_nn_cuda_build.py),
// and with -DVAEBM_CUDA_EMULATE it runs its kernel bodies on the host, so the indexing and the
// maths are tested without a GPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "nn_cuda.h"
#include "pack_io.cuh"

// Blocks of one Swish launch (a grid-stride loop covers the rest); overridable so the host
// emulation test can exercise the stride.
#ifndef VAEBM_CUDA_NN_MAX_BLOCKS
#define VAEBM_CUDA_NN_MAX_BLOCKS (1LL << 20)
#endif

#if defined(VAEBM_CUDA_EMULATE)
#define VAEBM_NN_HD inline
#else
#define VAEBM_NN_HD __host__ __device__ __forceinline__
#endif

namespace vaebm {
namespace cuda_nn {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = VAEBM_CUDA_NN_MAX_BLOCKS;
constexpr float kScale = float(1.0 / 1.1);
constexpr float kEps = 1e-12f;  // as weight_norm.EPS

using cuda_io::Io;
using cuda_io::Pack4;
using cuda_io::load4;
using cuda_io::pack_aligned;
using cuda_io::store4;

// ---------------------------------------------------------------------------------------------
// Swish. VAEBM energy net (paper Table 7): Swish scaled by 1/1.1 to be 1-Lipschitz. With
// y = x + bias[c] and s = sigmoid(y):
//     fwd:   out    = y s / 1.1
//     bwd:   grad_y = grad * s (1 + y (1 - s)) / 1.1
//     bwd2:  grad_x = gg * grad * s (1 - s) (2 + y (1 - 2 s)) / 1.1
// s and 1 - s from e = exp(-|y|) in (0, 1], r = 1 / (1 + e): (s, 1 - s) = (r, e r) for y >= 0
// and (e r, r) for y < 0: no overflow, and 1 - s keeps its relative precision where s -> 1.

template <int OP>
VAEBM_NN_HD float swish_math(float y, float g, float h) {
  const float e = expf(-fabsf(y));
  const float r = 1.f / (1.f + e);
  const float er = e * r;
  const bool pos = y >= 0.f;
  const float s = pos ? r : er, sc = pos ? er : r;
  if (OP == 0) return y * s * kScale;
  if (OP == 1) return g * (s * (1.f + y * sc)) * kScale;
  return h * g * (s * sc * (2.f + y * (sc - s))) * kScale;
}

// Elements 4 p .. 4 p + 3 (those below n). I: the index type of the channel arithmetic (32-bit
// division is several times cheaper; 64-bit only for tensors of 2^32 elements or more).
template <class T, class I, int OP>
VAEBM_NN_HD void swish_pack(const SwishArgs& a, int64_t p, bool vec) {
  const int64_t i0 = p * 4;
  const int cnt = a.n - i0 < 4 ? int(a.n - i0) : 4;
  const bool v = vec && cnt == 4;
  float x[4], g[4] = {0.f, 0.f, 0.f, 0.f}, h[4] = {0.f, 0.f, 0.f, 0.f};
  float b[4] = {0.f, 0.f, 0.f, 0.f}, o[4];
  load4(static_cast<const T*>(a.x) + i0, v, cnt, x);
  if (OP != 0) load4(static_cast<const T*>(a.g) + i0, v, cnt, g);
  if (OP == 2) load4(static_cast<const T*>(a.h) + i0, v, cnt, h);
  if (a.bias) {
    const I inner = I(a.inner), channels = I(a.channels);
    const I q = I(i0) / inner;
    I rem = I(i0) - q * inner, c = q % channels;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      b[l] = a.bias[c];
      if (++rem == inner) {
        rem = 0;
        c = c + 1 == channels ? 0 : c + 1;
      }
    }
  }
#pragma unroll
  for (int l = 0; l < 4; ++l) o[l] = swish_math<OP>(x[l] + b[l], g[l], h[l]);
  store4(static_cast<T*>(a.out) + i0, v, cnt, o);
}

// ---------------------------------------------------------------------------------------------
// Weight norm (Salimans & Kingma 2016, with the log-scale parameter of the VAEBM/NVAE convs).
// One block per row o, n_o = max(||v_o||, EPS), g_o = exp(log_g[o]), G = dL/dw:
//     fwd:  w_o = (g_o / n_o) v_o
//     bwd:  proj_o = <G_o, v_o> / n_o,  dL/dv_o = (g_o / n_o) (G_o - (proj_o / n_o) v_o),
//           dL/dlog_g[o] = g_o proj_o
// Thread tid sums elements tid, tid + kThreads, ...; the block adds the threads' sums.

template <class T, bool BWD>
VAEBM_NN_HD void wn_partial(const WeightNormArgs& a, int64_t row, int tid, float acc[2]) {
  const T* v = static_cast<const T*>(a.v) + row * a.k;
  const T* G = BWD ? static_cast<const T*>(a.grad_w) + row * a.k : nullptr;
  for (int64_t j = tid; j < a.k; j += kThreads) {
    const float vv = Io<T>::to_float(v[j]);
    acc[0] += vv * vv;
    if (BWD) acc[1] += Io<T>::to_float(G[j]) * vv;
  }
}

// The row's two factors (fwd: w = f0 v; bwd: grad_v = f0 (G - f1 v)); writes dL/dlog_g.
template <bool BWD>
VAEBM_NN_HD void wn_factors(const WeightNormArgs& a, int64_t row, float ss, float dot,
                            float f[2]) {
  const float root = sqrtf(ss);
  const float norm = root < kEps ? kEps : root;  // NaN stays NaN
  const float g = expf(a.log_g[row]);
  f[0] = g / norm;
  f[1] = 0.f;
  if (BWD) {
    const float proj = dot / norm;
    a.grad_log_g[row] = g * proj;
    f[1] = proj / norm;
  }
}

template <class T, bool BWD>
VAEBM_NN_HD void wn_write(const WeightNormArgs& a, int64_t row, int tid, const float f[2]) {
  const T* v = static_cast<const T*>(a.v) + row * a.k;
  const T* G = BWD ? static_cast<const T*>(a.grad_w) + row * a.k : nullptr;
  T* out = static_cast<T*>(a.out) + row * a.k;
  for (int64_t j = tid; j < a.k; j += kThreads) {
    const float vv = Io<T>::to_float(v[j]);
    out[j] = Io<T>::from_float(BWD ? f[0] * (Io<T>::to_float(G[j]) - f[1] * vv) : f[0] * vv);
  }
}

#if !defined(VAEBM_CUDA_EMULATE)

template <class T, class I, int OP>
__global__ void __launch_bounds__(kThreads) swish_kernel(const SwishArgs a, int64_t packs,
                                                         bool vec) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < packs; p += stride)
    swish_pack<T, I, OP>(a, p, vec);
}

template <class T, bool BWD>
__global__ void __launch_bounds__(kThreads) weight_norm_kernel(const WeightNormArgs a) {
  __shared__ float warp_sums[kThreads / 32][2];
  __shared__ float factors[2];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float acc[2] = {0.f, 0.f};
  wn_partial<T, BWD>(a, row, tid, acc);
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    float s = acc[c];
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) s += __shfl_down_sync(0xffffffffu, s, d);
    if (lane == 0) warp_sums[warp][c] = s;
  }
  __syncthreads();
  if (tid == 0) {
    float ss = 0.f, dot = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      ss += warp_sums[w][0];
      dot += warp_sums[w][1];
    }
    wn_factors<BWD>(a, row, ss, dot, factors);
  }
  __syncthreads();
  const float f[2] = {factors[0], factors[1]};
  wn_write<T, BWD>(a, row, tid, f);
}

cudaError_t launch_status() { return cudaGetLastError(); }

#else  // VAEBM_CUDA_EMULATE: the same bodies, one (block, thread) at a time on the host

int64_t g_emulated_launches = 0;

template <class T, class I, int OP>
void emulate_swish(const SwishArgs& a, int64_t packs, bool vec, int64_t blocks) {
  ++g_emulated_launches;
  const int64_t stride = blocks * kThreads;
  for (int64_t b = 0; b < blocks; ++b)
    for (int t = 0; t < kThreads; ++t)
      for (int64_t p = b * kThreads + t; p < packs; p += stride) swish_pack<T, I, OP>(a, p, vec);
}

template <class T, bool BWD>
void emulate_weight_norm(const WeightNormArgs& a) {
  ++g_emulated_launches;
  for (int64_t row = 0; row < a.rows; ++row) {
    float ss = 0.f, dot = 0.f, f[2];
    for (int t = 0; t < kThreads; ++t) {
      float acc[2] = {0.f, 0.f};
      wn_partial<T, BWD>(a, row, t, acc);
      ss += acc[0];
      dot += acc[1];
    }
    wn_factors<BWD>(a, row, ss, dot, f);
    for (int t = 0; t < kThreads; ++t) wn_write<T, BWD>(a, row, t, f);
  }
}

cudaError_t launch_status() { return cudaSuccess; }

#endif  // VAEBM_CUDA_EMULATE

// ---------------------------------------------------------------------------------------------
// Host side

template <class T, class I, int OP>
cudaError_t swish_impl(const SwishArgs& a, cudaStream_t stream) {
  const int64_t packs = (a.n + 3) / 4;
  const int64_t blocks = std::min<int64_t>((packs + kThreads - 1) / kThreads, kMaxBlocks);
  const bool vec = pack_aligned<T>(a.x) && pack_aligned<T>(a.out) &&
                   (OP == 0 || pack_aligned<T>(a.g)) && (OP != 2 || pack_aligned<T>(a.h));
#if defined(VAEBM_CUDA_EMULATE)
  (void)stream;
  emulate_swish<T, I, OP>(a, packs, vec, blocks);
#else
  swish_kernel<T, I, OP><<<unsigned(blocks), kThreads, 0, stream>>>(a, packs, vec);
#endif
  return launch_status();
}

template <class T, int OP>
cudaError_t swish_index(const SwishArgs& a, cudaStream_t stream) {
  // 32-bit channel arithmetic while i0 + 4 (and so rem, q, c) stays below 2^32
  if (a.n < (int64_t(1) << 32) - 8) return swish_impl<T, uint32_t, OP>(a, stream);
  return swish_impl<T, uint64_t, OP>(a, stream);
}

template <class T>
cudaError_t swish_op(SwishOp op, const SwishArgs& a, cudaStream_t stream) {
  switch (op) {
    case SwishOp::kFwd: return swish_index<T, 0>(a, stream);
    case SwishOp::kBwd: return swish_index<T, 1>(a, stream);
    case SwishOp::kBwd2: return swish_index<T, 2>(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <class T, bool BWD>
cudaError_t weight_norm_impl(const WeightNormArgs& a, cudaStream_t stream) {
#if defined(VAEBM_CUDA_EMULATE)
  (void)stream;
  emulate_weight_norm<T, BWD>(a);
#else
  weight_norm_kernel<T, BWD><<<unsigned(a.rows), kThreads, 0, stream>>>(a);
#endif
  return launch_status();
}

template <bool BWD>
cudaError_t weight_norm_any(DType dtype, const WeightNormArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.rows > 0x7fffffffLL || a.k < 0 || !a.v || !a.log_g || !a.out ||
      (BWD && (!a.grad_w || !a.grad_log_g)))
    return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return weight_norm_impl<float, BWD>(a, stream);
    case DType::kFloat16: return weight_norm_impl<__half, BWD>(a, stream);
    case DType::kBFloat16: return weight_norm_impl<__nv_bfloat16, BWD>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_swish(SwishOp op, DType dtype, const SwishArgs& a, cudaStream_t stream) {
  if (a.n < 0 || a.channels < 1 || a.inner < 1 || !a.x || !a.out) return cudaErrorInvalidValue;
  if ((op != SwishOp::kFwd && !a.g) || (op == SwishOp::kBwd2 && !a.h))
    return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return swish_op<float>(op, a, stream);
    case DType::kFloat16: return swish_op<__half>(op, a, stream);
    case DType::kBFloat16: return swish_op<__nv_bfloat16>(op, a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_weight_norm_fwd(DType dtype, const WeightNormArgs& a, cudaStream_t stream) {
  return weight_norm_any<false>(dtype, a, stream);
}

cudaError_t launch_weight_norm_bwd(DType dtype, const WeightNormArgs& a, cudaStream_t stream) {
  return weight_norm_any<true>(dtype, a, stream);
}

}  // namespace cuda_nn
}  // namespace vaebm
