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

MLXQ_INLINE uint32_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
MLXQ_INLINE uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The `Bits` bytes at p (8 values always fill exactly `Bits` bytes) as an integer, built from
// power-of-two loads so that no load reads past the last byte.
template <int Bits>
MLXQ_INLINE uint64_t load_bits8(const uint8_t* p) {
  if constexpr (Bits == 1) return p[0];
  if constexpr (Bits == 2) return load_u16(p);
  if constexpr (Bits == 3) return load_u16(p) | (uint32_t{p[2]} << 16);
  if constexpr (Bits == 4) return load_u32(p);
  if constexpr (Bits == 5) return load_u32(p) | (uint64_t{p[4]} << 32);
  if constexpr (Bits == 6) return load_u32(p) | (uint64_t{load_u16(p + 4)} << 32);
  if constexpr (Bits == 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
  }
}

// The 8 consecutive `Bits`-bit values that start at byte p, in order, as int32 lanes.
template <int Bits>
MLXQ_INLINE v8i unpack8(const uint8_t* p) {
  constexpr uint32_t mask = (1u << Bits) - 1u;
  const uint64_t bits64 = load_bits8<Bits>(p);
  if constexpr (Bits * 8 <= 32) {
    const v8u shifts = {0, Bits, 2 * Bits, 3 * Bits, 4 * Bits, 5 * Bits, 6 * Bits, 7 * Bits};
    return (v8i)(((v8u{} + static_cast<uint32_t>(bits64)) >> shifts) & mask);
  } else {
    const uint32_t lo = static_cast<uint32_t>(bits64);
    const uint32_t hi = static_cast<uint32_t>(bits64 >> (4 * Bits));
    const v8u v = {lo, lo, lo, lo, hi, hi, hi, hi};
    const v8u shifts = {0, Bits, 2 * Bits, 3 * Bits, 0, Bits, 2 * Bits, 3 * Bits};
    return (v8i)((v >> shifts) & mask);
  }
}

// Chunks: the unit of the decode kernels' inner loop.
// - 2, 4, 8 bits: 8 bytes, i.e. 8 byte lanes of P = 8/Bits values each. Vector j holds value
//   j of every byte, so it pairs with x in "chunk order" (x_chunk[j*8 + l] = x[l*P + j]):
//   one zero-extending byte load and a shift+mask per 8 values.
// - 1, 3, 5, 6 bits: `Bits` bytes holding 8 values in natural order (values straddle bytes).
template <int Bits>
struct Chunk {
  static constexpr bool kByteLanes = (Bits == 2 || Bits == 4 || Bits == 8);
  static constexpr int kVecs = kByteLanes ? 8 / Bits : 1;  // 8-value vectors per chunk
  static constexpr int kValues = 8 * kVecs;
  static constexpr int kBytes = kValues * Bits / 8;
};

// The chunk at p, loaded once; chunk_vec then extracts its 8-value vectors.
template <int Bits>
MLXQ_INLINE v8i chunk_bytes(const uint8_t* p) {
  if constexpr (Chunk<Bits>::kByteLanes) {
#if defined(MLXQ_X86_AVX2)
    // One vpmovzxbd; compilers do not find it from the generic form below.
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    v8i out;
    std::memcpy(&out, &v, sizeof(out));
    return out;
#else
    return unpack8<8>(p);
#endif
  } else {
    return unpack8<Bits>(p);
  }
}

// Vector j (0 <= j < Chunk<Bits>::kVecs) of a loaded chunk, as int32 lanes.
template <int Bits>
MLXQ_INLINE v8i chunk_vec(v8i bytes, int j) {
  if constexpr (Chunk<Bits>::kByteLanes) {
    if (j == Chunk<Bits>::kVecs - 1) return bytes >> (j * Bits);  // top value needs no mask
    return (bytes >> (j * Bits)) & ((1 << Bits) - 1);
  } else {
    return bytes;
  }
}

MLXQ_INLINE v8f to_float(v8i v) { return __builtin_convertvector(v, v8f); }

// Each lane rounded to bf16 (to nearest even; NaN stays a quiet NaN, infinities stay), kept as
// an fp32 bit pattern whose low 16 bits are zero: the fp32 value of that bf16 number.
MLXQ_INLINE v8u round_bf16(v8f v) {
  v8u u;
  std::memcpy(&u, &v, sizeof(u));
  const v8u rounded = (u + (0x7FFFu + ((u >> 16) & 1u))) & 0xFFFF0000u;
  const v8u nan = (v8u)((u & 0x7FFFFFFFu) > 0x7F800000u);  // all ones where NaN
  return (rounded & ~nan) | ((u | 0x00400000u) & 0xFFFF0000u & nan);
}

MLXQ_INLINE v8f bits_to_float(v8u u) {
  v8f v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// The bf16 halves of round_bf16's lanes, stored as 8 consecutive bf16 values.
MLXQ_INLINE void store8_bf16(uint16_t* p, v8u rounded) {
  typedef uint16_t v8h __attribute__((vector_size(16)));
  const v8h h = __builtin_convertvector(rounded >> 16, v8h);
  std::memcpy(p, &h, sizeof(h));
}

}  // namespace mlxq::cpu::MLXQ_ISA
