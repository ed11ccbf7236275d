// CPU kernel bodies for MLX's floating-point modes (mxfp4, nvfp4, mxfp8; see fp_format.h),
// written once with the 8-lane vectors of vec.h and compiled per instruction set by kernels.h.
// Every FP4/FP8 value times its scale is an fp32 number, so decoding is exact; products with x
// accumulate in fp32 and the group's scale is applied once per group:
//   y[m, n] = sum_g scale[n, g] * (sum_{k in g} value(q[n, k]) * x[m, k])
// Prefill shapes dequantize row tiles with fp_dequantize and use a dense GEMM (fp_cpu.cpp).

#ifndef MLXQ_ISA
#error "include fp_kernels.h through kernels.h"
#endif

#include <cmath>
#include <limits>

namespace mlxq::cpu::MLXQ_ISA {

// fp32 values of the 16 FP4 E2M1 codes and the 256 FP8 E4M3 bytes (0x7F and 0xFF are NaN).
struct FpTables {
  alignas(32) float fp4[16];
  alignas(32) float fp8[256];
  FpTables() {
    static constexpr float kMagnitudes[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    for (int i = 0; i < 16; ++i) fp4[i] = (i & 8) ? -kMagnitudes[i & 7] : kMagnitudes[i & 7];
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      const float v = e == 0 ? std::ldexp(static_cast<float>(m), -9)
                             : std::ldexp(1.f + static_cast<float>(m) / 8.f, e - 7);
      fp8[b] = (b & 0x7F) == 0x7F ? std::numeric_limits<float>::quiet_NaN() : (b & 0x80) ? -v : v;
    }
  }
};

inline const FpTables& fp_tables() {
  static const FpTables t;
  return t;
}

// A group's scale byte as fp32, times the tensor's global factor.
MLXQ_INLINE float fp_scale(const FpWeight& W, uint8_t s, const FpTables& t) {
  float v;
  if (W.mode == FpMode::kNvfp4) {
    v = t.fp8[s];
  } else {  // E8M0: 2^(s-127); 0 is the subnormal 2^-127
    const uint32_t u = s == 0 ? 0x00400000u : static_cast<uint32_t>(s) << 23;
    std::memcpy(&v, &u, 4);
  }
  return v * W.global;
}

// The fp32 values of 8 FP4 (Bits 4) or FP8 E4M3 (Bits 8) codes, one per int32 lane. With AVX2:
// FP4 magnitudes come from a register table (vpermps reads the low 3 bits) and bit 3 is the
// sign; FP8 values are built from their bit fields: a normal value's exponent and mantissa
// move into an fp32 pattern with a rebiased exponent, a subnormal (exponent field 0) is
// converted from its integer mantissa (so no fp32 subnormal is an input and flush-to-zero
// modes cannot change the result), and 0x7F/0xFF become NaN. Elsewhere: a table lookup per lane
// (vector code with per-lane shifts would be scalarized on SSE2).
template <int Bits>
MLXQ_INLINE v8f fp_values(v8i code, const FpTables& t) {
#if defined(MLXQ_X86_AVX2)
  if constexpr (Bits == 4) {
    __m256i vi;
    std::memcpy(&vi, &code, sizeof(vi));
    const __m256 mag = _mm256_permutevar8x32_ps(_mm256_load_ps(t.fp4), vi);
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(vi, _mm256_set1_epi32(8)), 28);
    const __m256 v = _mm256_xor_ps(mag, _mm256_castsi256_ps(sign));
    v8f out;
    std::memcpy(&out, &v, sizeof(out));
    return out;
  } else {
    const v8i mag = code & 0x7F;
    const v8i normal = (mag << 20) + ((127 - 7) << 23);
    const v8f sub = to_float(mag) * (1.0f / 512.0f);  // m * 2^-9
    v8i subi;
    std::memcpy(&subi, &sub, sizeof(subi));
    const v8i is_sub = mag < 8;  // -1 where the exponent field is 0
    v8i bits = (subi & is_sub) | (normal & ~is_sub);
    bits |= ((mag == 0x7F) & 0x7FC00000) | ((code >> 7) << 31);
    v8f out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
#else
  const float* lut = Bits == 4 ? t.fp4 : t.fp8;
  v8f out;
  for (int i = 0; i < 8; ++i) out[i] = lut[code[i]];
  return out;
#endif
}

// The 8 values at p (4 bytes of FP4 codes, or 8 FP8 bytes) in natural order.
template <int Bits>
MLXQ_INLINE v8f fp_decode8(const uint8_t* p, const FpTables& t) {
  return fp_values<Bits>(unpack8<Bits>(p), t);
}

template <FpMode Mode>
struct FpModeTraits {
  static constexpr int kBits = Mode == FpMode::kMxfp8 ? 8 : 4;
  static constexpr int kGroup = Mode == FpMode::kNvfp4 ? 16 : 32;
  static constexpr int kGroupBytes = kGroup * kBits / 8;
};

template <FpMode Mode, int MB>
void fp_qmv_rows(const FpQmvArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  using T = FpModeTraits<Mode>;
  const FpTables& tables = fp_tables();
  const FpWeight& W = a.W;
  const int64_t K = W.K, G = W.G, row_bytes = K * T::kBits / 8;
  const float* x[MB];
  for (int m = 0; m < MB; ++m) x[m] = a.x + (m0 + m) * K;
  RowStreamPrefetch prefetch(W, n0, n1, 1, 1);  // one row per tile, asked for at once
  for (int64_t n = n0; n < n1; ++n) {
    prefetch.start_tile(n);
    prefetch.finish(0);
    const uint8_t* wrow = W.w + n * row_bytes;
    const uint8_t* srow = W.scales + n * G;
    v8f total[MB];
    for (int m = 0; m < MB; ++m) total[m] = v8f{};
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* wg = wrow + g * T::kGroupBytes;
      v8f acc[MB][2];
      for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = v8f{};
      if constexpr (T::kBits == 4) {
        // 8 bytes = 16 values: low nibbles pair with x_chunk[0..7], high with [8..15]
        // (x in chunk order, see FpQmvArgs)
#pragma GCC unroll 2
        for (int c = 0; c < T::kGroup / 16; ++c) {
          const v8i bytes = chunk_bytes<4>(wg + c * 8);
          const v8f lo = fp_values<4>(bytes & 15, tables), hi = fp_values<4>(bytes >> 4, tables);
          for (int m = 0; m < MB; ++m) {
            const float* xc = x[m] + g * T::kGroup + c * 16;
            acc[m][0] += lo * load8(xc);
            acc[m][1] += hi * load8(xc + 8);
          }
        }
      } else {
#pragma GCC unroll 4
        for (int c = 0; c < T::kGroup / 8; ++c) {
          const v8f q = fp_values<8>(chunk_bytes<8>(wg + c * 8), tables);
          for (int m = 0; m < MB; ++m) acc[m][c & 1] += q * load8(x[m] + g * T::kGroup + c * 8);
        }
      }
      const v8f sv = splat(fp_scale(W, srow[g], tables));
      for (int m = 0; m < MB; ++m) total[m] += sv * (acc[m][0] + acc[m][1]);
    }
    for (int m = 0; m < MB; ++m) a.y[(m0 + m) * W.N + n] = hsum(total[m]);
  }
}

template <FpMode Mode>
void fp_qmv_mode(const FpQmvArgs& a, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4) fp_qmv_rows<Mode, 4>(a, m, n0, n1);
  switch (a.M - m) {
    case 3:
      fp_qmv_rows<Mode, 3>(a, m, n0, n1);
      break;
    case 2:
      fp_qmv_rows<Mode, 2>(a, m, n0, n1);
      break;
    case 1:
      fp_qmv_rows<Mode, 1>(a, m, n0, n1);
      break;
    default:
      break;
  }
}

template <FpMode Mode>
void fp_dequantize_mode(const FpWeight& W, float* out, int64_t n0, int64_t n1) {
  using T = FpModeTraits<Mode>;
  const FpTables& tables = fp_tables();
  const int64_t K = W.K, G = W.G, row_bytes = K * T::kBits / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = W.w + n * row_bytes;
    float* orow = out + (n - n0) * K;
    for (int64_t g = 0; g < G; ++g) {
      const v8f sv = splat(fp_scale(W, W.scales[n * G + g], tables));
      const uint8_t* wg = wrow + g * T::kGroupBytes;
#pragma GCC unroll 4
      for (int c = 0; c < T::kGroup / 8; ++c)
        store8(orow + g * T::kGroup + c * 8, fp_decode8<T::kBits>(wg + c * T::kBits, tables) * sv);
    }
  }
}

inline void fp_qmv(const FpQmvArgs& a, int64_t n0, int64_t n1) {
  switch (a.W.mode) {
    case FpMode::kMxfp4:
      return fp_qmv_mode<FpMode::kMxfp4>(a, n0, n1);
    case FpMode::kNvfp4:
      return fp_qmv_mode<FpMode::kNvfp4>(a, n0, n1);
    default:
      return fp_qmv_mode<FpMode::kMxfp8>(a, n0, n1);
  }
}

inline void fp_dequantize(const FpWeight& W, float* out, int64_t n0, int64_t n1) {
  switch (W.mode) {
    case FpMode::kMxfp4:
      return fp_dequantize_mode<FpMode::kMxfp4>(W, out, n0, n1);
    case FpMode::kNvfp4:
      return fp_dequantize_mode<FpMode::kNvfp4>(W, out, n0, n1);
    default:
      return fp_dequantize_mode<FpMode::kMxfp8>(W, out, n0, n1);
  }
}

}  // namespace mlxq::cpu::MLXQ_ISA
