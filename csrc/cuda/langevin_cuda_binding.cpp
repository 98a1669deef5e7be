// Torch binding of the CUDA Langevin kernels (langevin_cuda.cu): CUDA
// implementations of the vaebm:: ops declared in vaebm/ops/_library.py, that check their tensors, fill the plain-C++ argument structs
// and launch on the current stream. Lean headers only (no torch/extension.h): builds in seconds.
//
// The step counter is read by the kernel through a device pointer and all other metadata is
// passed by value, so a launch can be captured in a CUDA graph while the step advances on device.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "langevin_cuda.h"

namespace {

using vaebm::cuda::DType;
using vaebm::cuda::TensorArgs;

// A per-sample size beyond this needs more than 2^31 4-element groups in one row.
constexpr int64_t kMaxPerSample = (int64_t(1) << 33) - 4;

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

void check_like(const at::Tensor& t, const at::Tensor& x0, int64_t k, const char* op,
                const char* what) {
  TORCH_CHECK(t.device() == x0.device(), op, ": ", what, "[", k, "] is on ", t.device(),
              " but state[0] is on ", x0.device());
  TORCH_CHECK(t.scalar_type() == x0.scalar_type(), op, ": ", what, "[", k, "] has dtype ",
              t.scalar_type(), " but state[0] has ", x0.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, "[", k, "] must be contiguous");
  TORCH_CHECK(t.dim() >= 1 && t.size(0) == x0.size(0), op, ": ", what, "[", k,
              "] must have batch size ", x0.size(0), " in dim 0, got shape ", t.sizes());
}

// The per-tensor argument list shared by both ops; `others` may be empty (reduce without it).
std::vector<TensorArgs> tensor_args(at::TensorList states, at::TensorList grads,
                                    at::TensorList others, const char* op) {
  TORCH_CHECK(!states.empty(), op, ": the state list is empty");
  TORCH_CHECK(grads.size() == states.size(), op, ": ", grads.size(), " gradients for ",
              states.size(), " state tensors");
  TORCH_CHECK(others.empty() || others.size() == states.size(), op, ": ", others.size(),
              " outputs/others for ", states.size(), " state tensors");
  const at::Tensor& x0 = states[0];
  TORCH_CHECK(x0.is_cuda(), op, ": state[0] must be a CUDA tensor, got ", x0.device());
  TORCH_CHECK(x0.dim() >= 1 && x0.size(0) > 0, op, ": state[0] must be (B, ...) with B > 0");
  dtype_of(x0, op);
  const int64_t B = x0.size(0);
  std::vector<TensorArgs> args(states.size());
  for (size_t k = 0; k < states.size(); ++k) {
    const auto kk = int64_t(k);
    check_like(states[k], x0, kk, op, "state");
    check_like(grads[k], x0, kk, op, "grads");
    TORCH_CHECK(grads[k].sizes() == states[k].sizes(), op, ": grads[", kk, "] has shape ",
                grads[k].sizes(), " but state[", kk, "] has ", states[k].sizes());
    const void* o = nullptr;
    if (!others.empty()) {
      check_like(others[k], x0, kk, op, "outs/others");
      TORCH_CHECK(others[k].sizes() == states[k].sizes(), op, ": outs/others[", kk,
                  "] has shape ", others[k].sizes(), " but state[", kk, "] has ",
                  states[k].sizes());
      o = others[k].data_ptr();
    }
    const int64_t n = states[k].numel() / B;
    TORCH_CHECK(n > 0, op, ": state[", kk, "] is empty");
    TORCH_CHECK(n <= kMaxPerSample, op, ": state[", kk, "] has ", n,
                " elements per sample; the cuda backend handles at most ", kMaxPerSample);
    args[k] = TensorArgs{states[k].data_ptr(), grads[k].data_ptr(), o, n};
  }
  return args;
}

const float* per_sample_float(const std::optional<at::Tensor>& t, const at::Tensor& x0,
                              const char* op) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == x0.device() && t->scalar_type() == at::kFloat &&
                  t->is_contiguous() && t->numel() == x0.size(0),
              op, ": gscale must be a contiguous float32 (", x0.size(0), ",) tensor on ",
              x0.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  return t->data_ptr<float>();
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err),
              " (", cudaGetErrorString(err), ")");
}

void update_cuda(at::TensorList states, at::TensorList grads, at::TensorList outs,
                 const at::Tensor& step, int64_t seed_lo, int64_t seed_hi, int64_t sample_offset,
                 double a, double b, double lam, double clip_value, double lo, double hi,
                 const std::optional<at::Tensor>& gscale, const std::optional<at::Tensor>& mode,
                 const std::optional<at::Tensor>& chain_ids) {
  constexpr const char* op = "vaebm::langevin_update_ (CUDA)";
  // noise keyed by chain id: the cpp kernel only (vaebm.ops.langevin_update_ runs the reference)
  TORCH_CHECK(!chain_ids.has_value(), op, ": chain_ids are not supported by the CUDA kernel");
  TORCH_CHECK(outs.size() == states.size(), op, ": ", outs.size(), " outputs for ",
              states.size(), " state tensors");
  const std::vector<TensorArgs> args = tensor_args(states, grads, outs, op);
  const at::Tensor& x0 = states[0];
  TORCH_CHECK(step.device() == x0.device() && step.scalar_type() == at::kLong &&
                  step.numel() == 1,
              op, ": step must be a one-element int64 tensor on ", x0.device(), ", got ",
              step.scalar_type(), " ", step.sizes(), " on ", step.device());
  TORCH_CHECK(0 <= seed_lo && seed_lo <= 0xffffffffLL && 0 <= seed_hi && seed_hi <= 0xffffffffLL,
              op, ": seed halves must be 32-bit, got ", seed_lo, " and ", seed_hi);
  const int32_t* mode_p = nullptr;
  if (mode.has_value()) {
    TORCH_CHECK(mode->device() == x0.device() && mode->scalar_type() == at::kInt &&
                    mode->is_contiguous() && mode->numel() == x0.size(0),
                op, ": mode must be a contiguous int32 (", x0.size(0), ",) tensor on ",
                x0.device(), ", got ", mode->scalar_type(), " ", mode->sizes(), " on ",
                mode->device());
    mode_p = mode->data_ptr<int32_t>();
  }
  vaebm::cuda::UpdateScalars s{};
  s.step = step.data_ptr<int64_t>();
  s.gscale = per_sample_float(gscale, x0, op);
  s.mode = mode_p;
  s.seed = (uint64_t(seed_hi) << 32) | uint64_t(seed_lo);
  s.sample_offset = sample_offset;
  s.a = float(a);
  s.b = float(b);
  s.lam = float(lam);
  s.clip_value = float(clip_value);
  s.lo = float(lo);
  s.hi = float(hi);
  const c10::cuda::CUDAGuard guard(x0.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x0.device().index()).stream();
  check_launch(vaebm::cuda::launch_update(dtype_of(x0, op), args.data(), int(args.size()),
                                          x0.size(0), s, stream),
               op);
}

at::Tensor reduce_cuda(at::TensorList states, at::TensorList grads,
                       const std::optional<at::TensorList>& others, double a, double lam,
                       double clip_value, const std::optional<at::Tensor>& gscale) {
  constexpr const char* op = "vaebm::langevin_reduce (CUDA)";
  const std::vector<TensorArgs> args =
      tensor_args(states, grads, others.has_value() ? *others : at::TensorList(), op);
  const at::Tensor& x0 = states[0];
  const int64_t B = x0.size(0);
  vaebm::cuda::ReduceScalars s{};
  s.gscale = per_sample_float(gscale, x0, op);
  s.a = float(a);
  s.lam = float(lam);
  s.clip_value = float(clip_value);
  const c10::cuda::CUDAGuard guard(x0.device());
  const auto opts = x0.options().dtype(at::kFloat);
  const int64_t columns = vaebm::cuda::reduce_columns(args.data(), int(args.size()));
  at::Tensor partial = at::empty({B, columns, 4}, opts);
  at::Tensor out = at::empty({B, 4}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x0.device().index()).stream();
  check_launch(vaebm::cuda::launch_reduce(dtype_of(x0, op), args.data(), int(args.size()), B, s,
                                          partial.data_ptr<float>(), out.data_ptr<float>(),
                                          stream),
               op);
  return out;
}

}  // namespace

// The schemas are declared once, in Python (vaebm/ops/_library.py), for every backend; this
// file registers the CUDA implementations of the ops of csrc/cpu/langevin_cpu.cpp (not
// langevin_step_, which has a CPU kernel only). `outs` may be the states (in place).
TORCH_LIBRARY_IMPL(vaebm, CUDA, m) {
  m.impl("langevin_update_", &update_cuda);
  m.impl("langevin_reduce", &reduce_cuda);
}
