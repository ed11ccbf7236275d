// Host helpers of the op files: the kernels' dtype (launch.h's DType) of a torch dtype, and
// whether the current stream is being captured in a CUDA graph.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include "cuda/launch.h"

namespace mlxq::cuda {

inline DType dtype_of(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Half:
      return DType::kHalf;
    case c10::ScalarType::BFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat;
  }
}

// While the current stream captures a graph, nothing may synchronize with the host (a read of a
// device value fails the capture): the ops check gather indices on the device instead.
inline bool stream_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

}  // namespace mlxq::cuda
