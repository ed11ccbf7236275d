// Gather entry points of qmm (see affine_gather.h): pairs with many rows of x. Host names
// affine_gather_qmm_t_* (x @ W^T) and affine_gather_qmm_n_* (x @ W); geometry as affine_qmm
// with grid z = the number of pairs; buffers 6 and 7: the flat uint32 lhs/rhs indices.
#include <metal_stdlib>
using namespace metal;

#include "affine_gather.h"
#include "affine_qmm.h"

template <typename T, int GS, int BITS, bool TRANSPOSE>
[[kernel]] void affine_gather_qmm(
    const device T* x [[buffer(0)]], const device uint* wq [[buffer(1)]],
    const device T* scales [[buffer(2)]], const device T* biases [[buffer(3)]],
    device T* y [[buffer(4)]], constant AffineMatmulParams& p [[buffer(5)]],
    const device uint* lhs [[buffer(6)]], const device uint* rhs [[buffer(7)]],
    threadgroup float* tg [[threadgroup(0)]], uint3 tgid [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const mlxq::GatherOffsets o = mlxq::gather_offsets<BITS>(p, lhs, rhs, tgid.z);
  mlxq::affine_qmm_impl<T, GS, BITS, TRANSPOSE>(x + o.x, wq + o.w, scales + o.s, biases + o.s,
                                                y + o.y, p, tg, uint3(tgid.x, tgid.y, 0u), tid, sg,
                                                lane);
}

// clang-format off
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs32_b2", affine_gather_qmm, float, 32, 2, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs32_b3", affine_gather_qmm, float, 32, 3, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs32_b4", affine_gather_qmm, float, 32, 4, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs32_b5", affine_gather_qmm, float, 32, 5, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs32_b6", affine_gather_qmm, float, 32, 6, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs32_b8", affine_gather_qmm, float, 32, 8, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs64_b2", affine_gather_qmm, float, 64, 2, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs64_b3", affine_gather_qmm, float, 64, 3, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs64_b4", affine_gather_qmm, float, 64, 4, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs64_b5", affine_gather_qmm, float, 64, 5, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs64_b6", affine_gather_qmm, float, 64, 6, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs64_b8", affine_gather_qmm, float, 64, 8, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs128_b2", affine_gather_qmm, float, 128, 2, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs128_b3", affine_gather_qmm, float, 128, 3, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs128_b4", affine_gather_qmm, float, 128, 4, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs128_b5", affine_gather_qmm, float, 128, 5, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs128_b6", affine_gather_qmm, float, 128, 6, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_float_gs128_b8", affine_gather_qmm, float, 128, 8, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs32_b2", affine_gather_qmm, half, 32, 2, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs32_b3", affine_gather_qmm, half, 32, 3, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs32_b4", affine_gather_qmm, half, 32, 4, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs32_b5", affine_gather_qmm, half, 32, 5, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs32_b6", affine_gather_qmm, half, 32, 6, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs32_b8", affine_gather_qmm, half, 32, 8, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs64_b2", affine_gather_qmm, half, 64, 2, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs64_b3", affine_gather_qmm, half, 64, 3, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs64_b4", affine_gather_qmm, half, 64, 4, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs64_b5", affine_gather_qmm, half, 64, 5, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs64_b6", affine_gather_qmm, half, 64, 6, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs64_b8", affine_gather_qmm, half, 64, 8, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs128_b2", affine_gather_qmm, half, 128, 2, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs128_b3", affine_gather_qmm, half, 128, 3, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs128_b4", affine_gather_qmm, half, 128, 4, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs128_b5", affine_gather_qmm, half, 128, 5, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs128_b6", affine_gather_qmm, half, 128, 6, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_half_gs128_b8", affine_gather_qmm, half, 128, 8, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs32_b2", affine_gather_qmm, bfloat, 32, 2, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs32_b3", affine_gather_qmm, bfloat, 32, 3, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs32_b4", affine_gather_qmm, bfloat, 32, 4, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs32_b5", affine_gather_qmm, bfloat, 32, 5, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs32_b6", affine_gather_qmm, bfloat, 32, 6, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs32_b8", affine_gather_qmm, bfloat, 32, 8, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs64_b2", affine_gather_qmm, bfloat, 64, 2, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs64_b3", affine_gather_qmm, bfloat, 64, 3, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs64_b4", affine_gather_qmm, bfloat, 64, 4, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs64_b5", affine_gather_qmm, bfloat, 64, 5, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs64_b6", affine_gather_qmm, bfloat, 64, 6, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs64_b8", affine_gather_qmm, bfloat, 64, 8, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs128_b2", affine_gather_qmm, bfloat, 128, 2, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs128_b3", affine_gather_qmm, bfloat, 128, 3, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs128_b4", affine_gather_qmm, bfloat, 128, 4, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs128_b5", affine_gather_qmm, bfloat, 128, 5, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs128_b6", affine_gather_qmm, bfloat, 128, 6, true)
MLXQ_INSTANTIATE("affine_gather_qmm_t_bfloat_gs128_b8", affine_gather_qmm, bfloat, 128, 8, true)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs32_b2", affine_gather_qmm, float, 32, 2, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs32_b3", affine_gather_qmm, float, 32, 3, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs32_b4", affine_gather_qmm, float, 32, 4, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs32_b5", affine_gather_qmm, float, 32, 5, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs32_b6", affine_gather_qmm, float, 32, 6, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs32_b8", affine_gather_qmm, float, 32, 8, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs64_b2", affine_gather_qmm, float, 64, 2, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs64_b3", affine_gather_qmm, float, 64, 3, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs64_b4", affine_gather_qmm, float, 64, 4, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs64_b5", affine_gather_qmm, float, 64, 5, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs64_b6", affine_gather_qmm, float, 64, 6, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs64_b8", affine_gather_qmm, float, 64, 8, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs128_b2", affine_gather_qmm, float, 128, 2, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs128_b3", affine_gather_qmm, float, 128, 3, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs128_b4", affine_gather_qmm, float, 128, 4, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs128_b5", affine_gather_qmm, float, 128, 5, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs128_b6", affine_gather_qmm, float, 128, 6, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_float_gs128_b8", affine_gather_qmm, float, 128, 8, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs32_b2", affine_gather_qmm, half, 32, 2, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs32_b3", affine_gather_qmm, half, 32, 3, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs32_b4", affine_gather_qmm, half, 32, 4, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs32_b5", affine_gather_qmm, half, 32, 5, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs32_b6", affine_gather_qmm, half, 32, 6, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs32_b8", affine_gather_qmm, half, 32, 8, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs64_b2", affine_gather_qmm, half, 64, 2, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs64_b3", affine_gather_qmm, half, 64, 3, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs64_b4", affine_gather_qmm, half, 64, 4, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs64_b5", affine_gather_qmm, half, 64, 5, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs64_b6", affine_gather_qmm, half, 64, 6, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs64_b8", affine_gather_qmm, half, 64, 8, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs128_b2", affine_gather_qmm, half, 128, 2, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs128_b3", affine_gather_qmm, half, 128, 3, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs128_b4", affine_gather_qmm, half, 128, 4, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs128_b5", affine_gather_qmm, half, 128, 5, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs128_b6", affine_gather_qmm, half, 128, 6, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_half_gs128_b8", affine_gather_qmm, half, 128, 8, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs32_b2", affine_gather_qmm, bfloat, 32, 2, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs32_b3", affine_gather_qmm, bfloat, 32, 3, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs32_b4", affine_gather_qmm, bfloat, 32, 4, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs32_b5", affine_gather_qmm, bfloat, 32, 5, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs32_b6", affine_gather_qmm, bfloat, 32, 6, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs32_b8", affine_gather_qmm, bfloat, 32, 8, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs64_b2", affine_gather_qmm, bfloat, 64, 2, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs64_b3", affine_gather_qmm, bfloat, 64, 3, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs64_b4", affine_gather_qmm, bfloat, 64, 4, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs64_b5", affine_gather_qmm, bfloat, 64, 5, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs64_b6", affine_gather_qmm, bfloat, 64, 6, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs64_b8", affine_gather_qmm, bfloat, 64, 8, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs128_b2", affine_gather_qmm, bfloat, 128, 2, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs128_b3", affine_gather_qmm, bfloat, 128, 3, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs128_b4", affine_gather_qmm, bfloat, 128, 4, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs128_b5", affine_gather_qmm, bfloat, 128, 5, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs128_b6", affine_gather_qmm, bfloat, 128, 6, false)
MLXQ_INSTANTIATE("affine_gather_qmm_n_bfloat_gs128_b8", affine_gather_qmm, bfloat, 128, 8, false)
// clang-format on
