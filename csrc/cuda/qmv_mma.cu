// Launchers of the tensor-core decode kernels (4-bit weights, fp16/bf16 x, M <= 8); see
// qmv_mma4_kernel in kernels.cuh and qmv_stream_kernel in qmv_stream.cuh.
#include <c10/cuda/CUDAException.h>

#include "cuda/launch.h"
#include "cuda/qmv_stream.cuh"

namespace mlxq::cuda {
namespace {

template <int GS, typename T>
void launch_gs(const QmvParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.N + 15) / 16;
  qmv_mma4_kernel<GS, T><<<static_cast<unsigned>(blocks), kMmaWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const QmvParams& p, cudaStream_t stream) {
  switch (p.group_shift) {
    case 5:
      return launch_gs<32, T>(p, stream);
    case 6:
      return launch_gs<64, T>(p, stream);
    default:
      return launch_gs<128, T>(p, stream);
  }
}

// Spans (of 128 values) per step of the streaming kernel: 4 KB of loads in flight per warp. On an
// H200 (28672 x 8192, bf16, group 128, M = 1) 4 spans took 52.4 us, 2 spans 57.6, 8 spilled
// (72.8); a ring of cp.async stages in shared memory (2 spans x 3-6 stages) 52.3-62.7 us,
// rotating each warp's start over its row 53.0, and 1 + q/16 operands (no HSUB2, x sums taken off
// afterwards) 52.1 bf16 / 49.7 fp16 against 52.1 / 52.1: kept out. The loads alone take 34-37 us.
constexpr int kStreamSpans = 4;

template <int GS, typename T>
void launch_stream_gs(const QmvParams& p, int sm_count, cudaStream_t stream) {
  // Split K over more warps only while the tiles alone cannot fill the GPU's warp slots (2
  // blocks of kStreamWarps per SM), and while each warp keeps at least one whole step.
  const int64_t tiles = (p.N + 15) / 16, slots = int64_t{sm_count} * 2 * kStreamWarps;
  const int64_t steps = ((p.K / 32 + 3) / 4 + kStreamSpans - 1) / kStreamSpans;
  int kw = 1;
  while (kw < kStreamWarps && tiles * kw * 2 <= slots && steps / (kw * 2) >= 1) kw *= 2;
  const int64_t tpb = kStreamWarps / kw, blocks = (tiles + tpb - 1) / tpb;
  const int smem = static_cast<int>(qmv_stream_smem(p.M, p.K));
  auto kernel = qmv_stream_kernel<GS, kStreamSpans, true, T>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  kernel<<<static_cast<unsigned>(blocks), kStreamWarps * 32, smem, stream>>>(p, kw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_stream_typed(const QmvParams& p, int sm_count, cudaStream_t stream) {
  switch (p.group_shift) {
    case 5:
      return launch_stream_gs<32, T>(p, sm_count, stream);
    case 6:
      return launch_stream_gs<64, T>(p, sm_count, stream);
    default:
      return launch_stream_gs<128, T>(p, sm_count, stream);
  }
}

}  // namespace

bool qmv_stream4_fits(int64_t M, int64_t K) {
  return M >= 1 && M <= 2 && qmv_stream_smem(M, K) <= kQmvStreamMaxSmem;
}

void launch_qmv_stream4(const QmvParams& p, DType x_dtype, int sm_count, cudaStream_t stream) {
  if (x_dtype == DType::kHalf) return launch_stream_typed<__half>(p, sm_count, stream);
  return launch_stream_typed<__nv_bfloat16>(p, sm_count, stream);
}

void launch_qmv_mma4(const QmvParams& p, DType x_dtype, cudaStream_t stream) {
  if (x_dtype == DType::kHalf) return launch_typed<__half>(p, stream);
  return launch_typed<__nv_bfloat16>(p, stream);
}

}  // namespace mlxq::cuda
