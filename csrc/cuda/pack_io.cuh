// Storage <-> float conversion and 4-element vector accesses, shared by the CUDA kernels
// (langevin_cuda.cu, nn_cuda.cu). No torch headers; with -DVAEBM_CUDA_EMULATE the functions
// are plain host code, so the kernels' CPU emulation tests cover them too.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if defined(VAEBM_CUDA_EMULATE)
#define VAEBM_IO_HD inline
#else
#define VAEBM_IO_HD __host__ __device__ __forceinline__
#endif

namespace vaebm {
namespace cuda_io {

// dtype handling: storage T, arithmetic in float. Explicit conversions only (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__ and friends).

template <class T>
struct Io;
template <>
struct Io<float> {
  static VAEBM_IO_HD float to_float(float v) { return v; }
  static VAEBM_IO_HD float from_float(float v) { return v; }
};
template <>
struct Io<__half> {
  static VAEBM_IO_HD float to_float(__half v) { return __half2float(v); }
  static VAEBM_IO_HD __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Io<__nv_bfloat16> {
  static VAEBM_IO_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static VAEBM_IO_HD __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// Four consecutive elements: one 16-byte (fp32) or 8-byte (fp16/bf16) memory access.
template <class T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Loads cnt (1..4) elements as float; a whole aligned pack in one vector access.
template <class T>
VAEBM_IO_HD void load4(const T* p, bool vec, int cnt, float out[4]) {
  if (vec) {
    const Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(p);
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = Io<T>::to_float(pk.v[l]);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = l < cnt ? Io<T>::to_float(p[l]) : 0.f;
  }
}

template <class T>
VAEBM_IO_HD void store4(T* p, bool vec, int cnt, const float in[4]) {
  if (vec) {
    Pack4<T> pk;
#pragma unroll
    for (int l = 0; l < 4; ++l) pk.v[l] = Io<T>::from_float(in[l]);
    *reinterpret_cast<Pack4<T>*>(p) = pk;
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (l < cnt) p[l] = Io<T>::from_float(in[l]);
  }
}

// Whether p (or no pointer) allows Pack4<T> vector accesses.
template <class T>
bool pack_aligned(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % sizeof(Pack4<T>) == 0;
}

}  // namespace cuda_io
}  // namespace vaebm
