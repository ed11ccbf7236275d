#include "metal_host/launch.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <map>
#include <string>

namespace mlxq::metal {
namespace {

// The packed weight as contiguous 32-bit words. int32 holds the same bits as uint32 and has
// every copy kernel on every backend, so a strided uint32 weight is made contiguous as int32.
at::Tensor packed_words(const at::Tensor& wq) {
  const at::Tensor w = wq.scalar_type() == at::kUInt32 ? wq.view(at::kInt) : wq;
  return w.contiguous();
}

// Outputs start uninitialised, except when nothing is launched: then an output with elements
// (affine_matmul with an empty reduction) must hold the empty sums, zeros.
at::Tensor new_output(const DispatchPlan& plan, size_t i, const at::TensorOptions& opts) {
  TORCH_INTERNAL_ASSERT(i < plan.out_shapes.size(), "mlxq: plan of ", plan.kernel, " has ",
                        plan.out_shapes.size(), " outputs, wanted output ", i);
  return plan.empty() ? at::zeros(plan.out_shapes[i], opts) : at::empty(plan.out_shapes[i], opts);
}

// Binds every plan binding to its tensor by role; "params" is the plan's own bytes.
Launch bind(DispatchPlan plan, const std::map<std::string, at::Tensor>& by_role,
            std::vector<at::Tensor> outputs) {
  Launch l;
  for (const Binding& b : plan.bindings) {
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
  DispatchPlan plan = plan_affine_matmul(x, wq, scales, biases, group_size, bits, transpose);
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
  DispatchPlan plan = plan_affine_quantize(w, group_size, bits);
  at::Tensor wq = new_output(plan, 0, w.options().dtype(at::kUInt32));
  at::Tensor scales = new_output(plan, 1, w.options());
  at::Tensor biases = new_output(plan, 2, w.options());
  std::map<std::string, at::Tensor> roles{
      {"w", w.contiguous()}, {"wq", wq}, {"scales", scales}, {"biases", biases}};
  return bind(std::move(plan), roles, {wq, scales, biases});
}

Launch launch_affine_dequantize(const at::Tensor& wq, const at::Tensor& scales,
                                const at::Tensor& biases, int64_t group_size, int64_t bits) {
  DispatchPlan plan = plan_affine_dequantize(wq, scales, biases, group_size, bits);
  at::Tensor out = new_output(plan, 0, scales.options());
  std::map<std::string, at::Tensor> roles{{"wq", packed_words(wq)},
                                          {"scales", scales.contiguous()},
                                          {"biases", biases.contiguous()},
                                          {"out", out}};
  return bind(std::move(plan), roles, {out});
}

void check_launch(const Launch& l, const PipelineLimits& limits, c10::DeviceType device) {
  const DispatchPlan& p = l.plan;
  for (const auto& [index, t] : l.tensors) {
    TORCH_CHECK_VALUE(t.device().type() == device, "mlxq: Metal kernel ", p.kernel, ": buffer ",
                      index, " is on ", t.device(), ", expected ", c10::DeviceTypeName(device));
  }
  const uint64_t threads = uint64_t{p.threads[0]} * p.threads[1] * p.threads[2];
  TORCH_CHECK(threads <= limits.max_threads_per_threadgroup, "mlxq: Metal kernel ", p.kernel,
              " needs ", threads, " threads per threadgroup, its pipeline allows ",
              limits.max_threads_per_threadgroup);
  int64_t tg_bytes = limits.static_threadgroup_bytes;
  for (const auto& [index, bytes] : p.threadgroup_memory) {
    tg_bytes += threadgroup_bytes_aligned(bytes);
  }
  TORCH_CHECK(tg_bytes <= limits.max_threadgroup_bytes, "mlxq: Metal kernel ", p.kernel, " needs ",
              tg_bytes, " bytes of threadgroup memory, the device allows ",
              limits.max_threadgroup_bytes);
}

void encode_launch(const Launch& l, Encoder& enc) {
  for (const auto& [index, t] : l.tensors) {
    enc.set_buffer(index, t, t.storage_offset() * static_cast<int64_t>(t.element_size()));
  }
  enc.set_bytes(l.params_index, l.plan.params);
  for (const auto& [index, bytes] : l.plan.threadgroup_memory) {
    enc.set_threadgroup_memory(index, threadgroup_bytes_aligned(bytes));
  }
  enc.dispatch_threadgroups(l.plan.grid, l.plan.threads);
}

}  // namespace mlxq::metal

namespace mlxq::metal {

Launch launch_affine_gather_matmul(const at::Tensor& x, const at::Tensor& wq,
                                   const at::Tensor& scales, const at::Tensor& biases,
                                   const std::optional<at::Tensor>& lhs_indices,
                                   const std::optional<at::Tensor>& rhs_indices, int64_t group_size,
                                   int64_t bits, bool transpose, bool sorted_indices) {
  const GatherGeometry g = check_gather_matmul(x, wq, scales, biases, lhs_indices, rhs_indices,
                                               group_size, bits, transpose);
  DispatchPlan plan =
      plan_affine_gather_matmul(g, x.scalar_type(), group_size, bits, transpose, sorted_indices);
  const at::ScalarType dt = x.scalar_type();
  at::Tensor out = new_output(plan, 0, x.options());
  const auto [lhs, rhs] = gather_pair_indices(g, x, lhs_indices, rhs_indices);
  std::map<std::string, at::Tensor> roles{{"x", x.contiguous()},
                                          {"wq", packed_words(wq)},
                                          {"scales", scales.to(dt).contiguous()},
                                          {"biases", biases.to(dt).contiguous()},
                                          {"out", out},
                                          {"lhs_indices", lhs.to(at::kInt).contiguous()},
                                          {"rhs_indices", rhs.to(at::kInt).contiguous()}};
  return bind(std::move(plan), roles, {out});
}

}  // namespace mlxq::metal

namespace mlxq::metal {

namespace {
// nvfp4's global scale as bound: the tensor's own, or 448 * 6 (factor exactly 1).
at::Tensor bound_global_scale(const std::optional<at::Tensor>& global_scale,
                              const at::TensorOptions& opts) {
  return global_scale.has_value() ? global_scale->reshape({1}).contiguous()
                                  : at::full({1}, 448.0f * 6.0f, opts.dtype(at::kFloat));
}
}  // namespace

Launch launch_fp_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                        const std::optional<at::Tensor>& global_scale, c10::string_view mode,
                        int64_t group_size, int64_t bits, bool transpose) {
  DispatchPlan plan =
      plan_fp_matmul(x, wq, scales, global_scale, mode, group_size, bits, transpose);
  at::Tensor out = new_output(plan, 0, x.options());
  std::map<std::string, at::Tensor> roles{
      {"x", x.contiguous()},
      {"wq", packed_words(wq)},
      {"scales", scales.contiguous()},
      {"global_scale", bound_global_scale(global_scale, x.options())},
      {"out", out}};
  return bind(std::move(plan), roles, {out});
}

Launch launch_fp_gather_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                               c10::string_view mode, int64_t group_size, int64_t bits,
                               const std::optional<at::Tensor>& lhs_indices,
                               const std::optional<at::Tensor>& rhs_indices, bool transpose,
                               const std::optional<at::Tensor>& global_scale, bool sorted_indices) {
  const int m = check_fp_mode(mode, group_size, bits);
  const GatherGeometry g = check_fp_gather_matmul(x, wq, scales, m, group_size, bits, lhs_indices,
                                                  rhs_indices, transpose, global_scale);
  DispatchPlan plan = plan_fp_gather_matmul(g, x.scalar_type(), m, transpose, sorted_indices);
  at::Tensor out = new_output(plan, 0, x.options());
  const auto [lhs, rhs] = gather_pair_indices(g, x, lhs_indices, rhs_indices);
  // One value per matrix of wq (at least one, so that the buffer is never empty).
  const at::Tensor global = global_scale.has_value()
                                ? global_scale->reshape({-1}).contiguous()
                                : at::full({std::max<int64_t>(g.w_batch, 1)}, 448.0f * 6.0f,
                                           x.options().dtype(at::kFloat));
  std::map<std::string, at::Tensor> roles{{"x", x.contiguous()},
                                          {"wq", packed_words(wq)},
                                          {"scales", scales.contiguous()},
                                          {"global_scale", global},
                                          {"out", out},
                                          {"lhs_indices", lhs.to(at::kInt).contiguous()},
                                          {"rhs_indices", rhs.to(at::kInt).contiguous()}};
  return bind(std::move(plan), roles, {out});
}

Launch launch_fp_dequantize(const at::Tensor& wq, const at::Tensor& scales, c10::string_view mode,
                            int64_t group_size, int64_t bits,
                            const std::optional<at::Tensor>& global_scale,
                            std::optional<at::ScalarType> dtype) {
  DispatchPlan plan = plan_fp_dequantize(wq, scales, mode, group_size, bits, global_scale, dtype);
  at::Tensor out =
      new_output(plan, 0, wq.options().dtype(fp_dequantize_dtype(global_scale, dtype)));
  std::map<std::string, at::Tensor> roles{
      {"wq", packed_words(wq)},
      {"scales", scales.contiguous()},
      {"global_scale", bound_global_scale(global_scale, wq.options())},
      {"out", out}};
  return bind(std::move(plan), roles, {out});
}

Launch launch_fp_quantize(const at::Tensor& w, c10::string_view mode, int64_t group_size,
                          int64_t bits, const std::optional<at::Tensor>& global_scale) {
  DispatchPlan plan = plan_fp_quantize(w, mode, group_size, bits, global_scale);
  at::Tensor wq = new_output(plan, 0, w.options().dtype(at::kUInt32));
  at::Tensor scales = new_output(plan, 1, w.options().dtype(at::kByte));
  std::map<std::string, at::Tensor> roles{
      {"w", w.contiguous()},
      {"wq", wq},
      {"scales", scales},
      {"global_scale", bound_global_scale(global_scale, w.options())}};
  return bind(std::move(plan), roles, {wq, scales});
}

}  // namespace mlxq::metal
