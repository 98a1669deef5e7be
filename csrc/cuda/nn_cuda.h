// Host interface of the CUDA kernels of the scaled Swish and weight norm (nn_cuda.cu). Plain C++
// and the CUDA runtime API only, no torch: the binding (nn_cuda_binding.cpp) fills these structs.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vaebm {
namespace cuda_nn {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class SwishOp : int32_t { kFwd = 0, kBwd = 1, kBwd2 = 2 };

// One elementwise Swish op over n elements in memory order. x, g, h and out share one dense
// layout; the channel of element i is (i / inner) % channels (contiguous: inner = prod of the
// dims after 1; channels_last: inner = 1).
struct SwishArgs {
  const void* x;
  const void* g;       // bwd, bwd2: grad; else unused
  const void* h;       // bwd2: gg; else unused
  void* out;
  const float* bias;   // (channels,) float32 on the device, or nullptr
  int64_t n;
  int64_t channels;    // >= 1
  int64_t inner;       // >= 1
};

// fwd: out = y s / 1.1; bwd: out = g s (1 + y (1 - s)) / 1.1;
// bwd2: out = h g s (1 - s) (2 + y (1 - 2 s)) / 1.1, with y = x + bias[c], s = sigmoid(y).
cudaError_t launch_swish(SwishOp op, DType dtype, const SwishArgs& a, cudaStream_t stream);

// Weight norm of `rows` rows of `k` contiguous elements each (one row per output channel), all
// rows in one launch. log_g is float32 (rows,); grad_log_g is float32 (rows,) (bwd only).
struct WeightNormArgs {
  const void* v;
  const void* grad_w;   // bwd only
  const float* log_g;
  void* out;            // fwd: w; bwd: grad_v
  float* grad_log_g;    // bwd only
  int64_t rows, k;
};

cudaError_t launch_weight_norm_fwd(DType dtype, const WeightNormArgs& a, cudaStream_t stream);
cudaError_t launch_weight_norm_bwd(DType dtype, const WeightNormArgs& a, cudaStream_t stream);

}  // namespace cuda_nn
}  // namespace vaebm
