// The composite ops (composite.h) as the CUDA kernels of the mlxq ops that have no hand-written
// CUDA kernel: fp_quantize, fp_dequantize, rms_norm and rotary_embedding. affine_matmul,
// affine_gather_matmul, fp_matmul, fp_gather_matmul and decode_attention are registered by
// cuda/affine_cuda.cu, cuda/fp_cuda.cu and cuda/attention_cuda.cu, which call the composites where
// their own kernels do not apply.
// Compiled into every build, registered only when the CUDA backend is built (MLXQ_WITH_CUDA), so
// that a CPU-only build's dispatcher has no CUDA kernels at all.
#ifdef MLXQ_WITH_CUDA
#include <torch/library.h>

#include "composite/composite.h"

TORCH_LIBRARY_IMPL(mlxq, CUDA, m) {
  m.impl("fp_quantize", &mlxq::composite::fp_quantize);
  m.impl("fp_dequantize", &mlxq::composite::fp_dequantize);
  m.impl("rms_norm", &mlxq::composite::rms_norm);
  m.impl("rotary_embedding", &mlxq::composite::rotary_embedding);
}
#endif  // MLXQ_WITH_CUDA
