// Python view of the argument checks (mlxq._C.*_out_shape): the fake (meta) kernels of
// python/mlxq/ops.py call these, so that meta tensors and torch.compile accept and refuse
// exactly what the real kernels do. Tensors may be meta or fake tensors with symbolic sizes;
// shapes come back as lists of ints or torch.SymInts.
#include <torch/extension.h>

#include "checks.h"

namespace mlxq {

void register_check_bindings(pybind11::module& m) {
  namespace py = pybind11;
  m.def("matmul_out_shape", &matmul_out_shape, py::arg("x"), py::arg("wq"), py::arg("scales"),
        py::arg("biases"), py::arg("group_size"), py::arg("bits"), py::arg("transpose"),
        "Checks the arguments of affine_matmul (csrc/checks.cpp) and returns its output shape.");
  m.def(
      "matmul_many_out_shapes",
      [](const at::Tensor& x, const std::vector<at::Tensor>& wq,
         const std::vector<at::Tensor>& scales, const std::vector<at::Tensor>& biases,
         int64_t group_size,
         int64_t bits) { return matmul_many_out_shapes(x, wq, scales, biases, group_size, bits); },
      py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("group_size"),
      py::arg("bits"), "Checks the arguments of affine_matmul_many and returns its output shapes.");
  m.def("dequantize_out_shape", &dequantize_out_shape, py::arg("wq"), py::arg("scales"),
        py::arg("biases"), py::arg("group_size"), py::arg("bits"),
        "Checks the arguments of affine_dequantize and returns its output shape.");
  m.def("quantize_out_shapes", &quantize_out_shapes, py::arg("w"), py::arg("group_size"),
        py::arg("bits"),
        "Checks the arguments of affine_quantize and returns the shapes of wq, scales, biases.");
  // The gather checks read concrete sizes: the fake kernels call these for tensors without
  // symbolic sizes (under dynamic shapes they compute the output shape themselves).
  m.def(
      "gather_matmul_out_shape",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const at::Tensor& biases, const std::optional<at::Tensor>& lhs_indices,
         const std::optional<at::Tensor>& rhs_indices, int64_t group_size, int64_t bits,
         bool transpose) {
        return check_gather_matmul(x, wq, scales, biases, lhs_indices, rhs_indices, group_size,
                                   bits, transpose)
            .out_shape;
      },
      py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("lhs_indices"),
      py::arg("rhs_indices"), py::arg("group_size"), py::arg("bits"), py::arg("transpose"),
      "Checks the arguments of affine_gather_matmul (all but the index values) and returns its "
      "output shape.");
  m.def(
      "fp_gather_matmul_out_shape",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const std::string& mode, int64_t group_size, int64_t bits,
         const std::optional<at::Tensor>& lhs_indices, const std::optional<at::Tensor>& rhs_indices,
         bool transpose, const std::optional<at::Tensor>& global_scale) {
        const int m = check_fp_mode(mode, group_size, bits);
        return check_fp_gather_matmul(x, wq, scales, m, group_size, bits, lhs_indices, rhs_indices,
                                      transpose, global_scale)
            .out_shape;
      },
      py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("mode"), py::arg("group_size"),
      py::arg("bits"), py::arg("lhs_indices"), py::arg("rhs_indices"), py::arg("transpose"),
      py::arg("global_scale"),
      "Checks the arguments of fp_gather_matmul (all but the index values) and returns its "
      "output shape.");
  m.def(
      "check_rms_norm",
      [](const at::Tensor& x, const at::Tensor& weight, double eps) {
        (void)check_rms_norm(x, weight, eps);
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"),
      "Checks the arguments of rms_norm (its output takes the promoted dtype of x and weight).");
  m.def("check_rotary_embedding", &check_rotary_embedding, py::arg("q"), py::arg("k"),
        py::arg("cos"), py::arg("sin"), "Checks the arguments of rotary_embedding.");
  m.def("decode_attention_out_shape", &decode_attention_out_shape, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("mask"), py::arg("scale") = py::none(),
        "Checks the arguments of decode_attention and returns its output shape.");
}

}  // namespace mlxq
