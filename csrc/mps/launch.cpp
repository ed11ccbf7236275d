#include "mps/launch.h"

#include <c10/util/Exception.h>

#include <map>
#include <string>

namespace mlxq::mps {
namespace {

// The packed weight as contiguous 32-bit words. int32 holds the same bits as uint32 and has
// every copy kernel on every backend, so a strided uint32 weight is made contiguous as int32.
at::Tensor packed_words(const at::Tensor& wq) {
  const at::Tensor w = wq.scalar_type() == at::kUInt32 ? wq.view(at::kInt) : wq;
  return w.contiguous();
}

// Outputs start uninitialised, except when nothing is launched: then an output with elements
// (affine_matmul with an empty reduction) must hold the empty sums, zeros.
at::Tensor new_output(const plan::DispatchPlan& plan, size_t i, const at::TensorOptions& opts) {
  TORCH_INTERNAL_ASSERT(i < plan.out_shapes.size(), "mlxq: plan of ", plan.kernel, " has ",
                        plan.out_shapes.size(), " outputs, wanted output ", i);
  return plan.empty() ? at::zeros(plan.out_shapes[i], opts) : at::empty(plan.out_shapes[i], opts);
}

// Binds every plan binding to its tensor by role; "params" is the plan's own bytes.
Launch bind(plan::DispatchPlan plan, const std::map<std::string, at::Tensor>& by_role,
            std::vector<at::Tensor> outputs) {
  Launch l;
  for (const plan::Binding& b : plan.bindings) {
    if (b.role == "params") {
      l.params_index = b.index;
      continue;
    }
    auto it = by_role.find(b.role);
    TORCH_INTERNAL_ASSERT(it != by_role.end(), "mlxq: the plan of ", plan.kernel,
                          " binds an unknown role '", b.role, "' to buffer ", b.index);
    l.tensors.emplace_back(b.index, it->second);
  }
  TORCH_INTERNAL_ASSERT(l.params_index >= 0, "mlxq: the plan of ", plan.kernel, " has no params");
  l.plan = std::move(plan);
  l.outputs = std::move(outputs);
  return l;
}

}  // namespace

Launch launch_affine_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits,
                            bool transpose) {
  plan::DispatchPlan plan =
      plan::plan_affine_matmul(x, wq, scales, biases, group_size, bits, transpose);
  // The kernels read scales and biases in the dtype of x (all math is fp32 inside).
  const at::ScalarType dt = x.scalar_type();
  at::Tensor out = new_output(plan, 0, x.options());
  std::map<std::string, at::Tensor> roles{{"x", x.contiguous()},
                                          {"wq", packed_words(wq)},
                                          {"scales", scales.to(dt).contiguous()},
                                          {"biases", biases.to(dt).contiguous()},
                                          {"out", out}};
  return bind(std::move(plan), roles, {out});
}

Launch launch_affine_quantize(const at::Tensor& w, int64_t group_size, int64_t bits) {
  plan::DispatchPlan plan = plan::plan_affine_quantize(w, group_size, bits);
  at::Tensor wq = new_output(plan, 0, w.options().dtype(at::kUInt32));
  at::Tensor scales = new_output(plan, 1, w.options());
  at::Tensor biases = new_output(plan, 2, w.options());
  std::map<std::string, at::Tensor> roles{
      {"w", w.contiguous()}, {"wq", wq}, {"scales", scales}, {"biases", biases}};
  return bind(std::move(plan), roles, {wq, scales, biases});
}

Launch launch_affine_dequantize(const at::Tensor& wq, const at::Tensor& scales,
                                const at::Tensor& biases, int64_t group_size, int64_t bits) {
  plan::DispatchPlan plan = plan::plan_affine_dequantize(wq, scales, biases, group_size, bits);
  at::Tensor out = new_output(plan, 0, scales.options());
  std::map<std::string, at::Tensor> roles{{"wq", packed_words(wq)},
                                          {"scales", scales.contiguous()},
                                          {"biases", biases.contiguous()},
                                          {"out", out}};
  return bind(std::move(plan), roles, {out});
}

}  // namespace mlxq::mps
