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
//
// One translation unit in four files: this one (scalar paths, dispatch, work items, the update,
// reduction and uniform ops, registration), langevin_cpu_isa.h (the AVX2 / AVX-512 vector
// traits, each instantiating langevin_cpu_simd.h, the SIMD kernels written once) and
// langevin_cpu_step.h (the one-call step op).
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

#include "langevin_cpu_isa.h"


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

#include "langevin_cpu_step.h"

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
