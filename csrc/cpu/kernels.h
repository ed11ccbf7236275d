// CPU kernel bodies, written once with the 8-lane vectors of vec.h. Included by one translation
// unit per instruction set, inside namespace MLXQ_ISA (see kernels_*.cpp); keep it free of
// includes that define non-inline code.
//
// Decode (small M) kernels stream the packed weight once and never materialise it:
//   qmv:  y[m, n] = sum_g s[n,g] * (sum_{k in g} q[n,k] x[m,k]) + b[n,g] * xsum[m,g]
//   qvm:  y[m, k] += (x[m,n] s[n,g]) q[n,k] + x[m,n] b[n,g]
// Prefill shapes dequantize row tiles to fp32 with `dequantize` (to bf16 with `dequantize_bf16`
// for bf16 activations) and use a dense GEMM.

#ifndef MLXQ_ISA
#error "define MLXQ_ISA before including kernels.h"
#endif

#include "cpu/stream_prefetch.h"
#include "cpu/vec.h"

namespace mlxq::cpu::MLXQ_ISA {

// `count` fp16 or bf16 values (raw 16-bit patterns) to fp32, 8 at a time where possible.
inline void widen16(const uint16_t* src, float* dst, int64_t count, bool is_half) {
  int64_t i = 0;
#if defined(MLXQ_X86_AVX512)
  // 16 at a time with a masked tail: a decode tile's scales are a few dozen values
  for (; i < count; i += 16) {
    const __mmask16 k = count - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m256i h = _mm256_maskz_loadu_epi16(k, src + i);
    const __m512 f = is_half ? _mm512_cvtph_ps(h)
                             : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm512_mask_storeu_ps(dst + i, k, f);
  }
  return;
#endif
  if (!is_half) {  // bf16 is the top half of an fp32
    for (; i + 8 <= count; i += 8) {
      typedef uint16_t v8h __attribute__((vector_size(16)));
      v8h h;
      std::memcpy(&h, src + i, sizeof(h));
      const v8u u = __builtin_convertvector(h, v8u) << 16;
      std::memcpy(dst + i, &u, sizeof(u));
    }
  }
#if defined(MLXQ_X86_AVX2)
  if (is_half) {
    for (; i + 8 <= count; i += 8)
      _mm256_storeu_ps(dst + i,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
#endif
  for (; i < count; ++i)
    dst[i] = is_half ? static_cast<float>(c10::Half(src[i], c10::Half::from_bits()))
                     : static_cast<float>(c10::BFloat16(src[i], c10::BFloat16::from_bits()));
}

// Scales/biases of one row, groups [g0, g1), converted to fp32.
inline void load_scales(const QuantWeight& W, int64_t n, int64_t g0, int64_t g1, float* s,
                        float* b) {
  const int64_t off = n * W.G + g0, count = g1 - g0;
  if (W.scale_type == ScaleType::kFloat) {
    std::memcpy(s, static_cast<const float*>(W.scales) + off, count * sizeof(float));
    std::memcpy(b, static_cast<const float*>(W.biases) + off, count * sizeof(float));
    return;
  }
  const bool is_half = W.scale_type == ScaleType::kHalf;
  widen16(static_cast<const uint16_t*>(W.scales) + off, s, count, is_half);
  widen16(static_cast<const uint16_t*>(W.biases) + off, b, count, is_half);
}

// Scales/biases of rows [n, n + rows), every group, converted to fp32 (s[r * G + g]). A row's
// groups and the next row's are contiguous, so a decode tile converts its rows in one pass: per
// row, two short conversions with their tails cost about as much as streaming a row of K = 576.
inline void load_tile_scales(const QuantWeight& W, int64_t n, int64_t rows, float* s, float* b) {
  load_scales(W, n, 0, rows * W.G, s, b);
}

template <int Bits, int GS, int MB, int R>
void qmv_tile(const QmvArgs& a, int64_t m0, int64_t n0, int64_t n1, float* s, float* b) {
  using C = Chunk<Bits>;
  constexpr int A = MB * R >= 8 ? 1 : 2;  // accumulators per (m, r): keep >= 8 FMA chains
  const QuantWeight& W = a.W;
  const int64_t K = W.K, G = W.G, row_bytes = K * Bits / 8;
  const float* x[MB];
  for (int m = 0; m < MB; ++m) x[m] = a.x + (m0 + m) * K;
  RowStreamPrefetch prefetch(W, n0, n1, R, G);
  for (int64_t n = n0; n + R <= n1; n += R) {
    prefetch.start_tile(n);
    const uint8_t* wrow[R];
    load_tile_scales(W, n, R, s, b);
    for (int r = 0; r < R; ++r) wrow[r] = W.w + (n + r) * row_bytes;
    v8f total[MB][R];
    float bias_sum[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) total[m][r] = v8f{}, bias_sum[m][r] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      prefetch.step(g);
      const int64_t k0 = g * GS, byte0 = g * (GS * Bits / 8);
      v8f acc[MB][R][A];
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < R; ++r)
          for (int i = 0; i < A; ++i) acc[m][r][i] = v8f{};
#pragma GCC unroll 16
      for (int c = 0; c < GS / C::kValues; ++c) {
        v8i bytes[R];
        for (int r = 0; r < R; ++r) bytes[r] = chunk_bytes<Bits>(wrow[r] + byte0 + c * C::kBytes);
#pragma GCC unroll 4
        for (int j = 0; j < C::kVecs; ++j) {
          const int i = (c * C::kVecs + j) % A;
          v8f q[R];
          for (int r = 0; r < R; ++r) q[r] = to_float(chunk_vec<Bits>(bytes[r], j));
          for (int m = 0; m < MB; ++m) {
            const v8f xv = load8(x[m] + k0 + c * C::kValues + j * 8);
            for (int r = 0; r < R; ++r) acc[m][r][i] += q[r] * xv;
          }
        }
      }
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < R; ++r)
          for (int i = 1; i < A; ++i) acc[m][r][0] += acc[m][r][i];
      for (int m = 0; m < MB; ++m) {
        const float xs = a.xsum[(m0 + m) * G + g];
        for (int r = 0; r < R; ++r) {
          total[m][r] += splat(s[r * G + g]) * acc[m][r][0];
          bias_sum[m][r] += b[r * G + g] * xs;
        }
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) a.y[(m0 + m) * W.N + n + r] = hsum(total[m][r]) + bias_sum[m][r];
  }
}

template <int Bits, int GS, int MB>
void qmv_rows(const QmvArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int R = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  std::vector<float> s(R * a.W.G), b(R * a.W.G);
  const int64_t n_full = n0 + (n1 - n0) / R * R;
  qmv_tile<Bits, GS, MB, R>(a, m0, n0, n_full, s.data(), b.data());
  if constexpr (R > 1) qmv_tile<Bits, GS, MB, 1>(a, m0, n_full, n1, s.data(), b.data());
}

template <int Bits, int GS>
void qmv_bits_group(const QmvArgs& a, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4) qmv_rows<Bits, GS, 4>(a, m, n0, n1);
  switch (a.M - m) {
    case 3:
      qmv_rows<Bits, GS, 3>(a, m, n0, n1);
      break;
    case 2:
      qmv_rows<Bits, GS, 2>(a, m, n0, n1);
      break;
    case 1:
      qmv_rows<Bits, GS, 1>(a, m, n0, n1);
      break;
    default:
      break;
  }
}

// y is produced in chunk order, like x in qmv (the caller restores natural order).
template <int Bits, int GS>
void qvm_bits_group(const QvmArgs& a, int64_t g0, int64_t g1) {
  using C = Chunk<Bits>;
  const QuantWeight& W = a.W;
  const int64_t K = W.K, N = W.N, M = a.M, row_bytes = K * Bits / 8;
  const int64_t width = (g1 - g0) * GS;
  std::vector<float> ybuf(M * width, 0.f), s(g1 - g0), b(g1 - g0);
  for (int64_t n = 0; n < N; ++n) {
    load_scales(W, n, g0, g1, s.data(), b.data());
    const uint8_t* wrow = W.w + n * row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      const float xn = a.x[m * N + n];
      if (xn == 0.f) continue;
      float* yrow = ybuf.data() + m * width;
      for (int64_t g = g0; g < g1; ++g) {
        const v8f sx = splat(xn * s[g - g0]), bx = splat(xn * b[g - g0]);
        const uint8_t* wg = wrow + g * (GS * Bits / 8);
        float* yg = yrow + (g - g0) * GS;
#pragma GCC unroll 16
        for (int c = 0; c < GS / C::kValues; ++c) {
          const v8i bytes = chunk_bytes<Bits>(wg + c * C::kBytes);
#pragma GCC unroll 4
          for (int j = 0; j < C::kVecs; ++j) {
            float* yp = yg + c * C::kValues + j * 8;
            store8(yp, load8(yp) + (to_float(chunk_vec<Bits>(bytes, j)) * sx + bx));
          }
        }
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(a.y + m * K + g0 * GS, ybuf.data() + m * width, width * sizeof(float));
}

// Rows [n0, n1) of W, 8 values at a time: store(i, q, s, b) with i the offset of the values in
// a [n1 - n0, K] output, q the integers as fp32 and s, b their group's scale and bias.
template <int Bits, int GS, typename Store>
MLXQ_INLINE void for_each_weight_vector(const QuantWeight& W, int64_t n0, int64_t n1, Store store) {
  const int64_t K = W.K, G = W.G, row_bytes = K * Bits / 8;
  std::vector<float> s(G), b(G);
  for (int64_t n = n0; n < n1; ++n) {
    load_scales(W, n, 0, G, s.data(), b.data());
    const uint8_t* wrow = W.w + n * row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      const v8f sv = splat(s[g]), bv = splat(b[g]);
      const uint8_t* wg = wrow + g * (GS * Bits / 8);
#pragma GCC unroll 16
      for (int c = 0; c < GS / 8; ++c)
        store((n - n0) * K + g * GS + c * 8, to_float(unpack8<Bits>(wg + c * Bits)), sv, bv);
    }
  }
}

template <int Bits, int GS>
void dequantize_bits_group(const QuantWeight& W, float* out, int64_t n0, int64_t n1) {
  for_each_weight_vector<Bits, GS>(
      W, n0, n1, [&](int64_t i, v8f q, v8f s, v8f b) { store8(out + i, q * s + b); });
}

// Rows [n0, n1) of W as the bf16 tile of MLX's GEMM for bf16 activations (the same numbers as
// mx.dequantize in bf16): s*q rounded to bf16, plus b, rounded again. `out` is
// [n1 - n0, K] bf16 values. The product is exact in fp32 for 16-bit scales.
template <int Bits, int GS>
void dequantize_bf16_bits_group(const QuantWeight& W, uint16_t* out, int64_t n0, int64_t n1) {
  for_each_weight_vector<Bits, GS>(W, n0, n1, [&](int64_t i, v8f q, v8f s, v8f b) {
    store8_bf16(out + i, round_bf16(bits_to_float(round_bf16(q * s)) + b));
  });
}

// Calls Fn<Bits, GS>::run(args...) for the runtime bits and group size (validated earlier).
template <template <int, int> class Fn, typename... Args>
void dispatch_bits_group(int bits, int gs, Args&&... args) {
#define MLXQ_CASE_GS(B)                                    \
  switch (gs) {                                            \
    case 32:                                               \
      return Fn<B, 32>::run(std::forward<Args>(args)...);  \
    case 64:                                               \
      return Fn<B, 64>::run(std::forward<Args>(args)...);  \
    default:                                               \
      return Fn<B, 128>::run(std::forward<Args>(args)...); \
  }
  switch (bits) {
    case 1:
      MLXQ_CASE_GS(1)
    case 2:
      MLXQ_CASE_GS(2)
    case 3:
      MLXQ_CASE_GS(3)
    case 4:
      MLXQ_CASE_GS(4)
    case 5:
      MLXQ_CASE_GS(5)
    case 6:
      MLXQ_CASE_GS(6)
    default:
      MLXQ_CASE_GS(8)
  }
#undef MLXQ_CASE_GS
}

template <int B, int G>
struct QmvFn {
  static void run(const QmvArgs& a, int64_t n0, int64_t n1) { qmv_bits_group<B, G>(a, n0, n1); }
};
template <int B, int G>
struct QvmFn {
  static void run(const QvmArgs& a, int64_t g0, int64_t g1) { qvm_bits_group<B, G>(a, g0, g1); }
};
template <int B, int G>
struct DequantBf16Fn {
  static void run(const QuantWeight& W, uint16_t* out, int64_t n0, int64_t n1) {
    dequantize_bf16_bits_group<B, G>(W, out, n0, n1);
  }
};
template <int B, int G>
struct DequantFn {
  static void run(const QuantWeight& W, float* out, int64_t n0, int64_t n1) {
    dequantize_bits_group<B, G>(W, out, n0, n1);
  }
};

inline void qmv(const QmvArgs& a, int64_t n0, int64_t n1) {
  dispatch_bits_group<QmvFn>(a.W.bits, a.W.group_size, a, n0, n1);
}
inline void qvm(const QvmArgs& a, int64_t g0, int64_t g1) {
  dispatch_bits_group<QvmFn>(a.W.bits, a.W.group_size, a, g0, g1);
}
inline void dequantize(const QuantWeight& W, float* out, int64_t n0, int64_t n1) {
  dispatch_bits_group<DequantFn>(W.bits, W.group_size, W, out, n0, n1);
}
inline void dequantize_bf16(const QuantWeight& W, uint16_t* out, int64_t n0, int64_t n1) {
  dispatch_bits_group<DequantBf16Fn>(W.bits, W.group_size, W, out, n0, n1);
}

}  // namespace mlxq::cpu::MLXQ_ISA

#include "cpu/attention_kernels.h"
#include "cpu/fp_kernels.h"

namespace mlxq::cpu::MLXQ_ISA {

inline const KernelTable& table(const char* name) {
  static const KernelTable t = [name] {
    KernelTable k{name, &qmv, &qvm, &dequantize, nullptr, &fp_qmv, &fp_dequantize};
    k.attention = &attention;
    k.exp = &vector_exp;
    return k;
  }();
  return t;
}

}  // namespace mlxq::cpu::MLXQ_ISA
