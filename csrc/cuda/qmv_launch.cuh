// Body of qmv_b<Bits>.cu: the decode launcher for one bit width (MLXQ_QMV_BITS), which picks
// the kernel's x-row count MT (the next power of two >= M) and rows per warp R.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "cuda/launch.h"

#ifndef MLXQ_QMV_BITS
#error "define MLXQ_QMV_BITS before including qmv_launch.cuh"
#endif

namespace mlxq::cuda {
namespace {

template <int MT, typename T>
void launch_mt(const QmvParams& p, cudaStream_t stream) {
  // Few rows of x: 4 rows of W per warp share each load of x; more rows of x: 2 keep the
  // accumulators (MT * R) in registers.
  constexpr int R = MT <= 2 ? 4 : 2;
  const int64_t warps = (p.N + R - 1) / R;
  const int64_t blocks = (warps + kDecodeWarps - 1) / kDecodeWarps;
  qmv_kernel<MLXQ_QMV_BITS, MT, R, T>
      <<<static_cast<unsigned>(blocks), kDecodeWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const QmvParams& p, cudaStream_t stream) {
  if (p.M <= 1) return launch_mt<1, T>(p, stream);
  if (p.M <= 2) return launch_mt<2, T>(p, stream);
  if (p.M <= 4) return launch_mt<4, T>(p, stream);
  if (p.M <= 8) return launch_mt<8, T>(p, stream);
  return launch_mt<16, T>(p, stream);
}

}  // namespace

template <>
void launch_qmv<MLXQ_QMV_BITS>(const QmvParams& p, DType x_dtype, cudaStream_t stream) {
  switch (x_dtype) {
    case DType::kHalf:
      return launch_typed<__half>(p, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, stream);
    default:
      return launch_typed<float>(p, stream);
  }
}

}  // namespace mlxq::cuda
