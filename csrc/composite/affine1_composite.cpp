// 1-bit affine ops composed of ATen ops (composite.h): cpu/quantize.h's 1-bit rule and
// mx.dequantize's roundings (mlx_rounding.h) on tensors. Each packed bit is one value: value i
// of a row is bit i % 8 of the row's byte i / 8 (the little-endian bit stream).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>

#include <vector>

#include "checks.h"
#include "composite/composite.h"
#include "composite/matmul_decoded.h"
#include "mlx_rounding.h"

namespace mlxq::composite {
namespace {

void check_one_bit(int64_t bits) {
  TORCH_CHECK_VALUE(bits == 1, "mlxq: the composite affine ops take bits=1 only, got ", bits);
}

// The 0/1 values of packed rows [..., Kp] as fp32 [..., Kp * 32].
at::Tensor unpack_bits(const at::Tensor& wq) {
  const at::Tensor bytes = wq.contiguous().view(at::kInt).view(at::kByte).to(at::kInt);
  const at::Tensor shifts = at::arange(8, bytes.options());
  return at::bitwise_and(at::bitwise_right_shift(bytes.unsqueeze(-1), shifts), 1)
      .flatten(-2)
      .to(at::kFloat);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_quantize_1bit(const at::Tensor& w,
                                                                    int64_t group_size,
                                                                    int64_t bits) {
  check_quantize_input(w, group_size, bits);
  check_one_bit(bits);
  const c10::DeviceGuard device(w.device());
  const int64_t K = w.size(-1), G = K / group_size;
  const int64_t R = c10::multiply_integers(w.sizes().slice(0, w.dim() - 1));
  std::vector<int64_t> qshape(w.sizes().begin(), w.sizes().end());
  std::vector<int64_t> sshape = qshape;
  qshape.back() = packed_cols(K, bits);
  sshape.back() = G;
  const at::Tensor wf = w.to(at::kFloat).reshape({R, G, group_size});
  // quantize_group at 1 bit: s = max(max - min, 1e-7), b = min, q = rint((w - b) / s) in [0, 1]
  const at::Tensor w_min = wf.amin(-1, /*keepdim=*/true);
  const at::Tensor s = (wf.amax(-1, /*keepdim=*/true) - w_min).clamp_min(1e-7);
  const at::Tensor q = at::round((wf - w_min) / s);  // half to even, as nearbyint
  const at::Tensor q01 = at::where(q.gt(0), q.clamp_max(1), 0.0).to(at::kInt);  // NaN -> 0
  const at::Tensor weights = at::bitwise_left_shift(1, at::arange(8, q01.options()));
  const at::Tensor packed = (q01.reshape({R, K / 8, 8}) * weights).sum(-1).to(at::kByte);
  return {packed.view(at::kUInt32).reshape(qshape), s.to(w.scalar_type()).reshape(sshape),
          w_min.to(w.scalar_type()).reshape(sshape)};
}

at::Tensor affine_dequantize_1bit(const at::Tensor& wq, const at::Tensor& scales,
                                  const at::Tensor& biases, int64_t group_size, int64_t bits) {
  const PackedGeometry g = check_dequantize(wq, scales, biases, group_size, bits);
  check_one_bit(bits);
  const c10::DeviceGuard device(wq.device());
  std::vector<int64_t> shape(wq.sizes().begin(), wq.sizes().end());
  shape.back() = g.cols;
  const int64_t R = c10::multiply_integers(wq.sizes().slice(0, wq.dim() - 1));
  const at::Tensor q = unpack_bits(wq.reshape({R, wq.size(-1)}));
  return mlx_affine_map(q, scales, biases, R, g.groups, group_size).reshape(shape);
}

at::Tensor affine_matmul_1bit(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                              const at::Tensor& biases, int64_t group_size, int64_t bits,
                              bool transpose) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // autograd.cpp owns the gradient
  const MatmulGeometry g = check_matmul(x, wq, scales, biases, group_size, bits, transpose);
  check_one_bit(bits);
  if (x.numel() == 0 || wq.numel() == 0) return at::zeros(g.out_shape, x.options());
  const c10::DeviceGuard device(x.device());
  return matmul_decoded(x, g, transpose, [&](int64_t n0, int64_t n) {
    const bool all = n0 == 0 && n == g.w.rows;
    const at::Tensor q = unpack_bits(all ? wq : wq.narrow(-2, n0, n));
    const at::Tensor s = (all ? scales : scales.narrow(-2, n0, n)).to(at::kFloat);
    const at::Tensor b = (all ? biases : biases.narrow(-2, n0, n)).to(at::kFloat);
    // s*q + b in fp32 (q is 0 or 1: the weight is b or s + b, one rounding)
    return (q.unflatten(-1, {g.w.groups, group_size}) * s.unsqueeze(-1) + b.unsqueeze(-1))
        .flatten(-2);
  });
}

}  // namespace mlxq::composite
