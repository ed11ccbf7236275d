// Kernel launchers of the CUDA backend: plain host functions over the parameter structs of
// kernels.cuh, so that the op code (affine_cuda.cu) never instantiates a kernel template and the
// decode kernels of each bit width compile in their own translation unit (qmv_b*.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/kernels.cuh"

namespace mlxq::cuda {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// The largest M the decode kernels take; larger M dequantizes tiles for cuBLAS. The decode
// kernel's FMAs grow with M while its traffic does not: on an H200 (28672x8192, 4 bits) it
// takes 0.06 ms at M=1, 0.14 ms at M=4 and 0.9 ms at M=16, where tiles + cuBLAS take ~0.4 ms.
constexpr int kDecodeMaxRows = 8;

// y = x @ W.T for 1 <= p.M <= kDecodeMaxRows, x and y in `x_dtype`. Defined in qmv_b<Bits>.cu.
template <int Bits>
void launch_qmv(const QmvParams& p, DType x_dtype, cudaStream_t stream);
template <>
void launch_qmv<2>(const QmvParams& p, DType x_dtype, cudaStream_t stream);
template <>
void launch_qmv<3>(const QmvParams& p, DType x_dtype, cudaStream_t stream);
template <>
void launch_qmv<4>(const QmvParams& p, DType x_dtype, cudaStream_t stream);
template <>
void launch_qmv<5>(const QmvParams& p, DType x_dtype, cudaStream_t stream);
template <>
void launch_qmv<6>(const QmvParams& p, DType x_dtype, cudaStream_t stream);
template <>
void launch_qmv<8>(const QmvParams& p, DType x_dtype, cudaStream_t stream);

inline void launch_qmv(int bits, const QmvParams& p, DType x_dtype, cudaStream_t stream) {
  switch (bits) {
    case 2:
      return launch_qmv<2>(p, x_dtype, stream);
    case 3:
      return launch_qmv<3>(p, x_dtype, stream);
    case 4:
      return launch_qmv<4>(p, x_dtype, stream);
    case 5:
      return launch_qmv<5>(p, x_dtype, stream);
    case 6:
      return launch_qmv<6>(p, x_dtype, stream);
    default:
      return launch_qmv<8>(p, x_dtype, stream);
  }
}

// y = x @ W.T on tensor cores for 4-bit W, fp16/bf16 x, 1 <= p.M <= 8, compute capability
// >= 8.0 (qmv_mma.cu).
void launch_qmv_mma4(const QmvParams& p, DType x_dtype, cudaStream_t stream);

// out = dequantized W in `out_dtype` (affine_cuda.cu).
void launch_dequantize(int bits, const DequantParams& p, DType out_dtype, cudaStream_t stream);

}  // namespace mlxq::cuda
