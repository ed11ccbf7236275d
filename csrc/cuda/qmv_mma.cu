// Launchers of the tensor-core decode kernels (4-bit weights, fp16/bf16 x, M <= 8); see
// qmv_mma4_kernel and qmv_tc_kernel in kernels.cuh and qmv_stream_kernel in qmv_stream.cuh.
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

// Warps per SM the streaming kernel is sized for (its registers allow about this many).
constexpr int64_t kTcWarpsPerSm = 16;

template <int GS, typename T, int KW>
void launch_tc_kw(const QmvParams& p, cudaStream_t stream) {
  constexpr int TPB = KW >= 4 ? 1 : 4 / KW;  // at least 4 warps a block
  const int64_t tiles = (p.N + 15) / 16;
  const int64_t blocks = (tiles + TPB - 1) / TPB;
  qmv_tc_kernel<GS, T, KW, TPB><<<static_cast<unsigned>(blocks), KW * TPB * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int GS, typename T>
void launch_tc_gs(const QmvParams& p, int sm_count, cudaStream_t stream) {
  // Split K over more warps only while the tiles alone cannot fill the GPU's warp slots, and
  // while each warp keeps at least one whole step of its rows.
  const int64_t tiles = (p.N + 15) / 16, slots = sm_count * kTcWarpsPerSm;
  int kw = 1;
  while (kw < 8 && tiles * kw * 2 <= slots && p.G / (kw * 2) >= TcStep<GS, T>::kGroups) kw *= 2;
  switch (kw) {
    case 1:
      return launch_tc_kw<GS, T, 1>(p, stream);
    case 2:
      return launch_tc_kw<GS, T, 2>(p, stream);
    case 4:
      return launch_tc_kw<GS, T, 4>(p, stream);
    default:
      return launch_tc_kw<GS, T, 8>(p, stream);
  }
}

template <typename T>
void launch_tc_typed(const QmvParams& p, int sm_count, cudaStream_t stream) {
  switch (p.group_shift) {
    case 5:
      return launch_tc_gs<32, T>(p, sm_count, stream);
    case 6:
      return launch_tc_gs<64, T>(p, sm_count, stream);
    default:
      return launch_tc_gs<128, T>(p, sm_count, stream);
  }
}

// Spans (of 128 values) per step of the streaming kernel: 4 KB of loads in flight per warp in
// registers, or 2 KB per step in a ring of shared-memory stages (4 stages at group size 32,
// whose scales take more room, else 5: two blocks per SM for K up to ~8192 at M = 1).
constexpr int kStreamSpans = 4;
constexpr int kRingSpans = 2;

template <int GS, int U, int Stages, typename T>
void launch_stream_kernel(const QmvParams& p, int kw, int64_t blocks, cudaStream_t stream) {
  const int smem = static_cast<int>(qmv_stream_smem(p.M, p.K, GS, U, Stages));
  auto kernel = qmv_stream_kernel < GS, U, true, T, Stages == 0 ? 1 : 0, Stages > ;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  kernel<<<static_cast<unsigned>(blocks), kStreamWarps * 32, smem, stream>>>(p, kw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int GS, typename T>
void launch_stream_gs(const QmvParams& p, bool ring, int sm_count, cudaStream_t stream) {
  constexpr int kStages = GS == 32 ? 4 : 5;
  const int U = ring ? kRingSpans : kStreamSpans;
  // Split K over more warps only while the tiles alone cannot fill the GPU's warp slots (2
  // blocks of kStreamWarps per SM), and while each warp keeps at least one whole step.
  const int64_t tiles = (p.N + 15) / 16, slots = int64_t{sm_count} * 2 * kStreamWarps;
  const int64_t steps = ((p.K / 32 + 3) / 4 + U - 1) / U;
  int kw = 1;
  while (kw < kStreamWarps && tiles * kw * 2 <= slots && steps / (kw * 2) >= 1) kw *= 2;
  const int64_t tpb = kStreamWarps / kw, blocks = (tiles + tpb - 1) / tpb;
  // the ring copies whole steps of scales: rows of G % 8 == 0 groups, and it must fit one block
  if (ring && p.G % 8 == 0 && qmv_stream_smem(p.M, p.K, GS, kRingSpans, kStages) <= 227 * 1024) {
    return launch_stream_kernel<GS, kRingSpans, kStages, T>(p, kw, blocks, stream);
  }
  return launch_stream_kernel<GS, kStreamSpans, 0, T>(p, kw, blocks, stream);
}

template <typename T>
void launch_stream_typed(const QmvParams& p, bool ring, int sm_count, cudaStream_t stream) {
  switch (p.group_shift) {
    case 5:
      return launch_stream_gs<32, T>(p, ring, sm_count, stream);
    case 6:
      return launch_stream_gs<64, T>(p, ring, sm_count, stream);
    default:
      return launch_stream_gs<128, T>(p, ring, sm_count, stream);
  }
}

}  // namespace

bool qmv_stream4_fits(int64_t M, int64_t K) {
  return M >= 1 && M <= 2 && qmv_stream_smem(M, K) <= kQmvStreamMaxSmem;
}

void launch_qmv_stream4(const QmvParams& p, DType x_dtype, bool ring, int sm_count,
                        cudaStream_t stream) {
  if (x_dtype == DType::kHalf) return launch_stream_typed<__half>(p, ring, sm_count, stream);
  return launch_stream_typed<__nv_bfloat16>(p, ring, sm_count, stream);
}

void launch_qmv_tc4(const QmvParams& p, DType x_dtype, int sm_count, cudaStream_t stream) {
  if (x_dtype == DType::kHalf) return launch_tc_typed<__half>(p, sm_count, stream);
  return launch_tc_typed<__nv_bfloat16>(p, sm_count, stream);
}

void launch_qmv_mma4(const QmvParams& p, DType x_dtype, cudaStream_t stream) {
  if (x_dtype == DType::kHalf) return launch_typed<__half>(p, stream);
  return launch_typed<__nv_bfloat16>(p, stream);
}

}  // namespace mlxq::cuda
