// Affine quantization of one group, reproducing mlx.core.quantize bit for bit: fp32 math,
// the edge of larger magnitude kept exact (which can make the scale negative; at 1 bit MLX
// uses plain min/max), values rounded half to even and clamped to [0, 2^bits - 1], packed as a
// little-endian bit stream.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace mlxq::cpu {

inline void quantize_group(const float* w, int group_size, int bits, uint8_t* out, float* scale,
                           float* bias) {
  const float n_bins = static_cast<float>((1 << bits) - 1);
  float w_min = w[0], w_max = w[0];
  for (int j = 1; j < group_size; ++j) {
    w_min = std::min(w_min, w[j]);
    w_max = std::max(w_max, w[j]);
  }
  float s, b = 0.f;
  if (bits == 1) {
    // MLX quantizes 1 bit as plain min/max: scale max - min, bias min, no exact edge.
    s = std::max(w_max - w_min, 1e-7f);
    b = w_min;
  } else {
    const bool min_is_edge = std::abs(w_min) > std::abs(w_max);
    s = std::max((w_max - w_min) / n_bins, 1e-7f);
    s = min_is_edge ? s : -s;
    const float edge = min_is_edge ? w_min : w_max;
    const float q0 = std::nearbyint(edge / s);
    if (q0 != 0.f) {
      s = edge / q0;
      b = edge;
    }
  }
  // 8 values always fill exactly `bits` bytes.
  for (int c = 0; c < group_size / 8; ++c) {
    uint64_t packed = 0;
    for (int j = 0; j < 8; ++j) {
      float q = std::nearbyint((w[c * 8 + j] - b) / s);
      // NaN (a constant group at +-FLT_MAX makes the scale -0) clamps to 0, as in mlx; a NaN
      // cast to an integer is undefined and can set bits of the neighbouring values.
      q = q > 0.f ? std::min(q, n_bins) : 0.f;
      packed |= static_cast<uint64_t>(q) << (j * bits);
    }
    std::memcpy(out + c * bits, &packed, bits);
  }
  *scale = s;
  *bias = b;
}

}  // namespace mlxq::cpu
