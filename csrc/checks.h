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
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
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
// (affine) or of 16 (nvfp4, 4 bits): whole 32-value blocks first, so nothing overflows, then
// the 16-value tail, which fills whole words at 4 or 8 bits.
inline int64_t packed_cols(int64_t cols, int64_t bits) {
  return cols / 32 * bits + cols % 32 * bits / 32;
}

// --- MLX's floating-point modes (mxfp4, nvfp4, mxfp8) ----------------------------------------

// The mode's index (0 mxfp4, 1 nvfp4, 2 mxfp8, as cpu::FpMode); checks that group_size and bits
// are the mode's own (MLX accepts no others: 32/4, 16/4, 32/8).
int check_fp_mode(c10::string_view mode, int64_t group_size, int64_t bits);

// nvfp4's optional global scale: float32, one element, on `device`; refused for other modes.
void check_fp_global_scale(const c10::optional<at::Tensor>& global_scale, int mode,
                           const at::Device& device);

// fp_dequantize's output dtype: float32, float16 or bfloat16 (MLX's default when absent).
at::ScalarType check_fp_dequantize_dtype(const c10::optional<at::ScalarType>& dtype);

// Checks wq (uint32/int32) and uint8 scales [..., rows, K/group_size] of a floating-point mode.
PackedGeometry check_fp_packed(const at::Tensor& wq, const at::Tensor& scales, int64_t group_size,
                               int64_t bits, int64_t min_dim);

// Checks the float weight given to fp_quantize.
void check_fp_quantize_input(const at::Tensor& w, int64_t group_size);

// affine_matmul_many's arguments: as many scales and biases as weights (at least one), each
// weight 2-D and valid for check_matmul with x and transpose=True; returns the output shapes.
std::vector<std::vector<c10::SymInt>> matmul_many_out_shapes(const at::Tensor& x, at::TensorList wq,
                                                             at::TensorList scales,
                                                             at::TensorList biases,
                                                             int64_t group_size, int64_t bits);

// As check_matmul, for a weight of a floating-point mode (x: float, same device as wq).
MatmulGeometry check_fp_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                               int64_t group_size, int64_t bits, bool transpose);

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

// As check_gather_matmul, for weights of a floating-point mode (`mode` from check_fp_mode:
// uint8 scales, no biases). nvfp4's optional global_scale is mx.gather_qmm's: float32, one value
// per matrix of wq (shape wq.shape[:-2]).
GatherGeometry check_fp_gather_matmul(const at::Tensor& x, const at::Tensor& wq,
                                      const at::Tensor& scales, int mode, int64_t group_size,
                                      int64_t bits, const std::optional<at::Tensor>& lhs_indices,
                                      const std::optional<at::Tensor>& rhs_indices, bool transpose,
                                      const c10::optional<at::Tensor>& global_scale);

// How gather_pair_indices checks that given index values lie in their batch.
enum class IndexCheck {
  kHost,      // one device-to-host read of their range: an IndexError naming the tensor
  kAsync,     // on the device, in stream order (at::_assert_async: no synchronization, so a CUDA
              // graph can capture it); an index out of range ends in a device-side assert
  kInKernel,  // not here: the caller's kernel checks each index it reads (MLXQ_DEVICE_CHECK)
};

// A gather's pairs: lhs_indices and rhs_indices (or their defaults, aranges over the batch of
// x, resp. wq) broadcast to g.index_shape and flattened, as contiguous int64 tensors on x's
// device, every value checked to lie in its batch (as `check` says): out-of-range indices raise
// an IndexError naming them instead of reading outside the batch. kHost on a GPU synchronizes
// the stream and cannot be captured in a CUDA graph; the CUDA ops take it unless the current
// stream is capturing. Absent indices are never read.
struct GatherPairs {
  at::Tensor lhs;  // pair p multiplies x's matrix lhs[p]
  at::Tensor rhs;  // with wq's matrix rhs[p]
};
GatherPairs gather_pair_indices(const GatherGeometry& g, const at::Tensor& x,
                                const std::optional<at::Tensor>& lhs_indices,
                                const std::optional<at::Tensor>& rhs_indices,
                                IndexCheck check = IndexCheck::kHost);

}  // namespace mlxq

// --- decode_attention --------------------------------------------------------------------------

namespace mlxq {

struct AttentionGeometry {
  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0;
};

// q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] of one float dtype with Hkv >= 1 dividing Hq, a
// unit-stride last dimension (any other strides), an optional mask (bool, or float32, float16,
// bfloat16) that broadcasts to [B, Hq, Lq, Lk], all on one device, and a finite scale if given.
AttentionGeometry check_decode_attention(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                         std::optional<double> scale);

// rms_norm's arguments: x float of any shape with a last dimension of D >= 1 values, weight
// float [D], both on one device, eps finite and >= 0. Returns the output dtype (x's and weight's
// promoted, as transformers' `weight * normalized.to(x.dtype)` gives).
at::ScalarType check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// rotary_embedding's arguments: q [B, Hq, L, D] and k [B, Hk, L, D], cos and sin [Bc, L, D] with
// Bc 1 or B and D even, all four of one float dtype and on one device (any strides).
void check_rotary_embedding(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                            const at::Tensor& sin);

// The same checks; returns the output shape [B, Hq, Lq, D] (sizes may be symbolic).
std::vector<c10::SymInt> decode_attention_out_shape(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const std::optional<at::Tensor>& mask,
                                                    std::optional<double> scale);

}  // namespace mlxq
