// The composite ops (composite.h) as the CUDA kernels of the mlxq ops that have no hand-written
// CUDA kernel: fp_quantize, fp_dequantize and affine_gather_matmul. fp_matmul and
// fp_gather_matmul are registered by cuda/fp_cuda.cu, which calls the composites where its decode
// kernel does not apply.
// Compiled into every build, registered only when the CUDA backend is built (MLXQ_WITH_CUDA), so
// that a CPU-only build's dispatcher has no CUDA kernels at all.
#ifdef MLXQ_WITH_CUDA
#include <torch/library.h>

#include "composite/composite.h"

TORCH_LIBRARY_IMPL(mlxq, CUDA, m) {
  m.impl("fp_quantize", &mlxq::composite::fp_quantize);
  m.impl("fp_dequantize", &mlxq::composite::fp_dequantize);
  m.impl("affine_gather_matmul", &mlxq::composite::affine_gather_matmul);
}
#endif  // MLXQ_WITH_CUDA
