// The matmul of the composite ops (composite.h): y = x @ W.T or x @ W for a weight that a
// function decodes to fp32 rows, with the composites' numerics: the exact fp32 weight for fp32 x
// and for up to kExactRows rows of x; above, fp16/bf16 x takes the weight rounded to its dtype
// and the GEMM's fp32 accumulation. A 2-D x @ W.T decodes W in row tiles, so that a large weight
// is never held decoded whole.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "composite/composite.h"

namespace mlxq::composite {

// Values per row tile of a decoded weight (its intermediates hold ~20 bytes a value).
constexpr int64_t kDecodeBlockValues = int64_t{1} << 24;

// `decode(n0, n)` returns rows [n0, n0 + n) of the fp32 weight, [..., n, K] (batch included; a
// batched weight is decoded whole, n0 = 0 and n = rows). g: the op's checked geometry.
template <class Decode>
at::Tensor matmul_decoded(const at::Tensor& x, const MatmulGeometry& g, bool transpose,
                          const Decode& decode) {
  const at::ScalarType dt = x.scalar_type();
  const at::ScalarType wt = dt == at::kFloat || g.M <= kExactRows ? at::kFloat : dt;
  const at::Tensor xw = x.to(wt);
  const int64_t N = g.w.rows, K = g.w.cols;
  if (g.batch.empty() && transpose) {
    const at::Tensor x2 = xw.reshape({g.M, K});
    const int64_t rows = std::max<int64_t>(1, kDecodeBlockValues / K);
    at::Tensor y = at::empty({g.M, N}, xw.options());
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t n = std::min(rows, N - n0);
      const at::Tensor w = decode(n0, n).to(wt);
      if (n == N) {
        at::mm_out(y, x2, w.t());
      } else {
        at::Tensor out = y.narrow(1, n0, n);
        at::mm_out(out, x2, w.t());
      }
    }
    return y.to(dt).reshape(g.out_shape);
  }
  const at::Tensor w = decode(0, N).to(wt);
  return at::matmul(xw, transpose ? w.transpose(-1, -2) : w).to(dt).reshape(g.out_shape);
}

}  // namespace mlxq::composite
