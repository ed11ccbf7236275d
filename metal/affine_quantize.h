// affine_quantize and affine_dequantize: one thread per quantization group, so each input value,
// packed word, scale and bias is read or written exactly once and a group's packed bits
// (GS * BITS / 32 whole words) are written with word stores.
//
// Quantization reproduces MLX's own Metal affine_quantize (what mx.quantize does on a Mac's GPU,
// and so what most mlx-community checkpoints hold), not its CPU path: w_max starts at 0 (an
// all-negative group spans [min, 0]), and values are rounded half away from zero (round, not
// rint); then, as on the CPU, the edge of larger magnitude is kept exact (which can make the
// scale negative) and q is clamped to [0, 2^BITS - 1]. 1 bit, which MLX's GPU kernel lacks,
// keeps the CPU rule (plain min/max, rint). fp32 math; divisions are precise::divide (MLX builds
// its kernels with -fno-fast-math), so the result stays bit-exact under Metal's default fast math.
#pragma once

#include "mlxq_utils.h"

namespace mlxq {

template <typename T, int GS, int BITS>
void affine_quantize_impl(const device T* w, device uint* wq, device T* scales, device T* biases,
                          constant AffineQuantParams& p, uint gid) {
  const long total = long(p.rows) * p.groups;
  if (long(gid) >= total) {
    return;  // no barriers or collectives in this kernel
  }
  const float n_bins = float((1 << BITS) - 1);
  const device T* src = w + long(gid) * GS;
  float v[GS];
  float w_min = float(src[0]);
  float w_max = w_min;
#pragma clang loop unroll(full)
  for (int j = 0; j < GS; ++j) {
    v[j] = float(src[j]);
    w_min = min(w_min, v[j]);
    w_max = max(w_max, v[j]);
  }
  if (BITS != 1) {
    w_max = max(w_max, 0.0f);  // MLX's GPU kernel starts its maximum at 0
  }
  float s, b;
  if (BITS == 1) {
    // MLX quantizes 1 bit as plain min/max: scale max - min, bias min, no exact edge.
    s = max(w_max - w_min, 1e-7f);
    b = w_min;
  } else {
    const bool min_is_edge = abs(w_min) > abs(w_max);
    s = max(precise::divide(w_max - w_min, n_bins), 1e-7f);
    s = min_is_edge ? s : -s;
    const float edge = min_is_edge ? w_min : w_max;
    const float q0 = round(precise::divide(edge, s));  // ties away from zero
    b = 0.0f;
    if (q0 != 0.0f) {
      s = precise::divide(edge, q0);
      b = edge;
    }
  }
  // The group's bit stream, emitted a word at a time.
  device uint* dst = wq + long(gid) * (GS * BITS / 32);
  ulong bitbuf = 0;
  int nbits = 0;
  int word = 0;
#pragma clang loop unroll(full)
  for (int j = 0; j < GS; ++j) {
    const float r = precise::divide(v[j] - b, s);
    const float q = min(max(BITS == 1 ? rint(r) : round(r), 0.0f), n_bins);
    bitbuf |= ulong(uint(q)) << nbits;
    nbits += BITS;
    if (nbits >= 32) {
      dst[word++] = uint(bitbuf);
      bitbuf >>= 32;
      nbits -= 32;
    }
  }
  scales[gid] = T(s);
  biases[gid] = T(b);
}

template <typename T, int GS, int BITS>
void affine_dequantize_impl(const device uint* wq, const device T* scales, const device T* biases,
                            device T* out, constant AffineQuantParams& p, uint gid) {
  const long total = long(p.rows) * p.groups;
  if (long(gid) >= total) {
    return;  // no barriers or collectives in this kernel
  }
  const float s = float(scales[gid]);
  const float b = float(biases[gid]);
  const device uint* src = wq + long(gid) * (GS * BITS / 32);
  device T* dst = out + long(gid) * GS;
#pragma clang loop unroll(full)
  for (int c = 0; c < GS / 32; ++c) {
    uint words[BITS];
    load_words<BITS>(src + c * BITS, words);
#pragma clang loop unroll(full)
    for (int j = 0; j < 32; ++j) {
      dst[c * 32 + j] = T(s * float(extract32<BITS>(words, j)) + b);
    }
  }
}

}  // namespace mlxq
