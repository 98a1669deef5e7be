// CPU backend of the weight-norm reparameterisation (Salimans & Kingma 2016, with the log-scale
// parameter of the VAEBM/NVAE convs): torch.ops.vaebm.weight_norm_fwd / weight_norm_bwd.
//
// Per output channel o, with v_o = v[o].flatten(), n_o = max(||v_o||, EPS), g_o = exp(log_g[o]):
//     w[o]          = (g_o / n_o) v_o
//     dL/dv[o]      = (g_o / n_o) (G_o - (<G_o, v_o> / n_o^2) v_o)          (G = dL/dw)
//     dL/dlog_g[o]  = g_o <G_o, v_o> / n_o
// Spec: _torch_fwd / _torch_bwd in vaebm/ops/weight_norm.py. Rows are independent: threads take
// whole rows; row sums are float blocks added in double (see dot), the rest is float32
// arithmetic for float32/float16/bfloat16 and double for float64.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

namespace vaebm::cpu_nn {
namespace {

constexpr double kEps = 1e-12;  // as weight_norm.EPS
constexpr int64_t kRowWork = 1 << 14;  // elements per parallel work unit (at least)

template <class T>
using Compute = std::conditional_t<std::is_same_v<T, double>, double, float>;

// sum_j a_j b_j over a row: float partial sums over blocks of kBlock elements (vectorised by
// the compiler, error ~1e-7 relative per block), the blocks summed in double.
constexpr int64_t kBlock = 64;

template <class T>
double dot(const T* a, const T* b, int64_t k) {
  double acc = 0.0;
  for (int64_t j0 = 0; j0 < k; j0 += kBlock) {
    const int64_t j1 = std::min(k, j0 + kBlock);
    if constexpr (std::is_same_v<T, double>) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = j0; j < j1; ++j) acc += a[j] * b[j];
    } else {
      float part = 0.f;
#pragma omp simd reduction(+ : part)
      for (int64_t j = j0; j < j1; ++j) part += float(a[j]) * float(b[j]);
      acc += double(part);
    }
  }
  return acc;
}

template <class T>
void fwd_impl(const at::Tensor& v, const at::Tensor& lg, const at::Tensor& w) {
  using C = Compute<T>;
  const int64_t rows = v.size(0), k = v.numel() / rows;
  const T* vp = v.const_data_ptr<T>();
  const C* gp = lg.const_data_ptr<C>();
  T* wp = w.data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kRowWork / std::max<int64_t>(k, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* vr = vp + r * k;
      T* wr = wp + r * k;
      const C norm = std::max(C(std::sqrt(dot(vr, vr, k))), C(kEps));
      const C a = C(std::exp(gp[r])) / norm;
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) wr[j] = T(C(vr[j]) * a);
    }
  });
}

template <class T>
void bwd_impl(const at::Tensor& G, const at::Tensor& v, const at::Tensor& lg,
              const at::Tensor& gv, const at::Tensor& glg) {
  using C = Compute<T>;
  const int64_t rows = v.size(0), k = v.numel() / rows;
  const T* vp = v.const_data_ptr<T>();
  const T* Gp = G.const_data_ptr<T>();
  const C* gp = lg.const_data_ptr<C>();
  T* gvp = gv.data_ptr<T>();
  C* glp = glg.data_ptr<C>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kRowWork / std::max<int64_t>(k, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* vr = vp + r * k;
      const T* Gr = Gp + r * k;
      T* out = gvp + r * k;
      const C norm = std::max(C(std::sqrt(dot(vr, vr, k))), C(kEps));
      const C g = C(std::exp(gp[r]));
      const C proj = C(dot(Gr, vr, k)) / norm;  // <G, v / ||v||>
      const C a = g / norm, c = proj / norm;
      glp[r] = g * proj;
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) out[j] = T(a * (C(Gr[j]) - c * C(vr[j])));
    }
  });
}

template <class Fn>
void dispatch(at::ScalarType dt, Fn f) {
  switch (dt) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: return f(double{});
  }
}

void check(const at::Tensor& v, const at::Tensor& log_g, const char* op) {
  const auto dt = v.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              op, ": dtype must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(v.device().is_cpu() && v.is_contiguous() && v.dim() >= 2, op,
              ": v must be a contiguous CPU tensor (C_out, ...), got ", v.sizes());
  TORCH_CHECK(log_g.device().is_cpu() && log_g.is_floating_point() && log_g.dim() == 1 &&
                  log_g.numel() == v.size(0),
              op, ": log_g must be a floating-point CPU tensor of shape (", v.size(0),
              ",), got ", log_g.sizes());
}

at::ScalarType compute_type(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor weight_norm_fwd(const at::Tensor& v, const at::Tensor& log_g) {
  check(v, log_g, "vaebm::weight_norm_fwd");
  const at::Tensor lg = log_g.to(compute_type(v.scalar_type())).contiguous();
  at::Tensor w = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (v.numel() == 0) return w;
  dispatch(v.scalar_type(), [&](auto tag) { fwd_impl<decltype(tag)>(v, lg, w); });
  return w;
}

std::tuple<at::Tensor, at::Tensor> weight_norm_bwd(const at::Tensor& grad_w, const at::Tensor& v,
                                                   const at::Tensor& log_g) {
  constexpr const char* op = "vaebm::weight_norm_bwd";
  check(v, log_g, op);
  TORCH_CHECK(grad_w.device().is_cpu() && grad_w.is_contiguous() &&
                  grad_w.scalar_type() == v.scalar_type() && grad_w.sizes() == v.sizes(),
              op, ": grad_w must be a contiguous CPU tensor with v's dtype and shape");
  const auto ct = compute_type(v.scalar_type());
  const at::Tensor lg = log_g.to(ct).contiguous();
  at::Tensor gv = at::empty_like(v, at::MemoryFormat::Contiguous);
  at::Tensor glg = at::empty({v.size(0)}, lg.options());
  if (v.numel() == 0) return {gv, glg.zero_().to(log_g.scalar_type())};
  dispatch(v.scalar_type(), [&](auto tag) { bwd_impl<decltype(tag)>(grad_w, v, lg, gv, glg); });
  return {gv, glg.to(log_g.scalar_type())};
}

}  // namespace
}  // namespace vaebm::cpu_nn

// schemas: vaebm/ops/_library.py
TORCH_LIBRARY_IMPL(vaebm, CPU, m) {
  m.impl("weight_norm_fwd", &vaebm::cpu_nn::weight_norm_fwd);
  m.impl("weight_norm_bwd", &vaebm::cpu_nn::weight_norm_bwd);
}
