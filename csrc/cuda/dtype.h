// The kernels' dtype (launch.h's DType) of a torch dtype: one host mapping for the op files.
#pragma once

#include <c10/core/ScalarType.h>

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

}  // namespace mlxq::cuda
