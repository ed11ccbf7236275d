// Python view of the composite ops (mlxq._C.composite_*): the very functions that serve as CUDA
// kernels (register_cuda.cpp), callable on CPU tensors so that the tests hold them against the
// CPU ops on machines without a GPU. Not public API: users call torch.ops.mlxq.*.
#include <torch/extension.h>

#include <string>

#include "composite/composite.h"

namespace mlxq {

void register_composite_bindings(pybind11::module& m) {
  namespace py = pybind11;
  namespace c = mlxq::composite;
  m.def(
      "composite_fp_quantize",
      [](const at::Tensor& w, const std::string& mode, int64_t group_size, int64_t bits,
         const std::optional<at::Tensor>& global_scale) {
        return c::fp_quantize(w, mode, group_size, bits, global_scale);
      },
      py::arg("w"), py::arg("mode"), py::arg("group_size"), py::arg("bits"),
      py::arg("global_scale") = py::none(), "fp_quantize composed of ATen ops (composite.h)");
  m.def(
      "composite_fp_dequantize",
      [](const at::Tensor& wq, const at::Tensor& scales, const std::string& mode,
         int64_t group_size, int64_t bits, const std::optional<at::Tensor>& global_scale,
         std::optional<at::ScalarType> dtype) {
        return c::fp_dequantize(wq, scales, mode, group_size, bits, global_scale, dtype);
      },
      py::arg("wq"), py::arg("scales"), py::arg("mode"), py::arg("group_size"), py::arg("bits"),
      py::arg("global_scale") = py::none(), py::arg("dtype") = py::none(),
      "fp_dequantize composed of ATen ops (composite.h)");
  m.def(
      "composite_fp_matmul",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const std::string& mode, int64_t group_size, int64_t bits, bool transpose,
         const std::optional<at::Tensor>& global_scale) {
        return c::fp_matmul(x, wq, scales, mode, group_size, bits, transpose, global_scale);
      },
      py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("mode"), py::arg("group_size"),
      py::arg("bits"), py::arg("transpose") = true, py::arg("global_scale") = py::none(),
      "fp_matmul composed of ATen ops (composite.h)");
  m.def("composite_affine_quantize_1bit", &c::affine_quantize_1bit, py::arg("w"),
        py::arg("group_size"), py::arg("bits") = 1, "1-bit affine_quantize from ATen ops");
  m.def("composite_affine_dequantize_1bit", &c::affine_dequantize_1bit, py::arg("wq"),
        py::arg("scales"), py::arg("biases"), py::arg("group_size"), py::arg("bits") = 1,
        "1-bit affine_dequantize from ATen ops");
  m.def("composite_affine_matmul_1bit", &c::affine_matmul_1bit, py::arg("x"), py::arg("wq"),
        py::arg("scales"), py::arg("biases"), py::arg("group_size"), py::arg("bits") = 1,
        py::arg("transpose") = true, "1-bit affine_matmul from ATen ops");
  m.def("composite_affine_gather_matmul", &c::affine_gather_matmul, py::arg("x"), py::arg("wq"),
        py::arg("scales"), py::arg("biases"), py::arg("lhs_indices") = py::none(),
        py::arg("rhs_indices") = py::none(), py::arg("group_size") = 64, py::arg("bits") = 4,
        py::arg("transpose") = true, py::arg("sorted_indices") = false,
        py::arg("capturable") = false,
        "affine_gather_matmul grouped by expert over the device's affine_matmul (composite.h); "
        "capturable: pair by pair, the indices checked on the device (no host read)");
  m.def(
      "composite_fp_gather_matmul",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const std::string& mode, int64_t group_size, int64_t bits,
         const std::optional<at::Tensor>& lhs_indices, const std::optional<at::Tensor>& rhs_indices,
         bool transpose, const std::optional<at::Tensor>& global_scale, bool sorted_indices,
         bool capturable) {
        return c::fp_gather_matmul(x, wq, scales, mode, group_size, bits, lhs_indices, rhs_indices,
                                   transpose, global_scale, sorted_indices, capturable);
      },
      py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("mode"), py::arg("group_size"),
      py::arg("bits"), py::arg("lhs_indices") = py::none(), py::arg("rhs_indices") = py::none(),
      py::arg("transpose") = true, py::arg("global_scale") = py::none(),
      py::arg("sorted_indices") = false, py::arg("capturable") = false,
      "fp_gather_matmul grouped by expert over the device's fp_matmul (composite.h); "
      "capturable: pair by pair, the indices checked on the device (no host read)");
  m.def("composite_rms_norm", &c::rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"),
        "rms_norm composed of ATen ops (composite.h)");
  m.def("composite_rotary_embedding", &c::rotary_embedding, py::arg("q"), py::arg("k"),
        py::arg("cos"), py::arg("sin"), "rotary_embedding composed of ATen ops (composite.h)");
  m.def("composite_decode_attention", &c::decode_attention, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("mask") = py::none(), py::arg("scale") = py::none(),
        "decode_attention composed of ATen ops (composite.h)");
}

}  // namespace mlxq
