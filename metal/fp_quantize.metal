// fp_quantize entry point (see fp_quantize.h). Host names fp_quantize_<dtype of w>_<mode>.
// Threadgroup: 64 threads, one per group; grid: (ceil(rows * groups / 64), 1, 1).
#include <metal_stdlib>
using namespace metal;

#include "fp_quantize.h"

template <typename T, int MODE>
[[kernel]] void fp_quantize(const device T* w [[buffer(0)]], device uint* wq [[buffer(1)]],
                            device uchar* scales [[buffer(2)]],
                            const device float* global_scale [[buffer(3)]],
                            constant AffineQuantParams& p [[buffer(4)]],
                            uint gid [[thread_position_in_grid]]) {
  mlxq::fp_quantize_impl<T, MODE>(w, wq, scales, global_scale, p, gid);
}

// clang-format off
MLXQ_INSTANTIATE("fp_quantize_float_mxfp4", fp_quantize, float, 0)
MLXQ_INSTANTIATE("fp_quantize_float_nvfp4", fp_quantize, float, 1)
MLXQ_INSTANTIATE("fp_quantize_float_mxfp8", fp_quantize, float, 2)
MLXQ_INSTANTIATE("fp_quantize_half_mxfp4", fp_quantize, half, 0)
MLXQ_INSTANTIATE("fp_quantize_half_nvfp4", fp_quantize, half, 1)
MLXQ_INSTANTIATE("fp_quantize_half_mxfp8", fp_quantize, half, 2)
MLXQ_INSTANTIATE("fp_quantize_bfloat_mxfp4", fp_quantize, bfloat, 0)
MLXQ_INSTANTIATE("fp_quantize_bfloat_nvfp4", fp_quantize, bfloat, 1)
MLXQ_INSTANTIATE("fp_quantize_bfloat_mxfp8", fp_quantize, bfloat, 2)
// clang-format on
