// Python view of the Metal launches (mlxq._C.mps_launch_*) and of the native Metal backend
// (mlxq._C.mps_native_*, macOS builds only). mlxq.metal_backend picks the Metal path with these.
#include <torch/extension.h>

#include "mps/launch.h"
#ifdef MLXQ_WITH_MPS
#include "mps/native.h"
#endif

namespace mlxq::mps {
namespace {

namespace py = pybind11;

// kernel, grid, threads, threadgroup_memory (16-byte aligned, as encoded), buffers {index:
// tensor | params bytes}, params_index, outputs, empty.
py::dict to_dict(const Launch& l) {
  const plan::DispatchPlan& p = l.plan;
  py::dict d;
  d["kernel"] = p.kernel;
  d["grid"] = py::make_tuple(p.grid[0], p.grid[1], p.grid[2]);
  d["threads"] = py::make_tuple(p.threads[0], p.threads[1], p.threads[2]);
  py::list tgm;
  for (const auto& [index, bytes] : p.threadgroup_memory) {
    tgm.append(py::make_tuple(index, threadgroup_bytes_aligned(bytes)));
  }
  d["threadgroup_memory"] = tgm;
  py::dict buffers;
  for (const auto& [index, t] : l.tensors) buffers[py::int_(index)] = t;
  buffers[py::int_(l.params_index)] =
      py::bytes(reinterpret_cast<const char*>(p.params.data()), p.params.size());
  d["buffers"] = buffers;
  d["params_index"] = l.params_index;
  d["outputs"] = py::tuple(py::cast(l.outputs));
  d["empty"] = l.empty();
  return d;
}

}  // namespace

void register_mps_bindings(py::module& m) {
  m.def(
      "mps_launch_affine_matmul",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const at::Tensor& biases, int64_t group_size, int64_t bits, bool transpose) {
        return to_dict(launch_affine_matmul(x, wq, scales, biases, group_size, bits, transpose));
      },
      py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("group_size") = 64,
      py::arg("bits") = 4, py::arg("transpose") = true,
      "The Metal launch of affine_matmul: plan, bound tensors (converted and allocated on the "
      "operands' device) and outputs; the MPS backend encodes exactly this.");
  m.def(
      "mps_launch_affine_quantize",
      [](const at::Tensor& w, int64_t group_size, int64_t bits) {
        return to_dict(launch_affine_quantize(w, group_size, bits));
      },
      py::arg("w"), py::arg("group_size") = 64, py::arg("bits") = 4,
      "The Metal launch of affine_quantize.");
  m.def(
      "mps_launch_affine_dequantize",
      [](const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
         int64_t group_size, int64_t bits) {
        return to_dict(launch_affine_dequantize(wq, scales, biases, group_size, bits));
      },
      py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("group_size") = 64,
      py::arg("bits") = 4, "The Metal launch of affine_dequantize.");
#ifdef MLXQ_WITH_MPS
  m.attr("mps_native_compiled") = true;
  m.def("mps_native_load", &native::load_library, py::arg("path"),
        "Load the prebuilt metallib; returns '' on success, else the Metal error text.");
  m.def("mps_native_library_path", &native::library_path);
  m.def("mps_native_function_names", &native::function_names);
  m.def("mps_native_register", &native::register_kernels,
        "Register the native Metal kernels for the MPS dispatch key (once).");
  m.def("mps_native_registered", &native::kernels_registered);
#else
  m.attr("mps_native_compiled") = false;
#endif
}

}  // namespace mlxq::mps
