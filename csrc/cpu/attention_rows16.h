// Prompt attention for bf16 q/k/v on AVX-512 BF16: the rows of a task in blocks of 16 query rows,
// one row per vector lane, so that nothing in the step needs a horizontal sum:
//   scores  S[j][i] = scale * q_i . k_j: q of the 16 rows held as bf16 pairs (lane i holds
//           q_i[2p], q_i[2p + 1]) and vdpbf16ps with key j's pair p broadcast from the cache;
//   softmax running max, sum of exponentials and the rescale factor are vectors over the rows;
//   P V     o_i += sum_j p[j][i] v_j in fp32, 4 rows at a time against a chunk of V widened once.
// The numbers are those of the general kernel (exact bf16 products summed in fp32, exp8, fp32
// P V, one rounding at the end); only the order of the fp32 sums differs.
// A bool mask is read as one interval of attended keys per row (causal and sliding-window
// masks are); a mask that is not, or any other mask, takes the general kernel.
// Included through attention_kernels.h, inside namespace MLXQ_ISA, on the avx512 kernels only.

namespace rows16 {

constexpr int64_t kLanes = 16;
constexpr int64_t kChunk = 64;  // keys per online-softmax step

// Whether the task's rows can take this kernel (the mask is checked row by row later).
inline bool fits(const AttentionArgs& a, int64_t rows) {
  return a.dtype == ScaleType::kBFloat16 && a.D % 32 == 0 && rows >= kLanes &&
         (a.mask_type == MaskType::kNone ||
          (a.mask_type == MaskType::kBool && a.mask_stride[3] == 1));
}

// The keys in [j0, j1) that bool row m attends, as [first, end) of one interval; false when they
// are not one interval. A row that attends none gives first = end = j0.
inline bool attended_interval(const bool* m, int64_t j0, int64_t j1, int32_t& first, int32_t& end) {
  int64_t f = -1, e = j0, count = 0;
  for (int64_t j = j0; j < j1; j += 64) {
    const int64_t n = std::min<int64_t>(64, j1 - j);
    const __mmask64 in = n == 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
    const __m512i bytes = _mm512_maskz_loadu_epi8(in, m + j);
    const uint64_t t = _mm512_test_epi8_mask(bytes, bytes);
    if (t == 0) continue;
    if (f < 0) f = j + __builtin_ctzll(t);
    e = j + 64 - __builtin_clzll(t);
    count += __builtin_popcountll(t);
  }
  if (f < 0) f = e = j0;
  first = static_cast<int32_t>(f);
  end = static_cast<int32_t>(e);
  return count == e - f;
}

// o[r][0, 16W) += sum_j p[j][r] v_j[d0, d0 + 16W) for RB rows: RB x W accumulators in registers
// while the keys' widened V rows stream past once for all RB rows.
template <int RB, int W>
MLXQ_INLINE void pv_block(float* o, int64_t Dp, const float* vf, const float* p, int64_t n) {
  __m512 acc[RB][W];
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < W; ++u) acc[r][u] = _mm512_loadu_ps(o + r * Dp + u * 16);
  for (int64_t j = 0; j < n; ++j) {
    __m512 v[W];
    for (int u = 0; u < W; ++u) v[u] = _mm512_loadu_ps(vf + j * Dp + u * 16);
    for (int r = 0; r < RB; ++r) {
      const __m512 pr = _mm512_set1_ps(p[j * kLanes + r]);
      for (int u = 0; u < W; ++u) acc[r][u] = _mm512_fmadd_ps(pr, v[u], acc[r][u]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int u = 0; u < W; ++u) _mm512_storeu_ps(o + r * Dp + u * 16, acc[r][u]);
}

template <int RB>
MLXQ_INLINE void pv_rows(float* o, int64_t Dp, const float* vf, const float* p, int64_t n) {
  int64_t d = 0;
  for (; d + 64 <= Dp; d += 64) pv_block<RB, 4>(o + d, Dp, vf + d, p, n);
  if (d + 32 <= Dp) pv_block<RB, 2>(o + d, Dp, vf + d, p, n), d += 32;
}

// The state of one block of rows across key chunks.
struct Block {
  int64_t row0 = 0, rows = 0;            // task-relative first row, rows in the block (<= 16)
  int64_t first = 0, end = 0;            // the union of the rows' intervals
  int32_t firsts[kLanes], ends[kLanes];  // per-lane intervals (empty for lanes past `rows`)
  bool uniform = false;                  // every lane has the interval [first, end)
  float m[kLanes], l[kLanes];            // running max and sum of exponentials
};

// A thread's buffers, kept between calls: the blocks, q as pairs, a chunk of V widened to fp32
// and the chunk's scores (then probabilities) with the rows along the lanes.
struct Scratch {
  std::vector<Block> blocks;
  std::vector<uint32_t> pairs;
  std::vector<float> vf, st;
};

// One task's rows [r0, r1) (nr >= 16) against keys [j0, j1) of unit (b, hkv); returns false,
// having done nothing, when a row's mask is not one interval. On success sc.o, sc.m, sc.l hold
// each row's unnormalised output, max and sum, as the general kernel leaves them.
inline bool attend(const AttentionArgs& a, int64_t b, int64_t hkv, int64_t r0, int64_t r1,
                   int64_t j0, int64_t j1, AttnScratch& sc) {
  const int64_t D = a.D, Dp = D, nr = r1 - r0, pairs = D / 2;
  const int64_t nblocks = (nr + kLanes - 1) / kLanes;
  const float ninf = -std::numeric_limits<float>::infinity();
  // Per-row intervals, and q of each block as bf16 pairs.
  thread_local Scratch rs;
  std::vector<Block>& blocks = rs.blocks;
  blocks.resize(nblocks);
  rs.pairs.resize(nblocks * pairs * kLanes);
  for (int64_t k = 0; k < nblocks; ++k) {
    Block& blk = blocks[k];
    blk.row0 = k * kLanes;
    blk.rows = std::min(kLanes, nr - blk.row0);
    uint32_t* qp = rs.pairs.data() + k * pairs * kLanes;
    std::fill(qp, qp + pairs * kLanes, 0u);
    int32_t* firsts = blk.firsts;
    int32_t* ends = blk.ends;
    for (int64_t i = 0; i < kLanes; ++i) {
      firsts[i] = ends[i] = static_cast<int32_t>(j0);
      if (i >= blk.rows) continue;
      const int64_t r = r0 + blk.row0 + i;
      if (a.mask_type == MaskType::kBool) {
        if (!attended_interval(bool_mask_row(a, b, hkv, r), j0, j1, firsts[i], ends[i]))
          return false;
      } else {
        firsts[i] = static_cast<int32_t>(j0);
        ends[i] = static_cast<int32_t>(j1);
      }
      const char* q = q_row(a, b, hkv, r);
      for (int64_t p = 0; p < pairs; ++p) std::memcpy(qp + p * kLanes + i, q + 4 * p, 4);
    }
    blk.first = j1;
    blk.end = j0;
    blk.uniform = true;
    for (int64_t i = 0; i < blk.rows; ++i) {
      if (firsts[i] == ends[i]) continue;  // attends nothing
      blk.first = std::min<int64_t>(blk.first, firsts[i]);
      blk.end = std::max<int64_t>(blk.end, ends[i]);
    }
    for (int64_t i = 0; i < kLanes; ++i)
      blk.uniform = blk.uniform && i < blk.rows && firsts[i] == blk.first && ends[i] == blk.end;
    std::fill(blk.m, blk.m + kLanes, ninf);
    std::fill(blk.l, blk.l + kLanes, 0.f);
  }
  std::fill(sc.o.begin(), sc.o.begin() + nr * Dp, 0.f);
  rs.vf.resize(kChunk * Dp);
  rs.st.resize(kChunk * kLanes);
  float* vf = rs.vf.data();
  float* st = rs.st.data();
  const char* kbase = static_cast<const char*>(a.k) + (b * a.k_stride[0] + hkv * a.k_stride[1]) * 2;
  const char* vbase = static_cast<const char*>(a.v) + (b * a.v_stride[0] + hkv * a.v_stride[1]) * 2;
  const __m512 scale = _mm512_set1_ps(a.scale), minus_inf = _mm512_set1_ps(ninf);
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0);
    bool widened = false;
    for (Block& blk : blocks) {
      const int64_t c1 = std::min(c0 + n, blk.end), cs = std::max(c0, blk.first);
      if (cs >= c1) continue;      // no row of the block attends a key of this chunk
      const int64_t kn = c1 - c0;  // keys [c0, c1); those before blk.first are masked below
      if (!widened) {
        for (int64_t j = 0; j < n; ++j)
          widen_span(vbase + (c0 + j) * a.v_stride[2] * 2, ScaleType::kBFloat16, D, vf + j * Dp);
        widened = true;
      }
      // Scores, 8 keys at a time (the last keys of a short step repeat, unstored).
      const uint32_t* qp = rs.pairs.data() + (blk.row0 / kLanes) * pairs * kLanes;
      for (int64_t j = 0; j < kn; j += 8) {
        const int64_t nk = std::min<int64_t>(8, kn - j);
        const char* kr[8];
        for (int64_t t = 0; t < 8; ++t)
          kr[t] = kbase + (c0 + j + std::min(t, nk - 1)) * a.k_stride[2] * 2;
        __m512 acc[8];
        for (int t = 0; t < 8; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t p = 0; p < pairs; ++p) {
          const __m512bh qv = (__m512bh)_mm512_loadu_si512(qp + p * kLanes);
          for (int t = 0; t < 8; ++t) {
            int32_t kp;
            std::memcpy(&kp, kr[t] + 4 * p, 4);
            acc[t] = _mm512_dpbf16_ps(acc[t], qv, (__m512bh)_mm512_set1_epi32(kp));
          }
        }
        for (int64_t t = 0; t < nk; ++t)
          _mm512_storeu_ps(st + (j + t) * kLanes, _mm512_mul_ps(acc[t], scale));
      }
      // Mask (lanes outside their row's interval), then the running max (NaN scores skipped:
      // vmaxps returns its second operand when either is NaN).
      const bool inside = blk.uniform && c0 >= blk.first && c1 <= blk.end;
      const __m512i firsts = _mm512_loadu_si512(blk.firsts), ends = _mm512_loadu_si512(blk.ends);
      const __m512 m_old = _mm512_loadu_ps(blk.m);
      __m512 mx = m_old;
      for (int64_t j = 0; j < kn; ++j) {
        __m512 s = _mm512_loadu_ps(st + j * kLanes);
        if (!inside) {
          const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(c0 + j));
          const __mmask16 out =
              _mm512_cmpgt_epi32_mask(firsts, key) | _mm512_cmple_epi32_mask(ends, key);
          s = _mm512_mask_mov_ps(s, out, minus_inf);
          _mm512_storeu_ps(st + j * kLanes, s);
        }
        mx = _mm512_max_ps(s, mx);
      }
      // Rows that attended nothing yet keep max -inf: their exponentials are taken against 0
      // (exp(-inf) = 0), never against -inf (which would give NaN).
      const __mmask16 none = _mm512_cmpeq_ps_mask(mx, minus_inf);
      const __m512 shift = _mm512_mask_mov_ps(mx, none, _mm512_setzero_ps());
      const __mmask16 grew =
          _mm512_cmpneq_ps_mask(mx, m_old) & _mm512_cmpneq_ps_mask(m_old, minus_inf);
      __m512 l = _mm512_loadu_ps(blk.l);
      if (grew) {  // earlier sums and outputs scaled by exp(m_old - m)
        alignas(64) float corr[kLanes];
        _mm512_store_ps(corr, _mm512_sub_ps(m_old, shift));
        store8(corr, exp8(load8(corr)));
        store8(corr + 8, exp8(load8(corr + 8)));
        const __m512 cv = _mm512_mask_mov_ps(_mm512_set1_ps(1.f), grew, _mm512_load_ps(corr));
        l = _mm512_mul_ps(l, cv);
        for (int64_t i = 0; i < blk.rows; ++i) {
          if (!((grew >> i) & 1)) continue;
          const __m512 f = _mm512_set1_ps(corr[i]);
          float* o = sc.o.data() + (blk.row0 + i) * Dp;
          for (int64_t d = 0; d < Dp; d += 16)
            _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), f));
        }
      }
      _mm512_storeu_ps(blk.m, mx);
      for (int64_t j = 0; j < kn; ++j) {
        alignas(64) float e[kLanes];
        _mm512_store_ps(e, _mm512_sub_ps(_mm512_loadu_ps(st + j * kLanes), shift));
        store8(e, exp8(load8(e)));
        store8(e + 8, exp8(load8(e + 8)));
        const __m512 p = _mm512_load_ps(e);
        _mm512_storeu_ps(st + j * kLanes, p);
        l = _mm512_add_ps(l, p);
      }
      _mm512_storeu_ps(blk.l, l);
      // o += P V, 4 rows at a time.
      float* o = sc.o.data() + blk.row0 * Dp;
      int64_t i = 0;
      for (; i + 4 <= blk.rows; i += 4) pv_rows<4>(o + i * Dp, Dp, vf, st + i, kn);
      switch (blk.rows - i) {
        case 3:
          pv_rows<3>(o + i * Dp, Dp, vf, st + i, kn);
          break;
        case 2:
          pv_rows<2>(o + i * Dp, Dp, vf, st + i, kn);
          break;
        case 1:
          pv_rows<1>(o + i * Dp, Dp, vf, st + i, kn);
          break;
        default:
          break;
      }
    }
  }
  for (const Block& blk : blocks) {
    std::copy(blk.m, blk.m + blk.rows, sc.m.begin() + blk.row0);
    std::copy(blk.l, blk.l + blk.rows, sc.l.begin() + blk.row0);
  }
  return true;
}

}  // namespace rows16
