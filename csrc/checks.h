// Argument validation for every mlxq op, shared by all backends (CPU, MPS, emulator) and by the
// fake (meta) kernels. Each check raises a c10 ValueError / TypeError naming the argument and the
// expected vs actual value, before any kernel touches memory. Every size product is
// overflow-checked: a wrapped product could make an empty or mismatched operand pass.
//
// The checks read sizes as c10::SymInt so that one implementation serves the real kernels
// (concrete sizes) and the fake kernels under torch.compile (symbolic sizes, python/mlxq/ops.py
// through the *_out_shape functions): meta and torch.compile refuse exactly what the real op
// refuses. A condition on symbolic sizes that cannot be decided while tracing becomes a run-time
// assertion of the traced graph, and the real kernel repeats the check on concrete sizes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
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
// [..., rows, K/group_size]) against bits and group size, and that the dequantized output's
// element count fits in int64.
PackedGeometry check_dequantize(const at::Tensor& wq, const at::Tensor& scales,
                                const at::Tensor& biases, int64_t group_size, int64_t bits);

// Checks the float weight given to affine_quantize.
void check_quantize_input(const at::Tensor& w, int64_t group_size, int64_t bits);

// Everything an affine_matmul kernel needs to know about its operands.
struct MatmulGeometry {
  PackedGeometry w;
  std::vector<int64_t> out_shape;  // full output shape
  std::vector<int64_t> batch;      // broadcast batch shape (empty when wq is 2-D)
  int64_t batch_size = 1;          // product of `batch` (fits in int64: checked)
  int64_t M = 0;                   // rows of x per batch entry (all leading dims when wq is 2-D)
  int64_t in_features = 0;         // x.size(-1): K for transpose, N otherwise
  int64_t out_features = 0;        // N for transpose, K otherwise
};

MatmulGeometry check_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits,
                            bool transpose);

// The same checks, returning the output shapes only; sizes may be symbolic (fake tensors).
// These are what the fake kernels call, so that they accept and refuse what the real op does.
std::vector<c10::SymInt> matmul_out_shape(const at::Tensor& x, const at::Tensor& wq,
                                          const at::Tensor& scales, const at::Tensor& biases,
                                          int64_t group_size, int64_t bits, bool transpose);
std::vector<c10::SymInt> dequantize_out_shape(const at::Tensor& wq, const at::Tensor& scales,
                                              const at::Tensor& biases, int64_t group_size,
                                              int64_t bits);
// Shapes of (wq, scales, biases).
std::vector<std::vector<c10::SymInt>> quantize_out_shapes(const at::Tensor& w, int64_t group_size,
                                                          int64_t bits);

// Number of uint32 words that hold `cols` values of `bits` bits. `cols` is a multiple of 32
// (whole groups), so dividing first is exact and cannot overflow.
inline int64_t packed_cols(int64_t cols, int64_t bits) { return cols / 32 * bits; }

}  // namespace mlxq
