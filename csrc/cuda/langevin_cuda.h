// Host interface of the CUDA Langevin kernels (langevin_cuda.cu). Plain C++ and the CUDA runtime
// API only, no torch: the binding (langevin_cuda_binding.cpp) fills these structs from tensors.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vaebm {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One state tensor (B, ...) and its companions, all contiguous, of one dtype, on one device.
struct TensorArgs {
  const void* x;  // the state
  const void* g;  // its gradient
  const void* o;  // update: the output (may be x itself); reduce: the other state, or nullptr
  int64_t n;      // elements per sample
};

struct UpdateScalars {
  const int64_t* step;    // device pointer to the step counter (read inside the kernel)
  const float* gscale;    // (B,) per-sample gradient scale, or nullptr for 1
  const int32_t* mode;    // (B,) MODE_UPDATE / MODE_KEEP / MODE_RESET, or nullptr for update
  uint64_t seed;          // Philox key
  int64_t sample_offset;  // sample index of row 0 in the Philox counter
  float a, b, lam;        // y = x - a (s clip(g) + lam x) + b xi
  float clip_value;       // <= 0: no clipping
  float lo, hi;           // clamp bounds (+-inf: none)
};

struct ReduceScalars {
  const float* gscale;  // (B,) or nullptr
  float a, lam;
  float clip_value;  // <= 0: no clipping
};

// One fused update of `count` tensors (one kernel launch unless the list is very long).
// Returns cudaErrorInvalidValue for sizes the kernels cannot index, else the launch status.
cudaError_t launch_update(DType dtype, const TensorArgs* tensors, int count, int64_t batch,
                          const UpdateScalars& s, cudaStream_t stream);

// Columns of the reduce scratch buffer: launch_reduce needs batch * columns * 4 floats.
int64_t reduce_columns(const TensorArgs* tensors, int count);

// Per-sample sums (B, 4) into `out` (see langevin_ref.reduce_ref), deterministic: no atomics,
// a fixed summation order. `partial` is scratch of batch * reduce_columns(...) * 4 floats.
cudaError_t launch_reduce(DType dtype, const TensorArgs* tensors, int count, int64_t batch,
                          const ReduceScalars& s, float* partial, float* out,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace vaebm
