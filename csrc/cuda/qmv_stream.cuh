// Streaming decode on tensor cores for 4-bit weights, fp16/bf16 x and scales, M <= 2 rows of x:
// the M = 1 kernel, built to stream the packed weights with as little work per byte as it can.
//
// Products: mma.sync m16n8k16 with the exact q (0..15 as fp16/bf16 integers: one LOP3 and one
// HSUB2 per two values) as A and x as B, fp32 accumulation; per group y += s * sum(q*x) +
// b * sum(x), with sum(x) precomputed per 32 values. So, as for every decode kernel here, the
// weights are dequantized and summed in fp32 (the products q*x are exact).
//
// Layout. A warp owns a tile of 16 rows of W and a range of K (its "K slice"); lane (g, t) =
// (lane / 4, lane % 4) reads rows g and g + 8. K is walked in spans of 128 values: in span sp lane
// t holds the 32 values [sp*128 + 32t, +32) of both rows (one 16-byte load each), which lie in one
// group for every group size (32, 64, 128). The 4 lanes of a row each feed their own 32 values
// into the same mma, and the B operand keeps them apart: column n = 4m + t of B carries row m of x
// only at lane t's values (zeros elsewhere), so column 4m + t of the product is lane t's partial
// dot with row m of x, whatever group it belongs to. Scales are then applied per column.
//
// Streaming. A "step" is U spans (U * 1 KB of weights per warp). Each warp loads step i + 1 into
// registers (16-byte loads that skip L1, with an L2 evict-first hint: the weights are read once)
// before multiplying step i, so that it always has U KB of loads in flight; with 16 warps per SM
// that keeps ~U * 16 KB per SM on the way. x (in the permuted order the B operand wants) and its
// sums per 32 values are staged in shared memory once per block, while the first step's weights
// are already loading. Where the tiles alone leave the GPU short of warps, KW warps of a block
// split the K of one tile and add their partial sums through shared memory.
#pragma once

#include "cuda/kernels.cuh"

namespace mlxq::cuda {

constexpr int kStreamWarps = 8;  // warps per block (2 blocks per SM); benchmarks also try 16

// Bytes of dynamic shared memory the streaming kernel needs for M rows of x of length K.
// ring_bytes: the ring variant's weight slots per warp (stages * U KB); warps: per block.
inline int64_t qmv_stream_smem(int64_t M, int64_t K, int64_t ring_bytes = 0,
                               int warps = kStreamWarps) {
  const int64_t kp = (K + 1023) / 1024 * 1024;  // the kernel pads x to whole steps (U <= 8 spans)
  // x, its sums per 32 values, its factors per span (fp16 products), sums of warps, zeros, ring
  return M * kp * 2 + M * (kp / 32) * 4 + M * (kp / 128) * 4 + warps * 2 * 16 * 4 + 256 +
         warps * ring_bytes;
}

// The launch of the streaming kernel: KW warps split the K of a tile only while the tiles alone
// leave warp slots (min_blocks blocks of `warps` per multiprocessor) empty, and while each warp
// keeps at least one whole step of U spans; KW divides warps, warps / KW tiles a block. kw_force >
// 0 forces KW (benchmarks).
struct StreamGrid {
  int kw;
  int64_t blocks;
};
inline StreamGrid qmv_stream_grid(int64_t N, int64_t K, int U, int sm_count, int min_blocks,
                                  int kw_force = 0, int warps = kStreamWarps) {
  const int64_t tiles = (N + 15) / 16, slots = int64_t{sm_count} * min_blocks * warps;
  const int64_t steps = ((K / 32 + 3) / 4 + U - 1) / U;
  int kw = 1;
  while (kw < warps && warps % (kw * 2) == 0 && tiles * kw * 2 <= slots && steps / (kw * 2) >= 1)
    kw *= 2;
  if (kw_force > 0) kw = kw_force;
  const int64_t tpb = warps / kw;
  return {kw, (tiles + tpb - 1) / tpb};
}

// A 16-byte global load of streamed data: not kept in L1, evicted first from L2.
template <bool Hint>
__device__ __forceinline__ uint4 ld_stream(const uint4* p, uint64_t policy) {
  uint4 v;
  if constexpr (Hint) {
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "l"(policy));
  } else {
    v = __ldg(p);
  }
  return v;
}

// Two 16-bit scales/biases of a 32-bit word as floats (lo, hi).
template <typename T>
__device__ __forceinline__ float2 half_pair(uint32_t w);
template <>
__device__ __forceinline__ float2 half_pair<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
}
template <>
__device__ __forceinline__ float2 half_pair<__half>(uint32_t w) {
  return __half22float2(*reinterpret_cast<const __half2*>(&w));
}

// How the products are formed. kNative: x in its own dtype, each nibble an exact integer of that
// dtype (3 SHF, 4 LOP3 and 4 HSUB2 per 32-bit word of 8 nibbles: bf16's 7 mantissa bits only
// hold a nibble at bits 0-3 of each half). kHalfSub and kHalfMagic: fp16 products for either
// dtype of x, x staged as fp16 scaled per span (stream_stage_x_f16), so that with fp16's 10
// mantissa bits the nibbles at bits 0-3 and 4-7 of each half are both taken by a mask:
//  - kHalfSub: (w & 0x000F000F) read as fp16 is q * 2^-24 (a subnormal, exact), (w & 0x00F000F0)
//    16q * 2^-24; 1 SHF (w >> 8 for nibbles 2, 3, 6, 7) and 4 LOP3 a word, nothing else.
//  - kHalfMagic: the same masks OR'd with 0x6400 (1024) and 1024 taken off (4 HSUB2 more): q, 16q.
// The 16q nibbles go into their own mma chain (d), added as c + d / 16 at the end of a span.
// Numerics: products of fp16 values are exact in the tensor cores' fp32 sums, as the native
// form's are (subnormal fp16 operands included); what changes is x. A span's x are scaled by
// 2^(15 - E), E the exponent of their largest |x| (clamped to >= -100), so that the largest lies
// in [2^15, 2^16): fp16 x only ever scale up (exact), and a bf16 x (8 significant bits) keeps
// all its bits while its exponent is >= E - 32 (the scaled value >= 2^-17). Smaller ones round to
// a multiple of 2^-24 in the scaled units, an error below 2^-40 |x|max (or 2^-140 where E was
// clamped) per value, far under the fp32 sums' own error (tests: _matmul_tolerance). The
// harness's "f16" mode checks bf16 x spread over 2^40 in every span (rows within [2^-110,
// 2^-70) and [2^60, 2^100) too), test_decode_kernels x over 2^80. The span's sum goes back to
// x's scale by two exact multiplications, 2^24 (kHalfSub) then 2^(E - 15) (no overflow for any
// finite x before the fp32 sum of q * x itself would overflow).
enum class Prod { kNative = 0, kHalfSub = 1, kHalfMagic = 2 };

// c += products of 8 nibbles of row g (qa) and of row g + 8 (qb) at bits 0-3 of their halves
// (nibbles 0, 4, 2, 6) with x, d += those at bits 4-7 (nibbles 1, 5, 3, 7, as 16q); xv: the
// scaled fp16 x in the order stream_stage_x_f16 stages, (x0,x4) (x2,x6) (x1,x5) (x3,x7), so that
// each mma's B is a pair of adjacent registers of the 16-byte load (no moves: in the order of
// the native form ptxas added 2 IMAD.MOV per mma).
template <Prod P>
__device__ __forceinline__ void mma_nibble_words_f16(float (&c)[4], float (&d)[4], uint32_t qa,
                                                     uint32_t qb, const uint4& xv) {
  using Mma = MmaType<__half>;
  const uint32_t w[4] = {qa, qb, qa >> 8, qb >> 8};
  uint32_t lo[4], hi[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (P == Prod::kHalfSub) {
      lo[i] = w[i] & 0x000F000Fu;
      hi[i] = w[i] & 0x00F000F0u;
    } else {
      lo[i] = Mma::unbias(and_or<0x000F000Fu, 0x64006400u>(w[i]));
      hi[i] = Mma::unbias(and_or<0x00F000F0u, 0x64006400u>(w[i]));
    }
  }
  // A: rows g, g + 8 at k (2t, 2t + 1) then (2t + 8, 2t + 9); B the x under them
  Mma::mma(c, lo[0], lo[1], lo[2], lo[3], xv.x, xv.y);
  Mma::mma(d, hi[0], hi[1], hi[2], hi[3], xv.z, xv.w);
}

template <int GS, int U>
struct StreamStep {
  static constexpr int kGroups = U * 128 / GS;  // groups of a row per step
  static constexpr int kSbWords = kGroups / 2;  // this lane's scales (or biases), two a word
  static_assert(kSbWords >= 1, "a step holds at least two groups");
  uint4 qa[U], qb[U];  // rows g and g + 8: lane t's 32 values of each span
  uint32_t sb[kSbWords];
};

struct StreamLane {
  const uint4* wa;      // row g, at lane t's first 16 bytes
  const uint4* wb;      // row g + 8
  const uint16_t* sbp;  // lane L: scales (L < 16) or biases (L >= 16) of row L % 16
  int chunks;           // 32-value chunks per row (K / 32)
  int spans;            // 128-value spans per row
  int t;
  bool sb_vec;  // the scale rows allow aligned vector loads (G % 8 == 0)
  int G;
  uint64_t policy;
};

// The scales and biases of one step (this lane's row and kind, see StreamLane::sbp).
template <int GS, int U>
__device__ __forceinline__ void stream_load_sb(const StreamLane& L, int step,
                                               StreamStep<GS, U>& st) {
  using S = StreamStep<GS, U>;
  const int g0 = step * S::kGroups;
  if (L.sb_vec && g0 + S::kGroups <= L.G) {
    if constexpr (S::kSbWords == 1) {
      st.sb[0] = __ldg(reinterpret_cast<const uint32_t*>(L.sbp + g0));
    } else if constexpr (S::kSbWords == 2) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(L.sbp + g0));
      st.sb[0] = v.x, st.sb[1] = v.y;
    } else {
#pragma unroll
      for (int i = 0; i < S::kSbWords / 4; ++i) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(L.sbp + g0) + i);
        st.sb[4 * i] = v.x, st.sb[4 * i + 1] = v.y, st.sb[4 * i + 2] = v.z, st.sb[4 * i + 3] = v.w;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < S::kSbWords; ++i) {
      const int a = g0 + 2 * i, b = a + 1;
      const uint32_t lo = a < L.G ? __ldg(L.sbp + a) : 0u;
      const uint32_t hi = b < L.G ? __ldg(L.sbp + b) : 0u;
      st.sb[i] = lo | (hi << 16);
    }
  }
}

template <int GS, int U, bool Hint>
__device__ __forceinline__ void stream_load(const StreamLane& L, int step, StreamStep<GS, U>& st) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int sp = step * U + u;
    const bool ok = sp * 4 + L.t < L.chunks;
    st.qa[u] = ok ? ld_stream<Hint>(L.wa + sp * 4, L.policy) : make_uint4(0u, 0u, 0u, 0u);
    st.qb[u] = ok ? ld_stream<Hint>(L.wb + sp * 4, L.policy) : make_uint4(0u, 0u, 0u, 0u);
  }
  stream_load_sb<GS, U>(L, step, st);
}

// The ring variant: the weights of a step go straight to this lane's slot of shared memory
// (cp.async, no registers held while in flight; 16 zero bytes past the row's end), span u's
// rows g and g + 8 at slot + (2u) * 512 and slot + (2u + 1) * 512 (each lane its own 16 bytes).
// No L2 cache hint: with one, ptxas 13.0 emitted some of these copies with an odd uniform
// register as the 64-bit policy descriptor (desc[UR1]), which faults as an illegal instruction.
template <int U>
__device__ __forceinline__ void ring_issue(const StreamLane& L, int step, uint32_t slot) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int sp = step * U + u;
    const int bytes = sp * 4 + L.t < L.chunks ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(slot + 1024 * u),
                 "l"(L.wa + sp * 4), "r"(bytes));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(slot + 1024 * u + 512),
                 "l"(L.wb + sp * 4), "r"(bytes));
  }
}
template <int GS, int U>
__device__ __forceinline__ void ring_read(uint32_t slot, StreamStep<GS, U>& st) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    uint4 a, b;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(a.x), "=r"(a.y), "=r"(a.z), "=r"(a.w)
                 : "r"(slot + 1024 * u));
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(b.x), "=r"(b.y), "=r"(b.z), "=r"(b.w)
                 : "r"(slot + 1024 * u + 512));
    st.qa[u] = a, st.qb[u] = b;
  }
}

// Multiplies one loaded step: acc_a, acc_b (rows g, g + 8) collect this lane's two columns.
// xs: this lane's B operand, xstride uint4 a span apart (0 where it feeds zeros, see the kernel).
// fx: this lane's factors per span (its row of x; fp16 products only).
template <int GS, int U, typename T, Prod P = Prod::kNative>
__device__ __forceinline__ void stream_step(const StreamLane& L, int step, const uint4* xs,
                                            int xstride, const float* sx, int g,
                                            const StreamStep<GS, U>& st, float& acc_a, float& acc_b,
                                            const float* fx = nullptr) {
  const int t = L.t, t0 = 2 * (t & 1);  // this lane's columns: span lanes t0, t0 + 1
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int sp = step * U + u;
    // No early exit past the row's last span (x is staged to whole steps, zeros past K, and
    // the weights and scales read there are zeros): a step is straight-line code, so that the
    // compiler can interleave its spans' chains of dependent mma.
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (P == Prod::kNative) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // x of lane t's chunk of 8 values j, as (x0,x4) (x1,x5) (x2,x6) (x3,x7)
        const uint4 xv = xs[sp * xstride + 4 * j];
        mma_nibble_words<T>(c, (&st.qa[u].x)[j], (&st.qb[u].x)[j], xv.x, xv.y, xv.z, xv.w);
      }
    } else {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        mma_nibble_words_f16<P>(c, d, (&st.qa[u].x)[j], (&st.qb[u].x)[j], xs[sp * xstride + 4 * j]);
      }
      const float f = fx[sp];  // 2^(E - 15) of this span (stream_stage_x_f16)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        c[i] = fmaf(d[i], 0.0625f, c[i]);
        if constexpr (P == Prod::kHalfSub) c[i] *= 0x1p24f;  // the nibbles were q * 2^-24
        c[i] *= f;
      }
    }
    if constexpr (GS == 128) {
      // Every column is the whole span's dot (the span is one group): c[0] row g, c[2] row g + 8.
      const uint32_t w = st.sb[u / 2];
      const uint32_t ws[4] = {__shfl_sync(0xffffffffu, w, g), __shfl_sync(0xffffffffu, w, 8 + g),
                              __shfl_sync(0xffffffffu, w, 16 + g),
                              __shfl_sync(0xffffffffu, w, 24 + g)};
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = half_pair<T>(ws[i]);
        v[i] = (u & 1) ? f.y : f.x;
      }
      const float4 xq = *reinterpret_cast<const float4*>(sx + sp * 4);
      const float xsum = (xq.x + xq.y) + (xq.z + xq.w);
      acc_a = fmaf(v[0], c[0], acc_a);
      acc_a = fmaf(v[2], xsum, acc_a);
      acc_b = fmaf(v[1], c[2], acc_b);
      acc_b = fmaf(v[3], xsum, acc_b);
      continue;
    }
    // scales and biases of rows g and g + 8 for columns t0 and t0 + 1
    float2 s_a, s_b, b_a, b_b;
    if constexpr (GS == 64) {  // groups 2u, 2u + 1: word u, half t & 1
      const uint32_t w = st.sb[u];
      const uint32_t ws[4] = {__shfl_sync(0xffffffffu, w, g), __shfl_sync(0xffffffffu, w, 8 + g),
                              __shfl_sync(0xffffffffu, w, 16 + g),
                              __shfl_sync(0xffffffffu, w, 24 + g)};
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = half_pair<T>(ws[i]);
        v[i] = (t & 1) ? f.y : f.x;
      }
      s_a = make_float2(v[0], v[0]), s_b = make_float2(v[1], v[1]);
      b_a = make_float2(v[2], v[2]), b_b = make_float2(v[3], v[3]);
    } else {  // groups 4u .. 4u + 3: columns t0, t0 + 1 are word 2u + (t & 1)
      const uint32_t w0 = st.sb[2 * u], w1 = st.sb[2 * u + 1];
      uint32_t ws[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int src = 8 * i + g;
        const uint32_t v0 = __shfl_sync(0xffffffffu, w0, src);
        const uint32_t v1 = __shfl_sync(0xffffffffu, w1, src);
        ws[i] = (t & 1) ? v1 : v0;
      }
      s_a = half_pair<T>(ws[0]), s_b = half_pair<T>(ws[1]);
      b_a = half_pair<T>(ws[2]), b_b = half_pair<T>(ws[3]);
    }
    const float2 xsum = *reinterpret_cast<const float2*>(sx + sp * 4 + t0);
    acc_a = fmaf(s_a.x, c[0], acc_a);
    acc_a = fmaf(s_a.y, c[1], acc_a);
    acc_a = fmaf(b_a.x, xsum.x, acc_a);
    acc_a = fmaf(b_a.y, xsum.y, acc_a);
    acc_b = fmaf(s_b.x, c[2], acc_b);
    acc_b = fmaf(s_b.y, c[3], acc_b);
    acc_b = fmaf(b_b.x, xsum.x, acc_b);
    acc_b = fmaf(b_b.y, xsum.y, acc_b);
  }
}

// Chunks base + b * Threads + threadIdx.x (b < Batch) of x (zeros past K and past M rows).
template <typename T, int Threads, int Batch>
__device__ __forceinline__ void stream_x_batch(const QmvParams& p, int kp, int base,
                                               uint4 (&v)[Batch]) {
  const int per_row = kp / 8, total = p.M * per_row;
#pragma unroll
  for (int b = 0; b < Batch; ++b) {
    const int idx = base + b * Threads + threadIdx.x;
    const int m = idx / per_row, c = idx - m * per_row;
    v[b] = make_uint4(0u, 0u, 0u, 0u);
    if (idx < total && c * 8 < p.K) {
      v[b] = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + m * p.K + c * 8);
    }
  }
}

// Stages x for the streaming kernels: chunk c = 16 sp + 4 t + j of 8 values of row m (span sp,
// lane t's chunk j) at xs[m * kp / 8 + 16 sp + 4 j + t], permuted for the B operand, and the sums
// of x per 32 values at sx[m * kp / 32 + c / 4]; zeros past K up to kp. The loop's trip count is
// uniform (the shuffles need all lanes). Batch: chunks a thread loads before it waits on them;
// Pre: v0 holds the first batch, loaded (stream_x_batch) before the weights' first loads.
template <typename T, int Threads, int Batch, bool Pre>
__device__ __forceinline__ void stream_stage_x(const QmvParams& p, int kp, uint4* xs, float* sx,
                                               const uint4 (&v0)[Batch]) {
  const int per_row = kp / 8, total = p.M * per_row;
  for (int base = 0; base < total; base += Batch * Threads) {
    uint4 v[Batch];
    if (Pre && base == 0) {
#pragma unroll
      for (int b = 0; b < Batch; ++b) v[b] = v0[b];
    } else {
      stream_x_batch<T, Threads, Batch>(p, kp, base, v);
    }
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
      const int idx = base + b * Threads + threadIdx.x;
      const int m = idx / per_row, c = idx - m * per_row;
      const float2 f0 = half_pair<T>(v[b].x), f1 = half_pair<T>(v[b].y), f2 = half_pair<T>(v[b].z),
                   f3 = half_pair<T>(v[b].w);
      float s = ((f0.x + f0.y) + (f1.x + f1.y)) + ((f2.x + f2.y) + (f3.x + f3.y));
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      if (idx < total) {
        // chunk j of lane t's 32 values of a span at 4j + t: the 4 lanes of a row read 64
        // consecutive bytes (one wavefront; at 4t + j, t = 0 and 2 shared banks)
        const int sw = m * per_row + (c & ~15) + ((c & 3) << 2) + ((c >> 2) & 3);
        xs[sw] =
            make_uint4(__byte_perm(v[b].x, v[b].z, 0x5410), __byte_perm(v[b].x, v[b].z, 0x7632),
                       __byte_perm(v[b].y, v[b].w, 0x5410), __byte_perm(v[b].y, v[b].w, 0x7632));
        if ((c & 3) == 0) sx[m * (kp / 32) + c / 4] = s;
      }
    }
  }
}

// stream_stage_x for fp16 products: x as fp16 scaled per span of 128 values (16 consecutive
// threads: a span of one row) by 2^(15 - E), E the exponent of the span's largest |x| (see
// Prod), in the order (x0,x4) (x2,x6) (x1,x5) (x3,x7) of each chunk of 8, and fx[m * kp / 128 +
// span] = 2^(E - 15); the sums of x from x itself. Batch and Pre: as for stream_stage_x.
template <typename T, int Threads, int Batch, bool Pre>
__device__ __forceinline__ void stream_stage_x_f16(const QmvParams& p, int kp, uint4* xs, float* sx,
                                                   float* fx, const uint4 (&v0)[Batch]) {
  const int per_row = kp / 8, total = p.M * per_row;
  for (int base = 0; base < total; base += Batch * Threads) {
    uint4 v[Batch];
    if (Pre && base == 0) {
#pragma unroll
      for (int b = 0; b < Batch; ++b) v[b] = v0[b];
    } else {
      stream_x_batch<T, Threads, Batch>(p, kp, base, v);
    }
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
      const int idx = base + b * Threads + threadIdx.x;
      const int m = idx / per_row, c = idx - m * per_row;
      const float2 f0 = half_pair<T>(v[b].x), f1 = half_pair<T>(v[b].y), f2 = half_pair<T>(v[b].z),
                   f3 = half_pair<T>(v[b].w);
      float s = ((f0.x + f0.y) + (f1.x + f1.y)) + ((f2.x + f2.y) + (f3.x + f3.y));
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      float mx = fmaxf(fmaxf(fmaxf(fabsf(f0.x), fabsf(f0.y)), fmaxf(fabsf(f1.x), fabsf(f1.y))),
                       fmaxf(fmaxf(fabsf(f2.x), fabsf(f2.y)), fmaxf(fabsf(f3.x), fabsf(f3.y))));
#pragma unroll
      for (int o = 1; o < 16; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      // >= -100: 2^(15 - E) and 2^(E - 15) are normal floats (E <= 128, inf)
      const int E = max(static_cast<int>(__float_as_uint(mx) >> 23) - 127, -100);
      const float up = __uint_as_float(static_cast<uint32_t>(127 + 15 - E) << 23);
      if (idx < total) {
        const int sw = m * per_row + (c & ~15) + ((c & 3) << 2) + ((c >> 2) & 3);
        const __half2 h0 = __floats2half2_rn(f0.x * up, f2.x * up);  // exact products
        const __half2 h1 = __floats2half2_rn(f1.x * up, f3.x * up);
        const __half2 h2 = __floats2half2_rn(f0.y * up, f2.y * up);
        const __half2 h3 = __floats2half2_rn(f1.y * up, f3.y * up);
        xs[sw] = make_uint4(
            *reinterpret_cast<const uint32_t*>(&h0), *reinterpret_cast<const uint32_t*>(&h1),
            *reinterpret_cast<const uint32_t*>(&h2), *reinterpret_cast<const uint32_t*>(&h3));
        if ((c & 3) == 0) sx[m * (kp / 32) + c / 4] = s;
        if ((c & 15) == 0) {
          fx[m * (kp / 128) + c / 16] = __uint_as_float(static_cast<uint32_t>(112 + E) << 23);
        }
      }
    }
  }
}

// The end of the streaming decode kernels (this file's and qmv_lowbit.cuh's): lane (g, t) holds
// the dots of rows g and g + 8 of the tile at n0 with row t >> 1 of x; where KW warps split the
// tile's K, their partial dots meet in `red` ([warps][2][16]) and are summed in a fixed order.
template <typename T>
__device__ __forceinline__ void stream_store_y(const QmvParams& p, const int M, const int KW,
                                               const int tpb, const int wi, const int g,
                                               const int t, const int64_t n0, const bool active,
                                               float acc_a, float acc_b, float* red) {
  const int om = t >> 1;
  T* y = static_cast<T*>(p.y);
  if (KW == 1) {
    if ((t & 1) == 0 && om < M && active) {
      if (n0 + g < p.N) y[om * p.N + n0 + g] = from_float<T>(acc_a);
      if (n0 + g + 8 < p.N) y[om * p.N + n0 + g + 8] = from_float<T>(acc_b);
    }
    return;
  }
  if ((t & 1) == 0 && om < M) {
    red[(wi * 2 + om) * 16 + g] = acc_a;
    red[(wi * 2 + om) * 16 + g + 8] = acc_b;
  }
  __syncthreads();
  const int outs = tpb * M * 16;
  if (static_cast<int>(threadIdx.x) < outs) {
    const int tb = threadIdx.x / (M * 16), rem = threadIdx.x - tb * M * 16;
    const int m = rem / 16, r = rem % 16;
    const int64_t n = (static_cast<int64_t>(blockIdx.x) * tpb + tb) * 16 + r;
    float v = 0.f;
    for (int k = 0; k < KW; ++k) v += red[((tb * KW + k) * 2 + m) * 16 + r];
    if (n < p.N) y[m * p.N + n] = from_float<T>(v);
  }
}

// y = x @ W.T for 1 <= p.M <= 2; KW warps split the K of a tile, Warps / KW tiles a block.
// LoadsOnly (benchmarks): only the loads, a bandwidth probe of this access pattern (wrong
// results). Warps: per block (benchmarks: 16 with MinBlocks 1 stages x once per multiprocessor,
// which leaves shared memory for a deeper ring; see qmv_mma.cu for what it measured).
template <int GS, int U, bool Hint, typename T, bool LoadsOnly = false, int MinBlocks = 2,
          int Ring = 0, int Warps = kStreamWarps, Prod P = Prod::kNative, int Pro = 0>
__global__ void __launch_bounds__(Warps * 32, MinBlocks)
    qmv_stream_kernel(const QmvParams p, const int KW) {
  using S = StreamStep<GS, U>;
  extern __shared__ __align__(16) uint8_t stream_smem[];
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int M = p.M;
  const int chunks = static_cast<int>(p.K / 32), spans = (chunks + 3) / 4;
  const int kp = (spans + U - 1) / U * U * 128;  // K padded to whole steps (<= qmv_stream_smem's)
  uint4* xs = reinterpret_cast<uint4*>(stream_smem);                            // [M][kp / 8]
  float* sx = reinterpret_cast<float*>(stream_smem + M * kp * 2);               // [M][kp / 32]
  float* fx = reinterpret_cast<float*>(stream_smem + M * kp * 2 + M * kp / 8);  // [M][kp / 128]
  float* red = reinterpret_cast<float*>(stream_smem + M * kp * 2 + M * kp / 8 +
                                        (M * kp / 32 + 15) / 16 * 16);  // [W][2][16]
  uint4* zeros = reinterpret_cast<uint4*>(red + Warps * 2 * 16);        // [16]

  const int tpb = Warps / KW;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * tpb + wi / KW;
  const int ks = wi % KW;
  const int64_t n0 = tile * 16;
  const bool active = n0 < p.N;  // no early return: the block meets at barriers
  const int steps = (spans + U - 1) / U;
  const int st0 = steps * ks / KW, st1 = active ? steps * (ks + 1) / KW : st0;

  StreamLane L;
  {
    const int64_t last = p.N - 1;
    const int64_t ra = n0 + g < p.N ? n0 + g : last;
    const int64_t rb = n0 + g + 8 < p.N ? n0 + g + 8 : last;
    const int64_t rs = n0 + (lane & 15) < p.N ? n0 + (lane & 15) : last;
    const int64_t row_words = p.K / 8;
    L.wa = reinterpret_cast<const uint4*>(p.w + ra * row_words) + t;  // span: 4 x 16 bytes
    L.wb = reinterpret_cast<const uint4*>(p.w + rb * row_words) + t;
    L.sbp = static_cast<const uint16_t*>(lane < 16 ? p.scales : p.biases) + rs * p.G;
    L.chunks = chunks;
    L.spans = spans;
    L.t = t;
    L.G = static_cast<int>(p.G);
    L.sb_vec = p.G % 8 == 0;
    uint64_t pol = 0;
    if constexpr (Hint) asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    L.policy = pol;
  }
  // Pro, the prologue: 0 the first step's weights, then x (a chunk a thread at a time); 1 (the
  // register variant) both buffers of weights, then x 4 chunks at a time; 2 the first 4 chunks
  // of x a thread, then the first step's weights, then the rest of x 4 chunks at a time. (1 with
  // the ring, every slot filled before x is staged, was slower: x waits behind the weights.)
  static_assert(Pro >= 0 && Pro <= 2 && !(Pro == 1 && Ring > 0), "no such prologue");
  constexpr bool Early = Pro == 1;
  constexpr int kBatch = Pro == 0 ? 1 : 4;
  uint4 x0[kBatch];
  if constexpr (Pro == 2) stream_x_batch<T, Warps * 32, kBatch>(p, kp, 0, x0);
  S cur, nxt;
  if constexpr (Ring > 0) {
    if (st0 < st1) {  // slot 0 (the ring lies past `zeros`), on its way while x is staged
      const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(zeros + 16)) +
                            wi * Ring * U * 1024 + lane * 16;
      ring_issue<U>(L, st0, ring);
      stream_load_sb<GS, U>(L, st0, cur);
    }
    asm volatile("cp.async.commit_group;");
  } else if (st0 < st1 && !LoadsOnly) {
    stream_load<GS, U, Hint>(L, st0, cur);  // on its way while x is staged
    if (Early && st0 + 1 < st1) stream_load<GS, U, Hint>(L, st0 + 1, nxt);
  }

  // Stage x (the first step's weights are on their way)
  if constexpr (P == Prod::kNative) {
    stream_stage_x<T, Warps * 32, kBatch, Pro == 2>(p, kp, xs, sx, x0);
  } else {
    stream_stage_x_f16<T, Warps * 32, kBatch, Pro == 2>(p, kp, xs, sx, fx, x0);
  }
  const int per_row = kp / 8;
  if (threadIdx.x < 16) zeros[threadIdx.x] = make_uint4(0u, 0u, 0u, 0u);
  __syncthreads();

  // B column 4m + t is row m of x at lane t's values: lane (g, t) feeds it where g == 4m + t,
  // and zeros elsewhere (read from `zeros`, the same 256 bytes for every span), so that each
  // column's sum is lane t's partial dot with row m. With group 128 a span is one group and
  // columns 4m .. 4m + 3 all carry row m (clamped to M - 1) at every lane's values: each is
  // the whole span's dot.
  const int xm = g >> 2;
  const bool has_x = GS == 128 || ((g & 3) == t && xm < M);
  const uint4* xrow = has_x ? xs + (xm < M ? xm : M - 1) * per_row + t : zeros;
  const int xstride = has_x ? 16 : 0;
  const int om = t >> 1;  // the row of x of this lane's columns 2t, 2t + 1
  const float* sxrow = sx + (om < M ? om : 0) * (kp / 32);
  const float* fxrow = fx + (om < M ? om : 0) * (kp / 128);
  float acc_a = 0.f, acc_b = 0.f;
  if constexpr (LoadsOnly) {
    uint32_t x = 0;
    for (int st = st0; st < st1; ++st) {
      stream_load<GS, U, Hint>(L, st, cur);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        x ^= cur.qa[u].x ^ cur.qa[u].y ^ cur.qa[u].z ^ cur.qa[u].w;
        x ^= cur.qb[u].x ^ cur.qb[u].y ^ cur.qb[u].z ^ cur.qb[u].w;
      }
    }
    acc_a = __uint_as_float(x & 0x3FFFFFFFu);
  } else if constexpr (Ring > 0) {
    // Ring stages per warp: step st + Ring - 1 is copied while step st is multiplied.
    constexpr uint32_t kSlot = U * 1024;
    const uint32_t ring =
        static_cast<uint32_t>(__cvta_generic_to_shared(zeros + 16)) + wi * Ring * kSlot + lane * 16;
#pragma unroll
    for (int s = 1; s < Ring - 1; ++s) {
      if (st0 + s < st1) ring_issue<U>(L, st0 + s, ring + s * kSlot);
      asm volatile("cp.async.commit_group;");
    }
    for (int st = st0; st < st1; ++st) {
      const int sn = st + Ring - 1;
      if (sn < st1) ring_issue<U>(L, sn, ring + ((sn - st0) % Ring) * kSlot);
      asm volatile("cp.async.commit_group;");
      asm volatile("cp.async.wait_group %0;" ::"n"(Ring - 1));
      ring_read<GS, U>(ring + ((st - st0) % Ring) * kSlot, cur);
      if (st + 1 < st1) stream_load_sb<GS, U>(L, st + 1, nxt);
      stream_step<GS, U, T, P>(L, st, xrow, xstride, sxrow, g, cur, acc_a, acc_b, fxrow);
#pragma unroll
      for (int i = 0; i < S::kSbWords; ++i) cur.sb[i] = nxt.sb[i];
    }
  } else {
    for (int st = st0; st < st1; st += 2) {  // two steps per round: the buffers are never copied
      if (!Early && st + 1 < st1) stream_load<GS, U, Hint>(L, st + 1, nxt);
      stream_step<GS, U, T, P>(L, st, xrow, xstride, sxrow, g, cur, acc_a, acc_b, fxrow);
      if (st + 1 >= st1) break;
      if (st + 2 < st1) stream_load<GS, U, Hint>(L, st + 2, cur);
      stream_step<GS, U, T, P>(L, st + 1, xrow, xstride, sxrow, g, nxt, acc_a, acc_b, fxrow);
      if (Early && st + 3 < st1) stream_load<GS, U, Hint>(L, st + 3, nxt);
    }
  }
  // columns 2t, 2t + 1 plus those of lane t ^ 1: the whole dot of rows g, g + 8 with row om
  if constexpr (GS != 128) {
    acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 1);
    acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 1);
  }
  stream_store_y<T>(p, M, KW, tpb, wi, g, t, n0, active, acc_a, acc_b, red);
}

}  // namespace mlxq::cuda
