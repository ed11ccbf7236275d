// Python view of the dispatch plan (mlxq._C.plan_affine_*): plain dicts, so that the emulator,
// the runtime-compiled fallback and tests read the same plan the MPS backend executes. Shapes
// alone can be planned by passing meta tensors.
#include <torch/extension.h>

#include "metal_host/dispatch_plan.h"

namespace mlxq::metal {
namespace {

pybind11::dict to_dict(const DispatchPlan& plan) {
  pybind11::dict d;
  d["kernel"] = plan.kernel;
  d["dtype"] = plan.dtype;
  d["grid"] = pybind11::make_tuple(plan.grid[0], plan.grid[1], plan.grid[2]);
  d["threads"] = pybind11::make_tuple(plan.threads[0], plan.threads[1], plan.threads[2]);
  pybind11::list bindings;
  for (const Binding& b : plan.bindings) bindings.append(pybind11::make_tuple(b.index, b.role));
  d["bindings"] = bindings;
  pybind11::list tgm;
  for (const auto& [index, bytes] : plan.threadgroup_memory) {
    tgm.append(pybind11::make_tuple(index, bytes));
  }
  d["threadgroup_memory"] = tgm;
  d["params"] =
      pybind11::bytes(reinterpret_cast<const char*>(plan.params.data()), plan.params.size());
  pybind11::list shapes;
  for (const auto& s : plan.out_shapes) shapes.append(pybind11::tuple(pybind11::cast(s)));
  d["out_shapes"] = shapes;
  d["empty"] = plan.empty();
  return d;
}

}  // namespace

void register_plan_bindings(pybind11::module& m) {
  m.def(
      "plan_affine_matmul",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const at::Tensor& biases, int64_t group_size, int64_t bits, bool transpose) {
        return to_dict(plan_affine_matmul(x, wq, scales, biases, group_size, bits, transpose));
      },
      pybind11::arg("x"), pybind11::arg("wq"), pybind11::arg("scales"), pybind11::arg("biases"),
      pybind11::arg("group_size") = 64, pybind11::arg("bits") = 4,
      pybind11::arg("transpose") = true,
      "Metal dispatch plan of affine_matmul (kernel, grid, threads, bindings, threadgroup "
      "memory, params bytes, output shapes). Tensors may be on the meta device.");
  m.def(
      "plan_affine_quantize",
      [](const at::Tensor& w, int64_t group_size, int64_t bits) {
        return to_dict(plan_affine_quantize(w, group_size, bits));
      },
      pybind11::arg("w"), pybind11::arg("group_size") = 64, pybind11::arg("bits") = 4,
      "Metal dispatch plan of affine_quantize.");
  m.def(
      "plan_affine_dequantize",
      [](const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
         int64_t group_size, int64_t bits) {
        return to_dict(plan_affine_dequantize(wq, scales, biases, group_size, bits));
      },
      pybind11::arg("wq"), pybind11::arg("scales"), pybind11::arg("biases"),
      pybind11::arg("group_size") = 64, pybind11::arg("bits") = 4,
      "Metal dispatch plan of affine_dequantize.");
  m.def(
      "plan_affine_gather_matmul",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const at::Tensor& biases, const std::optional<at::Tensor>& lhs_indices,
         const std::optional<at::Tensor>& rhs_indices, int64_t group_size, int64_t bits,
         bool transpose, bool sorted_indices) {
        return to_dict(plan_affine_gather_matmul(x, wq, scales, biases, lhs_indices, rhs_indices,
                                                 group_size, bits, transpose, sorted_indices));
      },
      pybind11::arg("x"), pybind11::arg("wq"), pybind11::arg("scales"), pybind11::arg("biases"),
      pybind11::arg("lhs_indices") = pybind11::none(),
      pybind11::arg("rhs_indices") = pybind11::none(), pybind11::arg("group_size") = 64,
      pybind11::arg("bits") = 4, pybind11::arg("transpose") = true,
      pybind11::arg("sorted_indices") = false,
      "Metal dispatch plan of affine_gather_matmul (the indices are bound as flat uint32 "
      "tensors, roles lhs_indices and rhs_indices).");
  m.def(
      "plan_fp_matmul",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const std::string& mode, int64_t group_size, int64_t bits, bool transpose,
         const std::optional<at::Tensor>& global_scale) {
        return to_dict(
            plan_fp_matmul(x, wq, scales, global_scale, mode, group_size, bits, transpose));
      },
      pybind11::arg("x"), pybind11::arg("wq"), pybind11::arg("scales"), pybind11::arg("mode"),
      pybind11::arg("group_size"), pybind11::arg("bits"), pybind11::arg("transpose") = true,
      pybind11::arg("global_scale") = pybind11::none(),
      "Metal dispatch plan of fp_matmul (mxfp4, nvfp4, mxfp8; arguments in the op's order).");
  m.def(
      "plan_fp_gather_matmul_geometry",
      [](int64_t M, int64_t rows, int64_t cols, const std::vector<int64_t>& index_shape,
         int64_t x_batch, int64_t w_batch, at::ScalarType dtype, const std::string& mode,
         int64_t group_size, int64_t bits, bool transpose, bool sorted_indices) {
        const int m = check_fp_mode(mode, group_size, bits);
        TORCH_CHECK_VALUE(M >= 0 && rows >= 0 && cols >= 0 && cols % group_size == 0,
                          "mlxq: bad gather geometry");
        GatherGeometry g;
        g.w.rows = rows;
        g.w.cols = cols;
        g.w.groups = cols / group_size;
        g.w.batch = {w_batch};
        g.index_shape = index_shape;
        g.x_batch = x_batch;
        g.w_batch = w_batch;
        g.M = M;
        g.in_features = transpose ? cols : rows;
        g.out_features = transpose ? rows : cols;
        g.out_shape = index_shape;
        g.out_shape.push_back(M);
        g.out_shape.push_back(g.out_features);
        return to_dict(plan_fp_gather_matmul(g, dtype, m, transpose, sorted_indices));
      },
      pybind11::arg("M"), pybind11::arg("rows"), pybind11::arg("cols"),
      pybind11::arg("index_shape"), pybind11::arg("x_batch"), pybind11::arg("w_batch"),
      pybind11::arg("dtype"), pybind11::arg("mode"), pybind11::arg("group_size"),
      pybind11::arg("bits"), pybind11::arg("transpose") = true,
      pybind11::arg("sorted_indices") = false,
      "Metal dispatch plan of the float-mode gather matmul from its geometry (M rows per pair, "
      "w_batch matrices of [rows, cols], x_batch matrices of x, the broadcast index shape).");
  m.def(
      "plan_fp_gather_matmul",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const std::string& mode, int64_t group_size, int64_t bits,
         const std::optional<at::Tensor>& lhs_indices, const std::optional<at::Tensor>& rhs_indices,
         bool transpose, const std::optional<at::Tensor>& global_scale, bool sorted_indices) {
        return to_dict(plan_fp_gather_matmul(x, wq, scales, mode, group_size, bits, lhs_indices,
                                             rhs_indices, transpose, global_scale, sorted_indices));
      },
      pybind11::arg("x"), pybind11::arg("wq"), pybind11::arg("scales"), pybind11::arg("mode"),
      pybind11::arg("group_size"), pybind11::arg("bits"),
      pybind11::arg("lhs_indices") = pybind11::none(),
      pybind11::arg("rhs_indices") = pybind11::none(), pybind11::arg("transpose") = true,
      pybind11::arg("global_scale") = pybind11::none(), pybind11::arg("sorted_indices") = false,
      "Metal dispatch plan of fp_gather_matmul (arguments in the op's order). Tensors may be on "
      "the meta device.");
  m.def(
      "plan_fp_dequantize",
      [](const at::Tensor& wq, const at::Tensor& scales, const std::string& mode,
         int64_t group_size, int64_t bits, const std::optional<at::Tensor>& global_scale,
         std::optional<at::ScalarType> dtype) {
        return to_dict(plan_fp_dequantize(wq, scales, mode, group_size, bits, global_scale, dtype));
      },
      pybind11::arg("wq"), pybind11::arg("scales"), pybind11::arg("mode"),
      pybind11::arg("group_size"), pybind11::arg("bits"),
      pybind11::arg("global_scale") = pybind11::none(), pybind11::arg("dtype") = pybind11::none(),
      "Metal dispatch plan of fp_dequantize (arguments in the op's order).");
  m.def(
      "plan_fp_quantize",
      [](const at::Tensor& w, const std::string& mode, int64_t group_size, int64_t bits,
         const std::optional<at::Tensor>& global_scale) {
        return to_dict(plan_fp_quantize(w, mode, group_size, bits, global_scale));
      },
      pybind11::arg("w"), pybind11::arg("mode"), pybind11::arg("group_size"), pybind11::arg("bits"),
      pybind11::arg("global_scale") = pybind11::none(),
      "Metal dispatch plan of fp_quantize (arguments in the op's order).");
}

}  // namespace mlxq::metal
