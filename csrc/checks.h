// Argument validation for every mlxq op, shared by all backends (CPU, MPS, emulator).
// Each check raises a c10 ValueError / TypeError naming the argument and the expected vs actual
// value, before any kernel touches memory.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace mlxq {

// Validates bits in {2,3,4,5,6,8} and group_size in {32,64,128}.
void check_bits_group(int64_t bits, int64_t group_size);

// Geometry of a packed weight [..., rows, packed_cols] with its scales/biases.
struct PackedGeometry {
  std::vector<int64_t> batch;  // leading dims of the packed weight (empty for 2-D)
  int64_t rows = 0;            // N: rows of the logical weight
  int64_t cols = 0;            // K: logical (unpacked) columns
  int64_t groups = 0;          // K / group_size
};

// Checks wq (uint32/int32), scales and biases (same float dtype, same device, shape
// [..., rows, K/group_size]) against bits and group size. `min_dim` is 2 for matmul.
PackedGeometry check_packed(const at::Tensor& wq, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits,
                            int64_t min_dim);

// Checks the float weight given to affine_quantize.
void check_quantize_input(const at::Tensor& w, int64_t group_size, int64_t bits);

// Everything an affine_matmul kernel needs to know about its operands.
struct MatmulGeometry {
  PackedGeometry w;
  std::vector<int64_t> out_shape;  // full output shape
  std::vector<int64_t> batch;      // broadcast batch shape (empty when wq is 2-D)
  int64_t M = 0;                   // rows of x per batch entry (all leading dims when wq is 2-D)
  int64_t in_features = 0;         // x.size(-1): K for transpose, N otherwise
  int64_t out_features = 0;        // N for transpose, K otherwise
};

MatmulGeometry check_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits,
                            bool transpose);

// Number of uint32 words that hold `cols` values of `bits` bits.
inline int64_t packed_cols(int64_t cols, int64_t bits) { return cols * bits / 32; }

}  // namespace mlxq

namespace mlxq {

// Everything an affine_gather_matmul kernel needs to know about its operands (MLX's gather_qmm):
// x [..., M, in] holds x_batch matrices, wq [..., rows, Kp] holds w_batch matrices; the
// broadcast lhs/rhs indices (flat indices into those batches) pick the pair of each output.
struct GatherGeometry {
  PackedGeometry w;
  std::vector<int64_t> index_shape;  // broadcast shape of lhs_indices and rhs_indices
  std::vector<int64_t> out_shape;    // index_shape + [M, out_features]
  int64_t x_batch = 1;               // number of [M, in_features] matrices in x
  int64_t w_batch = 1;               // number of quantized matrices in wq
  int64_t M = 0;                     // x.size(-2)
  int64_t in_features = 0;
  int64_t out_features = 0;
};

// Shapes, dtypes and devices of affine_gather_matmul's operands; absent indices are MLX's
// defaults (arange over the batch of x, resp. wq). Index values are checked separately, by
// check_gather_index_values, because that needs their data.
GatherGeometry check_gather_matmul(const at::Tensor& x, const at::Tensor& wq,
                                   const at::Tensor& scales, const at::Tensor& biases,
                                   const std::optional<at::Tensor>& lhs_indices,
                                   const std::optional<at::Tensor>& rhs_indices, int64_t group_size,
                                   int64_t bits, bool transpose);

// The indices (or their defaults) broadcast to g.index_shape and flattened, as a contiguous
// int64 tensor on `indices`' device, every value checked to lie in [0, limit): out-of-range
// indices raise an IndexError naming `name` instead of reading outside the batch.
at::Tensor gather_flat_indices(const std::optional<at::Tensor>& indices,
                               const std::vector<int64_t>& batch_shape, const GatherGeometry& g,
                               int64_t limit, const char* name, const at::Device& device);

}  // namespace mlxq
