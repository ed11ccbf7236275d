// fp_qmv entry point: decode-shaped fp_matmul with transpose=True (see fp_qmv.h).
// Threadgroup: 64 threads (2 simdgroups x MLXQ_QMV_ROWS weight rows);
// grid: (ceil(N / 8), 1, batch). Mode template argument: 0 mxfp4, 1 nvfp4, 2 mxfp8.
#include <metal_stdlib>
using namespace metal;

#include "fp_qmv.h"

template <typename T, int MODE>
[[kernel]] void fp_qmv(const device T* x [[buffer(0)]], const device uint* wq [[buffer(1)]],
                       const device uchar* scales [[buffer(2)]],
                       const device float* global_scale [[buffer(3)]], device T* y [[buffer(4)]],
                       constant AffineMatmulParams& p [[buffer(5)]],
                       uint3 tgid [[threadgroup_position_in_grid]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]]) {
  mlxq::fp_qmv_impl<T, MODE>(x, wq, scales, global_scale, y, p, tgid, sg, lane);
}

// clang-format off
MLXQ_INSTANTIATE("fp_qmv_float_mxfp4", fp_qmv, float, 0)
MLXQ_INSTANTIATE("fp_qmv_float_nvfp4", fp_qmv, float, 1)
MLXQ_INSTANTIATE("fp_qmv_float_mxfp8", fp_qmv, float, 2)
MLXQ_INSTANTIATE("fp_qmv_half_mxfp4", fp_qmv, half, 0)
MLXQ_INSTANTIATE("fp_qmv_half_nvfp4", fp_qmv, half, 1)
MLXQ_INSTANTIATE("fp_qmv_half_mxfp8", fp_qmv, half, 2)
MLXQ_INSTANTIATE("fp_qmv_bfloat_mxfp4", fp_qmv, bfloat, 0)
MLXQ_INSTANTIATE("fp_qmv_bfloat_nvfp4", fp_qmv, bfloat, 1)
MLXQ_INSTANTIATE("fp_qmv_bfloat_mxfp8", fp_qmv, bfloat, 2)
// clang-format on
