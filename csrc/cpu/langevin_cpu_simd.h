// The SIMD kernels of the fused Langevin step, written once against a vector-traits struct `V`.
// Deliberately no include guard and no includes: langevin_cpu.cpp includes this file once per
// instruction set, inside a `#pragma GCC target(...)` region, with VAEBM_ISA naming the namespace
// that holds the matching `V` (avx2::V: 8 lanes, avx512::V: 16 lanes). Every function defined
// here is thereby compiled for that instruction set only and chosen at run time.
//
// Layout: one Philox call makes the 4 normals of a group of 4 consecutive elements; a block of
// 4 W elements takes W Philox calls side by side (in two half-batches of 64-bit lanes), then
// Box-Muller runs on W lanes (lane l = group l) and the normals are interleaved into element
// order. A step does NB blocks at once, for independent dependency chains.
//
// Spec: vaebm/ops/philox.py and vaebm/ops/langevin_ref.py; scalar twin: langevin_common.h.

namespace vaebm::cpu::VAEBM_ISA {
namespace {

using F = V::F;
using I = V::I;
constexpr int W = V::W;

// Within a row only word 0 of the counter (the group index) varies, so part of Philox rounds 1
// and 2 is the same for every group: computed once per row, in scalar, with the round keys.
struct RowConst {
  uint32_t x2, x0b, x2b, w3b;  // xor masks of rounds 1 and 2, and word 3 after round 2
};

inline RowConst row_const(uint32_t sample, uint32_t c3, const Params& p) {
  const uint64_t p1 = uint64_t(0xCD9E8D57u) * p.step;           // round 1: M1 * word 2
  const uint32_t w0 = uint32_t(p1 >> 32) ^ sample ^ p.key[0];   // word 0 after round 1
  const uint64_t q0 = uint64_t(0xD2511F53u) * w0;               // round 2: M0 * word 0
  return {c3 ^ p.key[1], uint32_t(p1) ^ p.key[2], uint32_t(q0 >> 32) ^ p.key[3], uint32_t(q0)};
}

// Philox rounds r0 .. 9 on K batches of W / 2 counters (each word in the low half of a lane).
template <int K>
inline void philox_rounds(I (&c)[K][4], const uint32_t* key, int r0) {
  for (int r = r0; r < 10; ++r)
    for (int h = 0; h < K; ++h) {
      const I p0 = V::mul_wide(c[h][0], 0xD2511F53u), p1 = V::mul_wide(c[h][2], 0xCD9E8D57u);
      c[h][0] = V::xor3(V::high_half(p1), c[h][1], V::iset(key[2 * r]));
      c[h][2] = V::xor3(V::high_half(p0), c[h][3], V::iset(key[2 * r + 1]));
      c[h][1] = p1;
      c[h][3] = p0;
    }
}

// Philox4x32-10 on K independent batches of W / 2 counters (c[h][0] holds the group indices;
// several chains hide the latency of the serial rounds). Each word sits in the low half of a
// 64-bit lane, so one 32x32 -> 64-bit multiply (mul_epu32) yields both halves of a product in
// place: lo is the low half (the high half of a lane is don't-care), hi is the product >> 32.
template <int K>
inline void philox(I (&c)[K][4], const RowConst& rc, const uint32_t* key) {
  for (int h = 0; h < K; ++h) {  // rounds 1 and 2, with the row's constant words folded in
    const I p0 = V::mul_wide(c[h][0], 0xD2511F53u);
    const I p1 = V::mul_wide(V::ixor(V::high_half(p0), V::iset(rc.x2)), 0xCD9E8D57u);
    c[h][0] = V::ixor(V::high_half(p1), V::iset(rc.x0b));
    c[h][1] = p1;
    c[h][2] = V::ixor(p0, V::iset(rc.x2b));
    c[h][3] = V::iset(rc.w3b);
  }
  philox_rounds(c, key, 2);
}

// u32_to_uniform: the word as int32, negative ones mirrored (x ^ (x >> 31) == ~x), times ~2^-31.
inline F uniform(I r) {
  return V::mul(V::cvt(V::ixor(r, V::srai31(r))), V::set(4.6566127342e-10f));
}

// Natural log for u in [1e-7, 1), correctly rounded for ~98% of inputs, else 1 ulp off.
// u = 2^e m with m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact):
//   log u = e ln2 + f - f^2/2 + f^3 P(f),
// P a degree-8 fit of (log1p(f) - f + f^2/2) / f^3 (relative error 7e-10). ln 2 = LN2_HI + LN2_LO
// with e LN2_HI exact; e LN2_HI + f is summed by Fast2Sum (|e LN2_HI| > |f|), keeping its error.
inline F vlog(F u) {
  const I t = V::isub(V::asi(u), V::iset(0x3F3504F3u));  // bits of sqrt(1/2)
  const F e = V::cvt(V::srai23(t));
  const F f = V::sub(V::asf(V::iadd(V::iand(t, V::iset(0x007FFFFFu)), V::iset(0x3F3504F3u))),
                     V::set(1.f));
  F p = V::set(0.0691518337f);
  for (float c : {-0.117897138f, 0.118730098f, -0.12384367f, 0.142186552f, -0.166692495f,
                  0.200022265f, -0.249999866f, 0.333333105f})
    p = V::fma(p, f, V::set(c));
  const F z = V::mul(f, f);
  F y = V::fma(V::set(-0.5f), z, V::mul(V::mul(f, z), p));
  y = V::fma(e, V::set(-2.12194440e-4f), y);  // e LN2_LO
  const F hi = V::mul(e, V::set(0.693359375f)), s = V::add(hi, f);
  return V::add(s, V::add(V::sub(f, V::sub(s, hi)), y));
}

// sin and cos of th in [0, 2 pi], correctly rounded for ~98% of inputs, else 1 ulp off.
// th = q pi/2 + r + rlo with |r| <= pi/4, q = 0..4 (pi/2 in three parts, the first product exact;
// rlo keeps the rounding error of r). With z = r^2 (+ zlo exactly, by FMA):
//   sin(r + rlo) = r + (r z S(z) + rlo cos r),  cos(r + rlo) = h + (hlo + z^2 C(z) - rlo r),
// h + hlo = 1 - z/2 exactly, S and C fits with relative error < 4e-9, each rounded once at the
// end. The quadrant then rotates (sin, cos) by q quarter turns.
inline void vsincos(F th, F& s, F& c) {
  const I q = V::cvt_nearest(V::mul(th, V::set(0.636619747f)));  // 2 / pi
  const F qf = V::cvt(q);
  const F r1 = V::fma(qf, V::set(-1.57079637f), th);
  const F r = V::fma(qf, V::set(4.37113883e-8f), r1);
  const F rlo =
      V::fma(qf, V::set(1.71512451e-15f), V::fma(qf, V::set(4.37113883e-8f), V::sub(r1, r)));
  const F z = V::mul(r, r), zlo = V::fms(r, r, z);
  const F sp = V::fma(V::fma(V::set(-1.95172950e-4f), z, V::set(8.33217800e-3f)), z,
                      V::set(-0.166666552f));
  const F cp = V::fma(V::fma(V::set(2.44384446e-5f), z, V::set(-1.38873677e-3f)), z,
                      V::set(4.16666456e-2f));
  const F h = V::fma(V::set(-0.5f), z, V::set(1.f));
  const F hlo = V::fma(V::set(-0.5f), zlo, V::fma(V::set(-0.5f), z, V::sub(V::set(1.f), h)));
  const F sr = V::add(r, V::fma(V::mul(r, z), sp, V::mul(rlo, h)));
  const F cr = V::add(h, V::fnma(rlo, r, V::fma(V::mul(z, z), cp, hlo)));
  // (sin, cos)(r + q pi/2) = (s, c), (c, -s), (-s, -c), (-c, s) for q mod 4 = 0, 1, 2, 3
  const F s1 = V::sel_odd(q, cr, sr), c1 = V::sel_odd(q, sr, cr);
  s = V::flip_sign_if_bit1(s1, q);
  c = V::flip_sign_if_bit1(c1, V::iadd(q, V::iset(1)));
}

// Box-Muller on W pairs (ua, ub): n0 = r cos th, n1 = r sin th.
inline void box_muller(I ra, I rb, F& n0, F& n1) {
  const F r = V::sqrt(V::mul(V::set(-2.f), vlog(V::max(uniform(ra), V::set(1e-7f)))));
  F s, c;
  vsincos(V::mul(uniform(rb), V::set(6.283185307179586f)), s, c);
  n0 = V::mul(r, c);
  n1 = V::mul(r, s);
}

// Elements per step: NB blocks of 4 W, i.e. NB W Philox calls side by side.
constexpr int NB = V::NB;
constexpr int64_t STEP = 4 * W * NB;
static_assert(kChunk % STEP == 0, "work items must start on a SIMD step");

// The STEP normals of groups g0 .. g0 + NB W - 1 (elements 4 g0 ..), in element order, into xi.
// Philox half-batches 2b and 2b+1 hold groups {0, 1, 4, 5, ..} and {2, 3, 6, 7, ..} of block b
// (V::group_lanes), so that V::pack_lo(even, odd) lists the words of its W groups in order.
inline void normals(uint32_t g0, const RowConst& rc, const Params& p, float* xi) {
  I c[2 * NB][4];
  for (int b = 0; b < NB; ++b) V::group_lanes(g0 + uint32_t(b * W), c[2 * b][0], c[2 * b + 1][0]);
  philox(c, rc, p.key);
  for (int b = 0; b < NB; ++b) {
    const I(&e)[4] = c[2 * b], (&o)[4] = c[2 * b + 1];
    F n0, n1, n2, n3;
    box_muller(V::pack_lo(e[0], o[0]), V::pack_lo(e[1], o[1]), n0, n1);
    box_muller(V::pack_lo(e[2], o[2]), V::pack_lo(e[3], o[3]), n2, n3);
    V::store_interleaved4(n0, n1, n2, n3, xi + 4 * W * b);
  }
}

inline F clamp_keep_nan(F v, F lo, F hi) { return V::sel_lt(v, lo, lo, V::sel_gt(v, hi, hi, v)); }

// The step's reduction (columns 0 and 1 only): sum clip(g)^2 in float32 lanes (four
// accumulators, vector q of a block of 4 W into s[q]; the lanes summed in double at the end) and
// whether any x or raw g is non-finite, found by accumulating v * 0 (0 for finite v, NaN for Inf
// or NaN) instead of counting per vector. Blocks of 4 W elements from the span's start, then
// finish() adds the squared norm to acc[0], 1 to acc[1] if anything was non-finite, and the
// row's tail (scalar). The checked update (update_span<T, true>) adds its vectors in the same
// order, so a sample's sums are the same bit for bit whichever path took them.
struct StepSums {
  F s[4], nan0, nan1;
  StepSums() : nan0(V::set(0.f)), nan1(nan0) { s[0] = s[1] = s[2] = s[3] = nan0; }

  template <class T>
  inline void block(const T* x, const T* g, int64_t j, const Params& p) {
    const F zero = V::set(0.f), cv = V::set(p.cv), ncv = V::set(-p.cv);
    F gv[4];
    for (int q = 0; q < 4; ++q) {
      const F xv = V::load(x + j + q * W);
      gv[q] = V::load(g + j + q * W);
      nan0 = V::fma(xv, zero, nan0);
      nan1 = V::fma(gv[q], zero, nan1);
      if (p.cv > 0.f) gv[q] = clamp_keep_nan(gv[q], ncv, cv);
    }
    for (int q = 0; q < 4; ++q) s[q] = V::fma(gv[q], gv[q], s[q]);
  }

  // blocks from j while whole ones fit in [j, j1), then the scalar tail and the totals
  template <class T>
  void finish(const T* x, const T* g, int64_t j, int64_t j1, const Params& p, double acc[4]) {
    for (; j + 4 * W <= j1; j += 4 * W) block(x, g, j, p);
    alignas(64) float t[W], u[W];
    V::store(t, V::add(V::add(s[0], s[1]), V::add(s[2], s[3])));
    V::store(u, V::add(nan0, nan1));
    double g2 = 0.0;
    bool bad = false;
    for (int l = 0; l < W; ++l) {
      g2 += double(t[l]);
      bad = bad || !(u[l] == 0.f);
    }
    double tail[4] = {0.0, 0.0, 0.0, 0.0};
    reduce_elems(x, g, static_cast<const T*>(nullptr), j, j1, 1.f, p, tail);  // the row's tail
    acc[0] += g2 + tail[0];
    acc[1] += double(bad) + tail[1];
  }
};

template <class T>
void reduce_step_span(const T* x, const T* g, const Span& s, const Params& p, double acc[4]) {
  StepSums r;
  r.finish(x, g, s.j0, s.j1, p, acc);
}

// Elements [s.j0, s.j1) of one sample row (x, g, o point at the row), s.j0 a multiple of STEP.
// Checked (a mode-update span without gradient scale): the update also adds the step's sums of
// the row to acc from the x and g it has loaded (reduce_step_span's, in its order of additions)
// and, when `save` is given, stores the old x there: one sweep over the state instead of a
// reduction pass before the update. Not checked here: raw g when there is no value clipping (a
// non-finite g makes the sum of squares non-finite, which the caller rechecks exactly).
template <class T, bool Checked = false>
void update_span(const T* x, const T* g, T* o, const Span& s, const Params& p,
                 T* save = nullptr, double* acc = nullptr) {
  alignas(64) float xi[STEP];
  const bool reset = s.mode == kModeReset;
  const RowConst rc =
      row_const(s.sample, ((reset ? kStreamReset : kStreamNoise) << 24) | s.tensor, p);
  const F a = V::set(p.a), b = V::set(p.b), lam = V::set(p.lam), gs = V::set(s.gs);
  const F cv = V::set(p.cv), ncv = V::set(-p.cv), lo = V::set(p.lo), hi = V::set(p.hi);
  const F zero = V::set(0.f);
  StepSums r;
  for (int64_t j = s.j0; j < s.j1; j += STEP) {
    normals(uint32_t(j >> 2), rc, p, xi);
    if (s.j1 - j < STEP) {  // the row's last, partial step: scalar
      if constexpr (Checked) {  // before it is written
        if (save) std::memcpy(save + j, x + j, size_t(s.j1 - j) * sizeof(T));
        r.finish(x, g, j, s.j1, p, acc);
      }
      update_elems(x + j, g + j, o + j, xi, s.j1 - j, s.gs, reset, p);
      return;
    }
#pragma GCC unroll 16
    for (int q = 0; q < 4 * NB; ++q) {
      const int64_t e = j + q * W;
      F y = V::load(xi + q * W);
      if (!reset) {  // Eq. 2: y = x - a (s_i clip(g) + lam x) + b xi, op by op as the reference
        const F xv = V::load(x + e);
        F gv = V::load(g + e);
        if constexpr (Checked) {
          if (save) V::store(save + e, xv);
          r.nan0 = V::fma(xv, zero, r.nan0);
          if (p.cv > 0.f) r.nan1 = V::fma(gv, zero, r.nan1);
        }
        if (p.cv > 0.f) gv = clamp_keep_nan(gv, ncv, cv);
        if constexpr (Checked) r.s[q % 4] = V::fma(gv, gv, r.s[q % 4]);
        if (s.gs != 1.f) gv = V::mul(gv, gs);  // (g * 1 == g exactly)
        const F t = V::mul(a, V::add(gv, V::mul(lam, xv)));
        y = V::add(V::sub(xv, t), V::mul(b, y));
      }
      if (p.clamp) y = clamp_keep_nan(y, lo, hi);
      V::store(o + e, y);
    }
  }
  if constexpr (Checked) r.finish(x, g, s.j1, s.j1, p, acc);
}

VAEBM_NARROW_SUMS_N  // the narrow state's sums, vectorised by the compiler for this ISA

// ---- narrow rows (fewer elements per sample than one SIMD step): lanes = samples ----
// A row of n < STEP elements would run entirely in the scalar tail above. Here lane l of a vector
// is sample row r + l instead, so its counter (group, sample id, step, stream | tensor) differs
// from its neighbours' in word 1: Philox runs in full (no row constants), W samples side by side,
// then Box-Muller on W lanes; the few elements of each row are updated in scalar.

// Samples per narrow step: NB blocks of W lanes, NB W Philox calls side by side (independent
// dependency chains; with one block the serial rounds leave the multiplier idle).
constexpr int NL = V::NB * W;

// n[b][q][l]: normal q (element 4 grp + q) of the sample with Philox id ids[b W + l]; with
// `pairs` = 1 only normals 0 and 1 (a row that ends within the group's first two elements, as
// every row of a 2-D state does: the second Box-Muller pair would be thrown away).
inline void normals_lanes(uint32_t grp, const uint32_t* ids, uint32_t word3, const Params& p,
                          float (*n)[4][W], int pairs = 2) {
  I c[2 * V::NB][4];
  for (int b = 0; b < V::NB; ++b)
    V::split_lanes(V::loadu_i(ids + b * W), c[2 * b][1], c[2 * b + 1][1]);
  for (int h = 0; h < 2 * V::NB; ++h) {
    c[h][0] = V::iset(grp);
    c[h][2] = V::iset(p.step);
    c[h][3] = V::iset(word3);
  }
  philox_rounds(c, p.key, 0);
  for (int b = 0; b < V::NB; ++b) {
    const I(&e)[4] = c[2 * b], (&o)[4] = c[2 * b + 1];
    F n0, n1, n2, n3;
    box_muller(V::pack_lo(e[0], o[0]), V::pack_lo(e[1], o[1]), n0, n1);
    V::store(n[b][0], n0);
    V::store(n[b][1], n1);
    if (pairs < 2) continue;
    box_muller(V::pack_lo(e[2], o[2]), V::pack_lo(e[3], o[3]), n2, n3);
    V::store(n[b][2], n2);
    V::store(n[b][3], n3);
  }
}

// Elements [0, cnt) of contiguous rows, given their normals in element order (xi), every row
// in mode update with unit gradient scale: update_span's arithmetic, W elements at a time.
template <class T>
void update_contig(const T* x, const T* g, T* o, const float* xi, int64_t cnt, const Params& p) {
  const F a = V::set(p.a), b = V::set(p.b), lam = V::set(p.lam);
  const F cv = V::set(p.cv), ncv = V::set(-p.cv), lo = V::set(p.lo), hi = V::set(p.hi);
  int64_t e = 0;
  for (; e + W <= cnt; e += W) {
    const F xv = V::load(x + e);
    F gv = V::load(g + e);
    if (p.cv > 0.f) gv = clamp_keep_nan(gv, ncv, cv);
    const F t = V::mul(a, V::add(gv, V::mul(lam, xv)));
    F y = V::add(V::sub(xv, t), V::mul(b, V::load(xi + e)));
    if (p.clamp) y = clamp_keep_nan(y, lo, hi);
    V::store(o + e, y);
  }
  update_elems(x + e, g + e, o + e, xi + e, cnt - e, 1.f, false, p);
}

// Rows [r0, r1) of a tensor with n elements per row (x, g, o point at row 0). sid: the Philox
// sample id of each row; gscale, mode: per row or null. Rows of at most 4 elements (one Philox
// group: every 2-D toy state) whose block of NL rows is all plain updates have their normals
// put in element order and are updated as one contiguous run of vectors (a scalar loop per
// row took half of a (2000, 2) step).
template <class T>
void update_narrow(const T* x, const T* g, T* o, int64_t n, int64_t r0, int64_t r1,
                   uint32_t tensor, const uint32_t* sid, const float* gscale,
                   const int32_t* mode, const Params& p) {
  alignas(64) float nz[V::NB][4][W];
  alignas(64) uint32_t ids[NL];
  const uint32_t w3 = (uint32_t(kStreamNoise) << 24) | tensor;
  const uint64_t seed = uint64_t(p.k1) << 32 | p.k0;
  for (int64_t r = r0; r < r1; r += NL) {
    const int m = int(std::min<int64_t>(NL, r1 - r));
    for (int l = 0; l < NL; ++l) ids[l] = sid[r + std::min(l, m - 1)];
    if (n <= 4 && gscale == nullptr) {
      bool plain = true;
      if (mode)
        for (int l = 0; l < m; ++l) plain = plain && mode[r + l] == kModeUpdate;
      if (plain) {
        normals_lanes(0u, ids, w3, p, nz, n <= 2 ? 1 : 2);
        alignas(64) float xe[NL * 4];
        for (int l = 0; l < m; ++l)
          for (int64_t q = 0; q < n; ++q) xe[l * n + q] = nz[l / W][q][l % W];
        update_contig(x + r * n, g + r * n, o + r * n, xe, m * n, p);
        continue;
      }
    }
    for (int64_t j = 0; j < n; j += 4) {
      const int64_t q1 = std::min<int64_t>(4, n - j);
      normals_lanes(uint32_t(j >> 2), ids, w3, p, nz, q1 <= 2 ? 1 : 2);
      for (int l = 0; l < m; ++l) {
        const int64_t at = (r + l) * n + j;
        const int md = mode ? mode[r + l] : int(kModeUpdate);
        if (md == kModeKeep) {  // a rejected step: the old state, bit for bit
          if (o != x) std::memcpy(o + at, x + at, size_t(q1) * sizeof(T));
          continue;
        }
        const float(&z)[4][W] = nz[l / W];
        float xi[4] = {z[0][l % W], z[1][l % W], z[2][l % W], z[3][l % W]};
        const bool reset = md == kModeReset;
        if (reset)
          philox_normal4(seed, philox_counter(uint64_t(j >> 2), ids[l], p.step, tensor,
                                              kStreamReset), xi);
        update_elems(x + at, g + at, o + at, xi, q1, gscale ? gscale[r + l] : 1.f, reset, p);
      }
    }
  }
}

// Adds the span's four per-sample sums (see langevin_ref.reduce_ref) to acc, in double.
template <class T>
void reduce_span(const T* x, const T* g, const T* o, const Span& s, const Params& p,
                 double acc[4]) {
  typename V::Acc g2, x2, d2;
  int64_t bad = 0, j = s.j0;
  const F a = V::set(p.a), lam = V::set(p.lam), gs = V::set(s.gs);
  const F cv = V::set(p.cv), ncv = V::set(-p.cv);
  for (; j + W <= s.j1; j += W) {
    const F xv = V::load(x + j);
    F gv = V::load(g + j);
    bad += V::count_nonfinite(xv) + V::count_nonfinite(gv);
    if (p.cv > 0.f) gv = clamp_keep_nan(gv, ncv, cv);
    g2.add_sq(gv);
    x2.add_sq(xv);
    if (o) {
      const F t = V::mul(a, V::add(V::mul(gv, gs), V::mul(lam, xv)));
      d2.add_sq(V::add(V::sub(V::load(o + j), xv), t));
    }
  }
  acc[0] += g2.sum();
  acc[1] += double(bad);
  acc[2] += x2.sum();
  acc[3] += d2.sum();
  reduce_elems(x, g, o, j, s.j1, s.gs, p, acc);  // the row's tail
}

}  // namespace
}  // namespace vaebm::cpu::VAEBM_ISA
