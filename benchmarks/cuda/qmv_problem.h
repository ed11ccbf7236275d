// The device side of a decode problem, shared by qmv_harness.cu and lowbit_harness.cu. Each
// harness's Problem holds its shape (N, K, GS, M, half, G()), host data (w, s, b, x) and the
// device buffers below; it generates the host data its own way, then:
//   upload(P, copies)  `copies` device copies of w, s and b (a timing cycles through them to
//                      miss the L2), one of x, and y (M x N)
//   params(P, c)       the QmvParams of copy c
//   release(P)         frees what upload allocated
// and, for both harnesses, Launch (a kernel launch under test), check_float64 (one launch's
// output against the float64 product) and read_kernel_f (a plain streaming read: the floor).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <functional>
#include <vector>

#include "cuda/kernels.cuh"
#include "harness.h"

template <typename Problem>
void upload(Problem& P, int copies) {
  P.copies = copies;
  for (int c = 0; c < copies; ++c) {
    uint32_t* w;
    uint16_t *s, *b;
    CK(cudaMalloc(&w, P.w.size() * 4));
    CK(cudaMalloc(&s, P.s.size() * 2));
    CK(cudaMalloc(&b, P.b.size() * 2));
    CK(cudaMemcpy(w, P.w.data(), P.w.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(s, P.s.data(), P.s.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(b, P.b.data(), P.b.size() * 2, cudaMemcpyHostToDevice));
    P.dw.push_back(w), P.ds.push_back(s), P.db.push_back(b);
  }
  CK(cudaMalloc(&P.dx, P.x.size() * 2));
  CK(cudaMemcpy(P.dx, P.x.data(), P.x.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&P.dy, P.M * P.N * 2));
}

template <typename Problem>
void release(Problem& P) {
  for (int c = 0; c < P.copies; ++c) cudaFree(P.dw[c]), cudaFree(P.ds[c]), cudaFree(P.db[c]);
  cudaFree(P.dx), cudaFree(P.dy);
}

template <typename Problem>
mlxq::cuda::QmvParams params(const Problem& P, int c) {
  mlxq::cuda::QmvParams p;
  p.w = P.dw[c];
  p.scales = P.ds[c];
  p.biases = P.db[c];
  p.x = P.dx;
  p.y = P.dy;
  p.N = P.N;
  p.K = P.K;
  p.G = P.G();
  p.M = P.M;
  p.group_shift = P.GS == 32 ? 5 : (P.GS == 64 ? 6 : 7);
  p.scale_type = P.half ? mlxq::cuda::ScaleType::kHalf : mlxq::cuda::ScaleType::kBFloat16;
  return p;
}

using Launch = std::function<void(const mlxq::cuda::QmvParams&, cudaStream_t)>;

// fn on copy 0 (y poisoned with NaN first) against the float64 product of x and the dequantized
// W over the first `rows` rows; code(n, k): W's integer code at (n, k). worst: the largest error
// over its bound (fp32 sums of K terms, the output rounded once); bad: outputs past the bound.
struct CheckResult {
  double worst = 0;
  int64_t bad = 0;
};

template <typename Problem, typename Code>
CheckResult check_float64(Problem& P, const Launch& fn, int64_t rows, const Code& code) {
  CK(cudaMemset(P.dy, 0xFF, P.M * P.N * 2));  // poison: NaN in both dtypes
  fn(params(P, 0), 0);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> y(P.M * P.N);
  CK(cudaMemcpy(y.data(), P.dy, y.size() * 2, cudaMemcpyDeviceToHost));
  const int64_t G = P.G();
  const double eps = P.half ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
  CheckResult out;
  for (int m = 0; m < P.M; ++m) {
    for (int64_t n = 0; n < rows; ++n) {
      double ref = 0, bound = 0;
      for (int64_t k = 0; k < P.K; ++k) {
        const double s = from_h(P.s[n * G + k / P.GS], P.half);
        const double b = from_h(P.b[n * G + k / P.GS], P.half);
        const double wv = s * code(n, k) + b, xv = from_h(P.x[m * P.K + k], P.half);
        ref += wv * xv;
        bound += std::fabs(wv * xv);
      }
      const double got = from_h(y[m * P.N + n], P.half);
      const double tol = 64 * std::ldexp(1.0, -24) * bound + eps * std::fabs(ref) + 1e-30;
      const double r = std::fabs(got - ref) / tol;
      if (!(r <= 1.0)) ++out.bad;
      if (!(r <= out.worst)) out.worst = r;
    }
  }
  return out;
}

// A grid-stride read of n 16-byte words with F independent streaming loads in flight per thread.
template <int F>
__global__ void read_kernel_f(const uint4* p, int64_t n, uint32_t* out) {
  uint32_t acc = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + (F - 1) * stride < n; i += F * stride) {
    uint4 v[F];
#pragma unroll
    for (int f = 0; f < F; ++f) v[f] = __ldcs(p + i + f * stride);
#pragma unroll
    for (int f = 0; f < F; ++f) acc ^= v[f].x ^ v[f].y ^ v[f].z ^ v[f].w;
  }
  for (; i < n; i += stride) {
    const uint4 a = __ldcs(p + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x12345678u) out[0] = acc;  // keeps the loads
}
