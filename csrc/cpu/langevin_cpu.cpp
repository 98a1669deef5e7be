// CPU backend of the fused Langevin ops: torch.ops.vaebm.langevin_update_ / langevin_reduce.
//
// The update is Eq. 2 of the VAEBM paper (Xiao et al., ICLR 2021) in eps-space with the
// standard-normal base density of Eq. 9:
//     eps <- eps - a (s_i clip(grad E) + lam eps) + b xi,   a = eta / 2,  b = sigma sqrt(eta),
// xi from the counter-based Philox stream of vaebm/ops/philox.py: no noise tensor ever exists,
// the op reads x and g once and writes the result once. Spec: vaebm/ops/langevin_ref.py.
//
// The noise (Philox + Box-Muller) is the expensive part; it runs in explicit SIMD kernels
// (langevin_cpu_simd.h, compiled here for AVX2+FMA and for AVX-512 through `#pragma GCC target`
// and picked at run time, so the library needs no -march flag). The scalar transcription in
// langevin_common.h is the fallback and handles row tails. Work is spread over threads with
// at::parallel_for on (tensor, sample, chunk) items; reductions are summed per item in double
// and combined in a fixed order, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <memory>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "langevin_common.h"

namespace vaebm::cpu {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per work item (a multiple of every SIMD step)

struct Params {
  uint32_t k0, k1, step;        // Philox key (seed halves) and counter word 2
  float a, b, lam, cv, lo, hi;  // cv = 0: no gradient clipping
  bool clamp;                   // lo or hi finite
  uint32_t key[20];             // the (k0, k1) key of each Philox round, for the SIMD kernels

  void schedule_keys() {
    for (uint32_t r = 0; r < 10; ++r) {
      key[2 * r] = k0 + r * 0x9E3779B9u;
      key[2 * r + 1] = k1 + r * 0xBB67AE85u;
    }
  }
};

// Elements [j0, j1) of one sample row of state tensor `tensor`.
struct Span {
  int64_t j0, j1;
  uint32_t sample, tensor;  // Philox counter words 1 and 3 (with the stream)
  float gs;                 // per-sample gradient scale (1 without gscale)
  int mode;                 // kModeUpdate / kModeKeep / kModeReset
};

// ---- scalar paths: the fallback without AVX2, and the row tails of the SIMD kernels ----

// Elements 0..n-1 of x, g, o, given their noise xi (langevin_ref.update_ref, element-wise).
template <class T>
void update_elems(const T* x, const T* g, T* o, const float* xi, int64_t n, float gs, bool reset,
                  const Params& p) {
  for (int64_t e = 0; e < n; ++e) {
    float y = reset ? xi[e]
                    : langevin_elem(float(x[e]), effective_grad(float(g[e]), p.cv, gs), xi[e],
                                    p.a, p.b, p.lam);
    if (p.clamp) y = clamp_keep_nan(y, p.lo, p.hi);
    o[e] = T(y);
  }
}

template <class T>
void update_span_scalar(const T* x, const T* g, T* o, const Span& s, const Params& p) {
  const bool reset = s.mode == kModeReset;
  const uint32_t stream = reset ? kStreamReset : kStreamNoise;
  float xi[4];
  for (int64_t j = s.j0; j < s.j1; j += 4) {
    philox_normal4(uint64_t(p.k1) << 32 | p.k0,
                   philox_counter(uint64_t(j >> 2), s.sample, p.step, s.tensor, stream), xi);
    update_elems(x + j, g + j, o + j, xi, std::min<int64_t>(4, s.j1 - j), s.gs, reset, p);
  }
}

// Adds elements [j0, j1) of one row to the four sums of langevin_ref.reduce_ref (column 1 counts
// the non-finite entries of x and of the raw, unclipped g).
template <class T>
void reduce_elems(const T* x, const T* g, const T* o, int64_t j0, int64_t j1, float gs,
                  const Params& p, double acc[4]) {
  for (int64_t j = j0; j < j1; ++j) {
    const float xv = float(x[j]), graw = float(g[j]);
    const float gv = effective_grad(graw, p.cv, 1.f);
    acc[0] += double(gv) * gv;
    acc[1] += double(!std::isfinite(xv)) + double(!std::isfinite(graw));
    acc[2] += double(xv) * xv;
    if (o) {
      const float d = (float(o[j]) - xv) + p.a * (gv * gs + p.lam * xv);
      acc[3] += double(d) * d;
    }
  }
}

// G2[i] (+)= sum over the row of clip(g)^2 and Z[i] (+)= sum of x * 0 + g * 0 (0 while every
// x and raw g is finite, NaN otherwise), for samples [i0, i1) of one tensor with N (or, N = 0, n)
// elements per row: float loops written for the auto-vectoriser, which vectorises them across
// samples (restrict pointers, no branch in the loop, no byte stores). Compiled once plainly
// (here) and once per ISA (langevin_cpu_simd.h expands this macro in its target region).
#define VAEBM_NARROW_SUMS_N                                                                    \
  template <class T, int N, bool First, bool Clip>                                             \
  void narrow_sums_n(const T* __restrict x, const T* __restrict g, int64_t i0, int64_t i1,     \
                     int64_t n, float cv, float* __restrict G2, float* __restrict Z) {         \
    const int64_t m = N > 0 ? N : n;                                                           \
    for (int64_t i = i0; i < i1; ++i) {                                                        \
      float s = 0.f, z = 0.f;                                                                  \
      for (int64_t j = 0; j < m; ++j) {                                                        \
        const float xv = float(x[i * m + j]), gr = float(g[i * m + j]);                        \
        z += xv * 0.f + gr * 0.f;                                                              \
        const float gv = Clip ? (gr < -cv ? -cv : (gr > cv ? cv : gr)) : gr; /* NaN kept */    \
        s += gv * gv;                                                                          \
      }                                                                                        \
      if (First) {                                                                             \
        G2[i] = s;                                                                             \
        Z[i] = z;                                                                              \
      } else {                                                                                 \
        G2[i] += s;                                                                            \
        Z[i] += z;                                                                             \
      }                                                                                        \
    }                                                                                          \
  }                                                                                            \
  template <class T, int N>                                                                    \
  void narrow_sums_row(const T* x, const T* g, int64_t i0, int64_t i1, int64_t n, float cv,    \
                       bool first, float* G2, float* Z) {                                      \
    if (first && cv > 0.f) return narrow_sums_n<T, N, true, true>(x, g, i0, i1, n, cv, G2, Z);  \
    if (first) return narrow_sums_n<T, N, true, false>(x, g, i0, i1, n, cv, G2, Z);            \
    if (cv > 0.f) return narrow_sums_n<T, N, false, true>(x, g, i0, i1, n, cv, G2, Z);         \
    return narrow_sums_n<T, N, false, false>(x, g, i0, i1, n, cv, G2, Z);                      \
  }                                                                                            \
  /* BAD[i] = Z[i] != 0 or the energy non-finite (ep may be null) */                           \
  inline void narrow_bad(const float* __restrict Z, const float* __restrict ep, int64_t B,     \
                         uint8_t* __restrict BAD) {                                            \
    if (ep)                                                                                    \
      for (int64_t i = 0; i < B; ++i) BAD[i] = uint8_t(!((Z[i] + ep[i] * 0.f) == 0.f));        \
    else                                                                                       \
      for (int64_t i = 0; i < B; ++i) BAD[i] = uint8_t(!(Z[i] == 0.f));                        \
  }
VAEBM_NARROW_SUMS_N

}  // namespace
}  // namespace vaebm::cpu

// ---- AVX2 + FMA (+ F16C for float16): 8 lanes ----
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace vaebm::cpu::avx2 {
namespace {
struct V {
  static constexpr int W = 8;   // lanes
  static constexpr int NB = 4;  // blocks of 4 W elements per step (measured fastest)
  using F = __m256;
  using I = __m256i;
  static F set(float v) { return _mm256_set1_ps(v); }
  static I iset(uint32_t v) { return _mm256_set1_epi32(int(v)); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I ixor(I a, I b) { return _mm256_xor_si256(a, b); }
  static I iand(I a, I b) { return _mm256_and_si256(a, b); }
  static I srai31(I a) { return _mm256_srai_epi32(a, 31); }
  static I srai23(I a) { return _mm256_srai_epi32(a, 23); }
  // Philox on 64-bit lanes (see philox in langevin_cpu_simd.h)
  static I mul_wide(I a, uint32_t m) { return _mm256_mul_epu32(a, iset(m)); }
  static I high_half(I a) { return _mm256_srli_epi64(a, 32); }
  static I xor3(I a, I b, I c) { return ixor(ixor(a, b), c); }
  static void group_lanes(uint32_t g0, I& a, I& b) {
    a = _mm256_add_epi64(_mm256_set1_epi64x(g0), _mm256_setr_epi64x(0, 1, 4, 5));
    b = _mm256_add_epi64(a, _mm256_set1_epi64x(2));
  }
  static I pack_lo(I a, I b) { return asi(_mm256_shuffle_ps(asf(a), asf(b), 0x88)); }
  // 32-bit words u[0..W-1] into the two half-batches of 64-bit lanes that pack_lo reassembles
  // in order (the layout of group_lanes)
  static I loadu_i(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void split_lanes(I u, I& a, I& b) {
    a = _mm256_unpacklo_epi32(u, _mm256_setzero_si256());
    b = _mm256_unpackhi_epi32(u, _mm256_setzero_si256());
  }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static I cvt_nearest(F a) { return _mm256_cvtps_epi32(a); }
  static F asf(I a) { return _mm256_castsi256_ps(a); }
  static I asi(F a) { return _mm256_castps_si256(a); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }    // a b + c
  static F fms(F a, F b, F c) { return _mm256_fmsub_ps(a, b, c); }    // a b - c
  static F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  // a < b ? x : y and a > b ? x : y (false for NaN); (q & 1) ? x : y; v with the sign flipped
  // where q & 2
  static F sel_lt(F a, F b, F x, F y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
  }
  static F sel_gt(F a, F b, F x, F y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ));
  }
  static F sel_odd(I q, F x, F y) { return _mm256_blendv_ps(y, x, asf(_mm256_slli_epi32(q, 31))); }
  static F flip_sign_if_bit1(F v, I q) {
    return asf(ixor(asi(v), _mm256_slli_epi32(iand(q, iset(2)), 30)));
  }
  static int count_nonfinite(F v) {  // !(|v| < inf)
    const F av = _mm256_andnot_ps(set(-0.f), v);
    return __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(av, set(INFINITY), _CMP_NLT_UQ)));
  }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F load(const c10::BFloat16* p) {
    const I u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return asf(_mm256_slli_epi32(u, 16));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store(c10::Half* p, F v) {  // round to nearest even
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
  static void store(c10::BFloat16* p, F v) {  // round to nearest even, NaN -> 0x7FC0 (as c10)
    const I u = asi(v), bias = iadd(iand(_mm256_srli_epi32(u, 16), iset(1)), iset(0x7FFF));
    I r = _mm256_srli_epi32(iadd(u, bias), 16);
    r = asi(_mm256_blendv_ps(asf(r), asf(iset(0x7FC0)), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
  // p[4 l + k] = n_k[l]: the normals of group l are elements 4 l .. 4 l + 3
  static void store_interleaved4(F n0, F n1, F n2, F n3, float* p) {
    const __m256d t0 = _mm256_castps_pd(_mm256_unpacklo_ps(n0, n1));  // groups 0, 1 | 4, 5
    const __m256d t1 = _mm256_castps_pd(_mm256_unpackhi_ps(n0, n1));  // 2, 3 | 6, 7
    const __m256d t2 = _mm256_castps_pd(_mm256_unpacklo_ps(n2, n3));
    const __m256d t3 = _mm256_castps_pd(_mm256_unpackhi_ps(n2, n3));
    const __m256d u0 = _mm256_unpacklo_pd(t0, t2), u1 = _mm256_unpackhi_pd(t0, t2);  // 0|4, 1|5
    const __m256d u2 = _mm256_unpacklo_pd(t1, t3), u3 = _mm256_unpackhi_pd(t1, t3);  // 2|6, 3|7
    double* d = reinterpret_cast<double*>(p);
    _mm256_storeu_pd(d, _mm256_permute2f128_pd(u0, u1, 0x20));
    _mm256_storeu_pd(d + 4, _mm256_permute2f128_pd(u2, u3, 0x20));
    _mm256_storeu_pd(d + 8, _mm256_permute2f128_pd(u0, u1, 0x31));
    _mm256_storeu_pd(d + 12, _mm256_permute2f128_pd(u2, u3, 0x31));
  }
  struct Acc {  // a sum of squares, in double
    __m256d s0, s1;
    Acc() : s0(_mm256_setzero_pd()), s1(_mm256_setzero_pd()) {}  // (defined in this region)
    void add_sq(F v) {
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
      s0 = _mm256_fmadd_pd(lo, lo, s0);
      s1 = _mm256_fmadd_pd(hi, hi, s1);
    }
    double sum() const {
      alignas(32) double t[4];
      _mm256_store_pd(t, _mm256_add_pd(s0, s1));
      return (t[0] + t[1]) + (t[2] + t[3]);
    }
  };
};
}  // namespace
}  // namespace vaebm::cpu::avx2
#define VAEBM_ISA avx2
#include "langevin_cpu_simd.h"
#undef VAEBM_ISA
#pragma GCC pop_options

// ---- AVX-512 (F, DQ, BW, VL): 16 lanes; the same operations as avx2::V ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")
namespace vaebm::cpu::avx512 {
namespace {
struct V {
  static constexpr int W = 16;
  static constexpr int NB = 2;
  using F = __m512;
  using I = __m512i;
  static F set(float v) { return _mm512_set1_ps(v); }
  static I iset(uint32_t v) { return _mm512_set1_epi32(int(v)); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I ixor(I a, I b) { return _mm512_xor_si512(a, b); }
  static I iand(I a, I b) { return _mm512_and_si512(a, b); }
  static I srai31(I a) { return _mm512_srai_epi32(a, 31); }
  static I srai23(I a) { return _mm512_srai_epi32(a, 23); }
  static I mul_wide(I a, uint32_t m) { return _mm512_mul_epu32(a, iset(m)); }
  static I high_half(I a) { return _mm512_srli_epi64(a, 32); }
  static I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static void group_lanes(uint32_t g0, I& a, I& b) {
    a = _mm512_add_epi64(_mm512_set1_epi64(g0), _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13));
    b = _mm512_add_epi64(a, _mm512_set1_epi64(2));
  }
  static I pack_lo(I a, I b) { return asi(_mm512_shuffle_ps(asf(a), asf(b), 0x88)); }
  static I loadu_i(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static void split_lanes(I u, I& a, I& b) {
    a = _mm512_unpacklo_epi32(u, _mm512_setzero_si512());
    b = _mm512_unpackhi_epi32(u, _mm512_setzero_si512());
  }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static I cvt_nearest(F a) { return _mm512_cvtps_epi32(a); }
  static F asf(I a) { return _mm512_castsi512_ps(a); }
  static I asi(F a) { return _mm512_castps_si512(a); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fms(F a, F b, F c) { return _mm512_fmsub_ps(a, b, c); }
  static F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F sel_lt(F a, F b, F x, F y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
  }
  static F sel_gt(F a, F b, F x, F y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x);
  }
  static F sel_odd(I q, F x, F y) {
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(q, iset(1)), y, x);
  }
  static F flip_sign_if_bit1(F v, I q) {
    return asf(ixor(asi(v), _mm512_slli_epi32(iand(q, iset(2)), 30)));
  }
  static int count_nonfinite(F v) {
    return __builtin_popcount(_mm512_cmp_ps_mask(_mm512_abs_ps(v), set(INFINITY), _CMP_NLT_UQ));
  }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load(const c10::BFloat16* p) {
    const I u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return asf(_mm512_slli_epi32(u, 16));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(c10::Half* p, F v) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
  static void store(c10::BFloat16* p, F v) {
    const I u = asi(v), bias = iadd(iand(_mm512_srli_epi32(u, 16), iset(1)), iset(0x7FFF));
    I r = _mm512_srli_epi32(iadd(u, bias), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, iset(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static void store_interleaved4(F n0, F n1, F n2, F n3, float* p) {
    // pairs (n0, n1) and (n2, n3) of groups 0-7 and 8-15, then pairs of pairs
    const I lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const I hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512d a0 = _mm512_castps_pd(_mm512_permutex2var_ps(n0, lo, n1));
    const __m512d a1 = _mm512_castps_pd(_mm512_permutex2var_ps(n0, hi, n1));
    const __m512d b0 = _mm512_castps_pd(_mm512_permutex2var_ps(n2, lo, n3));
    const __m512d b1 = _mm512_castps_pd(_mm512_permutex2var_ps(n2, hi, n3));
    const I q0 = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
    const I q1 = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
    double* d = reinterpret_cast<double*>(p);
    _mm512_storeu_pd(d, _mm512_permutex2var_pd(a0, q0, b0));
    _mm512_storeu_pd(d + 8, _mm512_permutex2var_pd(a0, q1, b0));
    _mm512_storeu_pd(d + 16, _mm512_permutex2var_pd(a1, q0, b1));
    _mm512_storeu_pd(d + 24, _mm512_permutex2var_pd(a1, q1, b1));
  }
  struct Acc {
    __m512d s0, s1;
    Acc() : s0(_mm512_setzero_pd()), s1(_mm512_setzero_pd()) {}
    void add_sq(F v) {
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
      s0 = _mm512_fmadd_pd(lo, lo, s0);
      s1 = _mm512_fmadd_pd(hi, hi, s1);
    }
    double sum() const {
      alignas(64) double t[8];
      _mm512_store_pd(t, _mm512_add_pd(s0, s1));
      return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    }
  };
};
}  // namespace
}  // namespace vaebm::cpu::avx512
#define VAEBM_ISA avx512
#include "langevin_cpu_simd.h"
#undef VAEBM_ISA
#pragma GCC pop_options

// ---- run-time dispatch, work items and the torch ops ----
namespace vaebm::cpu {
namespace {

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa detect_isa() {
  __builtin_cpu_init();
  if (const char* env = std::getenv("VAEBM_CPU_ISA")) {  // testing: force a narrower path
    if (!std::strcmp(env, "scalar")) return Isa::kScalar;
    if (!std::strcmp(env, "avx2")) return Isa::kAvx2;
  }
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  return avx2 ? Isa::kAvx2 : Isa::kScalar;
}

const Isa kIsa = detect_isa();

// A work item: elements [j0, j1) of sample i of tensor k; or, for a narrow tensor (j0 < 0),
// the whole rows i .. j1 - 1 of tensor k, done by the lanes-over-samples kernel.
struct Item {
  int64_t k, i, j0, j1;
};

// Rows shorter than one SIMD step of the wide kernel (4 W NB = 128 elements for both ISAs) go
// to the narrow kernel, whose lanes are samples; the scalar build keeps the per-row path.
constexpr int64_t kNarrow = 128;

bool narrow_rows(int64_t n) { return kIsa != Isa::kScalar && n < kNarrow; }

// (tensor, sample, chunk) work items, or (tensor, row range) for narrow tensors, in a fixed order.
std::vector<Item> work_items(const std::vector<at::Tensor>& xs, bool narrow = true) {
  std::vector<Item> items;
  for (int64_t k = 0; k < int64_t(xs.size()); ++k) {
    const int64_t B = xs[k].size(0), n = xs[k].numel() / B;
    if (narrow && narrow_rows(n)) {
      const int64_t rows = std::max<int64_t>(16, (kChunk / n) & ~int64_t(15));
      for (int64_t i = 0; i < B; i += rows) items.push_back({k, i, -1, std::min(B, i + rows)});
      continue;
    }
    for (int64_t i = 0; i < B; ++i)
      for (int64_t j = 0; j < n; j += kChunk) items.push_back({k, i, j, std::min(n, j + kChunk)});
  }
  return items;
}

// Runs f(item index) over all items, on all threads unless the job is small.
template <class Fn>
void for_items(const std::vector<Item>& items, int64_t total, Fn f) {
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) f(t);
  };
  if (total < 4 * kChunk)
    body(0, int64_t(items.size()));
  else
    at::parallel_for(0, int64_t(items.size()), 1, body);
}

void check_lists(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& gs,
                 const std::vector<at::Tensor>* os) {
  TORCH_CHECK(!xs.empty() && xs.size() == gs.size() && (!os || os->size() == xs.size()),
              "vaebm::langevin (CPU): state, grads (and outs/others) must be non-empty lists of one length");
  const auto dt = xs[0].scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "vaebm::langevin (CPU): dtype must be float32, float16 or bfloat16, got ", dt);
  for (size_t k = 0; k < xs.size(); ++k)
    for (const at::Tensor* t : {&xs[k], &gs[k], os ? &(*os)[k] : &xs[k]}) {
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == dt &&
                      t->dim() >= 1 && t->sizes() == xs[k].sizes() && t->numel() > 0 &&
                      t->size(0) == xs[0].size(0),
                  "vaebm::langevin (CPU): tensor ", k, " must be a non-empty contiguous CPU ", dt,
                  " tensor shaped like state[", k, "] with the batch size of state[0]");
    }
}

template <class T>
void update_span_any(const T* x, const T* g, T* o, const Span& s, const Params& p) {
  if (s.mode == kModeKeep) {  // a rejected step: the old state, bit for bit
    if (o != x) std::memcpy(o + s.j0, x + s.j0, size_t(s.j1 - s.j0) * sizeof(T));
    return;
  }
  switch (kIsa) {
    case Isa::kAvx512: return avx512::update_span(x, g, o, s, p);
    case Isa::kAvx2: return avx2::update_span(x, g, o, s, p);
    default: return update_span_scalar(x, g, o, s, p);
  }
}

template <class T>
void reduce_step_span_any(const T* x, const T* g, const Span& s, const Params& p, double acc[4]) {
  switch (kIsa) {
    case Isa::kAvx512: return avx512::reduce_step_span(x, g, s, p, acc);
    case Isa::kAvx2: return avx2::reduce_step_span(x, g, s, p, acc);
    default: return reduce_elems(x, g, static_cast<const T*>(nullptr), s.j0, s.j1, 1.f, p, acc);
  }
}

template <class T>
void update_checked_span_any(const T* x, const T* g, T* o, const Span& s, const Params& p,
                             T* save, double acc[4]) {
  if (kIsa == Isa::kAvx512) return avx512::update_span<T, true>(x, g, o, s, p, save, acc);
  return avx2::update_span<T, true>(x, g, o, s, p, save, acc);
}

template <class T>
void reduce_span_any(const T* x, const T* g, const T* o, const Span& s, const Params& p,
                     double acc[4]) {
  switch (kIsa) {
    case Isa::kAvx512: return avx512::reduce_span(x, g, o, s, p, acc);
    case Isa::kAvx2: return avx2::reduce_span(x, g, o, s, p, acc);
    default: return reduce_elems(x, g, o, s.j0, s.j1, s.gs, p, acc);
  }
}

Span span_of(const Item& it, const uint32_t* sid, const float* gscale, const int32_t* mode) {
  return Span{it.j0, it.j1, sid ? sid[it.i] : 0u, uint32_t(it.k),
              gscale ? gscale[it.i] : 1.f, mode ? mode[it.i] : int(kModeUpdate)};
}

template <class T>
void update_narrow_any(const T* x, const T* g, T* o, int64_t n, const Item& it,
                       const uint32_t* sid, const float* gscale, const int32_t* mode,
                       const Params& p) {
  if (kIsa == Isa::kAvx512)
    return avx512::update_narrow(x, g, o, n, it.i, it.j1, uint32_t(it.k), sid, gscale, mode, p);
  return avx2::update_narrow(x, g, o, n, it.i, it.j1, uint32_t(it.k), sid, gscale, mode, p);
}

// The Philox sample id of each row: chain_ids when given, else sample_offset + row.
std::vector<uint32_t> sample_ids(int64_t B, int64_t sample_offset, const int64_t* chain_ids) {
  std::vector<uint32_t> sid(size_t(B) + 64);  // padded: the narrow kernel loads NB W at a time
  for (int64_t i = 0; i < B; ++i) sid[i] = uint32_t(chain_ids ? chain_ids[i] : sample_offset + i);
  return sid;
}

template <class T>
void update_impl(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& gs,
                 const std::vector<at::Tensor>& os, const Params& p, const uint32_t* sid,
                 const float* gscale, const int32_t* mode) {
  const auto items = work_items(xs);
  int64_t total = 0;
  for (const auto& x : xs) total += x.numel();
  for_items(items, total, [&](int64_t t) {
    const Item& it = items[t];
    const int64_t n = xs[it.k].numel() / xs[it.k].size(0);
    const T* x = xs[it.k].const_data_ptr<T>();
    const T* g = gs[it.k].const_data_ptr<T>();
    T* o = os[it.k].data_ptr<T>();
    if (it.j0 < 0) return update_narrow_any(x, g, o, n, it, sid, gscale, mode, p);
    const int64_t row = it.i * n;
    update_span_any(x + row, g + row, o + row, span_of(it, sid, gscale, mode), p);
  });
}

// Per-sample sums (langevin_ref.reduce_ref columns 0 and 1: clipped |g|^2 and the non-finite
// count) over every tensor, one thread per sample row, each row summed in a fixed order.
template <class T>
void reduce_rows(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& gs,
                 const Params& p, double* acc /* B x 4 */) {
  const int64_t B = xs[0].size(0);
  int64_t total = 0;
  for (const auto& x : xs) total += x.numel();
  const size_t K = xs.size();
  std::vector<const T*> xp(K), gp(K);
  std::vector<int64_t> ns(K);
  for (size_t k = 0; k < K; ++k) {  // (tensor accessors cost ns per call: hoisted out of rows)
    xp[k] = xs[k].const_data_ptr<T>();
    gp[k] = gs[k].const_data_ptr<T>();
    ns[k] = xs[k].numel() / B;
  }
  // a sample's sums live in locals and reach acc once, at its end (a loop over rows of a few
  // elements was bound by read-modify-write stores into acc); same order of additions as before
  auto body = [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
      for (size_t k = 0; k < K; ++k) {
        const int64_t n = ns[k], row = i * n;
        const T* x = xp[k] + row;
        const T* g = gp[k] + row;
        if (n < kNarrow || kIsa == Isa::kScalar) {  // columns 0 and 1 only: a tight loop
          double g2 = 0.0;
          int64_t nb = 0;
          for (int64_t j = 0; j < n; ++j) {
            const float xv = float(x[j]), graw = float(g[j]);
            nb += !(std::fabs(xv) <= FLT_MAX) + !(std::fabs(graw) <= FLT_MAX);
            const float gv = p.cv > 0.f ? clamp_keep_nan(graw, -p.cv, p.cv) : graw;
            g2 += double(gv) * gv;
          }
          s0 += g2;
          s1 += double(nb);
          continue;
        }
        double t[4] = {s0, s1, s2, s3};
        for (int64_t j = 0; j < n; j += kChunk) {
          const Span sp{j, std::min(n, j + kChunk), 0u, uint32_t(k), 1.f, int(kModeUpdate)};
          reduce_step_span_any(x, g, sp, p, t);
        }
        s0 = t[0], s1 = t[1], s2 = t[2], s3 = t[3];
      }
      double* a = acc + 4 * i;
      a[0] = s0, a[1] = s1, a[2] = s2, a[3] = s3;
    }
  };
  if (total < 4 * kChunk)
    body(0, B);
  else
    at::parallel_for(0, B, 1, body);
}

// The step's sums of a state whose rows are all narrow (fewer than kNarrow elements): G2[i] =
// sum clip(g)^2 in float32, BAD[i] = any x or raw g non-finite, tensor by tensor; the loops
// (narrow_sums_n, in langevin_cpu_simd.h, compiled per ISA) run over samples with the row
// length a constant where it is small, so that the compiler vectorises across samples (a
// per-sample loop over the tensors and a row of 2 elements, summed in double, cost half of a
// (2000, 2) step).
template <class T, int N>
void narrow_sums_any(const T* x, const T* g, int64_t i0, int64_t i1, int64_t n, float cv,
                     bool first, float* G2, float* Z) {
  switch (kIsa) {
    case Isa::kAvx512: return avx512::narrow_sums_row<T, N>(x, g, i0, i1, n, cv, first, G2, Z);
    case Isa::kAvx2: return avx2::narrow_sums_row<T, N>(x, g, i0, i1, n, cv, first, G2, Z);
    default: return narrow_sums_row<T, N>(x, g, i0, i1, n, cv, first, G2, Z);
  }
}

template <class T>
void narrow_sums(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& gs,
                 const Params& p, float* G2, float* Z) {
  const int64_t B = xs[0].size(0);
  int64_t total = 0;
  for (const auto& x : xs) total += x.numel();
  auto body = [&](int64_t i0, int64_t i1) {
    for (size_t k = 0; k < xs.size(); ++k) {
      const T* x = xs[k].const_data_ptr<T>();
      const T* g = gs[k].const_data_ptr<T>();
      const int64_t n = xs[k].numel() / B;
      const bool first = k == 0;
      switch (n) {
        case 1: narrow_sums_any<T, 1>(x, g, i0, i1, n, p.cv, first, G2, Z); break;
        case 2: narrow_sums_any<T, 2>(x, g, i0, i1, n, p.cv, first, G2, Z); break;
        case 3: narrow_sums_any<T, 3>(x, g, i0, i1, n, p.cv, first, G2, Z); break;
        case 4: narrow_sums_any<T, 4>(x, g, i0, i1, n, p.cv, first, G2, Z); break;
        default: narrow_sums_any<T, 0>(x, g, i0, i1, n, p.cv, first, G2, Z);
      }
    }
  };
  if (total < 4 * kChunk)
    body(0, B);
  else
    at::parallel_for(0, B, 1024, body);
}

template <class T>
at::Tensor reduce_impl(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& gs,
                       const std::vector<at::Tensor>* os, const Params& p, const float* gscale) {
  const auto items = work_items(xs, /*narrow=*/false);  // per-row partial sums
  int64_t total = 0;
  for (const auto& x : xs) total += x.numel();
  std::vector<double> part(items.size() * 4, 0.0);  // per item: summed in a fixed order below
  for_items(items, total, [&](int64_t t) {
    const Item& it = items[t];
    const int64_t n = xs[it.k].numel() / xs[it.k].size(0), row = it.i * n;
    reduce_span_any(xs[it.k].const_data_ptr<T>() + row, gs[it.k].const_data_ptr<T>() + row,
                    os ? (*os)[it.k].const_data_ptr<T>() + row : nullptr,
                    span_of(it, nullptr, gscale, nullptr), p, &part[4 * t]);
  });
  const int64_t B = xs[0].size(0);
  std::vector<double> acc(B * 4, 0.0);
  for (size_t t = 0; t < items.size(); ++t)
    for (int c = 0; c < 4; ++c) acc[items[t].i * 4 + c] += part[4 * t + c];
  at::Tensor out = at::zeros({B, 4}, at::kFloat);
  float* po = out.data_ptr<float>();
  for (int64_t q = 0; q < B * 4; ++q) po[q] = float(acc[q]);
  return out;
}

template <class Fn>
void dispatch_dtype(at::ScalarType dt, Fn f) {
  if (dt == at::kFloat) return f(float{});
  if (dt == at::kHalf) return f(c10::Half{});
  return f(c10::BFloat16{});
}

const float* opt_ptr_f32(const std::optional<at::Tensor>& t, int64_t B, const char* what) {
  if (!t) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == B, what,
              " must be a contiguous float32 tensor of shape (B,)");
  return t->const_data_ptr<float>();
}

const int64_t* chain_ids_ptr(const std::optional<at::Tensor>& t, int64_t B) {
  if (!t) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == B &&
                  t->device().is_cpu(),
              "chain_ids must be a contiguous int64 CPU tensor of shape (B,)");
  return t->const_data_ptr<int64_t>();
}

void langevin_update_(at::TensorList states, at::TensorList grads, at::TensorList outs,
                      const at::Tensor& step, int64_t seed_lo, int64_t seed_hi,
                      int64_t sample_offset, double a, double b, double lam, double clip_value,
                      double lo, double hi, const std::optional<at::Tensor>& gscale,
                      const std::optional<at::Tensor>& mode,
                      const std::optional<at::Tensor>& chain_ids) {
  const std::vector<at::Tensor> xs = states.vec(), gs = grads.vec(), os = outs.vec();
  check_lists(xs, gs, &os);
  TORCH_CHECK(step.numel() == 1 && step.device().is_cpu(), "step must be a 1-element CPU tensor");
  const int64_t B = xs[0].size(0);
  const float* gsp = opt_ptr_f32(gscale, B, "gscale");
  const int32_t* modep = nullptr;
  if (mode) {
    TORCH_CHECK(mode->scalar_type() == at::kInt && mode->is_contiguous() && mode->numel() == B,
                "mode must be a contiguous int32 tensor of shape (B,)");
    modep = mode->const_data_ptr<int32_t>();
  }
  Params p{uint32_t(seed_lo), uint32_t(seed_hi), uint32_t(step.item<int64_t>()),
           float(a), float(b), float(lam), float(clip_value), float(lo), float(hi),
           std::isfinite(lo) || std::isfinite(hi), {}};
  p.schedule_keys();
  const auto sid = sample_ids(B, sample_offset, chain_ids_ptr(chain_ids, B));
  dispatch_dtype(xs[0].scalar_type(), [&](auto tag) {
    update_impl<decltype(tag)>(xs, gs, os, p, sid.data(), gsp, modep);
  });
}

// One whole unadjusted step of FusedLangevin in one call (spec: langevin_ref.step_ref):
//   per sample i: g2_i = sum clip(g)^2, bad_i = E_i or any x, g non-finite;
//   s_i = min(1, clip_norm / (sqrt(g2_i) + 1e-12)) (clip_norm > 0), mode_i from bad_i and guard
//   (0: none, 1: keep the old state, 2: restart from N(0, I));
//   x <- the update of langevin_update_ with (s_i, mode_i), in place;
//   the statistics row step % capacity gets E_i (NaN where non-finite), sqrt(g2_i), accepted =
//   !guarded_i, guarded_i; n_guarded += sum guarded_i; then step += 1.
// The per-sample verdict needs all of a sample's gradient before the first element is written;
// on wide states the sums of sample i + 1 are taken while sample i is updated (one sweep, the
// second read from cache), elsewhere in a reduction pass before the update.
void langevin_step_(at::TensorList states, at::TensorList grads,
                    const std::optional<at::Tensor>& energy, const at::Tensor& step,
                    int64_t seed_lo, int64_t seed_hi, int64_t sample_offset,
                    const std::optional<at::Tensor>& chain_ids, double a, double b, double lam,
                    double clip_value, double clip_norm, double lo, double hi, int64_t guard,
                    const std::optional<at::Tensor>& rec,
                    const std::optional<at::Tensor>& n_guarded) {
  const std::vector<at::Tensor> xs = states.vec(), gs = grads.vec();
  check_lists(xs, gs, nullptr);
  TORCH_CHECK(step.numel() == 1 && step.device().is_cpu() && step.scalar_type() == at::kLong &&
                  step.is_contiguous(),
              "step must be a 1-element int64 CPU tensor");
  TORCH_CHECK(guard >= 0 && guard <= 2, "guard must be 0 (none), 1 (keep) or 2 (reset)");
  const int64_t B = xs[0].size(0);
  const float* ep = opt_ptr_f32(energy, B, "energy");
  const int64_t* cid = chain_ids_ptr(chain_ids, B);
  int64_t cap = 0;
  if (rec) {
    TORCH_CHECK(n_guarded && n_guarded->scalar_type() == at::kLong && n_guarded->numel() == 1,
                "n_guarded must be a 1-element int64 tensor");
    TORCH_CHECK(rec->dim() == 3 && rec->size(1) == 4 && rec->size(2) == B &&
                    rec->scalar_type() == at::kFloat && rec->is_contiguous() &&
                    rec->device().is_cpu() && rec->size(0) > 0,
                "rec must be a contiguous float32 CPU (rows, 4, B) tensor");
    cap = rec->size(0);
  }
  int64_t* stepp = step.data_ptr<int64_t>();
  Params p{uint32_t(seed_lo), uint32_t(seed_hi), uint32_t(*stepp),
           float(a), float(b), float(lam), float(clip_value), float(lo), float(hi),
           std::isfinite(lo) || std::isfinite(hi), {}};
  p.schedule_keys();
  const bool need = guard != 0 || clip_norm > 0 || rec;
  // per-sample scratch, every entry written before it is read: left uninitialised (zeroing
  // 64 KB of sums cost a tenth of a (2000, 2) step)
  bool wide = kIsa != Isa::kScalar, all_narrow = true;
  int64_t total = 0;
  for (const auto& x : xs) {
    wide = wide && x.numel() / B >= kNarrow;
    all_narrow = all_narrow && x.numel() / B < kNarrow;
    total += x.numel();
  }
  // (an all-narrow state needs one float per sample here: Z of narrow_sums)
  std::unique_ptr<double[]> acc(need ? new double[all_narrow ? size_t(B + 1) / 2 : size_t(B) * 4]
                                     : nullptr);
  std::unique_ptr<float[]> gsv(clip_norm > 0 ? new float[B] : nullptr);
  std::unique_ptr<float[]> g2f(need ? new float[B] : nullptr);
  std::unique_ptr<int32_t[]> modev(guard != 0 ? new int32_t[B] : nullptr);
  std::unique_ptr<uint8_t[]> bad(need ? new uint8_t[B] : nullptr);
  int64_t n_bad = 0;
  // the verdicts of samples [i0, i1) from their sums (acc rows): straight loops over raw
  // pointers, so that the compiler vectorises them (a lambda over the vectors did not: with the
  // statistics row below they cost as much as the update itself on a (2000, 2) state)
  const double* A = acc.get();
  float* G2 = g2f.get();
  float* GS = gsv.get();
  uint8_t* BAD = bad.get();
  int32_t* MD = modev.get();
  const float cn = float(clip_norm);
  const int32_t md_bad = guard == 2 ? int32_t(kModeReset) : int32_t(kModeKeep);
  // clipping scale and mode from G2 and BAD
  auto decide = [=](int64_t i0, int64_t i1) {
    if (cn > 0)
      for (int64_t i = i0; i < i1; ++i) {
        const float s = cn / (std::sqrt(G2[i]) + 1e-12f);
        GS[i] = (s < 1.f || std::isnan(s)) ? s : 1.f;  // clamp(max=1): NaN stays NaN
      }
    if (guard != 0)
      for (int64_t i = i0; i < i1; ++i) MD[i] = BAD[i] ? md_bad : int32_t(kModeUpdate);
  };
  auto verdicts = [=](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      G2[i] = float(A[4 * i]);
      BAD[i] = uint8_t((ep != nullptr && !(std::fabs(ep[i]) <= FLT_MAX)) | (A[4 * i + 1] > 0));
    }
    decide(i0, i1);
  };
  const auto sid = sample_ids(B, sample_offset, cid);
  dispatch_dtype(xs[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const float* gsp = clip_norm > 0 ? gsv.get() : nullptr;
    const int32_t* mp = guard != 0 ? modev.get() : nullptr;
    static const bool one_pass = !std::getenv("VAEBM_STEP_TWO_PASS");  // A/B switch
    const bool sweep = one_pass && need && wide && total >= 4 * kChunk &&
                       B >= at::get_num_threads();
    // a sample's sums, over all its tensors (rows of sample i), into acc row i
    auto sums = [&](int64_t i) {
      double* a = acc.get() + 4 * i;
      a[0] = a[1] = a[2] = a[3] = 0.0;
      for (size_t k = 0; k < xs.size(); ++k) {
        const int64_t n = xs[k].numel() / B;
        const T* x = xs[k].const_data_ptr<T>() + i * n;
        const T* g = gs[k].const_data_ptr<T>() + i * n;
        for (int64_t j = 0; j < n; j += kChunk) {
          const Span sp{j, std::min(n, j + kChunk), 0u, uint32_t(k), 1.f, int(kModeUpdate)};
          reduce_step_span_any(x, g, sp, p, a);
        }
      }
    };
    // sample i's update with the modes and gradient scales decided (mp, gsp)
    auto update_sample = [&](int64_t i) {
      for (size_t k = 0; k < xs.size(); ++k) {
        const int64_t n = xs[k].numel() / B;
        T* x = xs[k].data_ptr<T>() + i * n;
        const T* g = gs[k].const_data_ptr<T>() + i * n;
        for (int64_t j = 0; j < n; j += kChunk)
          update_span_any(x, g, x, span_of(Item{int64_t(k), i, j, std::min(n, j + kChunk)},
                                           sid.data(), gsp, mp), p);
      }
    };
    if (sweep && clip_norm > 0) {
      // the gradient scale needs the sample's norm before its first element is written: one
      // pass per sample, its sums, then its update while its rows are still in cache
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t i = b0; i < b1; ++i) {
          sums(i);
          verdicts(i, i + 1);
          update_sample(i);
        }
      });
    } else if (sweep) {
      // one sweep: every sample is updated as if good, its sums taken from the x and g the
      // update loads (update_span_checked); a sample found bad afterwards (rare) gets its saved
      // rows back (guard keep: copied aside per thread just before they are overwritten) or is
      // restarted (guard reset). A sample whose energy is already non-finite is not updated.
      int64_t row_len = 0;
      for (const auto& x : xs) row_len += x.numel() / B;
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::unique_ptr<T[]> save(guard == 1 ? new T[size_t(row_len)] : nullptr);
        for (int64_t i = b0; i < b1; ++i) {
          if (guard != 0 && ep != nullptr && !(std::fabs(ep[i]) <= FLT_MAX)) {
            sums(i);
            verdicts(i, i + 1);  // bad: keep or reset
            update_sample(i);
            continue;
          }
          double* a = acc.get() + 4 * i;
          a[0] = a[1] = a[2] = a[3] = 0.0;
          int64_t off = 0;
          for (size_t k = 0; k < xs.size(); ++k) {
            const int64_t n = xs[k].numel() / B;
            T* x = xs[k].data_ptr<T>() + i * n;
            const T* g = gs[k].const_data_ptr<T>() + i * n;
            for (int64_t j = 0; j < n; j += kChunk) {
              const Span sp{j, std::min(n, j + kChunk), sid[i], uint32_t(k), 1.f,
                            int(kModeUpdate)};
              update_checked_span_any(x, g, x, sp, p, save ? save.get() + off : nullptr, a);
            }
            off += n;
          }
          if (p.cv == 0.f && !(std::fabs(a[0]) <= DBL_MAX)) {
            // a non-finite sum of squares: a non-finite g, or an overflow (not a broken chain);
            // recount g exactly (rare), like the reduction pass, which checks g itself
            int64_t nb = 0;
            for (size_t k = 0; k < xs.size(); ++k) {
              const int64_t n = xs[k].numel() / B;
              const T* g = gs[k].const_data_ptr<T>() + i * n;
              for (int64_t j = 0; j < n; ++j) nb += !(std::fabs(float(g[j])) <= FLT_MAX);
            }
            a[1] += double(nb > 0);
          }
          verdicts(i, i + 1);
          if (guard == 0 || !BAD[i]) continue;
          if (guard == 2) {
            update_sample(i);  // MD[i] = reset: fresh noise, whatever was written
            continue;
          }
          off = 0;  // guard keep: the old rows back
          for (size_t k = 0; k < xs.size(); ++k) {
            const int64_t n = xs[k].numel() / B;
            std::memcpy(xs[k].data_ptr<T>() + i * n, save.get() + off, size_t(n) * sizeof(T));
            off += n;
          }
        }
      });
    } else {
      if (need && all_narrow) {
        float* Z = reinterpret_cast<float*>(acc.get());  // (scratch of B * 4 doubles)
        narrow_sums<T>(xs, gs, p, G2, Z);
        if (kIsa == Isa::kAvx512)
          avx512::narrow_bad(Z, ep, B, BAD);
        else if (kIsa == Isa::kAvx2)
          avx2::narrow_bad(Z, ep, B, BAD);
        else
          narrow_bad(Z, ep, B, BAD);
        decide(0, B);
      } else if (need) {
        reduce_rows<T>(xs, gs, p, acc.get());
        verdicts(0, B);
      }
      update_impl<T>(xs, gs, xs, p, sid.data(), gsp, mp);
    }
  });
  if (guard != 0)
    for (int64_t i = 0; i < B; ++i) n_bad += BAD[i];
  if (rec) {
    const int64_t row = ((*stepp % cap) + cap) % cap;
    float* r = rec->data_ptr<float>() + row * 4 * B;  // energy, grad norm, accepted, guarded
    float *re = r, *rg = r + B, *ra = r + 2 * B, *rd = r + 3 * B;
    if (ep)
      for (int64_t i = 0; i < B; ++i) re[i] = std::fabs(ep[i]) <= FLT_MAX ? ep[i] : NAN;
    else
      std::fill(re, re + B, 0.f);
    for (int64_t i = 0; i < B; ++i) rg[i] = std::sqrt(G2[i]);
    if (guard != 0)
      for (int64_t i = 0; i < B; ++i) {
        rd[i] = float(BAD[i]);
        ra[i] = 1.f - rd[i];
      }
    else {
      std::fill(ra, ra + B, 1.f);
      std::fill(rd, rd + B, 0.f);
    }
    *n_guarded->data_ptr<int64_t>() += n_bad;
  }
  *stepp += 1;
}

at::Tensor langevin_reduce(at::TensorList states, at::TensorList grads,
                           std::optional<at::TensorList> others, double a, double lam,
                           double clip_value, const std::optional<at::Tensor>& gscale) {
  const std::vector<at::Tensor> xs = states.vec(), gs = grads.vec();
  std::vector<at::Tensor> os;
  if (others) os = others->vec();
  check_lists(xs, gs, others ? &os : nullptr);
  const float* gsp = opt_ptr_f32(gscale, xs[0].size(0), "gscale");
  const Params p{0, 0, 0, float(a), 0.f, float(lam), float(clip_value), 0.f, 0.f, false, {}};
  at::Tensor out;
  dispatch_dtype(xs[0].scalar_type(), [&](auto tag) {
    out = reduce_impl<decltype(tag)>(xs, gs, others ? &os : nullptr, p, gsp);
  });
  return out;
}

// One uniform per sample: lane 0 of Philox counter (0, sample, step, stream << 24), as
// vaebm.ops.philox.philox_uniform (MALA's accept test; a per-sample loop of scalar Philox).
at::Tensor philox_uniform(const at::Tensor& samples, const at::Tensor& step, int64_t seed_lo,
                          int64_t seed_hi, int64_t stream) {
  TORCH_CHECK(samples.device().is_cpu() && samples.scalar_type() == at::kLong && samples.dim() == 1,
              "philox_uniform: samples must be a 1-D int64 CPU tensor");
  TORCH_CHECK(step.numel() == 1 && step.device().is_cpu(), "step must be a 1-element CPU tensor");
  const at::Tensor ids = samples.contiguous();
  const int64_t B = ids.numel();
  at::Tensor out = at::empty({B}, ids.options().dtype(at::kFloat));
  const int64_t* sp = ids.const_data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const uint64_t st = uint64_t(step.item<int64_t>());
  for (int64_t i = 0; i < B; ++i) {
    const U4 r = philox4x32_10(philox_counter(0, uint64_t(sp[i]), st, 0u, uint32_t(stream)),
                               uint32_t(seed_lo), uint32_t(seed_hi));
    op[i] = u32_to_uniform(r.x);
  }
  return out;
}

}  // namespace
}  // namespace vaebm::cpu

// The schemas of these ops are declared once, in Python (vaebm/ops/_library.py), for every
// backend; this file registers their CPU implementations.
TORCH_LIBRARY_IMPL(vaebm, CPU, m) {
  m.impl("langevin_update_", &vaebm::cpu::langevin_update_);
  m.impl("langevin_reduce", &vaebm::cpu::langevin_reduce);
  m.impl("langevin_step_", &vaebm::cpu::langevin_step_);
  m.impl("philox_uniform", &vaebm::cpu::philox_uniform);
}
