// 8-lane float/int vectors as GCC/Clang vector extensions. The same kernel text compiles to
// AVX2+FMA (in a translation unit built under a target pragma), to NEON on arm64 and to
// plain SSE2 or scalar code elsewhere. Included once per ISA translation unit, inside that
// ISA's namespace (MLXQ_ISA), so that no inline function is shared between instruction sets.
#ifndef MLXQ_ISA
#error "define MLXQ_ISA before including vec.h"
#endif

#include <cstdint>
#include <cstring>

#ifndef MLXQ_INLINE
#define MLXQ_INLINE inline __attribute__((always_inline))
#endif

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "MLX packing is little-endian; mlxq assumes a little-endian host");

namespace mlxq::cpu::MLXQ_ISA {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

MLXQ_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

MLXQ_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

MLXQ_INLINE v8f splat(float s) { return v8f{} + s; }

MLXQ_INLINE float hsum(v8f v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// The 8 consecutive `Bits`-bit values that start at byte `p` (8 values always fill exactly
// `Bits` bytes), as int32 lanes.
template <int Bits>
MLXQ_INLINE v8i unpack8(const uint8_t* p) {
  constexpr uint32_t mask = (1u << Bits) - 1u;
  if constexpr (Bits * 8 <= 32) {
    uint32_t word = 0;
    std::memcpy(&word, p, Bits);
    const v8u shifts = {0, Bits, 2 * Bits, 3 * Bits, 4 * Bits, 5 * Bits, 6 * Bits, 7 * Bits};
    return (v8i)(((v8u{} + word) >> shifts) & mask);
  } else {
    uint64_t bits64 = 0;
    std::memcpy(&bits64, p, Bits);
    const uint32_t lo = static_cast<uint32_t>(bits64);
    const uint32_t hi = static_cast<uint32_t>(bits64 >> (4 * Bits));
    const v8u v = {lo, lo, lo, lo, hi, hi, hi, hi};
    const v8u shifts = {0, Bits, 2 * Bits, 3 * Bits, 0, Bits, 2 * Bits, 3 * Bits};
    return (v8i)((v >> shifts) & mask);
  }
}

MLXQ_INLINE v8f to_float(v8i v) { return __builtin_convertvector(v, v8f); }

}  // namespace mlxq::cpu::MLXQ_ISA
