// Python view of the Metal launches (mlxq._C.metal_launch_*) and of the native Metal backend
// (mlxq._C.mps_native_*, macOS builds only). mlxq.metal.backend picks the Metal path with these.
#include <torch/extension.h>

#include <string>

#include "metal_host/launch.h"
#ifdef MLXQ_WITH_MPS
#include "mps/native.h"
#endif

namespace mlxq::metal {
namespace {

namespace py = pybind11;

// kernel, grid, threads, threadgroup_memory (16-byte aligned, as encoded), buffers {index:
// tensor | params bytes}, params_index, outputs, empty.
py::dict to_dict(const Launch& l) {
  const DispatchPlan& p = l.plan;
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

// Records encode_launch's calls: ("set_buffer", index, tensor, offset_bytes), ("set_bytes",
// index, bytes), ("set_threadgroup_memory", index, bytes), ("dispatch_threadgroups", grid,
// threads).
class TraceEncoder final : public Encoder {
 public:
  py::list calls;
  void set_buffer(int index, const at::Tensor& t, int64_t offset_bytes) override {
    calls.append(py::make_tuple("set_buffer", index, t, offset_bytes));
  }
  void set_bytes(int index, const std::vector<uint8_t>& bytes) override {
    const auto* data = reinterpret_cast<const char*>(bytes.data());
    calls.append(py::make_tuple("set_bytes", index, py::bytes(data, bytes.size())));
  }
  void set_threadgroup_memory(int index, int64_t bytes) override {
    calls.append(py::make_tuple("set_threadgroup_memory", index, bytes));
  }
  void dispatch_threadgroups(const std::array<uint32_t, 3>& g,
                             const std::array<uint32_t, 3>& t) override {
    calls.append(py::make_tuple("dispatch_threadgroups", py::make_tuple(g[0], g[1], g[2]),
                                py::make_tuple(t[0], t[1], t[2])));
  }
};

// check_launch + encode_launch of the matmul launch, recorded (the native backend's sequence).
py::list trace_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                      const at::Tensor& biases, int64_t group_size, int64_t bits, bool transpose,
                      uint64_t max_threads, int64_t static_tg_bytes, int64_t max_tg_bytes,
                      const std::string& device) {
  const Launch l = launch_affine_matmul(x, wq, scales, biases, group_size, bits, transpose);
  const PipelineLimits limits{max_threads, static_tg_bytes, max_tg_bytes};
  check_launch(l, limits, device.empty() ? x.device().type() : c10::Device(device).type());
  TraceEncoder enc;
  if (!l.empty()) encode_launch(l, enc);
  return enc.calls;
}

}  // namespace

void register_launch_bindings(py::module& m) {
  m.def("metal_encode_trace_affine_matmul", &trace_matmul, py::arg("x"), py::arg("wq"),
        py::arg("scales"), py::arg("biases"), py::arg("group_size") = 64, py::arg("bits") = 4,
        py::arg("transpose") = true, py::arg("max_threads") = 1024,
        py::arg("static_threadgroup_bytes") = 0, py::arg("max_threadgroup_bytes") = 32768,
        py::arg("device") = "",
        "The encoder calls the native MPS backend makes for affine_matmul (for tests).");
  m.def(
      "metal_launch_affine_matmul",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const at::Tensor& biases, int64_t group_size, int64_t bits, bool transpose) {
        return to_dict(launch_affine_matmul(x, wq, scales, biases, group_size, bits, transpose));
      },
      py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("group_size") = 64,
      py::arg("bits") = 4, py::arg("transpose") = true,
      "The Metal launch of affine_matmul: plan, bound tensors (converted and allocated on the "
      "operands' device) and outputs; the MPS backend encodes exactly this.");
  m.def(
      "metal_launch_affine_quantize",
      [](const at::Tensor& w, int64_t group_size, int64_t bits) {
        return to_dict(launch_affine_quantize(w, group_size, bits));
      },
      py::arg("w"), py::arg("group_size") = 64, py::arg("bits") = 4,
      "The Metal launch of affine_quantize.");
  m.def(
      "metal_launch_affine_gather_matmul",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const at::Tensor& biases, const std::optional<at::Tensor>& lhs_indices,
         const std::optional<at::Tensor>& rhs_indices, int64_t group_size, int64_t bits,
         bool transpose, bool sorted_indices) {
        return to_dict(launch_affine_gather_matmul(x, wq, scales, biases, lhs_indices, rhs_indices,
                                                   group_size, bits, transpose, sorted_indices));
      },
      py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("biases"),
      py::arg("lhs_indices") = py::none(), py::arg("rhs_indices") = py::none(),
      py::arg("group_size") = 64, py::arg("bits") = 4, py::arg("transpose") = true,
      py::arg("sorted_indices") = false,
      "The Metal launch of affine_gather_matmul (indices as flat int32 at buffers 6 and 7).");
  m.def(
      "metal_launch_fp_matmul",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const std::string& mode, int64_t group_size, int64_t bits, bool transpose,
         const std::optional<at::Tensor>& global_scale) {
        return to_dict(
            launch_fp_matmul(x, wq, scales, global_scale, mode, group_size, bits, transpose));
      },
      py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("mode"), py::arg("group_size"),
      py::arg("bits"), py::arg("transpose") = true, py::arg("global_scale") = py::none(),
      "The Metal launch of fp_matmul (arguments in the op's order).");
  m.def(
      "metal_launch_fp_gather_matmul",
      [](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
         const std::string& mode, int64_t group_size, int64_t bits,
         const std::optional<at::Tensor>& lhs_indices, const std::optional<at::Tensor>& rhs_indices,
         bool transpose, const std::optional<at::Tensor>& global_scale, bool sorted_indices) {
        return to_dict(launch_fp_gather_matmul(x, wq, scales, mode, group_size, bits, lhs_indices,
                                               rhs_indices, transpose, global_scale,
                                               sorted_indices));
      },
      py::arg("x"), py::arg("wq"), py::arg("scales"), py::arg("mode"), py::arg("group_size"),
      py::arg("bits"), py::arg("lhs_indices") = py::none(), py::arg("rhs_indices") = py::none(),
      py::arg("transpose") = true, py::arg("global_scale") = py::none(),
      py::arg("sorted_indices") = false,
      "The Metal launch of fp_gather_matmul (arguments in the op's order; indices as flat int32 "
      "at buffers 6 and 7, the global scale as one float32 per matrix of wq at buffer 3).");
  m.def(
      "metal_launch_fp_dequantize",
      [](const at::Tensor& wq, const at::Tensor& scales, const std::string& mode,
         int64_t group_size, int64_t bits, const std::optional<at::Tensor>& global_scale,
         std::optional<at::ScalarType> dtype) {
        return to_dict(
            launch_fp_dequantize(wq, scales, mode, group_size, bits, global_scale, dtype));
      },
      py::arg("wq"), py::arg("scales"), py::arg("mode"), py::arg("group_size"), py::arg("bits"),
      py::arg("global_scale") = py::none(), py::arg("dtype") = py::none(),
      "The Metal launch of fp_dequantize (arguments in the op's order).");
  m.def(
      "metal_launch_fp_quantize",
      [](const at::Tensor& w, const std::string& mode, int64_t group_size, int64_t bits,
         const std::optional<at::Tensor>& global_scale) {
        return to_dict(launch_fp_quantize(w, mode, group_size, bits, global_scale));
      },
      py::arg("w"), py::arg("mode"), py::arg("group_size"), py::arg("bits"),
      py::arg("global_scale") = py::none(),
      "The Metal launch of fp_quantize (arguments in the op's order).");
  m.def(
      "metal_launch_affine_dequantize",
      [](const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
         int64_t group_size, int64_t bits) {
        return to_dict(launch_affine_dequantize(wq, scales, biases, group_size, bits));
      },
      py::arg("wq"), py::arg("scales"), py::arg("biases"), py::arg("group_size") = 64,
      py::arg("bits") = 4, "The Metal launch of affine_dequantize.");
#ifdef MLXQ_WITH_MPS
  m.attr("mps_native_compiled") = true;
  m.def("mps_native_load", &mps::native::load_library, py::arg("path"),
        "Load the prebuilt metallib; returns '' on success, else the Metal error text.");
  m.def("mps_native_library_path", &mps::native::library_path);
  m.def("mps_native_function_names", &mps::native::function_names);
  m.def("mps_native_register", &mps::native::register_kernels,
        "Register the native Metal kernels for the MPS dispatch key (once).");
  m.def("mps_native_registered", &mps::native::kernels_registered);
#else
  m.attr("mps_native_compiled") = false;
#endif
}

}  // namespace mlxq::metal
