// Shared MSL helpers for the affine kernels: instantiation macro, batch offsets and the
// unpacking of MLX's little-endian bit stream (value i of a row occupies bits [i*b, (i+1)*b)).
#pragma once

#include "mlxq_params.h"

// One line per entry point; the emulator recognises this expansion after preprocessing.
#define MLXQ_INSTANTIATE(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

namespace mlxq {

// Batch entry `z` of the broadcast batch shape -> batch entries of x and of the weight.
inline void batch_entries(constant AffineMatmulParams& p, uint z, thread long& xb,
                          thread long& wb) {
  xb = 0;
  wb = 0;
  long rest = long(z);
  for (int d = p.batch_ndim - 1; d >= 0; --d) {
    const long i = rest % long(p.batch_shape[d]);
    rest /= long(p.batch_shape[d]);
    xb += i * long(p.x_batch_strides[d]);
    wb += i * long(p.w_batch_strides[d]);
  }
}

// Value j (0..31) of 32 consecutive values held in BITS words. j is a compile-time constant
// after unrolling, so the shifts and the straddle test fold away.
template <int BITS>
inline uint extract32(const thread uint* w, int j) {
  const int bit = j * BITS;
  const int wi = bit >> 5;
  const int sh = bit & 31;
  uint v = w[wi] >> sh;
  if (sh + BITS > 32) {
    v |= w[wi + 1] << (32 - sh);
  }
  return v & ((1u << BITS) - 1u);
}

// Loads the BITS words that hold 32 values, with the widest aligned vector loads the layout
// allows: a row holds K*BITS/32 words with K a multiple of 32, so a 32-value chunk starts on a
// 4*BITS-byte boundary (16-byte aligned for 4 and 8 bits, 8-byte aligned for 2 bits).
template <int BITS>
inline void load_words(const device uint* src, thread uint* w) {
  if (BITS == 4) {
    const uint4 v = *(const device uint4*)src;
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  } else if (BITS == 8) {
    const uint4 a = *(const device uint4*)src;
    const uint4 b = *((const device uint4*)src + 1);
    w[0] = a.x;
    w[1] = a.y;
    w[2] = a.z;
    w[3] = a.w;
    w[4] = b.x;
    w[5] = b.y;
    w[6] = b.z;
    w[7] = b.w;
  } else if (BITS == 2) {
    const uint2 v = *(const device uint2*)src;
    w[0] = v.x;
    w[1] = v.y;
  } else {
    // 3, 5, 6 bits: the chunk is only 4-byte aligned.
#pragma clang loop unroll(full)
    for (int i = 0; i < BITS; ++i) {
      w[i] = src[i];
    }
  }
}

// Loads one pack of 8 values (exactly BITS bytes, starting at byte `8 * BITS / 8 * pack`).
// 2/4/8 bits: one aligned ushort/uint/uint2 load; 3/5/6 bits: BITS byte loads.
template <int BITS>
inline ulong load_pack(const device uchar* row, int pack) {
  const device uchar* p = row + pack * BITS;
  if (BITS == 2) {
    return ulong(*(const device ushort*)p);
  } else if (BITS == 4) {
    return ulong(*(const device uint*)p);
  } else if (BITS == 8) {
    const uint2 v = *(const device uint2*)p;
    return ulong(v.x) | (ulong(v.y) << 32);
  } else {
    ulong v = 0;
#pragma clang loop unroll(full)
    for (int i = 0; i < BITS; ++i) {
      v |= ulong(p[i]) << (8 * i);
    }
    return v;
  }
}

// Value j (0..7) of a pack.
template <int BITS>
inline uint pack_value(ulong pack, int j) {
  return uint(pack >> (j * BITS)) & ((1u << BITS) - 1u);
}

}  // namespace mlxq
