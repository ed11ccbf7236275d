// fp_qmm entry point: prefill-shaped fp_matmul, both transposes (see fp_qmm.h). Host names:
// fp_qmm_t_* (x @ W^T) and fp_qmm_n_* (x @ W; also the small-M transpose=False case).
// Threadgroup: 128 threads (4 simdgroups); grid: (ceil(out_features / 32), ceil(M / 32), batch);
// threadgroup memory 0: MLXQ_QMM_TG_FLOATS floats. Mode: 0 mxfp4, 1 nvfp4, 2 mxfp8.
#include <metal_stdlib>
using namespace metal;

#include "fp_qmm.h"

template <typename T, int MODE, bool TRANSPOSE>
[[kernel]] void fp_qmm(const device T* x [[buffer(0)]], const device uint* wq [[buffer(1)]],
                       const device uchar* scales [[buffer(2)]],
                       const device float* global_scale [[buffer(3)]], device T* y [[buffer(4)]],
                       constant AffineMatmulParams& p [[buffer(5)]],
                       threadgroup float* tg [[threadgroup(0)]],
                       uint3 tgid [[threadgroup_position_in_grid]],
                       uint tid [[thread_index_in_threadgroup]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint lane [[thread_index_in_simdgroup]]) {
  mlxq::fp_qmm_impl<T, MODE, TRANSPOSE>(x, wq, scales, global_scale, y, p, tg, tgid, tid, sg, lane);
}

// clang-format off
MLXQ_INSTANTIATE("fp_qmm_t_float_mxfp4", fp_qmm, float, 0, true)
MLXQ_INSTANTIATE("fp_qmm_t_float_nvfp4", fp_qmm, float, 1, true)
MLXQ_INSTANTIATE("fp_qmm_t_float_mxfp8", fp_qmm, float, 2, true)
MLXQ_INSTANTIATE("fp_qmm_t_half_mxfp4", fp_qmm, half, 0, true)
MLXQ_INSTANTIATE("fp_qmm_t_half_nvfp4", fp_qmm, half, 1, true)
MLXQ_INSTANTIATE("fp_qmm_t_half_mxfp8", fp_qmm, half, 2, true)
MLXQ_INSTANTIATE("fp_qmm_t_bfloat_mxfp4", fp_qmm, bfloat, 0, true)
MLXQ_INSTANTIATE("fp_qmm_t_bfloat_nvfp4", fp_qmm, bfloat, 1, true)
MLXQ_INSTANTIATE("fp_qmm_t_bfloat_mxfp8", fp_qmm, bfloat, 2, true)
MLXQ_INSTANTIATE("fp_qmm_n_float_mxfp4", fp_qmm, float, 0, false)
MLXQ_INSTANTIATE("fp_qmm_n_float_nvfp4", fp_qmm, float, 1, false)
MLXQ_INSTANTIATE("fp_qmm_n_float_mxfp8", fp_qmm, float, 2, false)
MLXQ_INSTANTIATE("fp_qmm_n_half_mxfp4", fp_qmm, half, 0, false)
MLXQ_INSTANTIATE("fp_qmm_n_half_nvfp4", fp_qmm, half, 1, false)
MLXQ_INSTANTIATE("fp_qmm_n_half_mxfp8", fp_qmm, half, 2, false)
MLXQ_INSTANTIATE("fp_qmm_n_bfloat_mxfp4", fp_qmm, bfloat, 0, false)
MLXQ_INSTANTIATE("fp_qmm_n_bfloat_nvfp4", fp_qmm, bfloat, 1, false)
MLXQ_INSTANTIATE("fp_qmm_n_bfloat_mxfp8", fp_qmm, bfloat, 2, false)
// clang-format on
