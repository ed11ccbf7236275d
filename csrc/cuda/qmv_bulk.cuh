// Streaming decode with Hopper bulk copies (4-bit weights, fp16/bf16 x and scales, M <= 2): one
// persistent block a multiprocessor, all multiprocessors busy, and one thread that issues every
// weight copy of its block.
//
// Why. The 16-warp ring (qmv_stream.cuh) fills 112 of 132 multiprocessors at 28672 x 8192 (1792
// tiles of 16 rows, 16 a block), and each of its threads spends instructions on copy addresses
// and LDGSTS. Here block b takes tiles [tiles * b / B, tiles * (b + 1) / B) with B = the
// multiprocessors (13 or 14 tiles each there), and the weights arrive by cp.async.bulk (1-D,
// no tensor map) into a ring of shared memory, completing on mbarriers.
//
// Pieces. A tile's rows are cut into chunks of WPP * 512 values; piece (tile, chunk) is 16 row
// pieces of WPP * 256 bytes, 16 bulk copies (rows 64 bytes apart more than their length, so that
// rows g and g + 1 of a quarter warp's 16-byte reads fall on other banks). Pieces go round the
// ring in the order tile by tile, chunk by chunk. The 16 consumer warps form 16 / WPP groups of
// WPP warps; group i takes pieces i, i + groups, ...; warp q of a group multiplies the q-th 512
// values (4 spans, one step of qmv_stream_kernel, stream_step) of each of its pieces, after
// copying them to registers and freeing the slot (mbarrier "empty", WPP arrivals). Each warp
// adds its sums of a tile in registers and leaves them in shared memory when its tile changes;
// at the end every output is the sum of its tile's 16 warps, in warp order (deterministic).
// The scales and biases: each lane loads its own one piece ahead (stream_load_sb), or with
// SbSmem a tile's 16 rows of scales and of biases (contiguous, 32 G bytes each) come by two more
// bulk copies into a ring of `sbs` slots of their own, freed by every warp that multiplies a
// piece of the tile. x and its sums are staged once a block while the first copies land.
// Measured (qmv_mma.cu has the numbers): 2-5% under the op's other kernels where the tiles fill
// 3 blocks a multiprocessor, 24% under the K split register variant at 4096 x 14336 (1-2 tiles a
// block, 4 pieces a tile); the op's default there (launch_stream_gs, bulk_reaches).
#pragma once

#include "cuda/mbarrier.cuh"
#include "cuda/qmv_stream.cuh"

namespace mlxq::cuda {

constexpr int kBulkWarps = 16;      // consumer warps; warp 16 issues the copies
constexpr int kBulkRowPad = 64;     // bytes between a slot's row pieces beyond their length
constexpr int kBulkMaxStages = 32;  // mbarriers reserved for the ring
constexpr int kBulkMaxSb = 4;       // and for the ring of tiles' scales and biases

// The launch of qmv_bulk_kernel for an N x K weight and M rows of x: its blocks, the most tiles
// one block takes, its ring stages and bytes of dynamic shared memory; ok false where it does
// not apply (N % 16, K % 512, M > 2, or fewer stages fit than groups + 2).
struct BulkShape {
  bool ok;
  int blocks;
  int tpb;
  int stages;
  int sbs;  // slots of a tile's scales and biases (0: each lane loads its own from global)
  int64_t smem;
};

// A slot: row r of a piece at r * (row bytes) + ((r + 1) / 2) * 64, so that rows 2i and 2i + 1
// (read by one quarter warp) lie 64 bytes apart modulo 128: other banks.
inline int64_t qmv_bulk_slot_bytes(int wpp) { return 16 * wpp * 256 + 8 * kBulkRowPad; }

inline int64_t qmv_bulk_fixed_smem(int64_t M, int64_t K, int64_t tpb) {
  const int64_t kp = (K + 511) / 512 * 512;
  // x, its sums per 32 values, its factors per span (16-byte rounded), zeros, warps' sums,
  // mbarriers; then (128-byte aligned) the slots of scales and biases, then the ring
  const int64_t fixed = M * kp * 2 + M * (kp / 32) * 4 + (M * (kp / 128) * 4 + 15) / 16 * 16 + 256 +
                        tpb * kBulkWarps * M * 16 * 4 + 2 * (kBulkMaxStages + kBulkMaxSb) * 8;
  return (fixed + 127) / 128 * 128;
}

// sbs: slots for whole tiles' scales and biases (64 G bytes each; 0: per-lane global loads).
inline BulkShape qmv_bulk_shape(int64_t N, int64_t K, int64_t M, int sm_count,
                                int64_t smem_per_block, int wpp, int max_stages = kBulkMaxStages,
                                int64_t G = 0, int sbs = 0) {
  BulkShape b{false, 0, 0, 0, 0, 0};
  if (N % 16 != 0 || K % 512 != 0 || M < 1 || M > 2 || N <= 0) return b;
  if (sbs > 0 && (G % 8 != 0 || sbs > kBulkMaxSb)) return b;  // 16-byte rows of scales
  const int64_t tiles = N / 16;
  b.blocks = static_cast<int>(tiles < sm_count ? tiles : sm_count);
  b.tpb = static_cast<int>((tiles + b.blocks - 1) / b.blocks);
  b.sbs = sbs;
  const int64_t fixed = qmv_bulk_fixed_smem(M, K, b.tpb) + sbs * 64 * G;
  const int64_t fit = (smem_per_block - fixed) / qmv_bulk_slot_bytes(wpp);
  const int groups = kBulkWarps / wpp;
  b.stages = static_cast<int>(fit < max_stages ? fit : max_stages);
  if (b.stages > kBulkMaxStages) b.stages = kBulkMaxStages;
  b.smem = fixed + b.stages * qmv_bulk_slot_bytes(wpp);
  b.ok = b.stages >= groups + 2;
  return b;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MLXQ_BULK 1
namespace bulk_ptx {
using mbarrier_ptx::mbar_arrive;
using mbarrier_ptx::mbar_expect_tx;
using mbarrier_ptx::mbar_init;
using mbarrier_ptx::mbar_wait;
// bytes (a multiple of 16) from global src to shared dst (both 16-byte aligned), counted on bar
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
}  // namespace bulk_ptx
#endif

// y = x @ W.T for 1 <= p.M <= 2, N % 16 == 0, K % 512 == 0 (qmv_bulk_shape), blocks of
// kBulkWarps + 1 warps, `stages` slots in the ring, tpb: BulkShape::tpb. Probe (benchmarks,
// wrong results): 1 the copies alone, 2 the products alone (no copies), 3 no loads of scales
// and biases. Ahead: pieces of a warp between the loads of their scales and their products
// (1 or 2). No divisions in the
// loops (an earlier form took pc / nc, pc % stages and the like a piece: its products alone ran
// 38.2 us at 28672 x 8192, group 128, WPP 4): slot, phase, tile and chunk are counted on.
// Lanes: the 16 row copies of a piece are issued by 16 lanes of the copy warp in one instruction
// (else by lane 0 in turn); measured slower (qmv_mma.cu, bulk_reaches), kept for qmv_harness.
template <int GS, typename T, int WPP, Prod P = Prod::kNative, int Probe = 0, int Ahead = 1,
          bool SbSmem = false, bool Lanes = false>
__global__ void __launch_bounds__((kBulkWarps + 1) * 32, 1)
    qmv_bulk_kernel(const QmvParams p, const int stages, const int tpb, const int sbs) {
#ifdef MLXQ_BULK
  constexpr int U = 4;
  constexpr int kGroups = kBulkWarps / WPP;
  constexpr int kRb = WPP * 256;  // bytes of a piece's row
  constexpr int kSlot = 16 * kRb + 8 * kBulkRowPad;
  constexpr int kChunk = WPP * 512;  // values of a piece's rows
  static_assert(kBulkWarps % WPP == 0, "groups of WPP warps");
  using S = StreamStep<GS, U>;
  extern __shared__ __align__(128) uint8_t bulk_smem[];
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int M = p.M;
  const int K = static_cast<int>(p.K);
  // K is a multiple of 512 (whole steps): x is staged unpadded
  const int kp = K;
  uint4* xs = reinterpret_cast<uint4*>(bulk_smem);                            // [M][kp / 8]
  float* sx = reinterpret_cast<float*>(bulk_smem + M * kp * 2);               // [M][kp / 32]
  float* fx = reinterpret_cast<float*>(bulk_smem + M * kp * 2 + M * kp / 8);  // [M][kp / 128]
  uint4* zeros = reinterpret_cast<uint4*>(bulk_smem + M * kp * 2 + M * kp / 8 +
                                          (M * kp / 32 + 15) / 16 * 16);  // [16]
  float* red = reinterpret_cast<float*>(zeros + 16);                      // [tpb][16][M][16]
  uint64_t* bars = reinterpret_cast<uint64_t*>(red + tpb * kBulkWarps * M * 16);  // full, empty
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(bulk_smem));
  const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(bars));
  const uint32_t empty0 = full0 + 8 * kBulkMaxStages;
  const uint32_t sbfull0 = empty0 + 8 * kBulkMaxStages, sbempty0 = sbfull0 + 8 * kBulkMaxSb;
  const uint32_t sbring = base + ((sbempty0 + 8 * kBulkMaxSb - base + 127u) & ~127u);
  const int64_t G = p.G;
  const uint32_t sb_slot = static_cast<uint32_t>(64 * G);  // scales [16][G], then biases
  const uint32_t ring = sbring + (SbSmem ? sbs * sb_slot : 0u);

  const int64_t tiles = p.N / 16;
  const int64_t T0 = tiles * blockIdx.x / gridDim.x, T1 = tiles * (blockIdx.x + 1) / gridDim.x;
  const int nt = static_cast<int>(T1 - T0);
  const int nc = (K + kChunk - 1) / kChunk;
  const int pieces = nt * nc;
  const int64_t row_bytes = p.K / 2;

  if (threadIdx.x == 0) {
    for (int i = 0; i < stages; ++i) {
      bulk_ptx::mbar_init(full0 + 8 * i, 1);
      bulk_ptx::mbar_init(empty0 + 8 * i, WPP);
    }
    // a tile's scales are freed by every warp that multiplies a piece of it
    const int touch = (nc < kGroups ? nc : kGroups) * WPP;
    for (int i = 0; SbSmem && i < sbs; ++i) {
      bulk_ptx::mbar_init(sbfull0 + 8 * i, 1);
      bulk_ptx::mbar_init(sbempty0 + 8 * i, touch);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wi == kBulkWarps) {
    // The copies: piece pc into slot s = pc % stages once piece pc - stages has left it.
    if (Lanes ? lane < 16 : lane == 0) {  // every issuing lane walks the same pieces
      const uint8_t* tile_src = reinterpret_cast<const uint8_t*>(p.w) + T0 * 16 * row_bytes;
      const uint8_t* tile_s = static_cast<const uint8_t*>(p.scales) + T0 * 32 * G;
      const uint8_t* tile_b = static_cast<const uint8_t*>(p.biases) + T0 * 32 * G;
      int s = 0, ph = 0, c = 0, tl = 0, ss = 0, sph = 0;
      for (int pc = 0; pc < pieces; ++pc) {
        if (SbSmem && c == 0) {  // the tile's scales and biases, once tile tl - sbs left the slot
          if (lane == 0) {
            if (tl >= sbs) bulk_ptx::mbar_wait(sbempty0 + 8 * ss, sph ^ 1);
            const uint32_t bar = sbfull0 + 8 * ss, dst = sbring + ss * sb_slot;
            bulk_ptx::mbar_expect_tx(bar, sb_slot);
            bulk_ptx::bulk_copy(dst, tile_s, sb_slot / 2, bar);
            bulk_ptx::bulk_copy(dst + sb_slot / 2, tile_b, sb_slot / 2, bar);
          }
          tile_s += 32 * G, tile_b += 32 * G;
          if (++ss == sbs) ss = 0, sph ^= 1;
          ++tl;
        }
        if (pc >= stages) bulk_ptx::mbar_wait(empty0 + 8 * s, ph ^ 1);
        const uint32_t bytes = static_cast<uint32_t>(min(kChunk, K - c * kChunk) / 2);
        if constexpr (Probe == 2) {
          if (lane == 0) bulk_ptx::mbar_arrive(full0 + 8 * s);
        } else {
          const uint8_t* src = tile_src + c * (kChunk / 2);
          const uint32_t dst = ring + s * kSlot;
          if (lane == 0) bulk_ptx::mbar_expect_tx(full0 + 8 * s, 16 * bytes);
          if constexpr (Lanes) {
            __syncwarp(0xFFFFu);  // the bytes are expected before any copy completes
            const int r = lane;
            bulk_ptx::bulk_copy(dst + r * kRb + ((r + 1) / 2) * kBulkRowPad, src + r * row_bytes,
                                bytes, full0 + 8 * s);
          } else {
#pragma unroll
            for (int r = 0; r < 16; ++r) {
              bulk_ptx::bulk_copy(dst + r * kRb + ((r + 1) / 2) * kBulkRowPad, src + r * row_bytes,
                                  bytes, full0 + 8 * s);
            }
          }
        }
        if (++s == stages) s = 0, ph ^= 1;
        if (++c == nc) c = 0, tile_src += 16 * row_bytes;
      }
    }
    __syncwarp();
  } else {
    constexpr int kThreads = kBulkWarps * 32;
    for (int i = threadIdx.x; i < nt * kBulkWarps * M * 16; i += kThreads) red[i] = 0.f;
    if (threadIdx.x < 16) zeros[threadIdx.x] = make_uint4(0u, 0u, 0u, 0u);
    const uint4 none[4] = {};
    if constexpr (P == Prod::kNative) {
      stream_stage_x<T, kThreads, 4, false>(p, kp, xs, sx, none);
    } else {
      stream_stage_x_f16<T, kThreads, 4, false>(p, kp, xs, sx, fx, none);
    }
    asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");  // consumers only

    // the B operand, sums and factors of x as in qmv_stream_kernel
    const int per_row = kp / 8, xm = g >> 2;
    const bool has_x = GS == 128 || ((g & 3) == t && xm < M);
    const uint4* xrow = has_x ? xs + (xm < M ? xm : M - 1) * per_row + t : zeros;
    const int xstride = has_x ? 16 : 0;
    const int om = t >> 1;
    const float* sxrow = sx + (om < M ? om : 0) * (kp / 32);
    const float* fxrow = fx + (om < M ? om : 0) * (kp / 128);
    const int gi = wi / WPP, q = wi % WPP;
    // this lane's 16 bytes of rows g and g + 8 in a slot
    const uint32_t lane_off = g * kRb + ((g + 1) / 2) * kBulkRowPad + q * 256 + t * 16;
    constexpr uint32_t kOff8 = 8 * kRb + 4 * kBulkRowPad;

    StreamLane L;
    L.wa = L.wb = nullptr;
    L.chunks = K / 32;
    L.spans = K / 128;
    L.t = t;
    L.G = static_cast<int>(p.G);
    L.sb_vec = p.G % 8 == 0;
    L.policy = 0;
    const uint16_t* sb0 = static_cast<const uint16_t*>(lane < 16 ? p.scales : p.biases) +
                          (T0 * 16 + (lane & 15)) * p.G;
    const int64_t tile_sb = 16 * p.G;
    // A piece's place: its tile (of this block) and chunk; `advance` moves it kGroups pieces on.
    struct Place {
      int tl, c;
    };
    const auto advance = [&](Place& x) {
      x.c += kGroups;
      while (x.c >= nc) x.c -= nc, ++x.tl;
    };
    const auto load_sb = [&](const Place& x, S& st) {
      const int step = x.c * WPP + q;
      L.sbp = sb0 + x.tl * tile_sb;
      if (step * U * 128 < K) stream_load_sb<GS, U>(L, step, st);
    };
    // SbSmem: the slot and phase of this warp's current tile's scales; this lane's words of a
    // slot (row lane % 16, scales below 16, biases above) at sb_lane + 2 * (first group)
    int sb_at = 0, sb_s = 0, sb_ph = 0, sb_waited = -1;  // slot, phase of tile sb_at
    const uint32_t sb_lane =
        sbring + (lane < 16 ? 0u : sb_slot / 2) + static_cast<uint32_t>((lane & 15) * 2 * G);
    const auto smem_sb = [&](int step, S& st) {
      const uint32_t a = sbring + sb_s * sb_slot + (sb_lane - sbring) + step * S::kGroups * 2;
      if constexpr (S::kSbWords == 1) {
        asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(st.sb[0]) : "r"(a));
      } else if constexpr (S::kSbWords == 2) {
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n"
                     : "=r"(st.sb[0]), "=r"(st.sb[1])
                     : "r"(a));
      } else {
#pragma unroll
        for (int i = 0; i < S::kSbWords / 4; ++i) {
          const uint4 v = bulk_ptx::lds128(a + 16 * i);
          st.sb[4 * i] = v.x;
          st.sb[4 * i + 1] = v.y;
          st.sb[4 * i + 2] = v.z;
          st.sb[4 * i + 3] = v.w;
        }
      }
    };
    // Scales and biases of this warp's pieces pc (cur), pc + groups (n1), pc + 2 groups (n2;
    // Ahead 2): loaded Ahead pieces before they are used
    S cur, n1, n2;
    Place at = {0, gi};
    while (at.c >= nc) at.c -= nc, ++at.tl;
    Place ahead = at;  // the piece of the last scales loaded
    if constexpr (SbSmem) {
    } else if constexpr (Probe == 3) {
#pragma unroll
      for (int i = 0; i < S::kSbWords; ++i) cur.sb[i] = n1.sb[i] = n2.sb[i] = 0x3C003C00u;
    } else {
      if (gi < pieces) load_sb(at, cur);
      if (Ahead == 2 && gi + kGroups < pieces) advance(ahead), load_sb(ahead, n1);
    }
    int s = gi, ph = 0;  // gi < kGroups < stages
    float acc_a = 0.f, acc_b = 0.f;
    for (int pc = gi; pc < pieces; pc += kGroups) {
      Place nx = at;
      advance(nx);
      const bool more = pc + kGroups < pieces;
      if constexpr (Probe != 3 && !SbSmem) {
        if (Ahead == 2 && pc + 2 * kGroups < pieces) {
          advance(ahead);
          load_sb(ahead, n2);
        } else if (Ahead == 1 && more) {
          load_sb(nx, n1);
        }
      }
      bulk_ptx::mbar_wait(full0 + 8 * s, ph);
      const int step = at.c * WPP + q;
      const bool live = step * U * 128 < K;  // this warp's 512 values of a last, short chunk
      if constexpr (SbSmem) {
        if (at.tl != sb_waited) {  // a new tile: wait for its scales
          for (; sb_at < at.tl; ++sb_at) {
            if (++sb_s == sbs) sb_s = 0, sb_ph ^= 1;
          }
          sb_waited = at.tl;
          bulk_ptx::mbar_wait(sbfull0 + 8 * sb_s, sb_ph);
        }
        if (live) smem_sb(step, cur);
      }
      if (live && Probe != 1) {
        const uint32_t a = ring + s * kSlot + lane_off;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          cur.qa[u] = bulk_ptx::lds128(a + u * 64);
          cur.qb[u] = bulk_ptx::lds128(a + kOff8 + u * 64);
        }
      }
      __syncwarp();
      if (lane == 0) bulk_ptx::mbar_arrive(empty0 + 8 * s);  // the weights are in registers
      s += kGroups;
      if (s >= stages) s -= stages, ph ^= 1;
      if (live && Probe != 1) {
        stream_step<GS, U, T, P>(L, step, xrow, xstride, sxrow, g, cur, acc_a, acc_b, fxrow);
      }
#pragma unroll
      for (int i = 0; i < S::kSbWords && !SbSmem; ++i) {
        cur.sb[i] = n1.sb[i];
        if (Ahead == 2) n1.sb[i] = n2.sb[i];
      }
      if (!more || nx.tl != at.tl) {  // this warp's last piece of the tile
        if constexpr (GS != 128) {
          acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 1);
          acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 1);
        }
        if ((t & 1) == 0 && om < M) {
          float* r = red + ((at.tl * kBulkWarps + wi) * M + om) * 16;
          r[g] += acc_a;
          r[g + 8] += acc_b;
        }
        acc_a = acc_b = 0.f;
        if constexpr (SbSmem) {  // this warp is done with the tile's scales
          __syncwarp();
          if (lane == 0) bulk_ptx::mbar_arrive(sbempty0 + 8 * sb_s);
        }
      }
      at = nx;
    }
  }
  __syncthreads();
  T* y = static_cast<T*>(p.y);
  const int outs = nt * M * 16;
  for (int o = threadIdx.x; o < outs; o += blockDim.x) {
    const int tl = o / (M * 16), rem = o - tl * M * 16, m = rem / 16, r = rem % 16;
    const float* src = red + (tl * kBulkWarps * M + m) * 16 + r;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kBulkWarps; ++w) v += src[w * M * 16];
    y[m * p.N + (T0 + tl) * 16 + r] = from_float<T>(v);
  }
#endif
}

}  // namespace mlxq::cuda
