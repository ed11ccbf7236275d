// The device side of a decode problem, shared by qmv_harness.cu and lowbit_harness.cu. Each
// harness's Problem holds its shape (N, K, GS, M, half, G()), host data (w, s, b, x) and the
// device buffers below; it generates the host data its own way, then:
//   upload(P, copies)  `copies` device copies of w, s and b (a timing cycles through them to
//                      miss the L2), one of x, and y (M x N)
//   params(P, c)       the QmvParams of copy c
//   release(P)         frees what upload allocated
#pragma once

#include <cuda_runtime.h>

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
