// Kernels for CPUs with AVX-512 and its BF16 dot product (Zen 4, Sapphire Rapids and newer).
// The generic kernels (kernels.h) are compiled here once more for this target, and decode at
// 2 and 4 bits gets a dedicated kernel: packed values become exact bf16 integers through a
// 32-entry table lookup (vpermw), and vdpbf16ps multiplies them with x held as a sum of bf16
// pieces (1 piece for bf16 x, 2 for fp16, 3 for fp32: exact to fp32 precision), accumulating
// in fp32. That is about a quarter of the instructions of the fp32 path per weight.
// (Placing q in the mantissa of 2^bits saves the lookup but its offset must be cancelled
// through the bias term, which costs fp32 accuracy; the lookup costs under 5% of the time.)
#if defined(__x86_64__) || defined(_M_X64)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/kernel_table.h"

#if defined(__clang__)
#pragma clang attribute push(                                                               \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#endif

#define MLXQ_ISA avx512
#define MLXQ_X86_AVX2 1
#include "cpu/kernels.h"

namespace mlxq::cpu::avx512 {

// bf16 bit patterns of the integers 0 .. 2^Bits - 1, one per 16-bit lane.
template <int Bits>
__m512i bf16_integer_table() {
  alignas(64) uint16_t t[32] = {};
  for (int i = 0; i < (1 << Bits); ++i) {
    const float f = static_cast<float>(i);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    t[i] = static_cast<uint16_t>(u >> 16);
  }
  return _mm512_load_si512(t);
}

// MB rows of x, R rows of W, NP bf16 pieces of x. A block is 32 packed bytes (P values each);
// accumulators are split by value position j so that MB*R*P dot-product chains run at once.
template <int Bits, int GS, int MB, int R, int NP>
void qmv_bf16_tile(const QmvBf16Args& a, int64_t m0, int64_t n0, int64_t n1, float* s, float* b) {
  constexpr int P = 8 / Bits;
  constexpr int kBlockValues = 32 * P;
  constexpr int kGroupsPerBlock = GS >= kBlockValues ? 1 : kBlockValues / GS;
  const QuantWeight& W = a.W;
  const int64_t K = W.K, G = W.G, M = a.M, row_bytes = K * Bits / 8;
  const int64_t blocks = K / kBlockValues;
  const __m512i table = bf16_integer_table<Bits>();
  const __m512i mask = _mm512_set1_epi16((1 << Bits) - 1);
  // Lane i of an accumulator covers packed bytes 2i and 2i+1: the group index within a block.
  alignas(64) int32_t lane_group[16];
  for (int i = 0; i < 16; ++i) lane_group[i] = i / (16 / kGroupsPerBlock);
  const __m512i lane_group_v = _mm512_load_si512(lane_group);
  const uint16_t* x[NP][MB];
  for (int p = 0; p < NP; ++p)
    for (int m = 0; m < MB; ++m) x[p][m] = a.x + (p * M + m0 + m) * K;

  for (int64_t n = n0; n + R <= n1; n += R) {
    const uint8_t* wrow[R];
    for (int r = 0; r < R; ++r) {
      load_scales(W, n + r, 0, G, s + r * G, b + r * G);
      wrow[r] = W.w + (n + r) * row_bytes;
    }
    __m512 total[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) total[m][r] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      __m512i bytes[R];
      for (int r = 0; r < R; ++r)
        bytes[r] = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow[r] + blk * 32)));
      __m512 acc[MB][R][P];
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < R; ++r)
          for (int j = 0; j < P; ++j) acc[m][r][j] = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) {
        __m512i q[R];
        for (int r = 0; r < R; ++r) {
          __m512i v = j == 0 ? bytes[r] : _mm512_srli_epi16(bytes[r], j * Bits);
          if (j != P - 1) v = _mm512_and_si512(v, mask);
          q[r] = _mm512_permutexvar_epi16(v, table);
        }
        for (int p = 0; p < NP; ++p)
          for (int m = 0; m < MB; ++m) {
            const __m512i xv = _mm512_loadu_si512(x[p][m] + blk * kBlockValues + j * 32);
            for (int r = 0; r < R; ++r)
              acc[m][r][j] = _mm512_dpbf16_ps(acc[m][r][j], (__m512bh)q[r], (__m512bh)xv);
          }
      }
      const int64_t g0 = blk * kBlockValues / GS;
      for (int r = 0; r < R; ++r) {
        __m512 sv;
        if constexpr (kGroupsPerBlock == 1) {
          sv = _mm512_set1_ps(s[r * G + g0]);
        } else {
          const __m512 sg =
              _mm512_maskz_loadu_ps((__mmask16)((1u << kGroupsPerBlock) - 1), s + r * G + g0);
          sv = _mm512_permutexvar_ps(lane_group_v, sg);
        }
        for (int m = 0; m < MB; ++m) {
          __m512 sum = acc[m][r][0];
          for (int j = 1; j < P; ++j) sum = _mm512_add_ps(sum, acc[m][r][j]);
          total[m][r] = _mm512_fmadd_ps(sv, sum, total[m][r]);
        }
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
  if (a.W.bits == 2) return qmv_bf16_group<2>(a, n0, n1);
  return qmv_bf16_group<4>(a, n0, n1);
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
    return k;
  }();
  return t;
}
}  // namespace mlxq::cpu
#endif
