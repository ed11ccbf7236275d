// Kernels for CPUs with AVX-512, its BF16 dot product and VBMI (Zen 4, Sapphire Rapids, newer).
// The generic kernels (kernels.h) are compiled here once more for this target, and decode at
// 2 to 6 bits gets a dedicated kernel: packed values are brought into 16-bit lanes (at 2 and 4
// bits 64 bytes are 32 lanes of 16/bits values, shifted by j*bits for value j; at 3, 5, 6 bits
// each lane gathers its value's two bytes with vpermb and shifts them), become exact bf16
// integers through a table lookup (vpermw/vpermt2w, which ignore the bits above the index), and
// vdpbf16ps multiplies them with x held as a sum of bf16 pieces (1 piece for bf16 x, 2 for
// fp16, 3 for fp32: exact to fp32 precision), accumulating in fp32.
// The floating-point modes decode the same way, their FP4 / FP8 values made bf16.
// (Placing q in the mantissa of 2^bits saves the lookup but its offset must be cancelled
// through the bias term, which costs fp32 accuracy; the lookup costs under 5% of the time.)
#if defined(__x86_64__) || defined(_M_X64)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/kernel_table.h"

#if defined(__clang__)
#pragma clang attribute push(                                                               \
    __attribute__((                                                                         \
        target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,avx2,fma,f16c")
#endif

#define MLXQ_ISA avx512
#define MLXQ_X86_AVX2 1
#define MLXQ_X86_AVX512 1  // kernels.h may use 512-bit intrinsics (attention_kernels.h does)
#include "cpu/kernels.h"

namespace mlxq::cpu::avx512 {

// bf16 bit patterns of value(i), i = 32*half .. 32*half + 31, for a lookup table.
template <typename Value>
__m512i bf16_table(int half, Value value) {
  alignas(64) uint16_t t[32] = {};
  for (int i = 0; i < 32; ++i) {
    const float f = value(i + 32 * half);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    t[i] = static_cast<uint16_t>(u >> 16);
  }
  return _mm512_load_si512(t);
}

// Packed value in the low bits of each 16-bit lane -> its exact bf16 value: by default the
// integer q; a table `value` of index i must give the value of code i & (2^Bits - 1), since
// vpermw reads the low 5 bits of each 16-bit lane (vpermt2w the low 6), so a lane shifted
// right to put value j in its low bits needs no mask.
template <int Bits>
struct Bf16Lookup {
  static_assert(Bits <= 6, "a 64-entry table covers at most 6 bits");
  __m512i lo, hi;
  Bf16Lookup() : Bf16Lookup([](int i) { return static_cast<float>(i & ((1 << Bits) - 1)); }) {}
  template <typename Value>
  explicit Bf16Lookup(Value value) : lo(bf16_table(0, value)), hi(bf16_table(1, value)) {}
  __m512i operator()(__m512i v) const {
    if constexpr (Bits <= 5) return _mm512_permutexvar_epi16(v, lo);
    return _mm512_permutex2var_epi16(lo, v, hi);
  }
};

// One block of 32 16-bit lanes per row of W, each lane holding PL packed values (value
// i*PL + j of the block in lane i; x is laid out to match, see QmvBf16Args): MB*R dot
// products over the block, each scaled by its group's scale and added to `total`. `Chains`
// accumulators per (m, r) (0: as many as keep >= 8 dependency chains; a fixed count makes each
// sum independent of the tile shape MB x R).
template <int Bits, int GS, int MB, int R, int NP, int PL, int Chains = 0,
          typename Lookup = Bf16Lookup<Bits>>
inline void bf16_block(const __m512i (&lanes)[R], const uint16_t* const (&x)[NP][MB], int64_t k0,
                       const float* s, int64_t G, const Lookup& lookup, __m512 (&total)[MB][R]) {
  constexpr int kValues = 32 * PL;
  constexpr int kGroups = GS >= kValues ? 1 : kValues / GS;  // groups in the block
  constexpr int A = Chains > 0 ? Chains : (MB * R >= 8 || PL == 1 ? 1 : 2);
  __m512 acc[MB][R][A];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < A; ++i) acc[m][r][i] = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int j = 0; j < PL; ++j) {
    __m512i q[R];
    for (int r = 0; r < R; ++r)
      q[r] = lookup(j == 0 ? lanes[r] : _mm512_srli_epi16(lanes[r], j * Bits));
    for (int p = 0; p < NP; ++p)
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_loadu_si512(x[p][m] + k0 + j * 32);
        for (int r = 0; r < R; ++r)
          acc[m][r][j % A] = _mm512_dpbf16_ps(acc[m][r][j % A], (__m512bh)q[r], (__m512bh)xv);
      }
  }
  const int64_t g0 = k0 / GS;
  for (int r = 0; r < R; ++r) {
    __m512 sv;
    if constexpr (kGroups == 1) {
      sv = _mm512_set1_ps(s[r * G + g0]);
    } else {
      // fp32 lane i sums 16-bit lanes 2i and 2i+1: group i / (16 / kGroups) of the block.
      alignas(64) static constexpr int32_t kLaneGroup[16] = {
          0 * kGroups / 16,  1 * kGroups / 16,  2 * kGroups / 16,  3 * kGroups / 16,
          4 * kGroups / 16,  5 * kGroups / 16,  6 * kGroups / 16,  7 * kGroups / 16,
          8 * kGroups / 16,  9 * kGroups / 16,  10 * kGroups / 16, 11 * kGroups / 16,
          12 * kGroups / 16, 13 * kGroups / 16, 14 * kGroups / 16, 15 * kGroups / 16};
      const __m512 sg = _mm512_maskz_loadu_ps((__mmask16)((1u << kGroups) - 1), s + r * G + g0);
      sv = _mm512_permutexvar_ps(_mm512_load_si512(kLaneGroup), sg);
    }
    for (int m = 0; m < MB; ++m) {
      __m512 sum = acc[m][r][0];
      for (int i = 1; i < A; ++i) sum = _mm512_add_ps(sum, acc[m][r][i]);
      total[m][r] = _mm512_fmadd_ps(sv, sum, total[m][r]);
    }
  }
}

// The bytes of 32 consecutive Bits-bit values (Bits = 3, 5, 6), as 32 16-bit lanes holding
// value i in their low bits: lane i gets bytes b and b+1 around bit i*Bits (vpermb), shifted
// right by (i*Bits) % 8 (vpsrlvw). Reads exactly the 4*Bits bytes of the values.
template <int Bits>
struct GatherLanes {
  __m512i index, shift;
  GatherLanes() {
    alignas(64) uint8_t idx[64];
    alignas(64) uint16_t sh[32];
    for (int i = 0; i < 32; ++i) {
      idx[2 * i] = static_cast<uint8_t>(i * Bits / 8);
      idx[2 * i + 1] = static_cast<uint8_t>(i * Bits / 8 + 1);
      sh[i] = static_cast<uint16_t>(i * Bits % 8);
    }
    index = _mm512_load_si512(idx);
    shift = _mm512_load_si512(sh);
  }
  __m512i operator()(const uint8_t* p) const {
    const __m512i bytes = _mm512_maskz_loadu_epi8((__mmask64)((1ULL << (4 * Bits)) - 1), p);
    return _mm512_srlv_epi16(_mm512_permutexvar_epi8(index, bytes), shift);
  }
};

// At 2 and 4 bits, 64 packed bytes already are 32 16-bit lanes of 16/Bits values.
struct WholeLanes {
  __m512i operator()(const uint8_t* p) const { return _mm512_loadu_si512(p); }
};

// MB rows of x, R rows of W, NP bf16 pieces of x. At 2 and 4 bits, blocks of 64 packed bytes
// are read as 32 16-bit lanes of 16/Bits values, and a K that ends in half a block ends with 32
// bytes widened to 16-bit lanes of 8/Bits values; at 3, 5 and 6 bits every 32 values are
// gathered into 16-bit lanes (GatherLanes) and x is in natural order.
template <int Bits, int GS, int MB, int R, int NP>
void qmv_bf16_tile(const QmvBf16Args& a, int64_t m0, int64_t n0, int64_t n1, float* s, float* b) {
  constexpr bool kShifted = bf16_shifted_lanes(Bits);
  constexpr int kLaneValues = kShifted ? 16 / Bits : 1;
  constexpr int kBlockValues = 32 * kLaneValues;
  const QuantWeight& W = a.W;
  const int64_t K = W.K, G = W.G, M = a.M, row_bytes = K * Bits / 8;
  const int64_t blocks = K / kBlockValues;
  const bool half_block = K % kBlockValues != 0;
  const Bf16Lookup<Bits> lookup;
  const std::conditional_t<kShifted, WholeLanes, GatherLanes<Bits>> load_lanes;
  const uint16_t* x[NP][MB];
  for (int p = 0; p < NP; ++p)
    for (int m = 0; m < MB; ++m) x[p][m] = a.x + (p * M + m0 + m) * K;

  RowStreamPrefetch prefetch(W, n0, n1, R, blocks + 1);
  for (int64_t n = n0; n + R <= n1; n += R) {
    prefetch.start_tile(n);
    const uint8_t* wrow[R];
    load_tile_scales(W, n, R, s, b);
    for (int r = 0; r < R; ++r) wrow[r] = W.w + (n + r) * row_bytes;
    __m512 total[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) total[m][r] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      prefetch.step(blk);
      __m512i lanes[R];
      for (int r = 0; r < R; ++r) lanes[r] = load_lanes(wrow[r] + blk * kBlockValues * Bits / 8);
      bf16_block<Bits, GS, MB, R, NP, kLaneValues>(lanes, x, blk * kBlockValues, s, G, lookup,
                                                   total);
    }
    prefetch.finish(blocks);
    if constexpr (kShifted) {
      if (half_block) {
        __m512i lanes[R];
        for (int r = 0; r < R; ++r)
          lanes[r] = _mm512_cvtepu8_epi16(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow[r] + blocks * 64)));
        bf16_block<Bits, GS, MB, R, NP, 8 / Bits>(lanes, x, blocks * kBlockValues, s, G, lookup,
                                                  total);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const float* xs = a.xsum + (m0 + m) * G;
      for (int r = 0; r < R; ++r) {
        __m512 bias = _mm512_setzero_ps();  // sum_g b[g] * xsum[g], 16 groups at a time
        for (int64_t g = 0; g < G; g += 16) {
          const __mmask16 k = G - g >= 16 ? 0xFFFF : (__mmask16)((1u << (G - g)) - 1);
          bias = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, b + r * G + g),
                                 _mm512_maskz_loadu_ps(k, xs + g), bias);
        }
        a.y[(m0 + m) * W.N + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(total[m][r], bias));
      }
    }
  }
}

template <int Bits, int GS, int NP>
void qmv_bf16_rows(const QmvBf16Args& a, int64_t n0, int64_t n1) {
  constexpr int R = 4;
  std::vector<float> s(R * a.W.G), b(R * a.W.G);
  const int64_t n_full = n0 + (n1 - n0) / R * R;
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2) {
    qmv_bf16_tile<Bits, GS, 2, R, NP>(a, m, n0, n_full, s.data(), b.data());
    qmv_bf16_tile<Bits, GS, 2, 1, NP>(a, m, n_full, n1, s.data(), b.data());
  }
  if (m < a.M) {
    qmv_bf16_tile<Bits, GS, 1, R, NP>(a, m, n0, n_full, s.data(), b.data());
    qmv_bf16_tile<Bits, GS, 1, 1, NP>(a, m, n_full, n1, s.data(), b.data());
  }
}

template <int Bits, int GS>
void qmv_bf16_pieces(const QmvBf16Args& a, int64_t n0, int64_t n1) {
  switch (a.pieces) {
    case 1:
      return qmv_bf16_rows<Bits, GS, 1>(a, n0, n1);
    case 2:
      return qmv_bf16_rows<Bits, GS, 2>(a, n0, n1);
    default:
      return qmv_bf16_rows<Bits, GS, 3>(a, n0, n1);
  }
}

template <int Bits>
void qmv_bf16_group(const QmvBf16Args& a, int64_t n0, int64_t n1) {
  switch (a.W.group_size) {
    case 32:
      return qmv_bf16_pieces<Bits, 32>(a, n0, n1);
    case 64:
      return qmv_bf16_pieces<Bits, 64>(a, n0, n1);
    default:
      return qmv_bf16_pieces<Bits, 128>(a, n0, n1);
  }
}

void qmv_bf16(const QmvBf16Args& a, int64_t n0, int64_t n1) {
  switch (a.W.bits) {
    case 2:
      return qmv_bf16_group<2>(a, n0, n1);
    case 3:
      return qmv_bf16_group<3>(a, n0, n1);
    case 4:
      return qmv_bf16_group<4>(a, n0, n1);
    case 5:
      return qmv_bf16_group<5>(a, n0, n1);
    default:
      return qmv_bf16_group<6>(a, n0, n1);
  }
}

// FP8 E4M3 code in the low byte of each 16-bit lane -> its exact bf16 value. A normal value
// keeps its mantissa and its exponent rebiased (7 -> 127): bf16 = (code & 0x7F) << 4 plus
// 120 << 7; a subnormal (exponent field 0) is m * 2^-9, normal in bf16, from an 8-entry
// table; 0x7F / 0xFF are NaN; the sign moves from bit 7 to bit 15.
struct E4M3Bf16 {
  __m512i subnormal = bf16_table(0, [](int i) { return static_cast<float>(i & 7) / 512.f; });
  __m512i operator()(__m512i v) const {
    const __m512i mag = _mm512_and_si512(v, _mm512_set1_epi16(0x7F));
    __m512i out = _mm512_add_epi16(_mm512_slli_epi16(mag, 4),
                                   _mm512_set1_epi16(static_cast<int16_t>(120 << 7)));
    out = _mm512_mask_permutexvar_epi16(out, _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)),
                                        mag, subnormal);
    out = _mm512_mask_mov_epi16(out, _mm512_cmpeq_epi16_mask(mag, _mm512_set1_epi16(0x7F)),
                                _mm512_set1_epi16(0x7FC0));
    return _mm512_or_si512(out, _mm512_slli_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x80)), 8));
  }
};

// fp_scale of `count` scale bytes (a decode tile's rows, contiguous), 16 at a time: the same
// fp32 values as the table and shift of fp_scale, times the global factor, without a scalar
// conversion per group (at group 16 a row's scales had cost as much as its weights).
template <FpMode Mode>
inline void fp_tile_scales(const FpWeight& W, const uint8_t* src, int64_t count, float* dst) {
  const __m512 global = _mm512_set1_ps(W.global);
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 k = count - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, src + i));
    __m512 v;
    if constexpr (Mode == FpMode::kNvfp4) {  // E4M3, as FpTables::fp8
      const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
      // exponent field e > 0: 2^(e-7) (1 + m/8), its fields moved and the exponent rebiased
      const __m512 normal = _mm512_castsi512_ps(
          _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
      const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.f / 512));
      v = _mm512_mask_blend_ps(_mm512_cmplt_epu32_mask(mag, _mm512_set1_epi32(8)), normal,
                               subnormal);
      const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
      v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
      v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F)), v,
                               _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
    } else {  // E8M0: 2^(s-127); 0 is the subnormal 2^-127
      v = _mm512_castsi512_ps(
          _mm512_mask_blend_epi32(_mm512_cmpeq_epi32_mask(b, _mm512_setzero_si512()),
                                  _mm512_slli_epi32(b, 23), _mm512_set1_epi32(0x00400000)));
    }
    _mm512_mask_storeu_ps(dst + i, k, _mm512_mul_ps(v, global));
  }
}

// FP4 decode (mxfp4, nvfp4): the 4-bit affine kernel's lanes and blocks with the E2M1 values
// (exact in bf16) in the lookup table, no bias, and each group's E8M0 / E4M3 scale applied in
// fp32 as fp_qmv does (mxfp8: 32 bytes widened to 32 lanes of one E4M3 value, E4M3Bf16); the
// sums differ from fp_qmv only in their fp32 summation order. One
// accumulator per (m, r), so that a row's result does not depend on the tiles it fell in
// (nor on how the rows of x were grouped, which a gather's pair order decides).
template <FpMode Mode, int MB, int R, int NP>
void fp_qmv_bf16_tile(const FpQmvBf16Args& a, int64_t m0, int64_t n0, int64_t n1, float* s) {
  using T = FpModeTraits<Mode>;
  constexpr int GS = T::kGroup, Bits = T::kBits;
  constexpr int kLaneValues = Bits == 4 ? 4 : 1;  // FP4: 64 bytes as 32 lanes; FP8: 32 bytes
  constexpr int kBlockValues = 32 * kLaneValues, kBlockBytes = kBlockValues * Bits / 8;
  const FpWeight& W = a.W;
  const int64_t K = W.K, G = W.G, M = a.M, row_bytes = K * Bits / 8;
  const int64_t blocks = K / kBlockValues;
  const bool half_block = Bits == 4 && K % kBlockValues != 0;
  const FpTables& tables = fp_tables();
  using Lookup = std::conditional_t<Bits == 4, Bf16Lookup<4>, E4M3Bf16>;
  const Lookup lookup = [&] {
    if constexpr (Bits == 4)
      return Bf16Lookup<4>([&](int i) { return tables.fp4[i & 15]; });
    else
      return E4M3Bf16();
  }();
  const auto load_lanes = [](const uint8_t* p) {
    if constexpr (Bits == 4)
      return _mm512_loadu_si512(p);
    else
      return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  };
  const uint16_t* x[NP][MB];
  for (int p = 0; p < NP; ++p)
    for (int m = 0; m < MB; ++m) x[p][m] = a.x + (p * M + m0 + m) * K;

  RowStreamPrefetch prefetch(W, n0, n1, R, blocks + 1);
  for (int64_t n = n0; n + R <= n1; n += R) {
    prefetch.start_tile(n);
    const uint8_t* wrow[R];
    fp_tile_scales<Mode>(W, W.scales + n * G, R * G, s);
    for (int r = 0; r < R; ++r) wrow[r] = W.w + (n + r) * row_bytes;
    __m512 total[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) total[m][r] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      prefetch.step(blk);
      __m512i lanes[R];
      for (int r = 0; r < R; ++r) lanes[r] = load_lanes(wrow[r] + blk * kBlockBytes);
      bf16_block<Bits, GS, MB, R, NP, kLaneValues, 1>(lanes, x, blk * kBlockValues, s, G, lookup,
                                                      total);
    }
    prefetch.finish(blocks);
    if constexpr (Bits == 4) {
      if (half_block) {
        __m512i lanes[R];
        for (int r = 0; r < R; ++r)
          lanes[r] = _mm512_cvtepu8_epi16(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow[r] + blocks * 64)));
        bf16_block<Bits, GS, MB, R, NP, 2, 1>(lanes, x, blocks * kBlockValues, s, G, lookup, total);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) a.y[(m0 + m) * W.N + n + r] = _mm512_reduce_add_ps(total[m][r]);
  }
}

template <FpMode Mode, int NP>
void fp_qmv_bf16_rows(const FpQmvBf16Args& a, int64_t n0, int64_t n1) {
  constexpr int R = 4;
  std::vector<float> s(R * a.W.G);
  const int64_t n_full = n0 + (n1 - n0) / R * R;
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2) {
    fp_qmv_bf16_tile<Mode, 2, R, NP>(a, m, n0, n_full, s.data());
    fp_qmv_bf16_tile<Mode, 2, 1, NP>(a, m, n_full, n1, s.data());
  }
  if (m < a.M) {
    fp_qmv_bf16_tile<Mode, 1, R, NP>(a, m, n0, n_full, s.data());
    fp_qmv_bf16_tile<Mode, 1, 1, NP>(a, m, n_full, n1, s.data());
  }
}

template <FpMode Mode>
void fp_qmv_bf16_pieces(const FpQmvBf16Args& a, int64_t n0, int64_t n1) {
  switch (a.pieces) {
    case 1:
      return fp_qmv_bf16_rows<Mode, 1>(a, n0, n1);
    case 2:
      return fp_qmv_bf16_rows<Mode, 2>(a, n0, n1);
    default:
      return fp_qmv_bf16_rows<Mode, 3>(a, n0, n1);
  }
}

void fp_qmv_bf16(const FpQmvBf16Args& a, int64_t n0, int64_t n1) {
  switch (a.W.mode) {
    case FpMode::kMxfp4:
      return fp_qmv_bf16_pieces<FpMode::kMxfp4>(a, n0, n1);
    case FpMode::kNvfp4:
      return fp_qmv_bf16_pieces<FpMode::kNvfp4>(a, n0, n1);
    default:
      return fp_qmv_bf16_pieces<FpMode::kMxfp8>(a, n0, n1);
  }
}

// The bf16 prefill's tiles at 4 bits (dequantize_bf16 in kernels.h, same numbers): 16 values
// at a time, each rounding one vcvtneps2bf16 where the generic kernel spends eight integer ops.
// That instruction flushes subnormal inputs and results to zero; with q < 16, s*q is subnormal
// only for a subnormal s, and s*q + b only where |s| and |b| are below about 2^-119, so a row
// with any scale or bias below 2^-100 takes the generic kernel.
bool has_tiny(const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = v[i] < 0 ? -v[i] : v[i];
    if (a != 0.f && a < 0x1p-100f) return true;
  }
  return false;
}

void dequantize_bf16_4bit(const QuantWeight& W, uint16_t* out, int64_t n0, int64_t n1) {
  const int64_t K = W.K, G = W.G, GS = W.group_size, row_bytes = K / 2;
  std::vector<float> s(G), b(G);
  // vpmovzxbd of each byte twice: even lanes keep its low nibble (value 2i), odd lanes shift
  // its high nibble (value 2i + 1) down, MLX's order within a byte.
  const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  const __m512i nibble = _mm512_set1_epi32(15);
  for (int64_t n = n0; n < n1; ++n) {
    uint16_t* orow = out + (n - n0) * K;
    load_scales(W, n, 0, G, s.data(), b.data());
    if (has_tiny(s.data(), G) || has_tiny(b.data(), G)) {
      dequantize_bf16(W, orow, n, n + 1);  // the generic kernel, for this row
      continue;
    }
    const uint8_t* wrow = W.w + n * row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      const __m512 sv = _mm512_set1_ps(s[g]), bv = _mm512_set1_ps(b[g]);
      for (int64_t c = g * GS; c < (g + 1) * GS; c += 16) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wrow + c / 2));
        const __m512i q = _mm512_and_si512(
            _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes)), shifts),
            nibble);
        const __m256bh product = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(q), sv));
        const __m512 widened =
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)product), 16));
        const __m256bh w = _mm512_cvtneps_pbh(_mm512_add_ps(widened, bv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + c), (__m256i)w);
      }
    }
  }
}

// The bf16 prefill's tiles on this CPU (the only kernel set that has them: its bf16 dot
// products make the bf16 GEMM pay).
void dequantize_bf16_tiles(const QuantWeight& W, uint16_t* out, int64_t n0, int64_t n1) {
  if (W.bits == 4) return dequantize_bf16_4bit(W, out, n0, n1);
  dequantize_bf16(W, out, n0, n1);
}

}  // namespace mlxq::cpu::avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mlxq::cpu {
const KernelTable& avx512_kernels() {
  static const KernelTable t = [] {
    KernelTable k = avx512::table("avx512");
    k.qmv_bf16 = &avx512::qmv_bf16;
    k.fp_qmv_bf16 = &avx512::fp_qmv_bf16;
    k.dequantize_bf16 = &avx512::dequantize_bf16_tiles;
    return k;
  }();
  return t;
}
}  // namespace mlxq::cpu
#endif
