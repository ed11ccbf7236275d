// Gather entry points of fp_qmv (mx.gather_qmm in MLX's floating-point modes, see
// affine_gather.h for the pairing): decode-shaped pairs with transpose=True. Host names
// fp_gather_qmv_<dtype>_<mode>; geometry as fp_qmv with grid z = the number of pairs; buffer 3:
// one float32 global scale per matrix of wq (pair z reads rhs[z]'s; the host binds 448 * 6 for
// each when nvfp4 has none, and the mx modes never read it); buffers 6 and 7: the flat uint32
// lhs/rhs indices.
#include <metal_stdlib>
using namespace metal;

#include "affine_gather.h"
#include "fp_qmv.h"

template <typename T, int MODE>
[[kernel]] void fp_gather_qmv(
    const device T* x [[buffer(0)]], const device uint* wq [[buffer(1)]],
    const device uchar* scales [[buffer(2)]], const device float* global_scale [[buffer(3)]],
    device T* y [[buffer(4)]], constant AffineMatmulParams& p [[buffer(5)]],
    const device uint* lhs [[buffer(6)]], const device uint* rhs [[buffer(7)]],
    uint3 tgid [[threadgroup_position_in_grid]], uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const mlxq::GatherOffsets o = mlxq::gather_offsets<mlxq::fp_bits(MODE)>(p, lhs, rhs, tgid.z);
  mlxq::fp_qmv_impl<T, MODE>(x + o.x, wq + o.w, scales + o.s, global_scale + rhs[tgid.z], y + o.y,
                             p, uint3(tgid.x, tgid.y, 0u), sg, lane);
}

// clang-format off
MLXQ_INSTANTIATE("fp_gather_qmv_float_mxfp4", fp_gather_qmv, float, 0)
MLXQ_INSTANTIATE("fp_gather_qmv_float_nvfp4", fp_gather_qmv, float, 1)
MLXQ_INSTANTIATE("fp_gather_qmv_float_mxfp8", fp_gather_qmv, float, 2)
MLXQ_INSTANTIATE("fp_gather_qmv_half_mxfp4", fp_gather_qmv, half, 0)
MLXQ_INSTANTIATE("fp_gather_qmv_half_nvfp4", fp_gather_qmv, half, 1)
MLXQ_INSTANTIATE("fp_gather_qmv_half_mxfp8", fp_gather_qmv, half, 2)
MLXQ_INSTANTIATE("fp_gather_qmv_bfloat_mxfp4", fp_gather_qmv, bfloat, 0)
MLXQ_INSTANTIATE("fp_gather_qmv_bfloat_nvfp4", fp_gather_qmv, bfloat, 1)
MLXQ_INSTANTIATE("fp_gather_qmv_bfloat_mxfp8", fp_gather_qmv, bfloat, 2)
// clang-format on
