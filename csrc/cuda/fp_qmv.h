// The streaming decode of the floating-point modes (mxfp4, nvfp4, mxfp8): y = x @ W.T for
// M <= kDecodeMaxRows rows of x. Plain host declarations over the kernel's parameter struct, so
// that the op code (fp_cuda.cu) instantiates no kernel template; each mode's kernels compile in
// their own translation unit (fp_qmv_<mode>.cu, bodies in fp_qmv.cuh).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "cuda/launch.h"

namespace mlxq::cuda {

// check_fp_mode's indices.
constexpr int kFpMxfp4 = 0, kFpNvfp4 = 1, kFpMxfp8 = 2;

// Warps per block of the float-mode decode kernel.
constexpr int kFpWarps = 8;

// Arguments of the float-mode decode kernel: y[m, n] = sum_g scale[n, g] * factor *
// sum_{k in g} value(code[n, k]) * x[m, k], the CPU op's order of operations.
struct FpQmvParams {
  const uint4* w;         // [N, chunks] 16-byte chunks of packed codes, 16-byte aligned
  const uint8_t* scales;  // [N, G] scale bytes (2-byte aligned for nvfp4)
  const float* global;    // nvfp4's global scale (one float on the device), or nullptr
  const void* x;          // [M, K] in the activation dtype, 16-byte aligned
  void* y;                // [M, N] in the activation dtype
  int64_t N;
  int64_t K;
  int64_t G;
  int64_t chunks;  // 16-byte chunks per row of W: K * bits / 128 (a whole number: checked)
  int M;           // rows of x, 1 <= M <= kDecodeMaxRows
  // The gather (fp_gather_matmul): pair i = blockIdx.y multiplies the M rows of x matrix lhs[i]
  // by weight matrix rhs[i] (with its global scale global[rhs[i]]) into y matrix i. For a plain
  // matmul: one pair, lhs = rhs = nullptr (matrix 0 of each).
  const int64_t* lhs = nullptr;  // [pairs], in [0, x_batch) (MLXQ_DEVICE_CHECK)
  const int64_t* rhs = nullptr;  // [pairs], in [0, w_batch)
  int64_t pairs = 1;             // <= kFpMaxPairs
  int64_t x_batch = 1;           // matrices in x
  int64_t w_batch = 1;           // matrices in W
  int64_t w_matrix = 0;          // chunks per weight matrix (N * chunks)
  int64_t s_matrix = 0;          // scale bytes per weight matrix (N * G)
};

// The most pairs one gather launch takes (the grid's y dimension).
constexpr int64_t kFpMaxPairs = 65535;

// y = x @ W.T for the mode `Mode` (kFp*), x and y in `x_dtype`. `variant` ('a'..'d') picks the
// kernel shape (fp_qmv.cuh). Defined in fp_qmv_<mode>.cu.
template <int Mode>
void launch_fp_qmv(const FpQmvParams& p, DType x_dtype, char variant, cudaStream_t stream);
template <>
void launch_fp_qmv<kFpMxfp4>(const FpQmvParams& p, DType x_dtype, char variant,
                             cudaStream_t stream);
template <>
void launch_fp_qmv<kFpNvfp4>(const FpQmvParams& p, DType x_dtype, char variant,
                             cudaStream_t stream);
template <>
void launch_fp_qmv<kFpMxfp8>(const FpQmvParams& p, DType x_dtype, char variant,
                             cudaStream_t stream);

// Rows of W per warp for `M` rows of x and `variant` (the kernel shapes of fp_qmv.cuh), which
// sets the grid size the host checks.
inline int fp_qmv_rows_per_warp(int64_t M, char variant) {
  if (M == 1) return variant == 'b' || variant == 'c' ? 4 : (variant == 'd' ? 1 : 2);
  return variant == 'b' || variant == 'd' ? 2 : (variant == 'c' ? 1 : 4);
}

}  // namespace mlxq::cuda
