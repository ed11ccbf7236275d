// fp_dequantize entry point (see fp_dequantize.h). Host names fp_dequantize_<dtype>_<mode>, and
// fp_dequantize_<dtype>_nvfp4_to_float for nvfp4 with a global scale (float32 output; for
// float32 itself the plain kernel is the same).
// Threadgroup: 64 threads, one per group; grid: (ceil(rows * groups / 64), 1, 1).
#include <metal_stdlib>
using namespace metal;

#include "fp_dequantize.h"

template <typename T, typename OutT, int MODE>
[[kernel]] void fp_dequantize(const device uchar* wq [[buffer(0)]],
                              const device uchar* scales [[buffer(1)]],
                              const device float* global_scale [[buffer(2)]],
                              device OutT* out [[buffer(3)]],
                              constant AffineQuantParams& p [[buffer(4)]],
                              uint gid [[thread_position_in_grid]]) {
  mlxq::fp_dequantize_impl<T, OutT, MODE>(wq, scales, global_scale, out, p, gid);
}

// clang-format off
MLXQ_INSTANTIATE("fp_dequantize_float_mxfp4", fp_dequantize, float, float, 0)
MLXQ_INSTANTIATE("fp_dequantize_float_nvfp4", fp_dequantize, float, float, 1)
MLXQ_INSTANTIATE("fp_dequantize_float_mxfp8", fp_dequantize, float, float, 2)
MLXQ_INSTANTIATE("fp_dequantize_half_mxfp4", fp_dequantize, half, half, 0)
MLXQ_INSTANTIATE("fp_dequantize_half_nvfp4", fp_dequantize, half, half, 1)
MLXQ_INSTANTIATE("fp_dequantize_half_mxfp8", fp_dequantize, half, half, 2)
MLXQ_INSTANTIATE("fp_dequantize_bfloat_mxfp4", fp_dequantize, bfloat, bfloat, 0)
MLXQ_INSTANTIATE("fp_dequantize_bfloat_nvfp4", fp_dequantize, bfloat, bfloat, 1)
MLXQ_INSTANTIATE("fp_dequantize_bfloat_mxfp8", fp_dequantize, bfloat, bfloat, 2)
MLXQ_INSTANTIATE("fp_dequantize_half_nvfp4_to_float", fp_dequantize, half, float, 1)
MLXQ_INSTANTIATE("fp_dequantize_bfloat_nvfp4_to_float", fp_dequantize, bfloat, float, 1)
// clang-format on
