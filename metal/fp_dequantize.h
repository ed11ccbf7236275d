// fp_dequantize: the float weight of MLX's floating-point modes, one thread per group, rounded
// as mx.dequantize's CPU graph rounds it (and as the CPU op, csrc/cpu/fp_cpu.cpp): the element
// value and the scale are each rounded to the requested dtype T, then their fp32 product is
// rounded once to the output type. With nvfp4's global scale the factor global / (448 * 6)
// multiplies the rounded scale in fp32 and the output is float32 (OutT), as in MLX.
#pragma once

#include "fp_format.h"

namespace mlxq {

// A group's scale as mx.dequantize sees it in dtype T (times nvfp4's fp32 global factor).
template <typename T, int MODE>
inline float fp_rounded_scale(uint s, float global_factor) {
  if (MODE == kNvfp4) {
    return float(T(fp8_e4m3_value(s))) * global_factor;
  }
  return float(T(e8m0_value(s)));
}

template <typename T, typename OutT, int MODE>
void fp_dequantize_impl(const device uchar* wq, const device uchar* scales,
                        const device float* global_scale, device OutT* out,
                        constant AffineQuantParams& p, uint gid) {
  constexpr int GS = fp_group_size(MODE), BITS = fp_bits(MODE);
  if (long(gid) >= long(p.rows) * p.groups) {
    return;  // no barriers or collectives in this kernel
  }
  const float scale =
      fp_rounded_scale<T, MODE>(uint(scales[gid]), fp_global_factor<MODE>(global_scale));
  const device uchar* src = wq + long(gid) * (GS * BITS / 8);
  device OutT* dst = out + long(gid) * GS;
#pragma clang loop unroll(full)
  for (int j = 0; j < GS; ++j) {
    const uint code = BITS == 8 ? uint(src[j]) : (uint(src[j / 2]) >> ((j % 2) * 4)) & 0xFu;
    dst[j] = OutT(float(T(fp_element<MODE>(code))) * scale);
  }
}

}  // namespace mlxq
