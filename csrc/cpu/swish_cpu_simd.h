// SIMD body of the scaled Swish kernels (swish_cpu.cpp), written once against a vector-traits
// struct `V`. Deliberately no include guard and no includes: swish_cpu.cpp includes this file
// once per instruction set inside a `#pragma GCC target(...)` region, with VAEBM_NN_ISA naming
// the namespace whose `V` matches (avx2::V: 8 lanes, avx512::V: 16 lanes), so everything here is
// compiled for that instruction set only and chosen at run time.
//
// Spec: _torch_fwd / _torch_bwd / _torch_bwd2 in vaebm/ops/swish.py; maths in swish_cpu.cpp.

namespace vaebm::cpu_nn::VAEBM_NN_ISA {
namespace {

using F = V::F;
constexpr int W = V::W;

// e^t for t <= 0: t = n ln2 + r, |r| <= ln2 / 2 (ln 2 in two parts, n ln2_hi exact), e^r by its
// degree-7 Taylor polynomial (truncation < 6e-9 relative), times 2^n as 2^a 2^(n - a), a = n / 2,
// both normal, so results down in the subnormal range round once, like libm's. Below -103.98
// (e^t under half the smallest subnormal) the result is 0; NaN gives 0 too, and the caller's y
// carries the NaN into every output.
inline F vexp_neg(F t) {
  const F lo = V::set(-103.98f);
  const auto keep = V::ge(t, lo);  // lanes where t >= lo
  t = V::max(t, lo);               // NaN -> lo (max returns its second operand)
  const F n = V::round(V::mul(t, V::set(1.44269504f)));
  const F r = V::fma(n, V::set(2.12194440e-4f),          // - n * LN2_LO
                     V::fma(n, V::set(-0.693359375f), t));  // t - n * LN2_HI
  F p = V::set(1.f / 5040.f);
  for (float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = V::fma(p, r, V::set(c));
  return V::zero_unless(V::mul_pow2(p, n), keep);
}

// y = x + b; s = sigmoid(y) and sc = 1 - s, both from e = exp(-|y|) (see swish_cpu.cpp).
inline void sigmoid2(F y, F& s, F& sc) {
  const F e = vexp_neg(V::neg_abs(y));
  const F r = V::div(V::set(1.f), V::add(V::set(1.f), e));
  const F er = V::mul(e, r);
  const auto pos = V::ge(y, V::set(0.f));
  s = V::blend(pos, r, er);
  sc = V::blend(pos, er, r);
}

template <int OP>
inline F swish_vec(F x, F b, F g, F h) {
  const F y = V::add(x, b);
  F s, sc;
  sigmoid2(y, s, sc);
  const F k = V::set(kScale);
  if (OP == kFwd) return V::mul(V::mul(y, s), k);
  if (OP == kBwd) return V::mul(V::mul(g, V::mul(s, V::fma(y, sc, V::set(1.f)))), k);
  // kBwd2: gg * grad * s (1 - s) (2 + y (1 - 2 s))
  const F d2 = V::mul(V::mul(s, sc), V::fma(y, V::sub(sc, s), V::set(2.f)));
  return V::mul(V::mul(V::mul(h, g), d2), k);
}

// Elements [0, n) of one span; the bias is bvec[j] (VB) or the scalar bsc.
template <class T, int OP, bool VB>
void swish_span(const T* x, const T* g, const T* h, T* o, int64_t n, const float* bvec,
                float bsc) {
  const F bs = V::set(bsc);
  const F zero = V::set(0.f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const F b = VB ? V::load(bvec + j) : bs;
    const F gv = OP != kFwd ? V::load(g + j) : zero;
    const F hv = OP == kBwd2 ? V::load(h + j) : zero;
    V::store(o + j, swish_vec<OP>(V::load(x + j), b, gv, hv));
  }
  if (j == n) return;
  // the tail goes through the same vector code on a zero-padded copy: every element of a tensor
  // gets bit-identical maths wherever it sits
  alignas(64) float bx[W] = {}, bb[W] = {}, bg[W] = {}, bh[W] = {}, bo[W];
  const int64_t m = n - j;
  for (int64_t l = 0; l < m; ++l) {
    bx[l] = float(x[j + l]);
    bb[l] = VB ? bvec[j + l] : bsc;
    if (OP != kFwd) bg[l] = float(g[j + l]);
    if (OP == kBwd2) bh[l] = float(h[j + l]);
  }
  V::store(bo, swish_vec<OP>(V::load(bx), V::load(bb), V::load(bg), V::load(bh)));
  for (int64_t l = 0; l < m; ++l) o[j + l] = T(bo[l]);
}

}  // namespace
}  // namespace vaebm::cpu_nn::VAEBM_NN_ISA
