// Python view of the CPU backend's run-time settings (mlxq._C.cpu_isa, set_cpu_isa, ...): the
// instruction set its kernels run with, whether they are threaded, and the vector exp of the
// attention kernels (for its tests). Registered by ops.cpp's module like every backend's.
#include <torch/extension.h>

#include "cpu/cpu_features.h"

namespace mlxq::cpu {

at::Tensor vector_exp_for_tests(const at::Tensor& x);  // csrc/cpu/attention_cpu.cpp

void register_cpu_bindings(pybind11::module& m) {
  m.def("set_cpu_isa", &set_isa, "Force the CPU kernels onto portable, avx2 or auto");
  m.def("cpu_isa", &active_isa,
        "Instruction set the CPU kernels run with on this machine (avx512, avx2, neon, portable)");
  m.def("cpu_threaded", &threaded,
        "Whether the CPU kernels run on torch's intra-op threads (False: built without OpenMP)");
  m.def("cpu_vector_exp", &vector_exp_for_tests,
        "exp of a float32 CPU tensor by the active CPU kernels' own vector exp (for its tests)");
}

}  // namespace mlxq::cpu
