// Helpers shared by the standalone CUDA harnesses (qmv_harness.cu, lowbit_harness.cu,
// gemm_harness.cu): the CUDA error check, a seeded xorshift generator for the test data, fp16/bf16
// conversions on the host (round to nearest even), and CUDA-graph timing.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

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

// Microseconds a call, the best of 7 replays of a CUDA graph of `calls` calls; call(i, stream)
// uses copy i of its data (i < ncopies; the copies cycle, so that a call can miss the L2).
inline double graph_us(const std::function<void(int, cudaStream_t)>& call, int ncopies, int calls) {
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (int i = 0; i < ncopies; ++i) call(i, s);  // warm up
  CK(cudaStreamSynchronize(s));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) call(i % ncopies, s);
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  CK(cudaGraphLaunch(ge, s));
  CK(cudaStreamSynchronize(s));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  double best = 1e30;
  for (int r = 0; r < 7; ++r) {
    CK(cudaEventRecord(a, s));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    best = std::min(best, 1000.0 * ms / calls);
  }
  CK(cudaGetLastError());
  cudaGraphExecDestroy(ge), cudaGraphDestroy(g), cudaStreamDestroy(s);
  cudaEventDestroy(a), cudaEventDestroy(b);
  return best;
}
