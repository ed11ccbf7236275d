// Helpers shared by the standalone CUDA harnesses (qmv_harness.cu, gemm_harness.cu): the CUDA
// error check, a seeded xorshift generator for the test data, and fp16/bf16 conversions on the
// host (round to nearest even).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

// xorshift64; each harness seeds it (harness_seed) so that its data stays what it was.
inline uint64_t& rng_state() {
  static uint64_t s = 0x9E3779B97F4A7C15ull;
  return s;
}
inline void harness_seed(uint64_t seed) { rng_state() = seed; }
inline uint64_t rnd() {
  uint64_t& s = rng_state();
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}
inline float urand() { return (rnd() >> 40) * (1.0f / 16777216.0f); }  // [0, 1)

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// fp16 (half) or bf16 bits of f, and back
inline uint16_t to_h(float f, bool half) {
  if (!half) return to_bf16(f);
  __half h = __float2half_rn(f);
  uint16_t r;
  std::memcpy(&r, &h, 2);
  return r;
}
inline float from_h(uint16_t v, bool half) {
  if (!half) return from_bf16(v);
  __half h;
  std::memcpy(&h, &v, 2);
  return __half2float(h);
}
