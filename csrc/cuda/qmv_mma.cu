// Launcher of the tensor-core decode kernel (4-bit weights, fp16/bf16 x, M <= 8); see
// qmv_mma4_kernel in kernels.cuh.
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

}  // namespace

void launch_qmv_mma4(const QmvParams& p, DType x_dtype, cudaStream_t stream) {
  if (x_dtype == DType::kHalf) return launch_typed<__half>(p, stream);
  return launch_typed<__nv_bfloat16>(p, stream);
}

}  // namespace mlxq::cuda
