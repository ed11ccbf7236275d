// affine_quantize / affine_dequantize entry points (see affine_quantize.h).
// Threadgroup: 64 threads, one per quantization group; grid: (ceil(rows * groups / 64), 1, 1).
#include <metal_stdlib>
using namespace metal;

#include "affine_quantize.h"

template <typename T, int GS, int BITS>
[[kernel]] void affine_quantize(const device T* w [[buffer(0)]], device uint* wq [[buffer(1)]],
                                device T* scales [[buffer(2)]], device T* biases [[buffer(3)]],
                                constant AffineQuantParams& p [[buffer(4)]],
                                uint gid [[thread_position_in_grid]]) {
  mlxq::affine_quantize_impl<T, GS, BITS>(w, wq, scales, biases, p, gid);
}

template <typename T, int GS, int BITS>
[[kernel]] void affine_dequantize(const device uint* wq [[buffer(0)]],
                                  const device T* scales [[buffer(1)]],
                                  const device T* biases [[buffer(2)]], device T* out [[buffer(3)]],
                                  constant AffineQuantParams& p [[buffer(4)]],
                                  uint gid [[thread_position_in_grid]]) {
  mlxq::affine_dequantize_impl<T, GS, BITS>(wq, scales, biases, out, p, gid);
}

// clang-format off
MLXQ_INSTANTIATE("affine_quantize_float_gs32_b2", affine_quantize, float, 32, 2)
MLXQ_INSTANTIATE("affine_quantize_float_gs32_b3", affine_quantize, float, 32, 3)
MLXQ_INSTANTIATE("affine_quantize_float_gs32_b4", affine_quantize, float, 32, 4)
MLXQ_INSTANTIATE("affine_quantize_float_gs32_b5", affine_quantize, float, 32, 5)
MLXQ_INSTANTIATE("affine_quantize_float_gs32_b6", affine_quantize, float, 32, 6)
MLXQ_INSTANTIATE("affine_quantize_float_gs32_b8", affine_quantize, float, 32, 8)
MLXQ_INSTANTIATE("affine_quantize_float_gs64_b2", affine_quantize, float, 64, 2)
MLXQ_INSTANTIATE("affine_quantize_float_gs64_b3", affine_quantize, float, 64, 3)
MLXQ_INSTANTIATE("affine_quantize_float_gs64_b4", affine_quantize, float, 64, 4)
MLXQ_INSTANTIATE("affine_quantize_float_gs64_b5", affine_quantize, float, 64, 5)
MLXQ_INSTANTIATE("affine_quantize_float_gs64_b6", affine_quantize, float, 64, 6)
MLXQ_INSTANTIATE("affine_quantize_float_gs64_b8", affine_quantize, float, 64, 8)
MLXQ_INSTANTIATE("affine_quantize_float_gs128_b2", affine_quantize, float, 128, 2)
MLXQ_INSTANTIATE("affine_quantize_float_gs128_b3", affine_quantize, float, 128, 3)
MLXQ_INSTANTIATE("affine_quantize_float_gs128_b4", affine_quantize, float, 128, 4)
MLXQ_INSTANTIATE("affine_quantize_float_gs128_b5", affine_quantize, float, 128, 5)
MLXQ_INSTANTIATE("affine_quantize_float_gs128_b6", affine_quantize, float, 128, 6)
MLXQ_INSTANTIATE("affine_quantize_float_gs128_b8", affine_quantize, float, 128, 8)
MLXQ_INSTANTIATE("affine_quantize_half_gs32_b2", affine_quantize, half, 32, 2)
MLXQ_INSTANTIATE("affine_quantize_half_gs32_b3", affine_quantize, half, 32, 3)
MLXQ_INSTANTIATE("affine_quantize_half_gs32_b4", affine_quantize, half, 32, 4)
MLXQ_INSTANTIATE("affine_quantize_half_gs32_b5", affine_quantize, half, 32, 5)
MLXQ_INSTANTIATE("affine_quantize_half_gs32_b6", affine_quantize, half, 32, 6)
MLXQ_INSTANTIATE("affine_quantize_half_gs32_b8", affine_quantize, half, 32, 8)
MLXQ_INSTANTIATE("affine_quantize_half_gs64_b2", affine_quantize, half, 64, 2)
MLXQ_INSTANTIATE("affine_quantize_half_gs64_b3", affine_quantize, half, 64, 3)
MLXQ_INSTANTIATE("affine_quantize_half_gs64_b4", affine_quantize, half, 64, 4)
MLXQ_INSTANTIATE("affine_quantize_half_gs64_b5", affine_quantize, half, 64, 5)
MLXQ_INSTANTIATE("affine_quantize_half_gs64_b6", affine_quantize, half, 64, 6)
MLXQ_INSTANTIATE("affine_quantize_half_gs64_b8", affine_quantize, half, 64, 8)
MLXQ_INSTANTIATE("affine_quantize_half_gs128_b2", affine_quantize, half, 128, 2)
MLXQ_INSTANTIATE("affine_quantize_half_gs128_b3", affine_quantize, half, 128, 3)
MLXQ_INSTANTIATE("affine_quantize_half_gs128_b4", affine_quantize, half, 128, 4)
MLXQ_INSTANTIATE("affine_quantize_half_gs128_b5", affine_quantize, half, 128, 5)
MLXQ_INSTANTIATE("affine_quantize_half_gs128_b6", affine_quantize, half, 128, 6)
MLXQ_INSTANTIATE("affine_quantize_half_gs128_b8", affine_quantize, half, 128, 8)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs32_b2", affine_quantize, bfloat, 32, 2)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs32_b3", affine_quantize, bfloat, 32, 3)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs32_b4", affine_quantize, bfloat, 32, 4)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs32_b5", affine_quantize, bfloat, 32, 5)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs32_b6", affine_quantize, bfloat, 32, 6)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs32_b8", affine_quantize, bfloat, 32, 8)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs64_b2", affine_quantize, bfloat, 64, 2)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs64_b3", affine_quantize, bfloat, 64, 3)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs64_b4", affine_quantize, bfloat, 64, 4)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs64_b5", affine_quantize, bfloat, 64, 5)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs64_b6", affine_quantize, bfloat, 64, 6)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs64_b8", affine_quantize, bfloat, 64, 8)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs128_b2", affine_quantize, bfloat, 128, 2)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs128_b3", affine_quantize, bfloat, 128, 3)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs128_b4", affine_quantize, bfloat, 128, 4)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs128_b5", affine_quantize, bfloat, 128, 5)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs128_b6", affine_quantize, bfloat, 128, 6)
MLXQ_INSTANTIATE("affine_quantize_bfloat_gs128_b8", affine_quantize, bfloat, 128, 8)
MLXQ_INSTANTIATE("affine_dequantize_float_gs32_b2", affine_dequantize, float, 32, 2)
MLXQ_INSTANTIATE("affine_dequantize_float_gs32_b3", affine_dequantize, float, 32, 3)
MLXQ_INSTANTIATE("affine_dequantize_float_gs32_b4", affine_dequantize, float, 32, 4)
MLXQ_INSTANTIATE("affine_dequantize_float_gs32_b5", affine_dequantize, float, 32, 5)
MLXQ_INSTANTIATE("affine_dequantize_float_gs32_b6", affine_dequantize, float, 32, 6)
MLXQ_INSTANTIATE("affine_dequantize_float_gs32_b8", affine_dequantize, float, 32, 8)
MLXQ_INSTANTIATE("affine_dequantize_float_gs64_b2", affine_dequantize, float, 64, 2)
MLXQ_INSTANTIATE("affine_dequantize_float_gs64_b3", affine_dequantize, float, 64, 3)
MLXQ_INSTANTIATE("affine_dequantize_float_gs64_b4", affine_dequantize, float, 64, 4)
MLXQ_INSTANTIATE("affine_dequantize_float_gs64_b5", affine_dequantize, float, 64, 5)
MLXQ_INSTANTIATE("affine_dequantize_float_gs64_b6", affine_dequantize, float, 64, 6)
MLXQ_INSTANTIATE("affine_dequantize_float_gs64_b8", affine_dequantize, float, 64, 8)
MLXQ_INSTANTIATE("affine_dequantize_float_gs128_b2", affine_dequantize, float, 128, 2)
MLXQ_INSTANTIATE("affine_dequantize_float_gs128_b3", affine_dequantize, float, 128, 3)
MLXQ_INSTANTIATE("affine_dequantize_float_gs128_b4", affine_dequantize, float, 128, 4)
MLXQ_INSTANTIATE("affine_dequantize_float_gs128_b5", affine_dequantize, float, 128, 5)
MLXQ_INSTANTIATE("affine_dequantize_float_gs128_b6", affine_dequantize, float, 128, 6)
MLXQ_INSTANTIATE("affine_dequantize_float_gs128_b8", affine_dequantize, float, 128, 8)
MLXQ_INSTANTIATE("affine_dequantize_half_gs32_b2", affine_dequantize, half, 32, 2)
MLXQ_INSTANTIATE("affine_dequantize_half_gs32_b3", affine_dequantize, half, 32, 3)
MLXQ_INSTANTIATE("affine_dequantize_half_gs32_b4", affine_dequantize, half, 32, 4)
MLXQ_INSTANTIATE("affine_dequantize_half_gs32_b5", affine_dequantize, half, 32, 5)
MLXQ_INSTANTIATE("affine_dequantize_half_gs32_b6", affine_dequantize, half, 32, 6)
MLXQ_INSTANTIATE("affine_dequantize_half_gs32_b8", affine_dequantize, half, 32, 8)
MLXQ_INSTANTIATE("affine_dequantize_half_gs64_b2", affine_dequantize, half, 64, 2)
MLXQ_INSTANTIATE("affine_dequantize_half_gs64_b3", affine_dequantize, half, 64, 3)
MLXQ_INSTANTIATE("affine_dequantize_half_gs64_b4", affine_dequantize, half, 64, 4)
MLXQ_INSTANTIATE("affine_dequantize_half_gs64_b5", affine_dequantize, half, 64, 5)
MLXQ_INSTANTIATE("affine_dequantize_half_gs64_b6", affine_dequantize, half, 64, 6)
MLXQ_INSTANTIATE("affine_dequantize_half_gs64_b8", affine_dequantize, half, 64, 8)
MLXQ_INSTANTIATE("affine_dequantize_half_gs128_b2", affine_dequantize, half, 128, 2)
MLXQ_INSTANTIATE("affine_dequantize_half_gs128_b3", affine_dequantize, half, 128, 3)
MLXQ_INSTANTIATE("affine_dequantize_half_gs128_b4", affine_dequantize, half, 128, 4)
MLXQ_INSTANTIATE("affine_dequantize_half_gs128_b5", affine_dequantize, half, 128, 5)
MLXQ_INSTANTIATE("affine_dequantize_half_gs128_b6", affine_dequantize, half, 128, 6)
MLXQ_INSTANTIATE("affine_dequantize_half_gs128_b8", affine_dequantize, half, 128, 8)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs32_b2", affine_dequantize, bfloat, 32, 2)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs32_b3", affine_dequantize, bfloat, 32, 3)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs32_b4", affine_dequantize, bfloat, 32, 4)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs32_b5", affine_dequantize, bfloat, 32, 5)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs32_b6", affine_dequantize, bfloat, 32, 6)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs32_b8", affine_dequantize, bfloat, 32, 8)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs64_b2", affine_dequantize, bfloat, 64, 2)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs64_b3", affine_dequantize, bfloat, 64, 3)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs64_b4", affine_dequantize, bfloat, 64, 4)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs64_b5", affine_dequantize, bfloat, 64, 5)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs64_b6", affine_dequantize, bfloat, 64, 6)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs64_b8", affine_dequantize, bfloat, 64, 8)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs128_b2", affine_dequantize, bfloat, 128, 2)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs128_b3", affine_dequantize, bfloat, 128, 3)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs128_b4", affine_dequantize, bfloat, 128, 4)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs128_b5", affine_dequantize, bfloat, 128, 5)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs128_b6", affine_dequantize, bfloat, 128, 6)
MLXQ_INSTANTIATE("affine_dequantize_bfloat_gs128_b8", affine_dequantize, bfloat, 128, 8)
// clang-format on
