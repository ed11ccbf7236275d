// Decode attention on the CPU (AttentionArgs in kernel_table.h): a few queries against a KV
// cache read in place in its own dtype, every number widened to fp32 as it is read:
//   s[r, j] = scale * q[r] . k[j] + mask[r, j],  p = exp(s - max_j s),
//   out[r] = sum_j p[r, j] v[j] / sum_j p[r, j],
// rounded once to the dtype of q. A task streams its keys once for all rows that share the kv
// head (GQA), in chunks of kAttnChunk keys with an online softmax (running max and sum, the
// output rescaled when the max grows), 8 keys at a time: 8 rows of K (or V) are widened into a
// small fp32 tile that every query row then reads from L1. A row whose every score is -inf (fully
// masked, or no keys) gives 0, as torch's scaled_dot_product_attention does.
// On the avx512 kernels (AVX512-BF16), bf16 q . k skips the widening: vdpbf16ps multiplies the
// stored bf16 values exactly and sums in fp32 (see dot8_bf16 for its one difference).
// There, bf16 prompts (16 or more query rows a task) take attention_rows16.h, one row per lane.
// Included through kernels.h, inside namespace MLXQ_ISA.

#ifndef MLXQ_ISA
#error "include attention_kernels.h through kernels.h"
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace mlxq::cpu::MLXQ_ISA {

MLXQ_INLINE v8f select(v8i mask, v8f a, v8f b) {  // mask lanes all ones: a, else b
  v8u ua, ub;
  std::memcpy(&ua, &a, sizeof(ua));
  std::memcpy(&ub, &b, sizeof(ub));
  const v8u m = (v8u)mask;
  return bits_to_float((ua & m) | (ub & ~m));
}

// exp(x) per lane, within about 1 ulp (subnormal results rounded once), exp(-inf) = 0,
// exp(+inf) = +inf, NaN stays NaN. x = n ln2 + r with n = rint(x / ln2) and |r| <= ln2 / 2
// (ln2 split in two so that n * ln2_hi is exact), exp(r) by its Taylor series to r^7 / 7!
// (the next term is below 6e-9 relative on that interval), and 2^n applied as two factors so
// that each is a normal float for every n that does not over- or underflow.
MLXQ_INLINE v8f exp8(v8f x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 355 / 512: n * kLn2Hi is exact for |n| < 2^15
  constexpr float kLn2Lo = static_cast<float>(0.69314718055994531 - 0.693359375);
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  // Beyond these, exp is +inf (above 88.73) or rounds to 0 (below -103.98); NaN compares false.
  x = select(x < -104.f, v8f{} - 104.f, x);
  x = select(x > 89.f, v8f{} + 89.f, x);
  const v8f n = (x * kLog2e + kRound) - kRound;
  const v8f r = (x - n * kLn2Hi) - n * kLn2Lo;
  v8f p = splat(1.f / 5040.f);
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const v8i ni = __builtin_convertvector(n, v8i);  // NaN lanes: garbage, p is NaN anyway
  const v8i n1 = ni >> 1, n2 = ni - n1;            // each in [-75, 65]
  v8f s1, s2;
  const v8i b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
  std::memcpy(&s1, &b1, sizeof(s1));
  std::memcpy(&s2, &b2, sizeof(s2));
  return (p * s1) * s2;
}

inline void vector_exp(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(y + i, exp8(load8(x + i)));
  if (i < n) {
    float in[8] = {}, out[8];
    std::memcpy(in, x + i, (n - i) * sizeof(float));
    store8(out, exp8(load8(in)));
    std::memcpy(y + i, out, (n - i) * sizeof(float));
  }
}

// The largest of s[0, n) (-inf if none is larger; NaN is skipped), n rounded up to whole
// vectors: the caller has set the lanes past n to -inf.
inline float max_of(const float* s, int64_t n) {
  v8f m = splat(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 8) {
    const v8f x = load8(s + j);
    m = select(x > m, x, m);
  }
  float r = m[0];
  for (int i = 1; i < 8; ++i) r = m[i] > r ? m[i] : r;
  return r;
}

// s[j] = exp(s[j] - m) for j < n rounded up to whole vectors (lanes past n hold -inf and
// become 0); returns their sum.
inline float exp_shifted(float* s, int64_t n, float m) {
  const v8f mv = splat(m);
  v8f sum = {};
  for (int64_t j = 0; j < n; j += 8) {
    const v8f p = exp8(load8(s + j) - mv);
    store8(s + j, p);
    sum += p;
  }
  return hsum(sum);
}

// Lane i: the sum of the lanes of a[i] (8 horizontal sums in 7 shuffle-add steps).
MLXQ_INLINE v8f sum_lanes8(const v8f* a) {
  v8f b[4];
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  v8f c[2];
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

constexpr int64_t kAttnChunk = 128;  // keys per online-softmax step

// `count` values of `type` at src widened to fp32 at dst.
inline void widen_span(const void* src, ScaleType type, int64_t count, float* dst) {
  if (type == ScaleType::kFloat) {
    std::memcpy(dst, src, count * sizeof(float));
    return;
  }
  const auto* s16 = static_cast<const uint16_t*>(src);
  int64_t d = 0;
#if defined(MLXQ_X86_AVX2)
  // bf16: one zero-extending load and a shift per vector (the generic form in widen16 compiles
  // to two half-width extensions and an insert); fp16 goes to widen16's F16C loop.
  if (type == ScaleType::kBFloat16) {
#if defined(MLXQ_X86_AVX512)
    for (; d + 16 <= count; d += 16)
      _mm512_storeu_si512(
          dst + d,
          _mm512_slli_epi32(
              _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s16 + d))),
              16));
#endif
    for (; d + 8 <= count; d += 8)
      _mm256_storeu_si256(
          reinterpret_cast<__m256i*>(dst + d),
          _mm256_slli_epi32(
              _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s16 + d))),
              16));
  }
#endif
  widen16(s16 + d, dst + d, count - d, type == ScaleType::kHalf);
}

// A row of D values of `type` widened into dst[0, Dp), zero beyond D.
inline void widen_row(const void* src, ScaleType type, int64_t D, int64_t Dp, float* dst) {
  widen_span(src, type, D, dst);
  std::fill(dst + D, dst + Dp, 0.f);
}

// Scratch of a thread's tasks: widened query rows, the running softmax state, the scores of one
// chunk and one tile of 8 widened K or V rows (plus a row of zeros for the keys past the end).
// Kept between calls (a decode step calls once per layer: no allocations).
struct AttnScratch {
  std::vector<float> q, o, m, l, s, tile, zeros;
  void reserve(int64_t rows, int64_t Dp) {
    q.resize(rows * Dp);
    o.resize(rows * Dp);
    m.resize(rows);
    l.resize(rows);
    s.resize(rows * kAttnChunk);
    tile.resize(8 * Dp);
    zeros.assign(Dp, 0.f);
  }
};

// Pointers to the fp32 rows of keys [j, j + n) (n <= 8) of one head of K or V: the rows
// themselves for fp32 with D a multiple of 8, else widened into the tile; rows past n read zeros.
inline void tile_rows(const void* base, int64_t stride, ScaleType type, int64_t j, int64_t n,
                      int64_t D, int64_t Dp, AttnScratch& sc, const float* rows[8]) {
  const int64_t elem = type == ScaleType::kFloat ? 4 : 2;
  const char* src = static_cast<const char*>(base) + j * stride * elem;
  float* tile = sc.tile.data();
  if (type == ScaleType::kFloat && D == Dp) {
    for (int64_t i = 0; i < n; ++i) rows[i] = reinterpret_cast<const float*>(src + i * stride * 4);
  } else {
    if (stride == D && D == Dp) {  // back-to-back rows (a contiguous cache): one loop
      widen_span(src, type, n * D, tile);
    } else {
      for (int64_t i = 0; i < n; ++i)
        widen_row(src + i * stride * elem, type, D, Dp, tile + i * Dp);
    }
    for (int64_t i = 0; i < n; ++i) rows[i] = tile + i * Dp;
  }
  for (int64_t i = n; i < 8; ++i) rows[i] = sc.zeros.data();
}

inline float mask_value(const void* p, MaskType t, int64_t i) {
  switch (t) {
    case MaskType::kBool:
      return static_cast<const bool*>(p)[i] ? 0.f : -std::numeric_limits<float>::infinity();
    case MaskType::kFloat:
      return static_cast<const float*>(p)[i];
    case MaskType::kHalf:
      return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default:
      return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  }
}

// s[0, n) += the mask at row (b, hq, lq), keys [j0, j0 + n).
inline void add_mask(const AttentionArgs& a, int64_t b, int64_t hq, int64_t lq, int64_t j0,
                     int64_t n, float* s) {
  const int64_t elem =
      a.mask_type == MaskType::kBool ? 1 : (a.mask_type == MaskType::kFloat ? 4 : 2);
  const int64_t off =
      b * a.mask_stride[0] + hq * a.mask_stride[1] + lq * a.mask_stride[2] + j0 * a.mask_stride[3];
  const void* row = static_cast<const char*>(a.mask) + off * elem;
  const int64_t sj = a.mask_stride[3];
  if (a.mask_type == MaskType::kBool) {  // the common case (transformers' sdpa masks)
    const bool* m = static_cast<const bool*>(row);
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i)
      if (!m[i * sj]) s[i] = ninf;
    return;
  }
  for (int64_t i = 0; i < n; ++i) s[i] += mask_value(row, a.mask_type, i * sj);
}

// out[0, D) = o / l in `type` (0 where l == 0: no key was attended).
inline void write_row(const float* o, float l, ScaleType type, int64_t D, void* out) {
  const float inv = l == 0.f ? 0.f : 1.f / l;
  if (type == ScaleType::kFloat) {
    float* y = static_cast<float*>(out);
    for (int64_t d = 0; d < D; ++d) y[d] = l == 0.f ? 0.f : o[d] * inv;
  } else if (type == ScaleType::kHalf) {
    c10::Half* y = static_cast<c10::Half*>(out);
    for (int64_t d = 0; d < D; ++d) y[d] = c10::Half(l == 0.f ? 0.f : o[d] * inv);
  } else {
    c10::BFloat16* y = static_cast<c10::BFloat16*>(out);
    for (int64_t d = 0; d < D; ++d) y[d] = c10::BFloat16(l == 0.f ? 0.f : o[d] * inv);
  }
}

// out[k]: 8 lanes whose sum is q . rows[k][0, Dp), for the 8 rows.
MLXQ_INLINE void dot8(const float* q, const float* const* rows, int64_t Dp, v8f* out) {
#if defined(MLXQ_X86_AVX512)
  if (Dp % 16 == 0) {  // 16 lanes, folded to 8 at the end
    __m512 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t d = 0; d < Dp; d += 16) {
      const __m512 qv = _mm512_loadu_ps(q + d);
      for (int k = 0; k < 8; ++k)
        acc[k] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(rows[k] + d), acc[k]);
    }
    for (int k = 0; k < 8; ++k) {
      const __m256 folded =
          _mm256_add_ps(_mm512_castps512_ps256(acc[k]), _mm512_extractf32x8_ps(acc[k], 1));
      std::memcpy(&out[k], &folded, sizeof(folded));
    }
    return;
  }
#endif
  for (int k = 0; k < 8; ++k) out[k] = v8f{};
  for (int64_t d = 0; d < Dp; d += 8) {
    const v8f qv = load8(q + d);
    for (int k = 0; k < 8; ++k) out[k] += qv * load8(rows[k] + d);
  }
}

#if defined(MLXQ_X86_AVX512)
// dot8 for bf16 q and K as they are, through vdpbf16ps: 32 exact bf16 products per instruction
// summed in fp32 (no widening). D is a multiple of 32. vdpbf16ps reads subnormal bf16 values
// (below 1.2e-38) as zero: a score changes by less than D * 1.2e-38 * max|q| (or |k|), far
// below the rounding of any score whose exp differs from its neighbours'.
MLXQ_INLINE void dot8_bf16(const uint16_t* q, const uint16_t* const* rows, int64_t D, v8f* out) {
  __m512 acc[8];
  for (int k = 0; k < 8; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    const __m512i qv = _mm512_loadu_si512(q + d);
    for (int k = 0; k < 8; ++k)
      acc[k] = _mm512_dpbf16_ps(acc[k], (__m512bh)qv, (__m512bh)_mm512_loadu_si512(rows[k] + d));
  }
  for (int k = 0; k < 8; ++k) {
    const __m256 folded =
        _mm256_add_ps(_mm512_castps512_ps256(acc[k]), _mm512_extractf32x8_ps(acc[k], 1));
    std::memcpy(&out[k], &folded, sizeof(folded));
  }
}

// add_pv below with 16-lane vectors: o[0, 16W) += sum_k p[k] * rows[k][d0, d0 + 16W).
template <int W>
MLXQ_INLINE void add_pv16(float* o, const float* const* rows, int64_t d0, const float* p,
                          int64_t nt) {
  __m512 acc[W];
  for (int u = 0; u < W; ++u) acc[u] = _mm512_loadu_ps(o + u * 16);
  for (int64_t k = 0; k < nt; ++k) {
    const __m512 pk = _mm512_set1_ps(p[k]);
    for (int u = 0; u < W; ++u)
      acc[u] = _mm512_fmadd_ps(pk, _mm512_loadu_ps(rows[k] + d0 + u * 16), acc[u]);
  }
  for (int u = 0; u < W; ++u) _mm512_storeu_ps(o + u * 16, acc[u]);
}
#endif

// o[0, 8W) += sum_k p[k] * rows[k][d0, d0 + 8W): W vectors of the output held in registers
// (a compile-time W, so that they are) while nt <= 8 rows of V stream past.
template <int W>
MLXQ_INLINE void add_pv(float* o, const float* const* rows, int64_t d0, const float* p,
                        int64_t nt) {
  v8f acc[W];
  for (int u = 0; u < W; ++u) acc[u] = load8(o + u * 8);
  for (int64_t k = 0; k < nt; ++k) {
    const v8f pk = splat(p[k]);
    for (int u = 0; u < W; ++u) acc[u] += pk * load8(rows[k] + d0 + u * 8);
  }
  for (int u = 0; u < W; ++u) store8(o + u * 8, acc[u]);
}

// Combines the key blocks of rows [g0, g1) (global rows unit * R + r): the largest max M, the
// sums and outputs of each block scaled by exp(m_blk - M); blocks that attended nothing skipped.
inline void attention_merge(const AttentionArgs& a, int64_t g0, int64_t g1) {
  const int64_t R = a.rows(), D = a.D, nb = a.blocks, rep = a.Hq / a.Hkv;
  const int64_t elem = a.dtype == ScaleType::kFloat ? 4 : 2;
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<float> o(D);
  for (int64_t g = g0; g < g1; ++g) {
    const float* m = a.part_m + g * nb;
    const float* l = a.part_l + g * nb;
    float M = ninf;
    for (int64_t k = 0; k < nb; ++k) M = std::max(M, m[k]);
    std::fill(o.begin(), o.end(), 0.f);
    float L = 0.f;
    if (M != ninf) {
      for (int64_t k = 0; k < nb; ++k) {
        if (m[k] == ninf) continue;
        const float f = std::exp(m[k] - M);
        L += l[k] * f;
        const float* ok = a.part_o + (g * nb + k) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += ok[d] * f;
      }
    }
    const int64_t unit = g / R, r = g % R, b = unit / a.Hkv, hkv = unit % a.Hkv;
    const int64_t hq = hkv * rep + r / a.Lq, lq = r % a.Lq;
    write_row(o.data(), L, a.dtype, D,
              static_cast<char*>(a.out) + ((b * a.Hq + hq) * a.Lq + lq) * D * elem);
  }
}

// Row r (of the R rows of unit (b, hkv)) of q as stored, and of a bool mask.
inline const char* q_row(const AttentionArgs& a, int64_t b, int64_t hkv, int64_t r) {
  const int64_t hq = hkv * (a.Hq / a.Hkv) + r / a.Lq, lq = r % a.Lq;
  const int64_t elem = a.dtype == ScaleType::kFloat ? 4 : 2;
  return static_cast<const char*>(a.q) +
         (b * a.q_stride[0] + hq * a.q_stride[1] + lq * a.q_stride[2]) * elem;
}
inline const bool* bool_mask_row(const AttentionArgs& a, int64_t b, int64_t hkv, int64_t r) {
  const int64_t hq = hkv * (a.Hq / a.Hkv) + r / a.Lq, lq = r % a.Lq;
  return static_cast<const bool*>(a.mask) + b * a.mask_stride[0] + hq * a.mask_stride[1] +
         lq * a.mask_stride[2];
}

// Narrows keys [j0, j1) to those that some of rows [r0, r1) of unit (b, hkv) attend under a bool
// mask (an empty range when none does): a causal prompt's row group skips the keys after its
// last row. Rows are scanned from the last for the end and from the first for the start, so a
// causal mask costs about one pass over the keys per task.
inline void attended_range(const AttentionArgs& a, int64_t b, int64_t hkv, int64_t r0, int64_t r1,
                           int64_t& j0, int64_t& j1) {
  const int64_t sj = a.mask_stride[3];
  auto row = [&](int64_t r) { return bool_mask_row(a, b, hkv, r); };
  int64_t last = j0;
  for (int64_t r = r1 - 1; r >= r0 && last < j1; --r) {
    const bool* m = row(r);
    int64_t e = j1;
    while (e > last && !m[(e - 1) * sj]) --e;
    last = e;
  }
  int64_t first = last;
  for (int64_t r = r0; r < r1 && first > j0; ++r) {
    const bool* m = row(r);
    int64_t j = j0;
    while (j < first && !m[j * sj]) ++j;
    first = j;
  }
  j0 = first;
  j1 = last;
}

// A task's rows [r0, r1) of unit `unit` done: sc.o / sc.l written out in q's dtype, or, when keys
// are split into blocks, left as this block's partials (max, sum, output) for the merge.
inline void finish_rows(const AttentionArgs& a, int64_t task, int64_t unit, int64_t r0, int64_t r1,
                        const AttnScratch& sc) {
  const int64_t R = a.rows(), D = a.D, Dp = (D + 7) / 8 * 8, rep = a.Hq / a.Hkv;
  const int64_t blk = task % a.blocks, rest = task / a.blocks;
  const int64_t b = unit / a.Hkv, hkv = unit % a.Hkv, row0 = unit * R;
  const int64_t elem = a.dtype == ScaleType::kFloat ? 4 : 2;
  for (int64_t i = 0; i < r1 - r0; ++i) {
    const int64_t r = r0 + i;
    if (a.blocks == 1) {
      const int64_t hq = hkv * rep + r / a.Lq, lq = r % a.Lq;
      void* out = static_cast<char*>(a.out) + ((b * a.Hq + hq) * a.Lq + lq) * D * elem;
      write_row(sc.o.data() + i * Dp, sc.l[i], a.dtype, D, out);
    } else {
      const int64_t at = (row0 + r) * a.blocks + blk;
      a.part_m[at] = sc.m[i];
      a.part_l[at] = sc.l[i];
      std::memcpy(a.part_o + at * D, sc.o.data() + i * Dp, D * sizeof(float));
    }
  }
  // The last block of this row group to finish merges them all (acq_rel: the other blocks'
  // partials are visible to it), so that no second parallel region is needed.
  if (a.blocks > 1 && a.blocks_done[rest].fetch_add(1, std::memory_order_acq_rel) == a.blocks - 1)
    attention_merge(a, row0 + r0, row0 + r1);
}

#if defined(MLXQ_X86_AVX512)
#include "cpu/attention_rows16.h"
#endif

// One task (see AttentionArgs): rows [r0, r1) of unit (b, hkv) against keys [j0, j1).
inline void attention_task(const AttentionArgs& a, int64_t task, AttnScratch& sc) {
  const int64_t R = a.rows(), D = a.D, Dp = (D + 7) / 8 * 8, rep = a.Hq / a.Hkv;
  const int64_t blk = task % a.blocks, rest = task / a.blocks;
  const int64_t group = rest % a.row_groups, unit = rest / a.row_groups;
  const int64_t b = unit / a.Hkv, hkv = unit % a.Hkv;
  const int64_t r0 = group * a.rows_per_group, r1 = std::min(R, r0 + a.rows_per_group);
  int64_t j0 = blk * a.block_keys, j1 = std::min(a.Lk, j0 + a.block_keys);
  const int64_t nr = r1 - r0;
  if (a.mask_type == MaskType::kBool) attended_range(a, b, hkv, r0, r1, j0, j1);
  const int64_t elem = a.dtype == ScaleType::kFloat ? 4 : 2;
  const float ninf = -std::numeric_limits<float>::infinity();
  const char* kbase =
      static_cast<const char*>(a.k) + (b * a.k_stride[0] + hkv * a.k_stride[1]) * elem;
  const char* vbase =
      static_cast<const char*>(a.v) + (b * a.v_stride[0] + hkv * a.v_stride[1]) * elem;
  auto head_of = [&](int64_t r) { return hkv * rep + r / a.Lq; };
  auto q_row16 = [&](int64_t r) { return reinterpret_cast<const uint16_t*>(q_row(a, b, hkv, r)); };
#if defined(MLXQ_X86_AVX512)
  // Prompts: blocks of 16 rows, one per lane (attention_rows16.h), where the mask allows.
  if (rows16::fits(a, nr) && rows16::attend(a, b, hkv, r0, r1, j0, j1, sc)) {
    finish_rows(a, task, unit, r0, r1, sc);
    return;
  }
#endif
  for (int64_t i = 0; i < nr; ++i) {
    widen_row(q_row16(r0 + i), a.dtype, D, Dp, sc.q.data() + i * Dp);
    sc.m[i] = ninf;
    sc.l[i] = 0.f;
  }
  std::fill(sc.o.begin(), sc.o.begin() + nr * Dp, 0.f);
  const float* rows[8];
  for (int64_t c0 = j0; c0 < j1; c0 += kAttnChunk) {
    const int64_t n = std::min(kAttnChunk, j1 - c0);
    // Scores: 8 keys at a time, each tile of K rows read by every query row.
#if defined(MLXQ_X86_AVX512)
    if (a.dtype == ScaleType::kBFloat16 && D % 32 == 0) {
      for (int64_t t = 0; t < n; t += 8) {
        const uint16_t* krows[8];
        for (int64_t i = 0; i < 8; ++i)
          krows[i] =
              t + i < n
                  ? reinterpret_cast<const uint16_t*>(kbase + (c0 + t + i) * a.k_stride[2] * 2)
                  : reinterpret_cast<const uint16_t*>(sc.zeros.data());
        for (int64_t i = 0; i < nr; ++i) {
          v8f acc[8];
          dot8_bf16(q_row16(r0 + i), krows, D, acc);
          store8(sc.s.data() + i * kAttnChunk + t, sum_lanes8(acc) * a.scale);
        }
      }
    }
    for (int64_t t = 0; t < n && !(a.dtype == ScaleType::kBFloat16 && D % 32 == 0); t += 8) {
#else
    for (int64_t t = 0; t < n; t += 8) {
#endif
      tile_rows(kbase, a.k_stride[2], a.dtype, c0 + t, std::min<int64_t>(8, n - t), D, Dp, sc,
                rows);
      for (int64_t i = 0; i < nr; ++i) {
        v8f acc[8];
        dot8(sc.q.data() + i * Dp, rows, Dp, acc);
        store8(sc.s.data() + i * kAttnChunk + t, sum_lanes8(acc) * a.scale);
      }
    }
    // Mask, then the online softmax: p = exp(s - m) with m the running max, earlier sums and
    // outputs scaled by exp(m_old - m).
    for (int64_t i = 0; i < nr; ++i) {
      float* s = sc.s.data() + i * kAttnChunk;
      const int64_t r = r0 + i;
      if (a.mask_type != MaskType::kNone) add_mask(a, b, head_of(r), r % a.Lq, c0, n, s);
      std::fill(s + n, s + (n + 7) / 8 * 8, ninf);
      const float m = std::max(sc.m[i], max_of(s, n));
      if (m == ninf) {  // nothing attended so far
        std::fill(s, s + n, 0.f);
        continue;
      }
      const float sum = exp_shifted(s, n, m);
      if (sc.m[i] != m) {
        const float corr = sc.m[i] == ninf ? 0.f : std::exp(sc.m[i] - m);
        sc.l[i] *= corr;
        float* o = sc.o.data() + i * Dp;
        for (int64_t d = 0; d < Dp; ++d) o[d] *= corr;
        sc.m[i] = m;
      }
      sc.l[i] += sum;
    }
    // out += p V, 8 keys at a time, the output in slices of 64 values held in registers.
    for (int64_t t = 0; t < n; t += 8) {
      const int64_t nt = std::min<int64_t>(8, n - t);
      tile_rows(vbase, a.v_stride[2], a.dtype, c0 + t, nt, D, Dp, sc, rows);
      for (int64_t i = 0; i < nr; ++i) {
        const float* p = sc.s.data() + i * kAttnChunk + t;
        float* o = sc.o.data() + i * Dp;
        int64_t d0 = 0;
#if defined(MLXQ_X86_AVX512)
        if (Dp % 16 == 0) {
          for (; d0 + 64 <= Dp; d0 += 64) add_pv16<4>(o + d0, rows, d0, p, nt);
          if (d0 + 32 <= Dp) add_pv16<2>(o + d0, rows, d0, p, nt), d0 += 32;
          if (d0 < Dp) add_pv16<1>(o + d0, rows, d0, p, nt);
          continue;
        }
#endif
        for (; d0 + 64 <= Dp; d0 += 64) add_pv<8>(o + d0, rows, d0, p, nt);
        if (d0 + 32 <= Dp) add_pv<4>(o + d0, rows, d0, p, nt), d0 += 32;
        if (d0 + 16 <= Dp) add_pv<2>(o + d0, rows, d0, p, nt), d0 += 16;
        if (d0 < Dp) add_pv<1>(o + d0, rows, d0, p, nt);
      }
    }
  }
  finish_rows(a, task, unit, r0, r1, sc);
}

inline void attention(const AttentionArgs& a, int64_t t0, int64_t t1) {
  thread_local AttnScratch sc;
  sc.reserve(std::min(a.rows_per_group, a.rows()), (a.D + 7) / 8 * 8);
  for (int64_t t = t0; t < t1; ++t) attention_task(a, t, sc);
}

}  // namespace mlxq::cpu::MLXQ_ISA
