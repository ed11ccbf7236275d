// A Metal kernel launch ready to encode: the dispatch plan plus the tensors bound to each buffer
// index, with the operands already in the layout and dtype the kernel reads and the outputs
// allocated. Plain C++ (no Metal types), device-generic: the MPS backend (affine_mps.mm), the
// runtime-compiled fallback (python/mlxq/metal/runtime.py) and the Linux tests (which run a
// launch of CPU tensors in the MSL emulator) all execute the same launch.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "metal_host/dispatch_plan.h"

namespace mlxq::metal {

struct Launch {
  DispatchPlan plan;
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

// The calls that encode a launch on a compute command encoder. affine_mps.mm implements them
// with Metal (one call each); the tests record them (mlxq._C.mps_encode_trace_*).
class Encoder {
 public:
  virtual ~Encoder() = default;
  virtual void set_buffer(int index, const at::Tensor& t, int64_t offset_bytes) = 0;
  virtual void set_bytes(int index, const std::vector<uint8_t>& bytes) = 0;
  virtual void set_threadgroup_memory(int index, int64_t bytes) = 0;
  virtual void dispatch_threadgroups(const std::array<uint32_t, 3>& grid,
                                     const std::array<uint32_t, 3>& threads) = 0;
};

// What the pipeline state of the launch's kernel allows.
struct PipelineLimits {
  uint64_t max_threads_per_threadgroup = 1024;
  int64_t static_threadgroup_bytes = 0;   // fixed-size threadgroup arrays of the kernel
  int64_t max_threadgroup_bytes = 32768;  // the device's limit
};

// Checks a launch against its pipeline and its buffers against `device` (clear errors naming
// the kernel), before anything is encoded.
void check_launch(const Launch& l, const PipelineLimits& limits, c10::DeviceType device);

// Encodes `l`: every tensor at its buffer index (at its storage offset, in bytes), the params
// bytes, the threadgroup memory lengths (16-byte aligned), then one dispatchThreadgroups.
void encode_launch(const Launch& l, Encoder& enc);

}  // namespace mlxq::metal

namespace mlxq::metal {

// affine_gather_matmul: the plan of plan_affine_gather_matmul, with the indices broadcast,
// flattened and range-checked (mlxq::gather_pair_indices: a sync on MPS) and bound as int32
// words (the kernels read them as uint; the plan keeps the batches below 2^31). sorted_indices
// may pick the sorted gather qmm (plan_affine_gather_matmul).
Launch launch_affine_gather_matmul(const at::Tensor& x, const at::Tensor& wq,
                                   const at::Tensor& scales, const at::Tensor& biases,
                                   const std::optional<at::Tensor>& lhs_indices,
                                   const std::optional<at::Tensor>& rhs_indices, int64_t group_size,
                                   int64_t bits, bool transpose, bool sorted_indices = false);

}  // namespace mlxq::metal

namespace mlxq::metal {

// fp_matmul: the plan of plan_fp_matmul with x, the packed words, the uint8 scales and the
// global scale bound (a one-value 448 * 6 tensor on x's device when there is none).
Launch launch_fp_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                        const std::optional<at::Tensor>& global_scale, c10::string_view mode,
                        int64_t group_size, int64_t bits, bool transpose);

// fp_gather_matmul: the plan of plan_fp_gather_matmul with the indices as in
// launch_affine_gather_matmul and the global scale as one float32 per matrix of wq (nvfp4's own,
// else 448 * 6 for each matrix: pair z reads rhs[z]'s). sorted_indices may pick the sorted
// gather qmm; the result does not depend on it.
Launch launch_fp_gather_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                               c10::string_view mode, int64_t group_size, int64_t bits,
                               const std::optional<at::Tensor>& lhs_indices,
                               const std::optional<at::Tensor>& rhs_indices, bool transpose,
                               const std::optional<at::Tensor>& global_scale,
                               bool sorted_indices = false);

// fp_dequantize: the plan of plan_fp_dequantize, bound as launch_fp_matmul binds its operands.
Launch launch_fp_dequantize(const at::Tensor& wq, const at::Tensor& scales, c10::string_view mode,
                            int64_t group_size, int64_t bits,
                            const std::optional<at::Tensor>& global_scale,
                            std::optional<at::ScalarType> dtype);

// fp_quantize: the plan of plan_fp_quantize with w, the allocated (wq, scales) and the global
// scale bound as in launch_fp_matmul.
Launch launch_fp_quantize(const at::Tensor& w, c10::string_view mode, int64_t group_size,
                          int64_t bits, const std::optional<at::Tensor>& global_scale);

}  // namespace mlxq::metal
