// A Metal kernel launch ready to encode: the dispatch plan plus the tensors bound to each buffer
// index, with the operands already in the layout and dtype the kernel reads and the outputs
// allocated. Plain C++ (no Metal types), device-generic: the MPS backend (affine_mps.mm), the
// runtime-compiled fallback (python/mlxq/metal_backend.py) and the Linux tests (which run a
// launch of CPU tensors in the MSL emulator) all execute the same launch.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "plan/dispatch_plan.h"

namespace mlxq::mps {

struct Launch {
  plan::DispatchPlan plan;
  // [[buffer(index)]] -> tensor, for every binding but "params" (contiguous, kernel dtype).
  std::vector<std::pair<int, at::Tensor>> tensors;
  int params_index = -1;            // [[buffer(index)]] of the params bytes (plan.params)
  std::vector<at::Tensor> outputs;  // what the op returns, in schema order
  bool empty() const { return plan.empty(); }
};

Launch launch_affine_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits,
                            bool transpose);
Launch launch_affine_quantize(const at::Tensor& w, int64_t group_size, int64_t bits);
Launch launch_affine_dequantize(const at::Tensor& wq, const at::Tensor& scales,
                                const at::Tensor& biases, int64_t group_size, int64_t bits);

// Threadgroup memory lengths must be multiples of 16 bytes for setThreadgroupMemoryLength.
inline int64_t threadgroup_bytes_aligned(int64_t bytes) { return (bytes + 15) / 16 * 16; }

}  // namespace mlxq::mps
