// MLX's floating-point quantization modes in MSL: decoding only (the Metal kernels multiply,
// they do not quantize). The formats, and MLX's quantizer, are defined for the whole project in
// csrc/cpu/fp_format.h; this header decodes the same codes with bit operations instead of
// tables, and tests/test_metal_fp.py checks every code and scale byte against the CPU op.
//
// - mxfp4: groups of 32 FP4 E2M1 values (two per byte, low nibble first), E8M0 scale bytes;
// - nvfp4: groups of 16 FP4 E2M1 values, FP8 E4M3 scale bytes, times the tensor's optional
//   float32 global scale / (448 * 6);
// - mxfp8: groups of 32 FP8 E4M3 values (one per byte), E8M0 scale bytes.
// Every value times its (power-of-two) mx scale is exact in fp32, as on the CPU.
#pragma once

#include "mlxq_utils.h"

namespace mlxq {

// Mode indices, as check_fp_mode (csrc/checks.h) numbers them.
enum FpModeIndex : int { kMxfp4 = 0, kNvfp4 = 1, kMxfp8 = 2 };

// Group size and element bits of a mode (MLX accepts no others).
constexpr int fp_group_size(int mode) { return mode == kNvfp4 ? 16 : 32; }
constexpr int fp_bits(int mode) { return mode == kMxfp8 ? 8 : 4; }

// A sign + E exponent bits (bias 2^(E-1) - 1) + MB mantissa bits minifloat as fp32, exactly:
// a normal value's fields move into an fp32 pattern with a rebiased exponent; a subnormal
// (exponent field 0) is its integer mantissa times 2^(1 - bias - MB).
template <int E, int MB>
inline float minifloat_value(uint code) {
  constexpr int BIAS = (1 << (E - 1)) - 1;
  const uint mag = code & ((1u << (E + MB)) - 1u);
  const uint sign = ((code >> (E + MB)) & 1u) << 31;
  const float subnormal = float(mag) / float(1u << (BIAS + MB - 1));
  const float normal = as_type<float>((mag << (23 - MB)) + (uint(127 - BIAS) << 23));
  const float v = (mag >> MB) == 0u ? subnormal : normal;
  return as_type<float>(as_type<uint>(v) | sign);
}

// FP4 E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives (code 8 is -0).
inline float fp4_value(uint code) { return minifloat_value<2, 1>(code); }

// FP8 E4M3: no infinities; 0x7F and 0xFF are NaN.
inline float fp8_e4m3_value(uint code) {
  const float v = minifloat_value<4, 3>(code);
  return (code & 0x7Fu) == 0x7Fu ? as_type<float>(0x7FC00000u) : v;
}

// E8M0 scale byte: 2^(s - 127); 0 is the fp32 subnormal 2^-127 and 255 reads as infinity.
inline float e8m0_value(uint s) { return as_type<float>(s == 0u ? 0x00400000u : s << 23); }

// An element code of the mode as fp32.
template <int MODE>
inline float fp_element(uint code) {
  return fp_bits(MODE) == 8 ? fp8_e4m3_value(code) : fp4_value(code);
}

// A group's scale byte as fp32; `global_factor` is nvfp4's global scale / (448 * 6) (1 when the
// tensor has none), applied in fp32 as the CPU op applies it.
template <int MODE>
inline float fp_scale(uint s, float global_factor) {
  return MODE == kNvfp4 ? fp8_e4m3_value(s) * global_factor : e8m0_value(s);
}

// nvfp4's factor from the bound global scale buffer (the host binds 448 * 6 when the tensor has
// no global scale, so the factor is then exactly 1); the mx modes never read the buffer.
template <int MODE>
inline float fp_global_factor(const device float* global_scale) {
  return MODE == kNvfp4 ? global_scale[0] / 2688.0f : 1.0f;
}

// Code j of values packed little-endian in 32-bit words (BITS 4 or 8 never straddle a word).
template <int BITS>
inline uint fp_code(const thread uint* w, int j) {
  return (w[(j * BITS) / 32] >> ((j * BITS) % 32)) & ((1u << BITS) - 1u);
}

}  // namespace mlxq
