// fp_quantize: MLX's floating-point quantizer (mxfp4, nvfp4, mxfp8), one thread per group,
// reproducing the CPU op (csrc/cpu/fp_format.h: quantize_fp_group, the measured rules of
// mlx.core.quantize) step by step, with the same roundings to the dtype T of w:
//   amax = max |w|;  s = T(amax / (6 or 448))
//   mx modes: e = ceil(log2(s)) (0 for s = 0); scale byte uint8(e + 127); v = T(w / T(2^e))
//   nvfp4:    scale byte s8 = e4m3(s * enc) (enc = 448 * 6 / global_scale, or 1);
//             v = float(T(w / T(e4m3_value(s8)))) * enc, compared with the FP4 table in fp32
//   FP4 code: the first table entry of least |v - entry| (differences rounded to v's type);
//   FP8 code: e4m3(v), nearest even, saturating at 448.
// Divisions are precise::divide, so the codes stay bit-exact under fast math.
#pragma once

#include "fp_format.h"

namespace mlxq {

// `v` rounded to T and back (the CPU op's round_to).
template <typename T>
inline float round_to(float v) {
  return float(T(v));
}

// The smallest e with 2^e >= s, for a finite s > 0 (fp32 subnormals included).
inline int ceil_log2(float s) {
  const uint u = as_type<uint>(s);
  const uint mant = u & 0x7FFFFFu;
  const int field = int(u >> 23);
  if (field == 0) {  // subnormal: s = mant * 2^-149
    const int top = 31 - int(clz(mant));
    return top - 149 + ((mant & (mant - 1u)) != 0u ? 1 : 0);
  }
  return field - 127 + (mant != 0u ? 1 : 0);
}

// 2^e as fp32, exactly (subnormal below 2^-126, 0 below 2^-149, infinity above 2^127).
inline float pow2(int e) {
  if (e > 127) {
    return as_type<float>(0x7F800000u);
  }
  if (e >= -126) {
    return as_type<float>(uint(e + 127) << 23);
  }
  return e >= -149 ? as_type<float>(1u << uint(e + 149)) : 0.0f;
}

// fp32 to FP8 E4M3: nearest even, magnitudes from 464 on (and inf/NaN) saturate to 448 (0x7E)
// with the sign kept; below 2^-6 the value is rounded on the 2^-9 grid by adding a magic number.
inline uint e4m3_code(float f) {
  uint u = as_type<uint>(f);
  const uint sign = u & 0x80000000u;
  u ^= sign;
  uint out;
  if (u >= (543u << 21)) {
    out = 0x7Eu;
  } else if (u < (121u << 23)) {
    const float magic = as_type<float>(141u << 23);
    out = as_type<uint>(as_type<float>(u) + magic) - (141u << 23);
  } else {
    const uint odd = (u >> 20) & 1u;
    out = (u + (uint(7 - 127) << 23) + 0x7FFFFu + odd) >> 20;
  }
  return (out | (sign >> 24)) & 0xFFu;
}

// The FP4 code of v: the first of the 16 entries with the least |v - entry|, the difference
// rounded to VT (a NaN difference never wins, so NaN gives code 0).
template <typename VT>
inline uint fp4_code(float v) {
  uint best = 0u;
  float best_d = abs(round_to<VT>(v - fp4_value(0u)));
  for (uint i = 1u; i < 16u; ++i) {
    const float d = abs(round_to<VT>(v - fp4_value(i)));
    if (d < best_d || (isnan(best_d) && !isnan(d))) {
      best_d = d;
      best = i;
    }
  }
  return best;
}

template <typename T, int MODE>
void fp_quantize_impl(const device T* w, device uint* wq, device uchar* scales,
                      const device float* global_scale, constant AffineQuantParams& p, uint gid) {
  constexpr int GS = fp_group_size(MODE), BITS = fp_bits(MODE);
  if (long(gid) >= long(p.rows) * p.groups) {
    return;  // no barriers or collectives in this kernel
  }
  const device T* src = w + long(gid) * GS;
  float amax = 0.0f;
#pragma clang loop unroll(full)
  for (int j = 0; j < GS; ++j) {
    amax = max(amax, abs(float(src[j])));
  }
  const float s = round_to<T>(precise::divide(amax, BITS == 8 ? 448.0f : 6.0f));
  float divisor, post = 1.0f;
  if (MODE == kNvfp4) {
    // the bound global scale is 448 * 6 when the tensor has none: enc is then exactly 1
    const float enc = precise::divide(2688.0f, global_scale[0]);
    const uint s8 = e4m3_code(s * enc);
    scales[gid] = uchar(s8);
    divisor = round_to<T>(fp8_e4m3_value(s8));
    post = enc;
  } else {
    const int e = s != 0.0f ? ceil_log2(s) : 0;
    scales[gid] = uchar(e + 127);  // wraps below 2^-127 as MLX's cast does
    divisor = round_to<T>(pow2(e));
  }
  // The group's codes, packed little-endian into GS * BITS / 32 words.
  device uint* dst = wq + long(gid) * (GS * BITS / 32);
  uint word = 0u;
#pragma clang loop unroll(full)
  for (int j = 0; j < GS; ++j) {
    const float v = round_to<T>(precise::divide(float(src[j]), divisor)) * post;
    uint code;
    if (BITS == 8) {
      code = e4m3_code(v);
    } else if (MODE == kNvfp4) {
      code = fp4_code<float>(v);  // the fp32 factor promotes the elements to fp32
    } else {
      code = fp4_code<T>(v);
    }
    word |= code << ((j * BITS) % 32);
    if ((j + 1) * BITS % 32 == 0) {
      dst[(j * BITS) / 32] = word;
      word = 0u;
    }
  }
}

}  // namespace mlxq
