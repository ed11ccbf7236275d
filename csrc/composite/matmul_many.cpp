// affine_matmul_many on backends without a one-call kernel of their own (MPS, CUDA): one
// affine_matmul per weight, which is what the op's outputs are defined to be. The CPU registers
// its own kernel (cpu/affine_cpu.cpp), which takes precedence over this one.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

namespace mlxq::composite {
namespace {

using AffineMatmulFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, int64_t, int64_t, bool);

std::vector<at::Tensor> affine_matmul_each(const at::Tensor& x, at::TensorList wq,
                                           at::TensorList scales, at::TensorList biases,
                                           int64_t group_size, int64_t bits) {
  (void)matmul_many_out_shapes(x, wq, scales, biases, group_size, bits);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlxq::affine_matmul", "")
                             .typed<AffineMatmulFn>();
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < wq.size(); ++i)
    out.push_back(op.call(x, wq[i], scales[i], biases[i], group_size, bits, true));
  return out;
}

}  // namespace
}  // namespace mlxq::composite

TORCH_LIBRARY_IMPL(mlxq, CompositeExplicitAutograd, m) {
  m.impl("affine_matmul_many", &mlxq::composite::affine_matmul_each);
}
