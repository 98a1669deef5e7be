// Scalar maths of the fused Langevin step, shared by the C++ CPU and the CUDA kernels.
// The specification is vaebm/ops/langevin_ref.py and vaebm/ops/philox.py; this header is a
// line-for-line transcription of it and must stay one. No torch headers here: nvcc compiles it
// on its own.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VAEBM_HD __host__ __device__ __forceinline__
#else
#define VAEBM_HD inline
#endif

namespace vaebm {

enum : int32_t { kModeUpdate = 0, kModeKeep = 1, kModeReset = 2 };
enum : uint32_t { kStreamNoise = 0, kStreamAccept = 1, kStreamReset = 2 };

struct U4 {
  uint32_t x, y, z, w;
};

// Philox4x32-10 (Salmon et al., SC'11): counter c, key (k0, k1).
VAEBM_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c.x;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c.z;
    c = U4{uint32_t(p1 >> 32) ^ c.y ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ c.w ^ k1,
           uint32_t(p0)};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// Triton's uint_to_uniform_float: the word as int32, negative ones mirrored, times ~2^-31.
VAEBM_HD float u32_to_uniform(uint32_t r) {
  int32_t x = int32_t(r);
  x = x < 0 ? ~x : x;
  return float(x) * 4.6566127342e-10f;
}

// Box-Muller on one pair of uniforms (Triton's pair_uniform_to_normal).
VAEBM_HD void box_muller(float ua, float ub, float* n0, float* n1) {
  const float r = sqrtf(-2.0f * logf(fmaxf(ua, 1e-7f)));
  const float th = 6.283185307179586f * ub;
  *n0 = r * cosf(th);
  *n1 = r * sinf(th);
}

// The counter of element group g (= j >> 2) of one sample of state tensor `tensor`.
VAEBM_HD U4 philox_counter(uint64_t group, uint64_t sample, uint64_t step, uint32_t tensor,
                           uint32_t stream) {
  return U4{uint32_t(group), uint32_t(sample), uint32_t(step), (stream << 24) | tensor};
}

// The four normals of one counter, lanes 0..3.
VAEBM_HD void philox_normal4(uint64_t seed, U4 counter, float n[4]) {
  const U4 r = philox4x32_10(counter, uint32_t(seed), uint32_t(seed >> 32));
  box_muller(u32_to_uniform(r.x), u32_to_uniform(r.y), &n[0], &n[1]);
  box_muller(u32_to_uniform(r.z), u32_to_uniform(r.w), &n[2], &n[3]);
}

// NaN-preserving clamp (a comparison with NaN is false, so NaN passes through), like torch.clamp.
VAEBM_HD float clamp_keep_nan(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// The gradient as the update sees it: clipped by value (cv > 0), scaled per sample.
VAEBM_HD float effective_grad(float g, float cv, float gscale) {
  if (cv > 0.f) g = clamp_keep_nan(g, -cv, cv);
  return g * gscale;
}

// One element of the update (Eq. 2 with the base-density term of Eq. 9):
//   y = x - a * (g + lam * x) + b * xi,   a = eta / 2,  b = sigma * sqrt(eta)
VAEBM_HD float langevin_elem(float x, float g, float xi, float a, float b, float lam) {
  return x - a * (g + lam * x) + b * xi;
}

}  // namespace vaebm
