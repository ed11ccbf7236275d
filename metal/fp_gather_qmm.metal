// Gather entry points of fp_qmm (see fp_gather_qmv.metal for the buffers): pairs with many rows
// of x, and transpose=False at every M. Host names fp_gather_qmm_t_<dtype>_<mode> (x @ W^T) and
// fp_gather_qmm_n_<dtype>_<mode> (x @ W); geometry as fp_qmm with grid z = the number of pairs.
#include <metal_stdlib>
using namespace metal;

#include "affine_gather.h"
#include "fp_qmm.h"

template <typename T, int MODE, bool TRANSPOSE>
[[kernel]] void fp_gather_qmm(
    const device T* x [[buffer(0)]], const device uint* wq [[buffer(1)]],
    const device uchar* scales [[buffer(2)]], const device float* global_scale [[buffer(3)]],
    device T* y [[buffer(4)]], constant AffineMatmulParams& p [[buffer(5)]],
    const device uint* lhs [[buffer(6)]], const device uint* rhs [[buffer(7)]],
    threadgroup float* tg [[threadgroup(0)]], uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const mlxq::GatherOffsets o = mlxq::gather_offsets<mlxq::fp_bits(MODE)>(p, lhs, rhs, tgid.z);
  mlxq::fp_qmm_impl<T, MODE, TRANSPOSE>(x + o.x, wq + o.w, scales + o.s, global_scale + rhs[tgid.z],
                                        y + o.y, p, tg, uint3(tgid.x, tgid.y, 0u), tid, sg, lane);
}

// clang-format off
MLXQ_INSTANTIATE("fp_gather_qmm_t_float_mxfp4", fp_gather_qmm, float, 0, true)
MLXQ_INSTANTIATE("fp_gather_qmm_t_float_nvfp4", fp_gather_qmm, float, 1, true)
MLXQ_INSTANTIATE("fp_gather_qmm_t_float_mxfp8", fp_gather_qmm, float, 2, true)
MLXQ_INSTANTIATE("fp_gather_qmm_t_half_mxfp4", fp_gather_qmm, half, 0, true)
MLXQ_INSTANTIATE("fp_gather_qmm_t_half_nvfp4", fp_gather_qmm, half, 1, true)
MLXQ_INSTANTIATE("fp_gather_qmm_t_half_mxfp8", fp_gather_qmm, half, 2, true)
MLXQ_INSTANTIATE("fp_gather_qmm_t_bfloat_mxfp4", fp_gather_qmm, bfloat, 0, true)
MLXQ_INSTANTIATE("fp_gather_qmm_t_bfloat_nvfp4", fp_gather_qmm, bfloat, 1, true)
MLXQ_INSTANTIATE("fp_gather_qmm_t_bfloat_mxfp8", fp_gather_qmm, bfloat, 2, true)
MLXQ_INSTANTIATE("fp_gather_qmm_n_float_mxfp4", fp_gather_qmm, float, 0, false)
MLXQ_INSTANTIATE("fp_gather_qmm_n_float_nvfp4", fp_gather_qmm, float, 1, false)
MLXQ_INSTANTIATE("fp_gather_qmm_n_float_mxfp8", fp_gather_qmm, float, 2, false)
MLXQ_INSTANTIATE("fp_gather_qmm_n_half_mxfp4", fp_gather_qmm, half, 0, false)
MLXQ_INSTANTIATE("fp_gather_qmm_n_half_nvfp4", fp_gather_qmm, half, 1, false)
MLXQ_INSTANTIATE("fp_gather_qmm_n_half_mxfp8", fp_gather_qmm, half, 2, false)
MLXQ_INSTANTIATE("fp_gather_qmm_n_bfloat_mxfp4", fp_gather_qmm, bfloat, 0, false)
MLXQ_INSTANTIATE("fp_gather_qmm_n_bfloat_nvfp4", fp_gather_qmm, bfloat, 1, false)
MLXQ_INSTANTIATE("fp_gather_qmm_n_bfloat_mxfp8", fp_gather_qmm, bfloat, 2, false)
// clang-format on
