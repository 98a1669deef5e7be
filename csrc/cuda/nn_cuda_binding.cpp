// Torch binding of the CUDA Swish and weight-norm kernels (nn_cuda.cu): CUDA
// implementations of the vaebm:: ops declared in vaebm/ops/_library.py, that check their tensors, fill the plain-C++
// argument structs and launch on the current stream. Lean headers only (no torch/extension.h).
// Contract: vaebm/ops/swish.py and vaebm/ops/weight_norm.py (the backend seam).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "nn_cuda.h"

namespace {

using vaebm::cuda_nn::DType;
using vaebm::cuda_nn::SwishOp;

DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": the cuda backend supports float32, float16 and bfloat16, got ",
              t.scalar_type());
  return DType::kFloat32;  // not reached
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err),
              " (", cudaGetErrorString(err), ")");
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// x (and grad, gg: same dtype, shape, strides) dense, contiguous or channels_last.
at::Tensor swish_cuda(SwishOp kind, const at::Tensor& x, const at::Tensor* g,
                      const at::Tensor* h, const std::optional<at::Tensor>& bias) {
  static const char* names[] = {"vaebm::swish_fwd (CUDA)", "vaebm::swish_bwd (CUDA)",
                                "vaebm::swish_bwd2 (CUDA)"};
  const char* op = names[int(kind)];
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  const DType dt = dtype_of(x, op);
  const bool contiguous = x.is_contiguous();
  TORCH_CHECK(contiguous || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)), op,
              ": x must be contiguous or channels_last, got strides ", x.strides());
  for (const at::Tensor* t : {g, h})
    if (t)
      TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type() &&
                      t->sizes() == x.sizes() && t->strides() == x.strides(),
                  op, ": grad/gg must have x's device, dtype, shape and strides");
  const c10::cuda::CUDAGuard guard(x.device());
  vaebm::cuda_nn::SwishArgs a{};
  at::Tensor b;
  a.channels = a.inner = 1;
  if (bias.has_value()) {
    TORCH_CHECK(x.dim() >= 2 && bias->dim() == 1 && bias->numel() == x.size(1) &&
                    bias->device() == x.device() && bias->is_floating_point(),
                op, ": bias must be a floating-point tensor of shape (C,) on x's device, got ",
                bias->sizes(), " on ", bias->device());
    b = bias->to(at::kFloat).contiguous();
    a.bias = b.const_data_ptr<float>();
    a.channels = x.size(1);
    const int64_t outer = x.size(0) * x.size(1);
    a.inner = contiguous ? (outer > 0 ? x.numel() / outer : 1) : 1;  // channels_last: 1
    if (a.inner < 1) a.inner = 1;
  }
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  a.x = x.const_data_ptr();
  a.g = g ? g->const_data_ptr() : nullptr;
  a.h = h ? h->const_data_ptr() : nullptr;
  a.out = out.data_ptr();
  a.n = x.numel();
  check_launch(vaebm::cuda_nn::launch_swish(kind, dt, a, stream_of(x)), op);
  return out;
}

at::Tensor swish_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  return swish_cuda(SwishOp::kFwd, x, nullptr, nullptr, bias);
}

at::Tensor swish_bwd(const at::Tensor& grad, const at::Tensor& x,
                     const std::optional<at::Tensor>& bias) {
  return swish_cuda(SwishOp::kBwd, x, &grad, nullptr, bias);
}

at::Tensor swish_bwd2(const at::Tensor& gg, const at::Tensor& grad, const at::Tensor& x,
                      const std::optional<at::Tensor>& bias) {
  return swish_cuda(SwishOp::kBwd2, x, &grad, &gg, bias);
}

vaebm::cuda_nn::WeightNormArgs wn_args(const at::Tensor& v, const at::Tensor& log_g,
                                       const char* op) {
  TORCH_CHECK(v.is_cuda() && v.is_contiguous() && v.dim() >= 2, op,
              ": v must be a contiguous CUDA tensor (C_out, ...), got ", v.sizes(), " on ",
              v.device());
  dtype_of(v, op);
  TORCH_CHECK(log_g.device() == v.device() && log_g.is_floating_point() && log_g.dim() == 1 &&
                  log_g.numel() == v.size(0),
              op, ": log_g must be a floating-point (", v.size(0), ",) tensor on ", v.device(),
              ", got ", log_g.sizes(), " on ", log_g.device());
  TORCH_CHECK(v.size(0) <= 0x7fffffffLL, op, ": at most 2^31 - 1 output channels");
  vaebm::cuda_nn::WeightNormArgs a{};
  a.rows = v.size(0);
  a.k = a.rows > 0 ? v.numel() / a.rows : 0;
  a.v = v.const_data_ptr();
  return a;
}

at::Tensor weight_norm_fwd(const at::Tensor& v, const at::Tensor& log_g) {
  constexpr const char* op = "vaebm::weight_norm_fwd (CUDA)";
  vaebm::cuda_nn::WeightNormArgs a = wn_args(v, log_g, op);
  const c10::cuda::CUDAGuard guard(v.device());
  const at::Tensor lg = log_g.to(at::kFloat).contiguous();
  at::Tensor w = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (v.numel() == 0) return w;
  a.log_g = lg.const_data_ptr<float>();
  a.out = w.data_ptr();
  check_launch(vaebm::cuda_nn::launch_weight_norm_fwd(dtype_of(v, op), a, stream_of(v)), op);
  return w;
}

std::tuple<at::Tensor, at::Tensor> weight_norm_bwd(const at::Tensor& grad_w, const at::Tensor& v,
                                                   const at::Tensor& log_g) {
  constexpr const char* op = "vaebm::weight_norm_bwd (CUDA)";
  vaebm::cuda_nn::WeightNormArgs a = wn_args(v, log_g, op);
  TORCH_CHECK(grad_w.device() == v.device() && grad_w.is_contiguous() &&
                  grad_w.scalar_type() == v.scalar_type() && grad_w.sizes() == v.sizes(),
              op, ": grad_w must be a contiguous tensor with v's device, dtype and shape");
  const c10::cuda::CUDAGuard guard(v.device());
  const at::Tensor lg = log_g.to(at::kFloat).contiguous();
  at::Tensor gv = at::empty_like(v, at::MemoryFormat::Contiguous);
  at::Tensor gl = at::empty({v.size(0)}, lg.options());
  if (v.numel() == 0) return {gv, gl.zero_().to(log_g.scalar_type())};
  a.grad_w = grad_w.const_data_ptr();
  a.log_g = lg.const_data_ptr<float>();
  a.out = gv.data_ptr();
  a.grad_log_g = gl.data_ptr<float>();
  check_launch(vaebm::cuda_nn::launch_weight_norm_bwd(dtype_of(v, op), a, stream_of(v)), op);
  return {gv, gl.to(log_g.scalar_type())};
}

}  // namespace

// The schemas are declared once, in Python (vaebm/ops/_library.py), for every backend; this file
// registers the CUDA implementations of the same ops as csrc/cpu/*.cpp.
TORCH_LIBRARY_IMPL(vaebm, CUDA, m) {
  m.impl("swish_fwd", &swish_fwd);
  m.impl("swish_bwd", &swish_bwd);
  m.impl("swish_bwd2", &swish_bwd2);
  m.impl("weight_norm_fwd", &weight_norm_fwd);
  m.impl("weight_norm_bwd", &weight_norm_bwd);
}
