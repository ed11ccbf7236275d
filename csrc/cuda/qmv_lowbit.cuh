// Decode on tensor cores for 2-, 3-, 5- and 6-bit weights, fp16/bf16 x with scales and biases of
// the same dtype, M <= 2 rows of x: the layout of qmv_stream.cuh's register variant (a warp owns
// 16 rows of W and a range of K; lane (g, t) reads rows g and g + 8; in span sp of 128 values lane
// t holds the 32 values [sp*128 + 32t, +32), one chunk of `Bits` words, which lies in one group;
// B column 4m + t carries row m of x only at lane t's values, so each column is one lane's
// partial dot, whatever its group), with the unpacking generalised to any width.
//
// Products: mma.sync m16n8k16 with exact integer codes as A. A register of A holds two codes of a
// chunk, i and j = i + D, as the two halves of an fp16/bf16 pair. One shift (or funnel shift)
// brings code i to bit s_lo and code j to bit 16 + s_hi, one LOP3 masks them and ORs in the
// exponents of 2^(mant - s_lo) and 2^(mant - s_hi) (mant: 10 mantissa bits for fp16, 7 for bf16),
// so that each half reads 2^(mant - s) + q exactly, and one HSUB2 takes those powers off: q. That
// needs both codes inside their half's mantissa: s + Bits <= mant with s_hi - s_lo = D*Bits - 16.
// D per width (the codes D apart pair up, in blocks of 2D): 2 bits D = 8 (16 bits apart, s 0/0),
// 3 bits D = 4 (12 apart: s 4/0), 5 bits D = 4 (20 apart: s 0/4, fp16 only), 6 bits D = 2 (12
// apart: s 4/0, fp16 only). Where they do not fit (bf16 5 and 6 bits) each code is shifted to bit
// 0 of its half on its own and the halves joined by one PRMT first (5 instructions a pair, not 3).
// x is staged in shared memory in the same pair order, so that each mma's B is two registers of
// one 16-byte load; sum(x) per 32 values is staged with it, and per group y += s * sum(q*x) +
// b * sum(x) in fp32: the products q*x are exact, so, as for every decode kernel here, the weights
// are dequantized and summed in fp32.
//
// Measured (H200, bf16, M = 1, 28672 x 8192, us, benchmarks/cuda/lowbit_harness.cu, one run; every
// shape's float64 checks passed): groups 64 / 128, this kernel against the CUDA-core one and a
// plain read of the packed bytes: 2 bits 48.4 / 48.4 against 82.7 / 76.5 (read 14.9), 3 bits 69.2 /
// 69.4 against 86.7 / 80.7 (21.1), 5 bits 110.6 / 110.4 against 95.5 / 84.4 (34.2), 6 bits 80.3 /
// 79.9 against 96.8 / 86.7 (40.6); more in qmv_launch.cuh, which takes it where it is the faster.
// So it beats the CUDA-core kernel by 1.6-1.7x at 2 bits and 1.1-1.2x at 6 bits (and loses at 5),
// but stays far from the read (1.4-2.4 TB/s of packed bytes against 4.5-4.9): time grows with the
// width much more slowly than the bytes (2 bits 3.3x the read, 6 bits 2.0x). Not yet measured (the
// next device run's questions; lowbit_harness's "probes" mode times the kernel without each of
// them): the scales and biases are loaded per span at the point of use (4 or 8 scalar loads a lane,
// their L1 misses exposed once per 4-16 spans a row; the 4-bit kernels fetch them with the weights,
// shuffled out of vector loads), x is staged by every block before its first step (8 scalar loads
// per 16 bytes), and 5 bits reads its chunks a word at a time (no aligned vector width for 20
// bytes).
#pragma once

#include <type_traits>

#include "cuda/qmv_stream.cuh"

namespace mlxq::cuda {

constexpr int kLowbitWarps = 8;  // warps per block (two blocks a multiprocessor)

// Spans of 128 values per step (the loads one buffer holds: 2 * U * Bits words a lane). H200,
// bf16, M = 1, us, 28672 x 8192 groups 64 / 128 (lowbit_harness, one run): 2 bits U8 50.2 / 50.2,
// U4 48.4 / 48.4 (also ahead at M = 2, at 8192 x 28672 and group 32; 7.6 against 7.3 at 4096 x
// 4096); 3 bits U4 69.2 / 69.4, U6 73.8 / 73.0; 5 bits U3 115.7 / 115.1, U2 110.6 / 110.4; 6 bits
// U2 80.3 / 79.9, U3 85.8 / 84.8.
template <int Bits>
constexpr int kLowbitSpans = Bits == 5 ? 2 : (Bits == 6 ? 2 : 4);

// How a chunk's 32 codes pair into A registers (see the header comment).
template <int Bits, typename T>
struct LowbitPairs {
  static constexpr bool kHalf = std::is_same_v<T, __half>;
  static constexpr int kMant = kHalf ? 10 : 7;
  static constexpr int D = Bits == 2 ? 8 : (Bits == 6 ? 2 : 4);
  static constexpr int kDist = D * Bits;
  static constexpr int kSLo = kDist >= 16 ? 0 : 16 - kDist;
  static constexpr int kSHi = kSLo + kDist - 16;
  static constexpr bool kOneMask = kSLo + Bits <= kMant && kSHi + Bits <= kMant;
  static_assert(Bits <= kMant, "a code must fit a half's mantissa");
  static_assert(32 % (2 * D) == 0, "pairs tile a chunk");
  // the first code of pair k (0..15); the second is D on
  __host__ __device__ static constexpr int lo(int k) { return k / D * 2 * D + k % D; }
  // the bits of 2^(kMant - s) in one half
  __host__ __device__ static constexpr uint32_t exp_bits(int s) {
    return kHalf ? static_cast<uint32_t>(25 - s) << 10 : static_cast<uint32_t>(134 - s) << 7;
  }
};

// Bits [Sh, Sh + 32) of a chunk (bit 0: bit 0 of word 0), zeros below bit 0 and past the chunk.
template <int Bits, int Sh>
__device__ __forceinline__ uint32_t lowbit_window(const uint32_t (&w)[Bits]) {
  if constexpr (Sh < 0) {
    return w[0] << (-Sh);
  } else {
    constexpr int k = Sh / 32, r = Sh % 32;
    if constexpr (r == 0) {
      return w[k];
    } else if constexpr (k + 1 >= Bits) {
      return w[k] >> r;
    } else {
      return __funnelshift_r(w[k], w[k + 1], r);
    }
  }
}

// u - (the pair of powers of two in Magic), halfwise in T (exact: the results are the codes).
template <typename T, uint32_t Magic>
__device__ __forceinline__ uint32_t lowbit_unbias(uint32_t u) {
  const uint32_t m = Magic;
  uint32_t r;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 d =
        __hsub2(*reinterpret_cast<const __half2*>(&u), *reinterpret_cast<const __half2*>(&m));
    r = *reinterpret_cast<const uint32_t*>(&d);
  } else {
    const __nv_bfloat162 d = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&u),
                                     *reinterpret_cast<const __nv_bfloat162*>(&m));
    r = *reinterpret_cast<const uint32_t*>(&d);
  }
  return r;
}

// A register of pair Kp of a chunk: (code lo(Kp), code lo(Kp) + D) as exact T integers.
template <int Bits, typename T, int Kp>
__device__ __forceinline__ uint32_t lowbit_pair(const uint32_t (&w)[Bits]) {
  using L = LowbitPairs<Bits, T>;
  constexpr int i = L::lo(Kp), j = i + L::D;
  constexpr uint32_t vm = (1u << Bits) - 1u;
  if constexpr (L::kOneMask) {
    constexpr uint32_t mask = (vm << L::kSLo) | (vm << (16 + L::kSHi));
    constexpr uint32_t magic = L::exp_bits(L::kSLo) | (L::exp_bits(L::kSHi) << 16);
    const uint32_t win = lowbit_window<Bits, i * Bits - L::kSLo>(w);
    return lowbit_unbias<T, magic>(and_or<mask, magic>(win));
  } else {
    constexpr uint32_t mask = vm | (vm << 16);
    constexpr uint32_t magic = L::exp_bits(0) | (L::exp_bits(0) << 16);
    const uint32_t lo = lowbit_window<Bits, i * Bits>(w);
    const uint32_t hi = lowbit_window<Bits, j * Bits - 16>(w);
    return lowbit_unbias<T, magic>(and_or<mask, magic>(__byte_perm(lo, hi, 0x7610)));
  }
}

// c += one chunk of rows g (qa) and g + 8 (qb) times x: 8 mma, mma h taking pairs 2h, 2h + 1;
// xp: this lane's staged x of the span (uint4 q: pairs 4q .. 4q + 3), or zeros.
template <int Bits, typename T, int Q = 0>
__device__ __forceinline__ void lowbit_chunk_mma(float (&c)[4], const uint32_t (&qa)[Bits],
                                                 const uint32_t (&qb)[Bits], const uint4* xp) {
  if constexpr (Q < 4) {
    using Mma = MmaType<T>;
    const uint4 xv = xp[4 * Q];
    Mma::mma(c, lowbit_pair<Bits, T, 4 * Q>(qa), lowbit_pair<Bits, T, 4 * Q>(qb),
             lowbit_pair<Bits, T, 4 * Q + 1>(qa), lowbit_pair<Bits, T, 4 * Q + 1>(qb), xv.x, xv.y);
    Mma::mma(c, lowbit_pair<Bits, T, 4 * Q + 2>(qa), lowbit_pair<Bits, T, 4 * Q + 2>(qb),
             lowbit_pair<Bits, T, 4 * Q + 3>(qa), lowbit_pair<Bits, T, 4 * Q + 3>(qb), xv.z, xv.w);
    lowbit_chunk_mma<Bits, T, Q + 1>(c, qa, qb, xp);
  }
}

// Loads of streamed weights: not kept in L1, evicted first from L2.
__device__ __forceinline__ uint32_t lowbit_ld1(const uint32_t* p, uint64_t policy) {
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.u32 %0, [%1], %2;"
      : "=r"(v)
      : "l"(p), "l"(policy));
  return v;
}
__device__ __forceinline__ uint2 lowbit_ld2(const uint32_t* p, uint64_t policy) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v2.u32 {%0, %1}, [%2], %3;"
      : "=r"(v.x), "=r"(v.y)
      : "l"(p), "l"(policy));
  return v;
}

// One chunk (its `Bits` words, 4*Bits bytes from a multiple of 4*Bits): 8-byte loads for the
// even widths, words for the odd ones; zeros where !ok.
template <int Bits>
__device__ __forceinline__ void lowbit_load_chunk(const uint32_t* p, bool ok, uint64_t policy,
                                                  uint32_t (&w)[Bits]) {
  if constexpr (Bits % 2 == 0) {
#pragma unroll
    for (int i = 0; i < Bits / 2; ++i) {
      const uint2 v = ok ? lowbit_ld2(p + 2 * i, policy) : make_uint2(0u, 0u);
      w[2 * i] = v.x, w[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < Bits; ++i) w[i] = ok ? lowbit_ld1(p + i, policy) : 0u;
  }
}

template <typename T>
__device__ __forceinline__ float lowbit_scale(const uint16_t* p, int64_t i) {
  const uint16_t v = __ldg(p + i);
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(v));
  } else {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
  }
}

// Stages x for the kernel: for row m, span sp, lane t, uint4 q: the pairs 4q .. 4q + 3 of lane
// t's 32 values in the order of LowbitPairs (lo code's x in the low half) at xs[m * kp / 8 +
// sp * 16 + 4q + t], and sums of x per 32 values at sx[m * kp / 32 + chunk]; zeros past K.
template <int Bits, typename T>
__device__ __forceinline__ void lowbit_stage_x(const QmvParams& p, int kp, uint4* xs, float* sx) {
  using L = LowbitPairs<Bits, T>;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const int K = static_cast<int>(p.K);
  const int per_row = kp / 8;
  for (int idx = threadIdx.x; idx < p.M * per_row; idx += blockDim.x) {
    const int m = idx / per_row, r = idx - m * per_row;
    const int k0 = (r >> 4) * 128 + (r & 3) * 32, q = (r >> 2) & 3;
    const uint16_t* xr = x + static_cast<int64_t>(m) * K;
    uint32_t v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = k0 + L::lo(4 * q + e), j = i + L::D;
      const uint32_t lo = i < K ? __ldg(xr + i) : 0u, hi = j < K ? __ldg(xr + j) : 0u;
      v[e] = lo | (hi << 16);
    }
    xs[idx] = make_uint4(v[0], v[1], v[2], v[3]);
  }
  const int cpr = kp / 32;
  for (int idx = threadIdx.x; idx < p.M * cpr; idx += blockDim.x) {
    const int m = idx / cpr, c = idx - m * cpr;
    float s = 0.f;
    if (c * 32 < K) {
      const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K + c * 32);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint4 u = __ldg(src + i);
        const float2 f0 = half_pair<T>(u.x), f1 = half_pair<T>(u.y), f2 = half_pair<T>(u.z),
                     f3 = half_pair<T>(u.w);
        s += ((f0.x + f0.y) + (f1.x + f1.y)) + ((f2.x + f2.y) + (f3.x + f3.y));
      }
    }
    sx[idx] = s;
  }
}

// Dynamic shared memory of the kernel for M rows of x of length K: x (padded to whole steps of
// U spans), its sums per 32 values, the warps' partial sums, 256 bytes of zeros.
inline int64_t qmv_lowbit_smem(int64_t M, int64_t K, int U) {
  const int64_t spans = (K / 32 + 3) / 4, kp = (spans + U - 1) / U * U * 128;
  return M * kp * 2 + M * (kp / 32) * 4 + kLowbitWarps * 2 * 16 * 4 + 256;
}

template <int Bits, int U>
struct LowbitStep {
  uint32_t qa[U][Bits], qb[U][Bits];  // rows g and g + 8: lane t's chunk of each span
};

// y = x @ W.T for 1 <= p.M <= 2 (U: spans a step; benchmarks try others); KW warps split the K
// of a tile (qmv_stream_grid), kLowbitWarps / KW tiles a block. Probe (benchmarks, wrong results:
// what each part costs): 1 no scale or bias loads (s = 1, b = 0), 2 x not staged, 3 the weight
// loads alone.
template <int Bits, int GS, typename T, int U = kLowbitSpans<Bits>, int Probe = 0>
__global__ void __launch_bounds__(kLowbitWarps * 32, 2)
    qmv_lowbit_kernel(const QmvParams p, const int KW) {
  using S = LowbitStep<Bits, U>;
  extern __shared__ __align__(16) uint8_t lowbit_smem[];
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int M = p.M;
  const int chunks = static_cast<int>(p.K / 32), spans = (chunks + 3) / 4;
  const int steps = (spans + U - 1) / U, kp = steps * U * 128;
  uint4* xs = reinterpret_cast<uint4*>(lowbit_smem);                     // [M][kp / 8]
  float* sx = reinterpret_cast<float*>(lowbit_smem + M * kp * 2);        // [M][kp / 32]
  float* red = sx + M * (kp / 32);                                       // [warps][2][16]
  uint4* zeros = reinterpret_cast<uint4*>(red + kLowbitWarps * 2 * 16);  // [16]

  const int tpb = kLowbitWarps / KW;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * tpb + wi / KW) * 16;
  const int ks = wi % KW;
  const bool active = n0 < p.N;  // no early return: the block meets at barriers
  const int st0 = steps * ks / KW, st1 = active ? steps * (ks + 1) / KW : st0;

  const int64_t last = p.N - 1;
  const int64_t ra = n0 + g < p.N ? n0 + g : last, rb = n0 + g + 8 < p.N ? n0 + g + 8 : last;
  const int64_t row_words = p.K / 32 * Bits;
  const uint32_t* wa = p.w + ra * row_words + t * Bits;  // a span: 4 chunks on
  const uint32_t* wb = p.w + rb * row_words + t * Bits;
  uint64_t pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  const auto load = [&](int step, S& st) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int sp = step * U + u;
      const bool ok = sp * 4 + t < chunks;
      lowbit_load_chunk<Bits>(wa + sp * 4 * Bits, ok, pol, st.qa[u]);
      lowbit_load_chunk<Bits>(wb + sp * 4 * Bits, ok, pol, st.qb[u]);
    }
  };
  S cur, nxt;
  if (st0 < st1) load(st0, cur);  // on its way while x is staged

  if constexpr (Probe != 2) lowbit_stage_x<Bits, T>(p, kp, xs, sx);
  if (threadIdx.x < 16) zeros[threadIdx.x] = make_uint4(0u, 0u, 0u, 0u);
  __syncthreads();

  // lane (g, t) feeds B column g = 4m + t (row m of x at its own values) where g % 4 == t, zeros
  // elsewhere; its accumulator columns 2t, 2t + 1 are lanes t0, t0 + 1 of row om of x
  const int xm = g >> 2;
  const bool has_x = (g & 3) == t && xm < M;
  const uint4* xrow = has_x ? xs + xm * (kp / 8) + t : zeros;
  const int xstride = has_x ? 16 : 0;
  const int om = t >> 1, t0 = 2 * (t & 1);
  const float* sxrow = sx + (om < M ? om : 0) * (kp / 32);
  const uint16_t* sp16 = static_cast<const uint16_t*>(p.scales);
  const uint16_t* bp16 = static_cast<const uint16_t*>(p.biases);
  const int64_t sa = ra * p.G, sb = rb * p.G, glast = p.G - 1;
  float acc_a = 0.f, acc_b = 0.f;

  const auto scale = [&](const uint16_t* base, int64_t i) {
    if constexpr (Probe == 1) {
      return base == sp16 ? 1.f : 0.f;
    } else {
      return lowbit_scale<T>(base, i);
    }
  };
  const auto multiply = [&](int step, const S& st) {
    if constexpr (Probe == 3) {
      uint32_t x = 0;
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int i = 0; i < Bits; ++i) x ^= st.qa[u][i] ^ st.qb[u][i];
      acc_a += __uint_as_float(x & 0x3FFFFFFFu);
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int sp = step * U + u;
        float c[4] = {0.f, 0.f, 0.f, 0.f};
        lowbit_chunk_mma<Bits, T>(c, st.qa[u], st.qb[u], xrow + sp * xstride);
        // the groups of chunks sp*4 + t0 and + 1 (clamped: past K the products and sums are 0)
        const int64_t c0 = static_cast<int64_t>(sp) * 4 + t0;
        const int64_t g0 = c0 * 32 / GS < glast ? c0 * 32 / GS : glast;
        const int64_t g1 = (c0 + 1) * 32 / GS < glast ? (c0 + 1) * 32 / GS : glast;
        const float2 xsum = *reinterpret_cast<const float2*>(sxrow + c0);
        const float s_a0 = scale(sp16, sa + g0), b_a0 = scale(bp16, sa + g0);
        const float s_b0 = scale(sp16, sb + g0), b_b0 = scale(bp16, sb + g0);
        if constexpr (GS >= 64) {  // both chunks in one group
          acc_a = fmaf(s_a0, c[0] + c[1], acc_a);
          acc_a = fmaf(b_a0, xsum.x + xsum.y, acc_a);
          acc_b = fmaf(s_b0, c[2] + c[3], acc_b);
          acc_b = fmaf(b_b0, xsum.x + xsum.y, acc_b);
        } else {
          const float s_a1 = scale(sp16, sa + g1), b_a1 = scale(bp16, sa + g1);
          const float s_b1 = scale(sp16, sb + g1), b_b1 = scale(bp16, sb + g1);
          acc_a = fmaf(s_a0, c[0], acc_a);
          acc_a = fmaf(s_a1, c[1], acc_a);
          acc_a = fmaf(b_a0, xsum.x, acc_a);
          acc_a = fmaf(b_a1, xsum.y, acc_a);
          acc_b = fmaf(s_b0, c[2], acc_b);
          acc_b = fmaf(s_b1, c[3], acc_b);
          acc_b = fmaf(b_b0, xsum.x, acc_b);
          acc_b = fmaf(b_b1, xsum.y, acc_b);
        }
      }
    }
  };
  for (int st = st0; st < st1; st += 2) {  // two steps a round: the buffers are never copied
    if (st + 1 < st1) load(st + 1, nxt);
    multiply(st, cur);
    if (st + 1 >= st1) break;
    if (st + 2 < st1) load(st + 2, cur);
    multiply(st + 1, nxt);
  }
  // columns 2t, 2t + 1 plus those of lane t ^ 1: the whole dot of rows g, g + 8 with row om
  acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 1);
  acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 1);
  stream_store_y<T>(p, M, KW, tpb, wi, g, t, n0, active, acc_a, acc_b, red);
}

// Host side: the launch on a device of `sm_count` multiprocessors (the caller checks that
// qmv_lowbit_smem fits a block, and the launch).
template <int Bits, int GS, typename T, int U = kLowbitSpans<Bits>, int Probe = 0>
inline void launch_qmv_lowbit_gs(const QmvParams& p, int sm_count, cudaStream_t stream) {
  const StreamGrid grid = qmv_stream_grid(p.N, p.K, U, sm_count, 2, 0, kLowbitWarps);
  const int64_t smem = qmv_lowbit_smem(p.M, p.K, U);
  auto kernel = qmv_lowbit_kernel<Bits, GS, T, U, Probe>;
  if (smem > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(smem));
  }
  kernel<<<static_cast<unsigned>(grid.blocks), kLowbitWarps * 32, smem, stream>>>(p, grid.kw);
}

template <int Bits, typename T>
inline void launch_qmv_lowbit_typed(const QmvParams& p, int sm_count, cudaStream_t stream) {
  switch (p.group_shift) {
    case 5:
      return launch_qmv_lowbit_gs<Bits, 32, T>(p, sm_count, stream);
    case 6:
      return launch_qmv_lowbit_gs<Bits, 64, T>(p, sm_count, stream);
    default:
      return launch_qmv_lowbit_gs<Bits, 128, T>(p, sm_count, stream);
  }
}

}  // namespace mlxq::cuda
