// Device-agnostic implementations of mlxq ops as compositions of ATen ops: the packed codes are
// unpacked with shifts and masks on integer tensors, FP4/FP8/E8M0 values decoded by bit
// arithmetic, scales applied in fp32, and products left to at::matmul. They run on any device
// that has those ATen ops, and serve as the CUDA kernels of the ops that have no hand-written
// CUDA kernel (registered at the CUDA key in register_cuda.cpp, only in CUDA builds). Every CPU
// build compiles them too, so the tests run these very functions on CPU tensors against the
// CPU ops (mlxq._C.composite_*, bindings.cpp).
//
// Each function runs the argument checks of checks.h first, so it accepts and refuses exactly
// what the CPU op does, with the same messages. Numerics:
// - fp_quantize, fp_dequantize: bit for bit the CPU ops (mx.quantize / mx.dequantize), every
//   rounding step restated on tensors in the same order.
// - fp_matmul: the exact fp32 weights of the CPU op (value * scale * global factor); x with at
//   most kExactRows rows (decode), fp32 x, or x @ W in fp32 multiply in fp32; otherwise the weight
//   is rounded to the dtype of x and the product accumulates in fp32 (cuBLAS), as the CUDA
//   affine path does for prefill. The weight is dequantized whole (in row tiles for a 2-D
//   x @ W.T): decode costs a dequantize plus a GEMM, not a streaming kernel (on CUDA the decode
//   sizes run cuda/fp_qmv.cuh's streaming kernel instead, cuda/fp_cuda.cu).
// - the gather ops: the pairs are grouped by expert (a stable sort of the expert indices and
//   their runs); each selected expert multiplies all its rows at once through the dense op of
//   the tensors' device (the dispatcher's affine_matmul / fp_matmul), so the numerics are that
//   op's and each selected expert is read once per call. With `capturable` (the CUDA ops pass it
//   while the current stream is capturing a graph) nothing is read back to the host: the indices
//   are checked on the device and each pair runs the dense op on its own expert.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace mlxq::composite {

// Rows of x up to which fp_matmul multiplies in fp32 whatever the dtype of x (the CUDA decode
// width, csrc/cuda/launch.h's kDecodeMaxRows).
constexpr int64_t kExactRows = 8;

std::tuple<at::Tensor, at::Tensor> fp_quantize(const at::Tensor& w, c10::string_view mode,
                                               int64_t group_size, int64_t bits,
                                               const c10::optional<at::Tensor>& global_scale);

at::Tensor fp_dequantize(const at::Tensor& wq, const at::Tensor& scales, c10::string_view mode,
                         int64_t group_size, int64_t bits,
                         const c10::optional<at::Tensor>& global_scale,
                         c10::optional<at::ScalarType> dtype);

at::Tensor fp_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                     c10::string_view mode, int64_t group_size, int64_t bits, bool transpose,
                     const c10::optional<at::Tensor>& global_scale);

at::Tensor affine_gather_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                                const at::Tensor& biases,
                                const std::optional<at::Tensor>& lhs_indices,
                                const std::optional<at::Tensor>& rhs_indices, int64_t group_size,
                                int64_t bits, bool transpose, bool sorted_indices,
                                bool capturable = false);

at::Tensor fp_gather_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                            c10::string_view mode, int64_t group_size, int64_t bits,
                            const std::optional<at::Tensor>& lhs_indices,
                            const std::optional<at::Tensor>& rhs_indices, bool transpose,
                            const c10::optional<at::Tensor>& global_scale, bool sorted_indices,
                            bool capturable = false);

// 1-bit affine (MLX quantizes it as plain min/max: scale max - min, bias min), which the CUDA
// kernels do not cover: affine_cuda.cu calls these for bits == 1 (they refuse other bits).
// quantize and dequantize are the CPU op bit for bit (for finite w); the matmul multiplies the
// fp32 weight s*q + b with fp_matmul's rule for the dtype of x.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_quantize_1bit(const at::Tensor& w,
                                                                    int64_t group_size,
                                                                    int64_t bits);
at::Tensor affine_dequantize_1bit(const at::Tensor& wq, const at::Tensor& scales,
                                  const at::Tensor& biases, int64_t group_size, int64_t bits);
at::Tensor affine_matmul_1bit(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                              const at::Tensor& biases, int64_t group_size, int64_t bits,
                              bool transpose);

// The layer ops (layers_composite.cpp), the CUDA kernels of rms_norm and rotary_embedding, and
// of decode_attention where its kernel (cuda/attention_cuda.cu) does not apply (head dims above
// 256). rotary_embedding is the CPU op (and transformers' apply_rotary_pos_emb) bit
// for bit; rms_norm differs from the CPU op only by its fp32 mean's summation order (the CPU
// sums the squares in double), which can move the normalized value by an ulp of the dtype of x
// at a rounding tie; decode_attention computes in fp32 (scores, softmax, weighted sum, sums in
// another order than the CPU kernel's) and rounds the output once to the dtype of q.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& cos, const at::Tensor& sin);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, std::optional<double> scale);

}  // namespace mlxq::composite
