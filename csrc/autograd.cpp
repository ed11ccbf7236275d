// Reverse-mode derivatives of the matmul ops, registered at the Autograd key in C++ (and
// decode_attention's refusal of one, at the end).
//
// Every op is linear in x and treats the quantized weight as a constant, so each vjp is the op
// itself with the other transpose. Registered here rather than with torch.library in Python:
// a Python autograd kernel runs on every call, grad or not, and cost ~7 us of a decode step's
// ~10 us per small matmul (211 calls a token for a 135M model). A call that needs no gradient
// now goes straight to the backend kernel. Forward mode (jvp) stays in python/mlxq/ops.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "checks.h"

namespace mlxq {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The error for a gradient asked of the constant weight, naming the operands that asked.
[[noreturn]] void refuse_weight_grad(const char* op, const std::string& names) {
  TORCH_CHECK(
      false, "mlxq.", op, ": the quantized weight is a constant; gradients with respect to ", names,
      " are not supported (call .requires_grad_(False) on them, or train a float ", "copy)");
}

std::string join_names(bool scales, const char* scales_name, bool other, const char* other_name) {
  if (scales && other) return std::string(scales_name) + " and " + other_name;
  return scales ? scales_name : other_name;
}

bool needs_grad(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

// grad of x when x was broadcast against a batched weight: summed back to x's shape.
at::Tensor to_x_shape(const at::Tensor& grad_x, const c10::IValue& x_sizes) {
  const std::vector<c10::SymInt> sizes = x_sizes.toSymIntVector();
  if (grad_x.sym_sizes().equals(sizes)) return grad_x;
  return at::sum_to(grad_x, sizes);
}

// --- affine_matmul ------------------------------------------------------------------------------

using AffineMatmulFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, int64_t, int64_t, bool);

const c10::TypedOperatorHandle<AffineMatmulFn>& affine_matmul_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlxq::affine_matmul", "")
                             .typed<AffineMatmulFn>();
  return op;
}

struct AffineMatmulGrad : torch::autograd::Function<AffineMatmulGrad> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& wq,
                            const at::Tensor& scales, const at::Tensor& biases, int64_t group_size,
                            int64_t bits, bool transpose) {
    ctx->save_for_backward({wq, scales, biases});
    ctx->saved_data["x_sizes"] = x.sym_sizes();
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["transpose"] = transpose;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return affine_matmul_op().call(x, wq, scales, biases, group_size, bits, transpose);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool s = ctx->needs_input_grad(2), b = ctx->needs_input_grad(3);
    if (s || b) refuse_weight_grad("affine_matmul", join_names(s, "scales", b, "biases"));
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      const variable_list w = ctx->get_saved_variables();
      grad_x = affine_matmul_op().call(
          grads[0], w[0], w[1], w[2], ctx->saved_data["group_size"].toInt(),
          ctx->saved_data["bits"].toInt(), !ctx->saved_data["transpose"].toBool());
      grad_x = to_x_shape(grad_x, ctx->saved_data["x_sizes"]);
    }
    return {grad_x, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor affine_matmul_autograd(const at::Tensor& x, const at::Tensor& wq,
                                  const at::Tensor& scales, const at::Tensor& biases,
                                  int64_t group_size, int64_t bits, bool transpose) {
  if (needs_grad({&x, &wq, &scales, &biases}))
    return AffineMatmulGrad::apply(x, wq, scales, biases, group_size, bits, transpose);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return affine_matmul_op().call(x, wq, scales, biases, group_size, bits, transpose);
}

// --- affine_matmul_many -------------------------------------------------------------------------
// Its outputs are affine_matmul's, so a call that needs a gradient is one affine_matmul per
// weight, each with its own grad_fn; others go to the backend's one-call kernel.

using AffineMatmulManyFn = std::vector<at::Tensor>(const at::Tensor&, at::TensorList,
                                                   at::TensorList, at::TensorList, int64_t,
                                                   int64_t);

std::vector<at::Tensor> affine_matmul_many_autograd(const at::Tensor& x, at::TensorList wq,
                                                    at::TensorList scales, at::TensorList biases,
                                                    int64_t group_size, int64_t bits) {
  bool grad = needs_grad({&x});
  for (const at::TensorList list : {wq, scales, biases})
    for (const at::Tensor& t : list) grad = grad || needs_grad({&t});
  if (grad) {
    (void)matmul_many_out_shapes(x, wq, scales, biases, group_size, bits);  // the lists' checks
    std::vector<at::Tensor> out;
    for (size_t i = 0; i < wq.size(); ++i)
      out.push_back(affine_matmul_autograd(x, wq[i], scales[i], biases[i], group_size, bits, true));
    return out;
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlxq::affine_matmul_many", "")
                             .typed<AffineMatmulManyFn>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, wq, scales, biases, group_size, bits);
}

// --- fp_matmul ----------------------------------------------------------------------------------

using FpMatmulFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              c10::string_view, int64_t, int64_t, bool,
                              const c10::optional<at::Tensor>&);

const c10::TypedOperatorHandle<FpMatmulFn>& fp_matmul_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mlxq::fp_matmul", "").typed<FpMatmulFn>();
  return op;
}

struct FpMatmulGrad : torch::autograd::Function<FpMatmulGrad> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& wq,
                            const at::Tensor& scales, const std::string& mode, int64_t group_size,
                            int64_t bits, bool transpose,
                            const c10::optional<at::Tensor>& global_scale) {
    ctx->save_for_backward({wq, scales, global_scale.value_or(at::Tensor())});
    ctx->saved_data["x_sizes"] = x.sym_sizes();
    ctx->saved_data["has_global_scale"] = global_scale.has_value();
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["transpose"] = transpose;
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return fp_matmul_op().call(x, wq, scales, mode, group_size, bits, transpose, global_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // needs_input_grad counts tensor arguments only; an absent global_scale is none
    const bool has_global = ctx->saved_data["has_global_scale"].toBool();
    if (ctx->needs_input_grad(2) || (has_global && ctx->needs_input_grad(3)))
      refuse_weight_grad("fp_matmul", "scales and global_scale");
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      const variable_list w = ctx->get_saved_variables();
      const c10::optional<at::Tensor> g =
          w[2].defined() ? c10::optional<at::Tensor>(w[2]) : c10::nullopt;
      grad_x = fp_matmul_op().call(grads[0], w[0], w[1], ctx->saved_data["mode"].toStringRef(),
                                   ctx->saved_data["group_size"].toInt(),
                                   ctx->saved_data["bits"].toInt(),
                                   !ctx->saved_data["transpose"].toBool(), g);
      grad_x = to_x_shape(grad_x, ctx->saved_data["x_sizes"]);
    }
    return {grad_x, {}, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor fp_matmul_autograd(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                              c10::string_view mode, int64_t group_size, int64_t bits,
                              bool transpose, const c10::optional<at::Tensor>& global_scale) {
  const at::Tensor g = global_scale.value_or(at::Tensor());
  if (needs_grad({&x, &wq, &scales, &g}))
    return FpMatmulGrad::apply(x, wq, scales, std::string(mode), group_size, bits, transpose,
                               global_scale);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return fp_matmul_op().call(x, wq, scales, mode, group_size, bits, transpose, global_scale);
}

// --- decode_attention ---------------------------------------------------------------------------
// An inference kernel without a derivative. Its refusal lives here too, not in Python: a Python
// autograd kernel would run on every decode call (once per layer per token), grad or not. A call
// that needs no gradient goes straight to the backend; one that does gets a grad_fn that
// refuses at backward time, instead of torch's silent "no autograd kernel" fallback.

using DecodeAttentionFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, std::optional<double>);

const c10::TypedOperatorHandle<DecodeAttentionFn>& decode_attention_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlxq::decode_attention", "")
                             .typed<DecodeAttentionFn>();
  return op;
}

struct DecodeAttentionGrad : torch::autograd::Function<DecodeAttentionGrad> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const std::optional<at::Tensor>& mask,
                            std::optional<double> scale) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return decode_attention_op().call(q, k, v, mask, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false,
                "mlxq.decode_attention is an inference kernel and has no gradient; use "
                "torch.nn.functional.scaled_dot_product_attention where gradients are needed");
    return {};
  }
};

at::Tensor decode_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& mask,
                                     std::optional<double> scale) {
  const at::Tensor m = mask.value_or(at::Tensor());
  if (needs_grad({&q, &k, &v, &m})) return DecodeAttentionGrad::apply(q, k, v, mask, scale);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return decode_attention_op().call(q, k, v, mask, scale);
}

// --- rms_norm -----------------------------------------------------------------------------------
// Inference only, like decode_attention: a call that needs a gradient gets a grad_fn that refuses
// at backward time (mlxq's norm hook keeps transformers' own forward for such calls).

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>&
rms_norm_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlxq::rms_norm", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op;
}

struct RmsNormGrad : torch::autograd::Function<RmsNormGrad> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            double eps) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return rms_norm_op().call(x, weight, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false,
                "mlxq.rms_norm is an inference kernel and has no gradient; use the model's own "
                "RMSNorm forward where gradients are needed");
    return {};
  }
};

at::Tensor rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (needs_grad({&x, &weight})) return RmsNormGrad::apply(x, weight, eps);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return rms_norm_op().call(x, weight, eps);
}

// --- rotary_embedding ---------------------------------------------------------------------------
// Inference only, like rms_norm (mlxq's rotary hook keeps transformers' own function when a
// gradient is needed).

using RotaryFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<RotaryFn>& rotary_embedding_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlxq::rotary_embedding", "")
                             .typed<RotaryFn>();
  return op;
}

struct RotaryGrad : torch::autograd::Function<RotaryGrad> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& cos, const at::Tensor& sin) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [q_out, k_out] = rotary_embedding_op().call(q, k, cos, sin);
    return {q_out, k_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false,
                "mlxq.rotary_embedding is an inference kernel and has no gradient; use the "
                "model's own apply_rotary_pos_emb where gradients are needed");
    return {};
  }
};

std::tuple<at::Tensor, at::Tensor> rotary_embedding_autograd(const at::Tensor& q,
                                                             const at::Tensor& k,
                                                             const at::Tensor& cos,
                                                             const at::Tensor& sin) {
  if (needs_grad({&q, &k, &cos, &sin})) {
    variable_list out = RotaryGrad::apply(q, k, cos, sin);
    return {out[0], out[1]};
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return rotary_embedding_op().call(q, k, cos, sin);
}

}  // namespace
}  // namespace mlxq

TORCH_LIBRARY_IMPL(mlxq, Autograd, m) {
  m.impl("affine_matmul", &mlxq::affine_matmul_autograd);
  m.impl("affine_matmul_many", &mlxq::affine_matmul_many_autograd);
  m.impl("fp_matmul", &mlxq::fp_matmul_autograd);
  m.impl("decode_attention", &mlxq::decode_attention_autograd);
  m.impl("rms_norm", &mlxq::rms_norm_autograd);
  m.impl("rotary_embedding", &mlxq::rotary_embedding_autograd);
}
