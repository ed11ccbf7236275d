// qvm entry point: decode-shaped affine_matmul with transpose=False (see affine_qvm.h).
// Threadgroup: 64 threads (2 simdgroups); grid: (ceil(K / 128), 1, batch);
// threadgroup memory 0: MLXQ_QVM_TG_FLOATS(group_size) floats.
#include <metal_stdlib>
using namespace metal;

#include "affine_qvm.h"

template <typename T, int GS, int BITS>
[[kernel]] void affine_qvm(const device T* x [[buffer(0)]], const device uint* wq [[buffer(1)]],
                           const device T* scales [[buffer(2)]],
                           const device T* biases [[buffer(3)]], device T* y [[buffer(4)]],
                           constant AffineMatmulParams& p [[buffer(5)]],
                           threadgroup float* tg [[threadgroup(0)]],
                           uint3 tgid [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]]) {
  mlxq::affine_qvm_impl<T, GS, BITS>(x, wq, scales, biases, y, p, tg, tgid, tid);
}

// clang-format off
MLXQ_INSTANTIATE("affine_qvm_float_gs32_b1", affine_qvm, float, 32, 1)
MLXQ_INSTANTIATE("affine_qvm_float_gs32_b2", affine_qvm, float, 32, 2)
MLXQ_INSTANTIATE("affine_qvm_float_gs32_b3", affine_qvm, float, 32, 3)
MLXQ_INSTANTIATE("affine_qvm_float_gs32_b4", affine_qvm, float, 32, 4)
MLXQ_INSTANTIATE("affine_qvm_float_gs32_b5", affine_qvm, float, 32, 5)
MLXQ_INSTANTIATE("affine_qvm_float_gs32_b6", affine_qvm, float, 32, 6)
MLXQ_INSTANTIATE("affine_qvm_float_gs32_b8", affine_qvm, float, 32, 8)
MLXQ_INSTANTIATE("affine_qvm_float_gs64_b1", affine_qvm, float, 64, 1)
MLXQ_INSTANTIATE("affine_qvm_float_gs64_b2", affine_qvm, float, 64, 2)
MLXQ_INSTANTIATE("affine_qvm_float_gs64_b3", affine_qvm, float, 64, 3)
MLXQ_INSTANTIATE("affine_qvm_float_gs64_b4", affine_qvm, float, 64, 4)
MLXQ_INSTANTIATE("affine_qvm_float_gs64_b5", affine_qvm, float, 64, 5)
MLXQ_INSTANTIATE("affine_qvm_float_gs64_b6", affine_qvm, float, 64, 6)
MLXQ_INSTANTIATE("affine_qvm_float_gs64_b8", affine_qvm, float, 64, 8)
MLXQ_INSTANTIATE("affine_qvm_float_gs128_b1", affine_qvm, float, 128, 1)
MLXQ_INSTANTIATE("affine_qvm_float_gs128_b2", affine_qvm, float, 128, 2)
MLXQ_INSTANTIATE("affine_qvm_float_gs128_b3", affine_qvm, float, 128, 3)
MLXQ_INSTANTIATE("affine_qvm_float_gs128_b4", affine_qvm, float, 128, 4)
MLXQ_INSTANTIATE("affine_qvm_float_gs128_b5", affine_qvm, float, 128, 5)
MLXQ_INSTANTIATE("affine_qvm_float_gs128_b6", affine_qvm, float, 128, 6)
MLXQ_INSTANTIATE("affine_qvm_float_gs128_b8", affine_qvm, float, 128, 8)
MLXQ_INSTANTIATE("affine_qvm_half_gs32_b1", affine_qvm, half, 32, 1)
MLXQ_INSTANTIATE("affine_qvm_half_gs32_b2", affine_qvm, half, 32, 2)
MLXQ_INSTANTIATE("affine_qvm_half_gs32_b3", affine_qvm, half, 32, 3)
MLXQ_INSTANTIATE("affine_qvm_half_gs32_b4", affine_qvm, half, 32, 4)
MLXQ_INSTANTIATE("affine_qvm_half_gs32_b5", affine_qvm, half, 32, 5)
MLXQ_INSTANTIATE("affine_qvm_half_gs32_b6", affine_qvm, half, 32, 6)
MLXQ_INSTANTIATE("affine_qvm_half_gs32_b8", affine_qvm, half, 32, 8)
MLXQ_INSTANTIATE("affine_qvm_half_gs64_b1", affine_qvm, half, 64, 1)
MLXQ_INSTANTIATE("affine_qvm_half_gs64_b2", affine_qvm, half, 64, 2)
MLXQ_INSTANTIATE("affine_qvm_half_gs64_b3", affine_qvm, half, 64, 3)
MLXQ_INSTANTIATE("affine_qvm_half_gs64_b4", affine_qvm, half, 64, 4)
MLXQ_INSTANTIATE("affine_qvm_half_gs64_b5", affine_qvm, half, 64, 5)
MLXQ_INSTANTIATE("affine_qvm_half_gs64_b6", affine_qvm, half, 64, 6)
MLXQ_INSTANTIATE("affine_qvm_half_gs64_b8", affine_qvm, half, 64, 8)
MLXQ_INSTANTIATE("affine_qvm_half_gs128_b1", affine_qvm, half, 128, 1)
MLXQ_INSTANTIATE("affine_qvm_half_gs128_b2", affine_qvm, half, 128, 2)
MLXQ_INSTANTIATE("affine_qvm_half_gs128_b3", affine_qvm, half, 128, 3)
MLXQ_INSTANTIATE("affine_qvm_half_gs128_b4", affine_qvm, half, 128, 4)
MLXQ_INSTANTIATE("affine_qvm_half_gs128_b5", affine_qvm, half, 128, 5)
MLXQ_INSTANTIATE("affine_qvm_half_gs128_b6", affine_qvm, half, 128, 6)
MLXQ_INSTANTIATE("affine_qvm_half_gs128_b8", affine_qvm, half, 128, 8)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs32_b1", affine_qvm, bfloat, 32, 1)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs32_b2", affine_qvm, bfloat, 32, 2)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs32_b3", affine_qvm, bfloat, 32, 3)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs32_b4", affine_qvm, bfloat, 32, 4)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs32_b5", affine_qvm, bfloat, 32, 5)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs32_b6", affine_qvm, bfloat, 32, 6)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs32_b8", affine_qvm, bfloat, 32, 8)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs64_b1", affine_qvm, bfloat, 64, 1)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs64_b2", affine_qvm, bfloat, 64, 2)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs64_b3", affine_qvm, bfloat, 64, 3)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs64_b4", affine_qvm, bfloat, 64, 4)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs64_b5", affine_qvm, bfloat, 64, 5)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs64_b6", affine_qvm, bfloat, 64, 6)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs64_b8", affine_qvm, bfloat, 64, 8)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs128_b1", affine_qvm, bfloat, 128, 1)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs128_b2", affine_qvm, bfloat, 128, 2)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs128_b3", affine_qvm, bfloat, 128, 3)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs128_b4", affine_qvm, bfloat, 128, 4)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs128_b5", affine_qvm, bfloat, 128, 5)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs128_b6", affine_qvm, bfloat, 128, 6)
MLXQ_INSTANTIATE("affine_qvm_bfloat_gs128_b8", affine_qvm, bfloat, 128, 8)
// clang-format on
