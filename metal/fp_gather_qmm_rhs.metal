// Entry points of the sorted gather qmm in MLX's floating-point modes (see fp_gather_rhs.h and
// affine_gather_rhs.h). Host names fp_gather_qmm_rhs_t_<dtype>_<mode> (x @ W^T) and
// fp_gather_qmm_rhs_n_<dtype>_<mode> (x @ W); geometry and threadgroup memory as
// affine_gather_qmm_rhs; buffer 3: one float32 global scale per matrix of wq (nvfp4).
#include <metal_stdlib>
using namespace metal;

#include "fp_gather_rhs.h"

template <typename T, int MODE, bool TRANSPOSE>
[[kernel]] void fp_gather_qmm_rhs(
    const device T* x [[buffer(0)]], const device uint* wq [[buffer(1)]],
    const device uchar* scales [[buffer(2)]], const device float* global_scale [[buffer(3)]],
    device T* y [[buffer(4)]], constant AffineMatmulParams& p [[buffer(5)]],
    const device uint* lhs [[buffer(6)]], const device uint* rhs [[buffer(7)]],
    threadgroup float* tg [[threadgroup(0)]], threadgroup uint* tile_rows [[threadgroup(1)]],
    uint3 tgid [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  mlxq::fp_gather_qmm_rhs_impl<T, MODE, TRANSPOSE>(x, wq, scales, global_scale, y, p, lhs, rhs, tg,
                                                   tile_rows, tgid, tid, sg, lane);
}

// clang-format off
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_t_float_mxfp4", fp_gather_qmm_rhs, float, 0, true)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_t_float_nvfp4", fp_gather_qmm_rhs, float, 1, true)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_t_float_mxfp8", fp_gather_qmm_rhs, float, 2, true)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_t_half_mxfp4", fp_gather_qmm_rhs, half, 0, true)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_t_half_nvfp4", fp_gather_qmm_rhs, half, 1, true)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_t_half_mxfp8", fp_gather_qmm_rhs, half, 2, true)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_t_bfloat_mxfp4", fp_gather_qmm_rhs, bfloat, 0, true)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_t_bfloat_nvfp4", fp_gather_qmm_rhs, bfloat, 1, true)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_t_bfloat_mxfp8", fp_gather_qmm_rhs, bfloat, 2, true)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_n_float_mxfp4", fp_gather_qmm_rhs, float, 0, false)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_n_float_nvfp4", fp_gather_qmm_rhs, float, 1, false)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_n_float_mxfp8", fp_gather_qmm_rhs, float, 2, false)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_n_half_mxfp4", fp_gather_qmm_rhs, half, 0, false)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_n_half_nvfp4", fp_gather_qmm_rhs, half, 1, false)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_n_half_mxfp8", fp_gather_qmm_rhs, half, 2, false)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_n_bfloat_mxfp4", fp_gather_qmm_rhs, bfloat, 0, false)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_n_bfloat_nvfp4", fp_gather_qmm_rhs, bfloat, 1, false)
MLXQ_INSTANTIATE("fp_gather_qmm_rhs_n_bfloat_mxfp8", fp_gather_qmm_rhs, bfloat, 2, false)
// clang-format on
