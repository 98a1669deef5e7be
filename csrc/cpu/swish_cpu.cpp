// CPU backend of the scaled Swish: torch.ops.vaebm.swish_fwd / swish_bwd / swish_bwd2.
//
// VAEBM's energy network (Table 7 of the paper; FACTS.md section 2) uses Swish scaled by 1/1.1
// so that it is 1-Lipschitz, fused here with the bias add of the conv before it. With
// y = x + bias[c] (c = index along dim 1) and s = sigmoid(y):
//     fwd:   out    = y s / 1.1
//     bwd:   grad_y = grad * s (1 + y (1 - s)) / 1.1
//     bwd2:  grad_x = gg * grad * s (1 - s) (2 + y (1 - 2 s)) / 1.1
// Spec: _torch_fwd / _torch_bwd / _torch_bwd2 in vaebm/ops/swish.py. Both s and 1 - s come from
// e = exp(-|y|) in (0, 1]: with r = 1 / (1 + e), (s, 1 - s) = (r, e r) for y >= 0 and (e r, r)
// for y < 0. Nothing overflows and 1 - s keeps its relative precision where s -> 1.
//
// Layout: x, grad, gg share one dense layout, contiguous or channels_last; the output gets it
// too, so every op is a walk over memory. The bias index of memory element i is
// (i / inner) % C, inner = prod(shape[2:]) for contiguous and 1 for channels_last. Work is cut
// into spans: a row of `inner` elements with one bias value when rows are long, else a whole
// number of periods (C * inner elements) against a pre-expanded bias buffer, so channels_last
// and small images vectorise as well as long rows.
//
// float32/float16/bfloat16 compute in float32 with explicit AVX2+FMA or AVX-512 kernels
// (swish_cpu_simd.h, compiled under `#pragma GCC target` and picked at run time, so no -march
// flag is needed); float64 (for gradcheck) and CPUs without AVX2 use the scalar code here.
// VAEBM_CPU_ISA=scalar|avx2 forces a narrower path (read per call, for tests).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace vaebm::cpu_nn {
namespace {

enum { kFwd = 0, kBwd = 1, kBwd2 = 2 };
constexpr float kScale = float(1.0 / 1.1);
constexpr int64_t kChunk = 1 << 14;      // elements per parallel work unit (at least)
constexpr int64_t kLongRow = 64;         // rows at least this long take one scalar bias
constexpr int64_t kPeriodSpan = 2048;    // target span length of the expanded-bias path

// ---- scalar path: float64, CPUs without AVX2 ----
template <class C>
inline void sigmoid2(C y, C& s, C& sc) {
  const C e = std::exp(-std::abs(y));
  const C r = C(1) / (C(1) + e);
  const bool pos = y >= C(0);
  s = pos ? r : e * r;
  sc = pos ? e * r : r;
}

template <class C, int OP>
inline C swish_elem(C x, C b, C g, C h) {
  const C y = x + b;
  C s, sc;
  sigmoid2(y, s, sc);
  const C k = std::is_same_v<C, double> ? C(1.0 / 1.1) : C(kScale);
  if (OP == kFwd) return y * s * k;
  if (OP == kBwd) return g * (s * (C(1) + y * sc)) * k;
  return h * g * (s * sc * (C(2) + y * (sc - s))) * k;
}

template <class C, class T, int OP, bool VB>
void swish_span_scalar(const T* x, const T* g, const T* h, T* o, int64_t n, const C* bvec,
                       C bsc) {
  for (int64_t j = 0; j < n; ++j)
    o[j] = T(swish_elem<C, OP>(C(x[j]), VB ? bvec[j] : bsc, OP != kFwd ? C(g[j]) : C(0),
                               OP == kBwd2 ? C(h[j]) : C(0)));
}

}  // namespace
}  // namespace vaebm::cpu_nn

// ---- AVX2 + FMA (+ F16C for float16): 8 lanes ----
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace vaebm::cpu_nn::avx2 {
namespace {
struct V {
  static constexpr int W = 8;
  using F = __m256;
  using M = __m256;  // lane mask: all ones / all zeros
  static F set(float v) { return _mm256_set1_ps(v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }  // a b + c
  static F max(F a, F b) { return _mm256_max_ps(a, b); }              // b where either is NaN
  static F neg_abs(F a) { return _mm256_or_ps(a, set(-0.f)); }
  static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F mul_pow2(F p, F n) {  // p 2^n for integral n in [-150, 127], as p 2^a 2^(n - a)
    const __m256i ni = _mm256_cvtps_epi32(n), a = _mm256_srai_epi32(ni, 1);
    const __m256i bias = _mm256_set1_epi32(127);
    const F pa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23));
    const F pb = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, a), bias), 23));
    return mul(mul(p, pa), pb);
  }
  static M ge(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static F zero_unless(F a, M m) { return _mm256_and_ps(a, m); }
  static F blend(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }  // m ? a : b
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F load(const c10::BFloat16* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store(c10::Half* p, F v) {  // round to nearest even
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store(c10::BFloat16* p, F v) {  // round to nearest even; NaN -> 0x7FC0 (as c10)
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rnd = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, rnd), 16);
    r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r),
                                             _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)),
                                             _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
};
}  // namespace
}  // namespace vaebm::cpu_nn::avx2
#define VAEBM_NN_ISA avx2
#include "swish_cpu_simd.h"
#undef VAEBM_NN_ISA
#pragma GCC pop_options

// ---- AVX-512 (F, BW, VL): 16 lanes; the same operations ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
namespace vaebm::cpu_nn::avx512 {
namespace {
struct V {
  static constexpr int W = 16;
  using F = __m512;
  using M = __mmask16;
  static F set(float v) { return _mm512_set1_ps(v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F neg_abs(F a) {
    return _mm512_castsi512_ps(
        _mm512_or_si512(_mm512_castps_si512(a), _mm512_set1_epi32(int(0x80000000u))));
  }
  static F round(F a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static F mul_pow2(F p, F n) {
    const __m512i ni = _mm512_cvtps_epi32(n), a = _mm512_srai_epi32(ni, 1);
    const __m512i bias = _mm512_set1_epi32(127);
    const F pa = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(a, bias), 23));
    const F pb = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(ni, a), bias), 23));
    return mul(mul(p, pa), pb);
  }
  static M ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static F zero_unless(F a, M m) { return _mm512_maskz_mov_ps(m, a); }
  static F blend(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }  // m ? a : b
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i u = _mm512_cvtepu16_epi32(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(c10::Half* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static void store(c10::BFloat16* p, F v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rnd = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, rnd), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r,
                                _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};
}  // namespace
}  // namespace vaebm::cpu_nn::avx512
#define VAEBM_NN_ISA avx512
#include "swish_cpu_simd.h"
#undef VAEBM_NN_ISA
#pragma GCC pop_options

// ---- run-time dispatch, spans and the torch ops ----
namespace vaebm::cpu_nn {
namespace {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa hardware_isa() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  return avx2 ? Isa::kAvx2 : Isa::kScalar;
}

Isa current_isa() {
  static const Isa hw = hardware_isa();
  const char* env = std::getenv("VAEBM_CPU_ISA");
  if (env && !std::strcmp(env, "scalar")) return Isa::kScalar;
  if (env && !std::strcmp(env, "avx2")) return std::min(hw, Isa::kAvx2);
  return hw;
}

// How memory splits into spans: span s is elements [s len, min(n, (s + 1) len)), with bias
// vec[0 .. len) (vec non-empty) or the scalar bias[s % C] (bias null: no bias).
template <class C>
struct Plan {
  int64_t len = kChunk;
  std::vector<C> vec;
  const C* bias = nullptr;
  int64_t channels = 1;
};

template <class C>
Plan<C> make_plan(const at::Tensor& x, const C* bias) {
  Plan<C> p;
  if (!bias) return p;
  const int64_t B = x.size(0), Cn = x.size(1), n = x.numel();
  const int64_t inner = x.is_contiguous() ? n / (B * Cn) : 1;  // else channels_last
  p.channels = Cn;
  if (inner >= kLongRow) {
    p.len = inner;
    p.bias = bias;
    return p;
  }
  const int64_t period = Cn * inner;
  p.len = period * std::max<int64_t>(1, (kPeriodSpan + period - 1) / period);
  p.vec.resize(size_t(p.len));
  for (int64_t j = 0; j < p.len; ++j) p.vec[size_t(j)] = bias[(j / inner) % Cn];
  return p;
}

template <class C, class T, int OP, bool VB>
void span_any(Isa isa, const T* x, const T* g, const T* h, T* o, int64_t n, const C* bvec,
              C bsc) {
  if constexpr (std::is_same_v<C, float>) {
    if (isa == Isa::kAvx512) return avx512::swish_span<T, OP, VB>(x, g, h, o, n, bvec, bsc);
    if (isa == Isa::kAvx2) return avx2::swish_span<T, OP, VB>(x, g, h, o, n, bvec, bsc);
  }
  swish_span_scalar<C, T, OP, VB>(x, g, h, o, n, bvec, bsc);
}

template <class C, class T, int OP>
void run(const at::Tensor& x, const at::Tensor* g, const at::Tensor* h, const at::Tensor& out,
         const C* bias) {
  const int64_t n = x.numel();
  const Plan<C> p = make_plan<C>(x, bias);
  const Isa isa = current_isa();
  const T* xp = x.const_data_ptr<T>();
  const T* gp = g ? g->const_data_ptr<T>() : nullptr;
  const T* hp = h ? h->const_data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const int64_t spans = (n + p.len - 1) / p.len;
  const int64_t grain = std::max<int64_t>(1, kChunk / p.len);
  at::parallel_for(0, spans, grain, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t j = s * p.len, m = std::min(n - j, p.len);
      const T* gj = gp ? gp + j : nullptr;
      const T* hj = hp ? hp + j : nullptr;
      if (!p.vec.empty())
        span_any<C, T, OP, true>(isa, xp + j, gj, hj, op + j, m, p.vec.data(), C(0));
      else
        span_any<C, T, OP, false>(isa, xp + j, gj, hj, op + j, m, nullptr,
                                  p.bias ? p.bias[s % p.channels] : C(0));
    }
  });
}

bool dense(const at::Tensor& x) {
  return x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast));
}

template <int OP>
at::Tensor swish_op(const at::Tensor& x, const at::Tensor* g, const at::Tensor* h,
                    const std::optional<at::Tensor>& bias) {
  static const char* names[] = {"vaebm::swish_fwd", "vaebm::swish_bwd",
                                "vaebm::swish_bwd2"};
  const char* op = names[OP];
  const auto dt = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              op, ": dtype must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(dense(x), op, ": x must be contiguous or channels_last, got strides ",
              x.strides());
  for (const at::Tensor* t : {g, h})
    if (t)
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dt && t->sizes() == x.sizes() &&
                      t->strides() == x.strides(),
                  op, ": grad/gg must be CPU ", dt, " tensors with the shape and strides of x");
  const bool dbl = dt == at::kDouble;
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(x.dim() >= 2 && bias->dim() == 1 && bias->numel() == x.size(1) &&
                    bias->device().is_cpu() && bias->is_floating_point(),
                op, ": bias must be a floating-point CPU tensor of shape (", 
                x.dim() >= 2 ? x.size(1) : -1, ",), got ", bias->sizes());
    b = bias->to(dbl ? at::kDouble : at::kFloat).contiguous();
  }
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  auto go = [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double>)
      run<double, double, OP>(x, g, h, out, b.defined() ? b.const_data_ptr<double>() : nullptr);
    else
      run<float, T, OP>(x, g, h, out, b.defined() ? b.const_data_ptr<float>() : nullptr);
  };
  switch (dt) {
    case at::kFloat: go(float{}); break;
    case at::kHalf: go(c10::Half{}); break;
    case at::kBFloat16: go(c10::BFloat16{}); break;
    default: go(double{}); break;
  }
  return out;
}

at::Tensor swish_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  return swish_op<kFwd>(x, nullptr, nullptr, bias);
}

at::Tensor swish_bwd(const at::Tensor& grad, const at::Tensor& x,
                     const std::optional<at::Tensor>& bias) {
  return swish_op<kBwd>(x, &grad, nullptr, bias);
}

at::Tensor swish_bwd2(const at::Tensor& gg, const at::Tensor& grad, const at::Tensor& x,
                      const std::optional<at::Tensor>& bias) {
  return swish_op<kBwd2>(x, &grad, &gg, bias);
}

int64_t swish_isa() { return int64_t(current_isa()); }

}  // namespace
}  // namespace vaebm::cpu_nn

// The schemas are declared once, in Python (vaebm/ops/_library.py), for every backend; this file
// registers the CPU implementations. The one exception is a diagnostic without tensor arguments
// (so without a dispatch key): 0 scalar, 1 AVX2, 2 AVX-512, the path the Swish kernels take now.
TORCH_LIBRARY_FRAGMENT(vaebm, m) {
  m.def("cpu_swish_isa() -> int", &vaebm::cpu_nn::swish_isa);
}

TORCH_LIBRARY_IMPL(vaebm, CPU, m) {
  m.impl("swish_fwd", &vaebm::cpu_nn::swish_fwd);
  m.impl("swish_bwd", &vaebm::cpu_nn::swish_bwd);
  m.impl("swish_bwd2", &vaebm::cpu_nn::swish_bwd2);
}
