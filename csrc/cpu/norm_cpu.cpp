// CPU kernel of mlxq::rms_norm (ops.cpp): transformers' Llama-family RMSNorm in one call. A
// decode step runs 2 norms a layer on one row each, and transformers' forward spends seven tensor
// ops on each (widen, square, mean, add, rsqrt, multiply, round), which costs more than the row.
// Each value is computed as there: squares in fp32, their mean (summed in double, so within
// fp32 rounding of torch's own summation order), fp32 rsqrt as 1 / sqrt, the normalized value
// rounded to the dtype of x, then times weight in the promoted dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"

namespace mlxq::cpu {
namespace {

template <typename X, typename W, typename Y>
void rms_norm_rows(const X* x, const W* w, Y* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const X* xr = x + r * D;
      double sum = 0.0;
      for (int64_t i = 0; i < D; ++i) {
        const float v = static_cast<float>(xr[i]);
        sum += static_cast<double>(v * v);
      }
      const float variance = static_cast<float>(sum / static_cast<double>(D));
      const float inv = 1.0f / std::sqrt(variance + eps);
      Y* yr = y + r * D;
      for (int64_t i = 0; i < D; ++i) {
        const X normalized = static_cast<X>(static_cast<float>(xr[i]) * inv);
        yr[i] = static_cast<Y>(static_cast<float>(w[i]) * static_cast<float>(normalized));
      }
    }
  });
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType out_type = check_rms_norm(x, weight, eps);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_type));
  const int64_t D = x.size(-1), rows = D == 0 ? 0 : x.numel() / D;
  if (rows == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_x", [&] {
    using X = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, weight.scalar_type(), "rms_norm_w", [&] {
          using W = scalar_t;
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_type, "rms_norm_y", [&] {
            rms_norm_rows<X, W, scalar_t>(xc.const_data_ptr<X>(), wc.const_data_ptr<W>(),
                                          y.mutable_data_ptr<scalar_t>(), rows, D,
                                          static_cast<float>(eps));
          });
        });
  });
  return y;
}

}  // namespace
}  // namespace mlxq::cpu

TORCH_LIBRARY_IMPL(mlxq, CPU, m) { m.impl("rms_norm", &mlxq::cpu::rms_norm_cpu); }
