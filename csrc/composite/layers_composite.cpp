// rms_norm, rotary_embedding and decode_attention composed of ATen ops (composite.h): the CUDA
// kernels of these ops (decode_attention's only above the head dims of cuda/attention_cuda.cu),
// and callable on CPU tensors so that the tests hold them against the CPU
// kernels. Each restates its schema's numerics (ops.cpp) with tensor ops in fp32.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "checks.h"
#include "composite/composite.h"

namespace mlxq::composite {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // autograd.cpp refuses gradients
  const at::ScalarType out_type = check_rms_norm(x, weight, eps);
  const c10::DeviceGuard device(x.device());
  // fp32 squares and their mean, 1 / sqrt (both correctly rounded, as the CPU op's) rather than
  // rsqrt, whose CUDA version is not; the normalized value rounded to the dtype of x, then the
  // product with weight in fp32 rounded once to the promoted dtype (the CPU op computes in fp32
  // whatever the dtypes, so fp64 operands too).
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor variance = xf.square().mean(-1, /*keepdim=*/true);
  const at::Tensor inv = at::reciprocal(at::sqrt(variance + static_cast<float>(eps)));
  const at::Tensor normalized = (xf * inv).to(x.scalar_type()).to(at::kFloat);
  return (weight.to(at::kFloat) * normalized).to(out_type);
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& cos, const at::Tensor& sin) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_rotary_embedding(q, k, cos, sin);
  const c10::DeviceGuard device(q.device());
  // transformers' apply_rotary_pos_emb op for op: x * cos + rotate_half(x) * sin, each product
  // and the sum a tensor op of x's dtype (so each rounds once), into outputs laid out as x.
  const at::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);
  const auto rotate = [&](const at::Tensor& x) {
    const int64_t half = x.size(-1) / 2;
    const at::Tensor rotated =
        at::cat({x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)}, /*dim=*/-1);
    at::Tensor out = at::empty_like(x);
    at::add_out(out, x * c, rotated * s);
    return out;
  };
  return {rotate(q), rotate(k)};
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, std::optional<double> scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const AttentionGeometry g = check_decode_attention(q, k, v, mask, scale);
  const c10::DeviceGuard device(q.device());
  if (g.B * g.Hq * g.Lq * g.D == 0) return at::empty({g.B, g.Hq, g.Lq, g.D}, q.options());
  if (g.Lk == 0) return at::zeros({g.B, g.Hq, g.Lq, g.D}, q.options());  // no key attended
  const float s = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(g.D)));
  // Query heads h = kv * rep + j share kv head kv: q viewed as [B, Hkv, rep * Lq, D], so each kv
  // head is one batched product (k and v are not repeated). All fp32: the 16-bit caches are
  // widened (a copy; the CPU kernel reads them in place); fp32 matmuls follow torch's TF32
  // setting, off by default.
  const int64_t rep = g.Hq / g.Hkv;
  const at::Tensor qf = q.to(at::kFloat).reshape({g.B, g.Hkv, rep * g.Lq, g.D});
  const at::Tensor kf = k.to(at::kFloat), vf = v.to(at::kFloat);
  at::Tensor scores = at::matmul(qf, kf.transpose(-1, -2)).mul_(s);  // scale * (q . k)
  scores = scores.view({g.B, g.Hq, g.Lq, g.Lk});
  if (mask.has_value()) {
    if (mask->scalar_type() == at::kBool) {
      scores.masked_fill_(mask->logical_not(), -std::numeric_limits<float>::infinity());
    } else {
      scores.add_(mask->to(at::kFloat));
    }
  }
  // softmax with the row's max subtracted; a row whose every score is -inf subtracts 0 instead,
  // so that its weights are exp(-inf) = 0 (not NaN) and its output 0, as on the CPU
  at::Tensor top = scores.amax(-1, /*keepdim=*/true);
  top.masked_fill_(top == -std::numeric_limits<float>::infinity(), 0.0);
  const at::Tensor p = (scores - top).exp_();
  const at::Tensor l = p.sum(-1, /*keepdim=*/true);
  const at::Tensor o =
      at::matmul(p.view({g.B, g.Hkv, rep * g.Lq, g.Lk}), vf).view({g.B, g.Hq, g.Lq, g.D});
  return at::where(l == 0, at::zeros({}, o.options()), o / l).to(q.scalar_type());
}

}  // namespace mlxq::composite
