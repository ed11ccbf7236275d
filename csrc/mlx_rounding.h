// mx.dequantize's numerics, shared by the CPU and CUDA dequantize ops.
#pragma once

#include <ATen/ATen.h>

namespace mlxq {

// w = s*q + b as MLX computes it on the CPU: s*q rounded to the scales' dtype, then + b rounded
// again (two separate ops, so no fused multiply-add). `q` is the unpacked integers as fp32
// [rows, groups * group_size]; the product is exact in fp32 for fp16/bf16 scales (<= 19
// significant bits), so rounding it once to the dtype is MLX's own single rounding.
inline at::Tensor mlx_affine_map(const at::Tensor& q, const at::Tensor& scales,
                                 const at::Tensor& biases, int64_t rows, int64_t groups,
                                 int64_t group_size) {
  const at::Tensor q3 = q.view({rows, groups, group_size});
  const at::Tensor s3 = scales.reshape({rows, groups, 1});
  const at::Tensor b3 = biases.reshape({rows, groups, 1});
  const at::Tensor product = at::mul(q3, s3.to(at::kFloat)).to(scales.scalar_type());
  return at::add(product, b3);
}

}  // namespace mlxq
