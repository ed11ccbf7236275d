// Argument validation for every mlxq op, shared by all backends (CPU, MPS, emulator).
// Each check raises a c10 ValueError / TypeError naming the argument and the expected vs actual
// value, before any kernel touches memory.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <vector>

namespace mlxq {

// Validates bits in {1,2,3,4,5,6,8} and group_size in {32,64,128}.
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

// --- MLX's floating-point modes (mxfp4, nvfp4, mxfp8) ----------------------------------------

// The mode's index (0 mxfp4, 1 nvfp4, 2 mxfp8, as cpu::FpMode); checks that group_size and bits
// are the mode's own (MLX accepts no others: 32/4, 16/4, 32/8).
int check_fp_mode(c10::string_view mode, int64_t group_size, int64_t bits);

// nvfp4's optional global scale: float32, one element, on `device`; refused for other modes.
void check_fp_global_scale(const c10::optional<at::Tensor>& global_scale, int mode,
                           const at::Device& device);

// Checks wq (uint32/int32) and uint8 scales [..., rows, K/group_size] of a floating-point mode.
PackedGeometry check_fp_packed(const at::Tensor& wq, const at::Tensor& scales, int64_t group_size,
                               int64_t bits, int64_t min_dim);

// Checks the float weight given to fp_quantize.
void check_fp_quantize_input(const at::Tensor& w, int64_t group_size);

// As check_matmul, for a weight of a floating-point mode (x: float, same device as wq).
MatmulGeometry check_fp_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                               int64_t group_size, int64_t bits, bool transpose);

}  // namespace mlxq
