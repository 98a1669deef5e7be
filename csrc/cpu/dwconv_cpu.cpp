// CPU depthwise convolution, stride 1, square odd kernel, zero padding:
// torch.ops.vaebm.dwconv2d(x, w, bias, pad) == F.conv2d(x, w, bias, 1, pad, 1, C)
// for x (B, C, H, W) float32 NCHW-contiguous, w (C, 1, K, K), bias (C,) or None.
//
// Why: NVAE's decoder cells run a 5x5 depthwise conv on (B, 6C, H, W) at every Langevin step,
// forward and input gradient; oneDNN takes ~1.6 ms forward + 0.8 ms backward per call on a
// (2, 1536, 16, 16) tensor on one core, a few times more than its FLOPs need. The input gradient
// of a stride-1 depthwise conv is the same conv with the kernel flipped and padding K-1-pad, so
// this one kernel serves both directions (see vaebm/ops/conv.py).
//
// Layout: each (b, c) plane is copied into a zero-bordered buffer, then every output row is
// computed 16 columns at a time in a register-resident accumulator (a GCC vector of 16 floats:
// one AVX-512 or two AVX2 registers) with K*K fused multiply-adds of unaligned loads. The code is compiled three
// times (AVX-512, AVX2+FMA, baseline) and the variant is picked once at run time, so no -march
// flag is needed. Planes are independent: at::parallel_for splits over them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace vaebm::cpu_nn {
namespace {

constexpr int kChunk = 16;
// 16 floats: one AVX-512 register. The AVX2 variant uses 8-float vectors (one YMM register):
// GCC lowers a 64-byte vector under target("avx2") through the stack, which measured 12x slower
// than oneDNN (14 ms vs 1.2 ms on a (2, 1536, 16, 16) tensor) on the same core.
typedef float V16 __attribute__((vector_size(64)));
typedef float V8 __attribute__((vector_size(32)));

#define VAEBM_DW_BODY(VT, CH)                                                              \
  for (int64_t p = p0; p < p1; ++p) {                                                      \
    const float* xp = x + p * H * W;                                                       \
    float* op = out + p * OH * OW;                                                         \
    const float* wp = w + (p % C) * K * K;                                                 \
    const float b = bias ? bias[p % C] : 0.f;                                              \
    std::fill(buf.begin(), buf.end(), 0.f);                                                \
    for (int64_t h = 0; h < H; ++h)                                                        \
      std::memcpy(&buf[(h + pad) * PW + pad], xp + h * W, W * sizeof(float));              \
    for (int64_t oh = 0; oh < OH; ++oh) {                                                  \
      for (int64_t c0 = 0; c0 < OW; c0 += CH) {                                            \
        VT acc;                                                                            \
        for (int t = 0; t < CH; ++t) acc[t] = b;                                           \
        for (int64_t i = 0; i < K; ++i) {                                                  \
          const float* row = &buf[(oh + i) * PW + c0];                                     \
          for (int64_t j = 0; j < K; ++j) {                                                \
            VT r;                                                                          \
            std::memcpy(&r, row + j, sizeof(VT));                                          \
            acc += wp[i * K + j] * r;                                                      \
          }                                                                                \
        }                                                                                  \
        const int64_t n = std::min<int64_t>(CH, OW - c0);                                  \
        if (n == CH) {                                                                     \
          std::memcpy(op + oh * OW + c0, &acc, sizeof(VT));                                \
        } else {                                                                           \
          for (int64_t t = 0; t < n; ++t) op[oh * OW + c0 + t] = acc[t];                   \
        }                                                                                  \
      }                                                                                    \
    }                                                                                      \
  }

// buf holds the padded plane, rows PW wide; PW is rounded up so that the last 16-column chunk
// may read past OW (those lanes are computed and dropped) without leaving the buffer.
#define VAEBM_DW_FN(NAME, ATTR, VT, CH)                                                    \
  ATTR void NAME(const float* x, float* out, const float* w, const float* bias, int64_t C,  \
                 int64_t H, int64_t W, int64_t K, int64_t pad, int64_t OH, int64_t OW,     \
                 int64_t PW, int64_t PH, int64_t p0, int64_t p1) {                         \
    std::vector<float> buf(PH * PW);                                                       \
    VAEBM_DW_BODY(VT, CH)                                                                  \
  }

VAEBM_DW_FN(dw_avx512, __attribute__((target("avx512f,fma"))), V16, 16)
VAEBM_DW_FN(dw_avx2, __attribute__((target("avx2,fma"))), V8, 8)
VAEBM_DW_FN(dw_base, , V8, 8)


// Weight gradient (training): gw[c, i, j] = sum_{b, oh, ow} xpad[b, c, oh + i, ow + j] g[b, c, oh, ow]
// (xpad: x zero-padded by pad). PyTorch's CPU path for this (the weight gradient of a grouped
// conv) took 0.27-1.2 s on a (32, 96, 32, 32) 5x5 depthwise conv, half of a stage-1 iteration of
// the `mnist` NVAE. Here each thread owns whole channels and loops over the batch, so the sum
// needs no atomics: per (b, c) plane, x is copied into the zero-bordered buffer as in the
// forward, the g row into a zero-tailed buffer (the lanes past OW contribute 0), and K*K vector
// accumulators gather x-row-shifted-by-j times the g row; lanes are summed once per channel.
#define VAEBM_DWG_FN(NAME, ATTR, VT, CH)                                                   \
  ATTR void NAME(const float* x, const float* g, float* gw, int64_t B, int64_t C, int64_t H, \
                 int64_t W, int64_t K, int64_t pad, int64_t OH, int64_t OW, int64_t PW,     \
                 int64_t PH, int64_t GW, int64_t c0, int64_t c1) {                          \
    std::vector<float> buf(PH * PW), grow(GW);                                             \
    VT acc[15 * 15]; /* on the stack: aligned, no allocator instantiated per target */     \
    for (int64_t c = c0; c < c1; ++c) {                                                    \
      for (int64_t k = 0; k < K * K; ++k) acc[k] = VT{};                                   \
      for (int64_t b = 0; b < B; ++b) {                                                    \
        const float* xp = x + (b * C + c) * H * W;                                         \
        const float* gp = g + (b * C + c) * OH * OW;                                       \
        std::fill(buf.begin(), buf.end(), 0.f);                                            \
        for (int64_t h = 0; h < H; ++h)                                                    \
          std::memcpy(&buf[(h + pad) * PW + pad], xp + h * W, W * sizeof(float));          \
        for (int64_t oh = 0; oh < OH; ++oh) {                                              \
          std::memcpy(grow.data(), gp + oh * OW, OW * sizeof(float));                      \
          for (int64_t q = 0; q < GW; q += CH) {                                           \
            VT gv;                                                                         \
            std::memcpy(&gv, &grow[q], sizeof(VT));                                        \
            for (int64_t i = 0; i < K; ++i) {                                              \
              const float* row = &buf[(oh + i) * PW + q];                                  \
              for (int64_t j = 0; j < K; ++j) {                                            \
                VT r;                                                                      \
                std::memcpy(&r, row + j, sizeof(VT));                                      \
                acc[i * K + j] += r * gv;                                                  \
              }                                                                            \
            }                                                                              \
          }                                                                                \
        }                                                                                  \
      }                                                                                    \
      for (int64_t k = 0; k < K * K; ++k) {                                                \
        float s = 0.f;                                                                     \
        for (int t = 0; t < CH; ++t) s += acc[k][t];                                       \
        gw[c * K * K + k] = s;                                                             \
      }                                                                                    \
    }                                                                                      \
  }

VAEBM_DWG_FN(dwg_avx512, __attribute__((target("avx512f,fma"))), V16, 16)
VAEBM_DWG_FN(dwg_avx2, __attribute__((target("avx2,fma"))), V8, 8)
VAEBM_DWG_FN(dwg_base, , V8, 8)

using Fn = decltype(&dw_base);
using GFn = decltype(&dwg_base);

// VAEBM_CPU_ISA=scalar|avx2 forces a narrower variant (read once, at the first call), as in
// swish_cpu.cpp and langevin_cpu.cpp: CI runs the suite a second time restricted to AVX2.
Fn pick() {
  __builtin_cpu_init();
  const char* env = std::getenv("VAEBM_CPU_ISA");
  const bool scalar = env && !std::strcmp(env, "scalar");
  const bool cap_avx2 = env && !std::strcmp(env, "avx2");
  if (scalar) return dw_base;
  if (!cap_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
    return dw_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return dw_avx2;
  return dw_base;
}

GFn pick_wgrad() {
  const Fn f = pick();
  if (f == dw_avx512) return dwg_avx512;
  if (f == dw_avx2) return dwg_avx2;
  return dwg_base;
}

at::Tensor dwconv2d(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                    int64_t pad) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "dwconv2d: x must be a 4-D float32 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "dwconv2d: x must be NCHW-contiguous");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 4 &&
                  w.size(0) == C && w.size(1) == 1 && w.size(2) == w.size(3),
              "dwconv2d: w must be a contiguous float32 (C, 1, K, K) tensor with C = ", C,
              ", got ", w.sizes());
  const int64_t K = w.size(2);
  TORCH_CHECK(pad >= 0 && pad < K, "dwconv2d: pad must be in [0, K), got ", pad);
  const int64_t OH = H + 2 * pad - K + 1, OW = W + 2 * pad - K + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "dwconv2d: empty output for input ", x.sizes(), " and K ", K);
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == C,
                "dwconv2d: bias must be a contiguous float32 (C,) tensor");
    bp = bias->const_data_ptr<float>();
  }
  auto out = at::empty({B, C, OH, OW}, x.options());
  const int64_t chunks = (OW + kChunk - 1) / kChunk;
  const int64_t PW = std::max(W + 2 * pad, chunks * kChunk + K - 1);
  const int64_t PH = H + 2 * pad;
  static const Fn fn = pick();
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, OH * OW * K * K / 8));
  at::parallel_for(0, B * C, grain, [&](int64_t p0, int64_t p1) {
    fn(xp, op, wp, bp, C, H, W, K, pad, OH, OW, PW, PH, p0, p1);
  });
  return out;
}

// gw (C, 1, K, K) of dwconv2d(x, w, None, pad) for the output gradient g (B, C, OH, OW).
at::Tensor dwconv2d_wgrad(const at::Tensor& x, const at::Tensor& g, int64_t K, int64_t pad) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 &&
                  x.is_contiguous(),
              "dwconv2d_wgrad: x must be a 4-D NCHW-contiguous float32 CPU tensor, got ",
              x.sizes());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(K >= 1 && K % 2 == 1 && K <= 15, "dwconv2d_wgrad: K must be odd in [1, 15], got ", K);
  TORCH_CHECK(pad >= 0 && pad < K, "dwconv2d_wgrad: pad must be in [0, K), got ", pad);
  const int64_t OH = H + 2 * pad - K + 1, OW = W + 2 * pad - K + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "dwconv2d_wgrad: empty output for input ", x.sizes());
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.is_contiguous() && g.dim() == 4 &&
                  g.size(0) == B && g.size(1) == C && g.size(2) == OH && g.size(3) == OW,
              "dwconv2d_wgrad: g must be a contiguous float32 (", B, ", ", C, ", ", OH, ", ", OW,
              ") tensor, got ", g.sizes());
  auto gw = at::empty({C, 1, K, K}, x.options());
  const int64_t chunks = (OW + kChunk - 1) / kChunk;
  const int64_t GW = chunks * kChunk;
  const int64_t PW = std::max(W + 2 * pad, GW + K - 1);
  const int64_t PH = H + 2 * pad;
  static const GFn fn = pick_wgrad();
  const float* xp = x.const_data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  float* out = gw.data_ptr<float>();
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    fn(xp, gp, out, B, C, H, W, K, pad, OH, OW, PW, PH, GW, c0, c1);
  });
  return gw;
}

}  // namespace
}  // namespace vaebm::cpu_nn

// schemas: vaebm/ops/_library.py
TORCH_LIBRARY_IMPL(vaebm, CPU, m) {
  m.impl("dwconv2d", &vaebm::cpu_nn::dwconv2d);
  m.impl("dwconv2d_wgrad", &vaebm::cpu_nn::dwconv2d_wgrad);
}
