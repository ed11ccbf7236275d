// The floating-point quantization modes of MLX (mxfp4, nvfp4, mxfp8): element and scale
// encodings, and the quantizer of one group, reproducing mlx.core.quantize on the CPU bit for
// bit. Scalar code shared by every instruction set (the kernels in fp_kernels.h only decode).
//
// Formats (MLX 0.32):
// - mxfp4: groups of 32 FP4 E2M1 values (two per byte, low nibble first), one E8M0 scale byte
//   per group (2^(s-127));
// - nvfp4: groups of 16 FP4 E2M1 values, one FP8 E4M3 scale byte per group, optionally one
//   float32 `global_scale` per tensor (the scale bytes then encode scale * 448*6/global_scale);
// - mxfp8: groups of 32 FP8 E4M3 values (one per byte), one E8M0 scale byte per group.
//
// How MLX 0.32.4's CPU path quantizes (intermediates rounded to the dtype T of w as MLX's array
// ops round them; reproduced step by step below, and measured against mx.quantize):
//   amax = max |w| over the group;  s = amax / T(6 or 448)                          (in T)
//   mx modes:  e = s == 0 ? 0 : ceil(log2(s)) (exact);  v = w / T(2^e);  byte = uint8(e + 127)
//   nvfp4:     s8 = e4m3(s * enc) (fp32 product; enc = 2688/global_scale or 1);
//              v = float(w / T(e4m3_value(s8))) * enc                               (fp32)
//   fp4 code:  argmin_i |v - lut[i]| over the 16-entry table (first minimum wins, differences
//              rounded to v's type), so -0.1 becomes +0 (code 0) and ties go to the smaller
//              magnitude;  fp8 code: e4m3(v), round to nearest even, saturating at 448.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/kernel_table.h"

namespace mlxq::cpu {

// The 16 FP4 E2M1 values by code (bit 3 is the sign).
inline constexpr float kFp4Values[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                         -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// `v` rounded to the dtype `t` (nearest even) and back to fp32.
inline float round_to(float v, ScaleType t) {
  switch (t) {
    case ScaleType::kHalf:
      return static_cast<float>(c10::Half(v));
    case ScaleType::kBFloat16:
      return static_cast<float>(c10::BFloat16(v));
    default:
      return v;
  }
}

// FP8 E4M3 (bias 7, no infinities; 0x7F and 0xFF are NaN) to fp32, exactly.
inline float e4m3_value(uint8_t b) {
  if ((b & 0x7F) == 0x7F) return std::numeric_limits<float>::quiet_NaN();
  const c10::Half h(static_cast<uint16_t>((b & 0x7F) << 7), c10::Half::from_bits());
  const float v = static_cast<float>(h) * 256.0f;
  return (b & 0x80) ? -v : v;
}

// fp32 to FP8 E4M3, round to nearest even, magnitudes from 464 on (and inf/NaN) saturate to
// 448 (0x7E), the sign kept; subnormals (below 2^-6) are rounded on the 2^-9 grid.
inline uint8_t e4m3_code(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint8_t out;
  if (u >= (543u << 21)) {  // >= 464.0, inf, NaN
    out = 0x7E;
  } else if (u < (121u << 23)) {  // below 2^-6: add 2^-9's magic to round on that grid
    const float magic = bits_to_float(141u << 23);
    out = static_cast<uint8_t>(float_to_bits(bits_to_float(u) + magic) - (141u << 23));
  } else {
    const uint32_t odd = (u >> 20) & 1u;
    out = static_cast<uint8_t>((u + (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFFu + odd) >> 20);
  }
  return static_cast<uint8_t>(out | (sign >> 24));
}

// E8M0 scale byte to fp32: 2^(s-127); 0 is 2^-127 (a subnormal), 255 reads as infinity.
inline float e8m0_value(uint8_t s) {
  return s == 0 ? bits_to_float(0x00400000u) : bits_to_float(static_cast<uint32_t>(s) << 23);
}

// The FP4 code of v: the first table entry of least |v - lut[i]|, the difference rounded to
// `t` as MLX's argmin sees it (a NaN difference never wins, so NaN gives code 0).
inline uint8_t fp4_code(float v, ScaleType t) {
  uint8_t best = 0;
  float best_d = std::abs(round_to(v - kFp4Values[0], t));
  for (uint8_t i = 1; i < 16; ++i) {
    const float d = std::abs(round_to(v - kFp4Values[i], t));
    if (d < best_d || (std::isnan(best_d) && !std::isnan(d))) {
      best_d = d;
      best = i;
    }
  }
  return best;
}

// Quantizes one group of `w` (values of dtype t, held as fp32) into `out` (group/2 bytes for
// FP4, group bytes for FP8) and its scale byte. `enc` is 2688/global_scale for nvfp4 with a
// global scale, else 1 (unused by the mx modes).
inline void quantize_fp_group(const float* w, int group_size, FpMode mode, ScaleType t, float enc,
                              uint8_t* out, uint8_t* scale_byte) {
  float amax = 0.f;
  for (int j = 0; j < group_size; ++j) amax = std::max(amax, std::abs(w[j]));
  const bool fp8_values = mode == FpMode::kMxfp8;
  const float s = round_to(amax / (fp8_values ? 448.0f : 6.0f), t);
  // Each element before encoding, and the type its rounding to the table happens in.
  float divisor, post = 1.f;
  ScaleType vt = t;
  if (mode == FpMode::kNvfp4) {
    const uint8_t s8 = e4m3_code(s * enc);
    *scale_byte = s8;
    divisor = round_to(e4m3_value(s8), t);
    post = enc;
    vt = ScaleType::kFloat;  // the fp32 `enc` factor promotes the elements to fp32
  } else {
    // The smallest power of two 2^e >= s, so that no element exceeds the largest value.
    int32_t e = 0;
    if (s != 0.f) {
      int exp2 = 0;
      const float mant = std::frexp(s, &exp2);  // s = mant * 2^exp2, mant in [0.5, 1)
      e = mant == 0.5f ? exp2 - 1 : exp2;
    }
    *scale_byte = static_cast<uint8_t>(e + 127);  // wraps below 2^-127 as MLX's cast does
    divisor = round_to(std::pow(2.0f, static_cast<float>(e)), t);
  }
  for (int j = 0; j < group_size; ++j) {
    const float v = round_to(w[j] / divisor, t) * post;
    if (fp8_values) {
      out[j] = e4m3_code(v);
    } else {
      const uint8_t c = fp4_code(v, vt);
      if (j % 2 == 0)
        out[j / 2] = c;
      else
        out[j / 2] |= static_cast<uint8_t>(c << 4);
    }
  }
}

}  // namespace mlxq::cpu
