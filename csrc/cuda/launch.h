// Kernel launchers of the CUDA backend: plain host functions over the parameter structs of
// kernels.cuh, so that the op code (affine_cuda.cu) never instantiates a kernel template and the
// decode kernels of each bit width compile in their own translation unit (qmv_b*.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/kernels.cuh"

namespace mlxq::cuda {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// The largest M the decode kernels take; larger M goes to the prefill paths. The decode
// kernel's FMAs grow with M while its traffic does not: on an H200 (28672x8192, 4 bits) it
// takes 0.06 ms at M=1, 0.14 ms at M=4 and 0.9 ms at M=16, where tiles + cuBLAS take ~0.4 ms.
constexpr int kDecodeMaxRows = 8;

// y = x @ W.T for 1 <= p.M <= kDecodeMaxRows, x and y in `x_dtype`, for each of p.pairs pairs
// (the gather's, QmvParams::lhs/rhs; one for a matmul). Defined in qmv_b<Bits>.cu.
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

// The streaming decode on tensor cores (qmv_stream.cuh): 4-bit W, fp16/bf16 x with scales and
// biases of the same dtype (16-byte aligned rows), 1 <= p.M <= 2, compute capability >= 8.0,
// where x fits a block's shared memory (qmv_stream4_fits: 8192 x 28672 at M = 2 stages 115 KB);
// K is split over more warps for few rows.
struct StreamDevice {
  int sm_count;
  int64_t smem_per_block;  // opt-in maximum of dynamic shared memory per block
  int64_t smem_per_sm;
  bool bulk = false;  // an sm_90a build on a compute capability 9.0 device (qmv_bulk.cuh)
};
bool qmv_stream4_fits(int64_t M, int64_t K, const StreamDevice& dev);
void launch_qmv_stream4(const QmvParams& p, DType x_dtype, const StreamDevice& dev,
                        cudaStream_t stream);

// Prefill on Hopper tensor cores (gemm_sm90.cu): y = x @ W.T for 4-bit W, fp16/bf16 x with
// scales and biases of the same dtype, K a multiple of 64, all contiguous and 16-byte aligned.
struct GemmArgs {
  const uint32_t* w;   // [N, K / 8]
  const void* scales;  // [N, G], dtype of x
  const void* biases;  // [N, G]
  uint32_t* sb;        // [N, gemm_w4_sm90_sb_cols(G)] workspace: (scale, bias) pairs
  const void* x;       // [M, K]
  void* y;             // [M, N]
  int64_t N, M, K, G;
  int group_shift;
  int sm_count;           // multiprocessors of the device
  float* ws;              // gemm_w4_sm90_workspace(...).floats fp32 values
  int* counters;          // gemm_w4_sm90_workspace(...).counters zeros (left zero after each call)
  bool sb_ready = false;  // sb already holds the pairs (packed by an earlier call): not repacked
};
// The launch of a call of these sizes: its blocks, and the scratch of its K split
// (gemm_sm90.cuh's GemmSplit).
struct GemmWorkspace {
  int64_t blocks;
  int64_t floats;
  int64_t counters;
};
GemmWorkspace gemm_w4_sm90_workspace(int64_t M, int64_t N, int64_t K, int sm_count);
// Whether this build and `device` run it (sm_90a code built, compute capability 9.0, and
// MLXQ_CUDA_GEMM is not 0; affine_cuda.cu decides where it pays, "2" forces it).
bool gemm_w4_sm90_available(int device);
int64_t gemm_w4_sm90_sb_cols(int64_t G);
// Whether the launch of `a` (its sizes, scales and biases; sb unused) reads the (scale, bias)
// pairs, or takes the scales and biases from their arrays (nothing to pack or cache).
bool gemm_w4_sm90_reads_pairs(const GemmArgs& a);
void launch_gemm_w4_sm90(const GemmArgs& a, DType x_dtype, cudaStream_t stream);
// sb[i] = (scales[i], biases[i]) for i < n (16-bit scales and biases), as launch_gemm_w4_sm90
// packs them unless GemmArgs::sb_ready.
void launch_gemm_pack_sb(const void* scales, const void* biases, uint32_t* sb, int64_t n,
                         cudaStream_t stream);

// out = dequantized W in `out_dtype` (affine_cuda.cu).
void launch_dequantize(int bits, const DequantParams& p, DType out_dtype, cudaStream_t stream);

}  // namespace mlxq::cuda
