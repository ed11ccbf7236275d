// Launchers of the tensor-core decode kernels (4-bit weights, fp16/bf16 x, M <= 8); see
// qmv_mma4_kernel and qmv_tc_kernel in kernels.cuh.
#include <c10/cuda/CUDAException.h>

#include "cuda/launch.h"

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

}  // namespace

void launch_qmv_tc4(const QmvParams& p, DType x_dtype, int sm_count, cudaStream_t stream) {
  if (x_dtype == DType::kHalf) return launch_tc_typed<__half>(p, sm_count, stream);
  return launch_tc_typed<__nv_bfloat16>(p, sm_count, stream);
}

void launch_qmv_mma4(const QmvParams& p, DType x_dtype, cudaStream_t stream) {
  if (x_dtype == DType::kHalf) return launch_typed<__half>(p, stream);
  return launch_typed<__nv_bfloat16>(p, stream);
}

}  // namespace mlxq::cuda
