// The mlxq op library: every schema lives here, once. Backends register kernels for these
// schemas in their own files (cpu/affine_cpu.cpp, mps/affine_mps.mm); fake (meta) kernels and
// autograd are registered from Python (python/mlxq/ops.py).
#include <torch/extension.h>

#include "cpu/cpu_features.h"

namespace mlxq::plan {
void register_plan_bindings(pybind11::module& m);  // csrc/plan/plan_bindings.cpp
}
namespace mlxq::mps {
void register_mps_bindings(pybind11::module& m);  // csrc/mps/mps_bindings.cpp
}

TORCH_LIBRARY(mlxq, m) {
  m.def("affine_quantize(Tensor w, int group_size=64, int bits=4) -> (Tensor, Tensor, Tensor)");
  m.def(
      "affine_dequantize(Tensor wq, Tensor scales, Tensor biases, int group_size=64, int bits=4)"
      " -> Tensor");
  m.def(
      "affine_matmul(Tensor x, Tensor wq, Tensor scales, Tensor biases, int group_size=64, "
      "int bits=4, bool transpose=True) -> Tensor");
  // MLX's gather_qmm: pair i of the broadcast indices multiplies x's matrix lhs_indices[i]
  // with wq's matrix rhs_indices[i] (mixture-of-experts layers); absent indices are aranges
  // over the batch of x, resp. wq.
  m.def(
      "affine_gather_matmul(Tensor x, Tensor wq, Tensor scales, Tensor biases, "
      "Tensor? lhs_indices=None, Tensor? rhs_indices=None, int group_size=64, int bits=4, "
      "bool transpose=True, bool sorted_indices=False) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mlxq native op library (ops are reached through torch.ops.mlxq)";
  m.def("set_cpu_isa", &mlxq::cpu::set_isa, "Force the CPU kernels onto portable, avx2 or auto");
  m.def("cpu_isa", &mlxq::cpu::active_isa,
        "Instruction set the CPU kernels run with on this machine (avx512, avx2, neon, portable)");
  m.def("cpu_threaded", &mlxq::cpu::threaded,
        "Whether the CPU kernels run on torch's intra-op threads (False: built without OpenMP)");
  mlxq::plan::register_plan_bindings(m);
  mlxq::mps::register_mps_bindings(m);
}
