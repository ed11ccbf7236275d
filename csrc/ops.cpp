// The mlxq op library: every schema lives here, once. Backends register kernels for these
// schemas in their own files (cpu/affine_cpu.cpp, mps/affine_mps.mm); the matmul ops' reverse
// mode is registered in autograd.cpp; fake (meta) kernels and the other ops' autograd from
// Python (python/mlxq/ops.py), the fake kernels running the backends' own argument checks
// (checks.h, through check_bindings.cpp).
#include <torch/extension.h>

namespace mlxq::cpu {
void register_cpu_bindings(pybind11::module& m);  // csrc/cpu/bindings.cpp
}  // namespace mlxq::cpu
namespace mlxq {
void register_check_bindings(pybind11::module& m);          // csrc/check_bindings.cpp
void register_composite_bindings(pybind11::module& m);      // csrc/composite/bindings.cpp
void register_decoder_layer_bindings(pybind11::module& m);  // csrc/composite/decoder_layer.cpp
}  // namespace mlxq
namespace mlxq::metal {
void register_plan_bindings(pybind11::module& m);    // csrc/metal_host/plan_bindings.cpp
void register_launch_bindings(pybind11::module& m);  // csrc/metal_host/launch_bindings.cpp
}  // namespace mlxq::metal

TORCH_LIBRARY(mlxq, m) {
  m.def("affine_quantize(Tensor w, int group_size=64, int bits=4) -> (Tensor, Tensor, Tensor)");
  m.def(
      "affine_dequantize(Tensor wq, Tensor scales, Tensor biases, int group_size=64, int bits=4)"
      " -> Tensor");
  m.def(
      "affine_matmul(Tensor x, Tensor wq, Tensor scales, Tensor biases, int group_size=64, "
      "int bits=4, bool transpose=True) -> Tensor");
  // MLX's gather_qmm: pair i of the broadcast indices multiplies x's matrix lhs_indices[i]
  // with wq's matrix rhs_indices[i] (mixture-of-experts layers); absent indices are aranges
  // over the batch of x, resp. wq.
  m.def(
      "affine_gather_matmul(Tensor x, Tensor wq, Tensor scales, Tensor biases, "
      "Tensor? lhs_indices=None, Tensor? rhs_indices=None, int group_size=64, int bits=4, "
      "bool transpose=True, bool sorted_indices=False) -> Tensor");
  // Sibling projections that read one input (q/k/v, gate/up): output i is
  // affine_matmul(x, wq[i], scales[i], biases[i], group_size, bits), bit for bit, computed in
  // one call so that a decode step's small layers share one parallel region.
  m.def(
      "affine_matmul_many(Tensor x, Tensor[] wq, Tensor[] scales, Tensor[] biases, "
      "int group_size=64, int bits=4) -> Tensor[]");
}

// MLX's floating-point modes (mxfp4, nvfp4, mxfp8): FP4/FP8 values with uint8 scales, no
// biases, and for nvfp4 an optional float32 global scale. A family of their own rather than a
// `mode` argument on the affine ops: the operands differ (no biases, uint8 scales, a global
// scale), so one schema per family keeps every argument meaningful and every check simple.
TORCH_LIBRARY_FRAGMENT(mlxq, m) {
  m.def(
      "fp_quantize(Tensor w, str mode, int group_size, int bits, Tensor? global_scale=None)"
      " -> (Tensor, Tensor)");
  m.def(
      "fp_dequantize(Tensor wq, Tensor scales, str mode, int group_size, int bits, "
      "Tensor? global_scale=None, ScalarType? dtype=None) -> Tensor");
  m.def(
      "fp_matmul(Tensor x, Tensor wq, Tensor scales, str mode, int group_size, int bits, "
      "bool transpose=True, Tensor? global_scale=None) -> Tensor");
  // mx.gather_qmm in the floating-point modes: fp_matmul's operands, the gather indices of
  // affine_gather_matmul, and nvfp4's global_scale as mx.gather_qmm takes it (one float32 per
  // matrix of wq, shape wq.shape[:-2]).
  m.def(
      "fp_gather_matmul(Tensor x, Tensor wq, Tensor scales, str mode, int group_size, int bits, "
      "Tensor? lhs_indices=None, Tensor? rhs_indices=None, bool transpose=True, "
      "Tensor? global_scale=None, bool sorted_indices=False) -> Tensor");
}

// Attention of a few queries (decode) against a KV cache, read in place in its dtype:
// q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] (query head h reads kv head h / (Hq / Hkv)); mask
// bool (True attends) or float (added), broadcast to [B, Hq, Lq, Lk]; scale default 1/sqrt(D).
// Computed in fp32, the output [B, Hq, Lq, D] rounded once to the dtype of q.
TORCH_LIBRARY_FRAGMENT(mlxq, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None, float? scale=None)"
      " -> Tensor");
}

// RMSNorm as transformers' Llama family computes it: y = weight * (x * rsqrt(mean(x^2) + eps))
// with the normalization in fp32, rounded to the dtype of x before the product with weight (the
// output takes the promoted dtype of the two).
TORCH_LIBRARY_FRAGMENT(mlxq, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

// transformers' rotate-half rotary embedding (the Llama family's apply_rotary_pos_emb) of q and k
// in one call: x * cos + rotate_half(x) * sin, each product rounded to the dtype of x and then
// their sum. q [B, Hq, L, D], k [B, Hk, L, D], cos and sin [1 or B, L, D], one float dtype.
TORCH_LIBRARY_FRAGMENT(mlxq, m) {
  m.def("rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mlxq native op library (ops are reached through torch.ops.mlxq)";
  mlxq::cpu::register_cpu_bindings(m);
  mlxq::register_check_bindings(m);
  mlxq::register_composite_bindings(m);
  mlxq::register_decoder_layer_bindings(m);
  mlxq::metal::register_plan_bindings(m);
  mlxq::metal::register_launch_bindings(m);
}
