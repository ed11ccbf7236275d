// Gather entry points of qmv and qvm (see affine_gather.h): decode-shaped pairs. Host names
// with grid z = the number of pairs; buffers 6 and 7: the flat uint32 lhs/rhs indices.
#include <metal_stdlib>
using namespace metal;

#include "affine_gather.h"
#include "affine_qmv.h"

template <typename T, int GS, int BITS>
[[kernel]] void affine_gather_qmv(
    const device T* x [[buffer(0)]], const device uint* wq [[buffer(1)]],
    const device T* scales [[buffer(2)]], const device T* biases [[buffer(3)]],
    device T* y [[buffer(4)]], constant AffineMatmulParams& p [[buffer(5)]],
    const device uint* lhs [[buffer(6)]], const device uint* rhs [[buffer(7)]],
    uint3 tgid [[threadgroup_position_in_grid]], uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const mlxq::GatherOffsets o = mlxq::gather_offsets<BITS>(p, lhs, rhs, tgid.z);
  mlxq::affine_qmv_impl<T, GS, BITS>(x + o.x, wq + o.w, scales + o.s, biases + o.s, y + o.y, p,
                                     uint3(tgid.x, tgid.y, 0u), sg, lane);
}

// clang-format off
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs32_b1", affine_gather_qmv, float, 32, 1)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs32_b2", affine_gather_qmv, float, 32, 2)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs32_b3", affine_gather_qmv, float, 32, 3)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs32_b4", affine_gather_qmv, float, 32, 4)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs32_b5", affine_gather_qmv, float, 32, 5)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs32_b6", affine_gather_qmv, float, 32, 6)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs32_b8", affine_gather_qmv, float, 32, 8)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs64_b1", affine_gather_qmv, float, 64, 1)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs64_b2", affine_gather_qmv, float, 64, 2)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs64_b3", affine_gather_qmv, float, 64, 3)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs64_b4", affine_gather_qmv, float, 64, 4)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs64_b5", affine_gather_qmv, float, 64, 5)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs64_b6", affine_gather_qmv, float, 64, 6)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs64_b8", affine_gather_qmv, float, 64, 8)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs128_b1", affine_gather_qmv, float, 128, 1)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs128_b2", affine_gather_qmv, float, 128, 2)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs128_b3", affine_gather_qmv, float, 128, 3)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs128_b4", affine_gather_qmv, float, 128, 4)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs128_b5", affine_gather_qmv, float, 128, 5)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs128_b6", affine_gather_qmv, float, 128, 6)
MLXQ_INSTANTIATE("affine_gather_qmv_float_gs128_b8", affine_gather_qmv, float, 128, 8)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs32_b1", affine_gather_qmv, half, 32, 1)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs32_b2", affine_gather_qmv, half, 32, 2)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs32_b3", affine_gather_qmv, half, 32, 3)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs32_b4", affine_gather_qmv, half, 32, 4)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs32_b5", affine_gather_qmv, half, 32, 5)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs32_b6", affine_gather_qmv, half, 32, 6)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs32_b8", affine_gather_qmv, half, 32, 8)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs64_b1", affine_gather_qmv, half, 64, 1)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs64_b2", affine_gather_qmv, half, 64, 2)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs64_b3", affine_gather_qmv, half, 64, 3)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs64_b4", affine_gather_qmv, half, 64, 4)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs64_b5", affine_gather_qmv, half, 64, 5)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs64_b6", affine_gather_qmv, half, 64, 6)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs64_b8", affine_gather_qmv, half, 64, 8)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs128_b1", affine_gather_qmv, half, 128, 1)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs128_b2", affine_gather_qmv, half, 128, 2)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs128_b3", affine_gather_qmv, half, 128, 3)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs128_b4", affine_gather_qmv, half, 128, 4)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs128_b5", affine_gather_qmv, half, 128, 5)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs128_b6", affine_gather_qmv, half, 128, 6)
MLXQ_INSTANTIATE("affine_gather_qmv_half_gs128_b8", affine_gather_qmv, half, 128, 8)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs32_b1", affine_gather_qmv, bfloat, 32, 1)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs32_b2", affine_gather_qmv, bfloat, 32, 2)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs32_b3", affine_gather_qmv, bfloat, 32, 3)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs32_b4", affine_gather_qmv, bfloat, 32, 4)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs32_b5", affine_gather_qmv, bfloat, 32, 5)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs32_b6", affine_gather_qmv, bfloat, 32, 6)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs32_b8", affine_gather_qmv, bfloat, 32, 8)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs64_b1", affine_gather_qmv, bfloat, 64, 1)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs64_b2", affine_gather_qmv, bfloat, 64, 2)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs64_b3", affine_gather_qmv, bfloat, 64, 3)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs64_b4", affine_gather_qmv, bfloat, 64, 4)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs64_b5", affine_gather_qmv, bfloat, 64, 5)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs64_b6", affine_gather_qmv, bfloat, 64, 6)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs64_b8", affine_gather_qmv, bfloat, 64, 8)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs128_b1", affine_gather_qmv, bfloat, 128, 1)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs128_b2", affine_gather_qmv, bfloat, 128, 2)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs128_b3", affine_gather_qmv, bfloat, 128, 3)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs128_b4", affine_gather_qmv, bfloat, 128, 4)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs128_b5", affine_gather_qmv, bfloat, 128, 5)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs128_b6", affine_gather_qmv, bfloat, 128, 6)
MLXQ_INSTANTIATE("affine_gather_qmv_bfloat_gs128_b8", affine_gather_qmv, bfloat, 128, 8)
// clang-format on
