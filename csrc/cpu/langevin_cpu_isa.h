// The AVX2 and AVX-512 vector traits of the fused Langevin kernels, each followed by its
// instantiation of langevin_cpu_simd.h inside its `#pragma GCC target` region. Included once, by
// langevin_cpu.cpp, after the scalar paths (no include guard, no includes of its own: it uses
// that file's includes, Params, Span and scalar helpers).

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
