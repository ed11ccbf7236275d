// The warp-specialized form of the fused Hopper prefill kernel (gemm_sm90.cuh: the design, the
// helpers and GemmParams) for 128 rows of W by 256 rows of x. In the register-A kernel a
// warpgroup cannot overlap its own dequantization with its products (C7513), and ncu saw its
// tensor pipe 58% busy. Here a third warpgroup only dequantizes: it reads the TMA'd packed stage,
// writes the stage's 128 x 64 tile of W in the dtype of x to shared memory in the 128-byte
// swizzled layout wgmma reads (a ring of such tiles), and two warpgroups only multiply, both
// operands from shared memory, one stage of products left in flight while the next is issued.
// Same numerics as the register-A kernel: s * q + b in one FMA of the dtype of x, products in
// fp32.
//
// The last, partial wave of 256-row tiles (448 tiles on 132 SMs at 28672 x 8192, M = 512: 3.4
// waves run as 4) can be run as twice as many 128-row half tiles (GemmParams::full: tiles
// computed whole; each later tile is two blocks, its rows of x split), which take about half as
// long; no partial sums, so the result does not depend on it.
//
// The ring (GemmWsCfg). First 5 TMA slots and 2 dequantized tiles, loads issued 3 stages ahead
// (the "52" ring). The dequantizer may write a tile only once both multipliers' products of the
// tile two stages back are complete, so it had one stage of products to write the next one in:
// any delay of its own reached the tensor cores. The default "43l" ring has 4 slots and 3 tiles
// (a stage of slack more) and issues each load once the products that free its slot are known
// complete (late: 3 ahead with 4 slots rather than 2).
//
// Measured on an H200 (benchmarks/cuda/gemm_harness.cu, bf16, group 128, ms; wstail: the
// half-tile last wave). First form, M = 512, dense cuBLAS 0.304-0.312: 28672 x 8192 0.454-0.461
// whole tiles, 0.431-0.432 wstail, against 0.512-0.530 for the register-A kernel's whole tiles
// in the same runs; 8192 x 28672 (128 tiles, one wave) 0.383-0.388 against 0.40-0.46. Leaving
// parts out (28672 x 8192): no dequantization (the packed words stored as they are) 0.395, no
// products 0.268, only the TMA loads 0.211. The rings, one run (dense / register-A / 52 / 52
// late / 43l / 52 direct / 43l direct / 43l without dequantization), wstail:
//   28672 x 8192 M=256 0.1742 / 0.2270 / 0.2313 / 0.2313 / 0.2110 / 0.2470 / 0.2277 / 0.1933
//                M=512 0.3056 / 0.5106 / 0.4298 / 0.4355 / 0.4026 / 0.4727 / 0.4355 / 0.3818
//                M=768 0.4747 / 0.7570 / 0.6573 / 0.6618 / 0.6115 / 0.7197 / 0.6575 / 0.6126
//   8192 x 28672 M=512 0.2996 / 0.4784 / 0.3873 / 0.3887 / 0.3657 / 0.4173 / 0.3704 / 0.3271
// (8192 x 28672 at M = 256 and 768 the op splits K or runs stream-K: the register-A kernel).
// With the pairs packed before each call as the op does (MLXQ_HARNESS_PACK=1, pack kernel
// included), M = 512: 28672 x 8192 0.3042 / 0.5316 / 0.4402 / 0.4450 / 0.4123 / 0.4739 /
// 0.4362 / 0.3923, 8192 x 28672 0.2988 / 0.4792 / 0.3989 / 0.3978 / 0.3752 / 0.4164 / 0.3714 /
// 0.3589. Through the op, the same run (profiler: device time of one call's kernel at M = 512,
// 28672 x 8192 / 8192 x 28672, us; the packing kernel then took 8.3-9.0 more): register-A
// 427.8 / 443.0, 52 426.0 / 415.2, 52 late 429.7 / 407.3, 43l 398.3 / 368.9, 52 direct 466.7 /
// 419.4, 43l direct 431.1 / 374.7. Direct read the arrays one stage ahead through a register copy
// that waited for each load; a second run gave it three stages in flight (a register ring named
// statically by an unrolled loop) and tried one arrival a warp for a dequantized tile
// (kWsWarpArrive) instead of one a thread. Second run, through the op, M = 512, 28672 x 8192 /
// 8192 x 28672 (profiler us; the 8-pair packing kernel 4.7-4.9 us): register-A 428.3 / 430.0,
// 52 424.3 / 429.5, 43l 393.6 / 362.9, 43l warp arrivals 404.3 / 374.3, 43l direct 435.5 /
// 376.9, both 438.7 / 382.3. CUDA-graph replay (bench_ops' timing, ms per call with the packing,
// ratio to dense cuBLAS in the same run): dense 0.3015 / 0.2978, register-A 0.4339 (1.439x) /
// 0.4242 (1.424x), 52 0.4544 / 0.4301, 43l 0.4252 (1.410x) / 0.3890 (1.306x), 43l warp
// arrivals 0.4505 / 0.4307, 43l direct 0.4736 / 0.4209, both 0.4747 / 0.4272. So the op runs
// 43l (gemm_sm90.cu); warp arrivals and direct reads stay in the harness. In that run the
// graph timings of the warp-specialized kernels came out 25-27 us a call above their profiled
// time plus the packing. The graph adds nothing (benchmarks/cuda/graph_probe.py, H200, M = 512,
// profiler over graph replays / eager calls, us): 28672 x 8192 packing 4.7 / 4.8, kernel 399.2
// / 399.6, idle before the packing 1.2 / 1.9 and before the kernel 0.4 / 2.6 (register-A 429.7 /
// 430.1); 8192 x 28672 packing 4.8 / 4.7, kernel 380.2 / 369.4. So a replayed call is the
// packing, the kernel and 1.6 us, 405.6 us at 28672 x 8192, which bench_ops then read (0.4046,
// 0.4052 ms). What moves a timing is the GPU's clock: with the card near its 700 W limit the SM
// clock read 1440-1980 MHz within one run, dense cuBLAS took 0.3077-0.3512 ms and the register-A
// kernel 0.4357-0.5137 in CUDA-graph timings seconds apart, and a kernel change measured in
// separate timings can sit inside that (bench_ops' x_vs_dense_paired times the two graphs back
// to back).
// Also measured and not used by the op (harness only): Mc, clusters of two CTAs that multicast
// x (0.55 at 28672 x 8192, 0.47 at 8192 x 28672; its TMA loads alone took 0.47 against 0.21),
// and 4 TMA slots with 3 dequantized tiles in clusters (0.56). With any ring but 5/2 (and 6/1)
// ptxas serialized the products (C7514) until the main loop was kept from unrolling.
//
// "43lt" (MLXQ_CUDA_GEMM_WS_RING=43lt; to be the op's default once it has run through
// tests/test_cuda_ops.py on a GPU): the 43l ring with the scales and biases TMA'd from
// their arrays (kWsTmaSb; boxes of 8 groups x 128 rows, a ring of two in 8 KB more shared
// memory, each box issued one box ahead by the dequantizer's thread 0), so no packing kernel
// runs before the call, and the dequantizer reads its stage's scale and bias from shared memory
// rather than a pair per stage from L2. It gained more than the packing's 4.7 us: harness, M =
// 512, two runs (dense / 43l with the packing / 43lt / pt (below) / 43lt without the
// dequantization), ms: 28672 x 8192 0.3081 / 0.4050 / 0.3857 / 0.4204 / 0.3684 and 0.3072 /
// 0.4048 / 0.3848 / 0.4143 / 0.3721; 8192 x 28672 0.2998 / 0.3656 / 0.3453 / 0.3717 / 0.3276
// and 0.3002 / 0.3660 / 0.3458 / 0.3719 / 0.3624. So 43lt is 1.25x dense at 28672 x 8192 (43l
// 1.31-1.32x) and 1.15x at 8192 x 28672 (1.22x). Not yet timed through the op (bench_ops).
//
// The persistent kernel (gemm_w4_sm90_wsp_kernel, below; rings "p" with the pairs, "pt" by
// TMA) measured slower, also at 8192 x 28672 where each CTA has one tile, so not for the
// persistence itself: it needs setmaxnreg (dequantizer 56 registers, multipliers 224: with 216
// ptxas serialized the products, C7512; without it the accumulators spilled), and its
// dequantizer at 56 registers is the likely cost (without the dequantization it equals 43l:
// 28672 x 8192 0.3864 / 0.3861 against 0.3857 / 0.3746). First device run (harness, M = 512,
// the pairs packed with each call, two runs, ms): 28672 x 8192 dense 0.3092 / 0.3078, 43l 0.4078
// / 0.4093, p 0.4334 / 0.4361, pt 0.4172 / 0.4176; 8192 x 28672 dense 0.3011 / 0.3025, 43l
// 0.3676 / 0.3684, p 0.3891 / 0.3908, pt 0.3764 / 0.3756. Through the op (benchmarks/cuda/
// wsp_ab.py, graphs timed back to back, 12 rounds, the card hot after the tests: ratio over
// dense, median (range)): 28672 x 8192 43l 1.449x (1.339-1.477), p 1.560x (1.421-1.595), pt
// 1.499x (1.373-1.530); 8192 x 28672 43l 1.339x (1.245-1.367), p 1.463x (1.338-1.530), pt
// 1.381x (1.282-1.420). It stays for benchmarks and tests (MLXQ_CUDA_GEMM_WS_RING=p / pt).
#pragma once

#include "cuda/gemm_sm90.cuh"

namespace mlxq::cuda {

// Stages: TMA slots (x and packed W); ABufs: dequantized tiles of W; Opt, bits of:
// kWsLate: each stage's load is issued once the products that free its slot are known complete
// (the bottom of the multipliers' loop), Stages - 1 stages ahead rather than Stages - 2;
// kWsDirect: the dequantizer reads the scale and bias arrays (GemmParams::scales, biases) three
// stages ahead instead of the pairs packed before the kernel (GemmParams::sb); kWsWarpArrive:
// a dequantized tile is signalled by one arrival a warp rather than one a thread.
// kWsTmaSb: the dequantizer's scales and biases by TMA from their arrays (boxes of 8 groups of
// the tile's 128 rows, a ring of two, each issued a box ahead by the dequantizer's thread 0;
// gemm_w4_sm90_wst_kernel), so that the op packs no pairs (gemm_pack_sb: a kernel before each
// call); needs G % 8 == 0 and 16-byte aligned arrays (a tensor map's row stride).
constexpr int kWsLate = 1, kWsDirect = 2, kWsWarpArrive = 4, kWsTmaSb = 8;
template <int Stages, int ABufs, int Opt = 0>
struct GemmWsCfg {
  static constexpr int kThreads = 384;                         // dequantizer + two multipliers
  static constexpr int kTileN = 128;                           // rows of W per block
  static constexpr int kNT = 256;                              // rows of x per block (whole tiles)
  static constexpr int kXBytes = kNT * kGemmTileK * 2;         // 32 KB
  static constexpr int kWBytes = kTileN * kGemmTileK / 2;      // packed W: 4 KB
  static constexpr int kStageBytes = kXBytes + kWBytes;        // one TMA slot
  static constexpr int kStages = Stages;                       // TMA ring
  static constexpr int kATileBytes = kTileN * kGemmTileK * 2;  // 16 KB dequantized W
  static constexpr int kABufs = ABufs;                         // ring of dequantized tiles
  static constexpr bool kLate = (Opt & kWsLate) != 0;
  static constexpr bool kDirect = (Opt & kWsDirect) != 0;
  static constexpr bool kWarpArrive = (Opt & kWsWarpArrive) != 0;
  static constexpr int kAhead = kLate ? Stages - 1 : Stages - 2;  // TMA stages issued ahead
  static constexpr bool kTmaSb = (Opt & kWsTmaSb) != 0;
  static constexpr int kSbGroups = 8;                          // groups of a box: 16 bytes
  static constexpr int kSbBytes = 2 * kTileN * kSbGroups * 2;  // scales, then biases: 4 KB
  static constexpr int kSbOff = kStages * kStageBytes + kABufs * kATileBytes;  // two boxes
  static constexpr int kSmemBytes = kSbOff + (kTmaSb ? 2 * kSbBytes : 0) + 1024;
  static constexpr int kOutStride = kTileN * 2 + 16;  // bytes per staged row of y
  static_assert(kStageBytes % 1024 == 0 && kATileBytes % 1024 == 0, "swizzle atoms");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
  static_assert(kNT * kOutStride <= kStages * kStageBytes, "the output tile must fit the ring");
};

#ifdef MLXQ_WGMMA
namespace sm90 {

// One wgmma.m64nNk16 with both operands from shared-memory descriptors (K-major, 128-byte
// swizzle), fp32 accumulators d (added to unless acc is 0), for TYPE "bf16" or "f16".
#define MLXQ_WGMMA_SS_REGS64                                                                      \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),    \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),  \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),  \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),  \
      "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),  \
      "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),  \
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),  \
      "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define MLXQ_WGMMA_SS_REGS128                                                                    \
  MLXQ_WGMMA_SS_REGS64, "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]),         \
      "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), \
      "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), \
      "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), \
      "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), \
      "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]),           \
      "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]),        \
      "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]),        \
      "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]),        \
      "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]),        \
      "+f"(d[127])
#define MLXQ_WGMMA_SS_D64                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63"
#define MLXQ_WGMMA_SS_D128                                                                       \
  MLXQ_WGMMA_SS_D64                                                                              \
  ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, " \
  "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, "   \
  "%100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, "   \
  "%115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

template <typename T>
struct WgmmaSS;
#define MLXQ_WGMMA_SS(CT, TYPE)                                                               \
  template <>                                                                                 \
  struct WgmmaSS<CT> {                                                                        \
    static __device__ __forceinline__ void mma(float (&d)[64], uint64_t da, uint64_t db,      \
                                               uint32_t acc) {                                \
      asm volatile(                                                                           \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                        \
          "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " MLXQ_WGMMA_SS_D64  \
          "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                  \
          : MLXQ_WGMMA_SS_REGS64                                                              \
          : "l"(da), "l"(db), "r"(acc));                                                      \
    }                                                                                         \
    static __device__ __forceinline__ void mma(float (&d)[128], uint64_t da, uint64_t db,     \
                                               uint32_t acc) {                                \
      asm volatile(                                                                           \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                       \
          "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " " MLXQ_WGMMA_SS_D128 \
          "}, %128, %129, p, 1, 1, 0, 0;\n}\n"                                                \
          : MLXQ_WGMMA_SS_REGS128                                                             \
          : "l"(da), "l"(db), "r"(acc));                                                      \
    }                                                                                         \
  };
MLXQ_WGMMA_SS(__nv_bfloat16, "bf16")
MLXQ_WGMMA_SS(__half, "f16")
#undef MLXQ_WGMMA_SS
#undef MLXQ_WGMMA_SS_REGS64
#undef MLXQ_WGMMA_SS_REGS128
#undef MLXQ_WGMMA_SS_D64
#undef MLXQ_WGMMA_SS_D128

__device__ __forceinline__ uint32_t lds16(uint32_t addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void bar_sync128(int id) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory");
}

__device__ __forceinline__ void sts128(uint32_t addr, uint32_t a, uint32_t b, uint32_t c,
                                       uint32_t d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}

// tma_2d into the same offset of the shared memory of each CTA of the cluster in `mask`,
// completing on the barrier at `bar`'s offset in each
__device__ __forceinline__ void tma_2d_mc(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                          uint32_t bar, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::"
      "cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
      : "memory");
}
// Arrive on the barrier at `bar`'s offset in CTA `rank` of the cluster
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [ra];\n}\n" ::"r"(bar),
      "r"(rank)
      : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::
                   : "memory");
}

// The multipliers of gemm_ws_tile: warpgroup 1 takes rows 0 .. 63 of the W tile, warpgroup 2
// rows 64 .. 127; thread 128 streams the stages.
template <typename T, int NTC, int Probe, typename C, bool Mc>
__device__ __forceinline__ void gemm_ws_mul(const GemmParams& p, const CUtensorMap* map_x,
                                            const CUtensorMap* map_w, int64_t m0, int64_t n0,
                                            uint32_t smem0, uint8_t* smem_gen, uint32_t rank,
                                            uint32_t bar0, uint32_t ebar0, uint32_t abar0,
                                            uint32_t aebar0) {
  constexpr int kStages = C::kStages, kAhead = C::kAhead;
  constexpr bool Late = C::kLate;
  const int tid = threadIdx.x, wg = tid >> 7, ltid = tid & 127;
  const int nst = static_cast<int>(p.K / kGemmTileK);
  const uint32_t abuf0 = smem0 + kStages * C::kStageBytes;
  const int cw = wg - 1;
  auto load_stage = [&](int s) {
    const int slot = s % kStages;
    if (s >= kStages) mbar_wait(ebar0 + 8 * slot, ((s / kStages) - 1) & 1);
    const uint32_t base = smem0 + slot * C::kStageBytes, bar = bar0 + 8 * slot;
    mbar_expect_tx(bar, NTC * kGemmTileK * 2 + C::kWBytes);
    if constexpr (Mc) {  // this CTA's half of the x tile, into both
      tma_2d_mc(base + rank * (NTC / 2) * 128, map_x, s * kGemmTileK,
                static_cast<int>(m0) + static_cast<int>(rank) * (NTC / 2), bar, 3);
    } else {
      tma_2d(base, map_x, s * kGemmTileK, static_cast<int>(m0), bar);
    }
    tma_2d(base + C::kXBytes, map_w, s * (kGemmTileK / 8), static_cast<int>(n0), bar);
  };
  if (tid == 128) {
    for (int s = 0; s < kAhead && s < nst; ++s) load_stage(s);
  }
  float d[NTC / 2];  // the first products overwrite it (scale-d 0)
  // at least one stage (K >= 64, the host's check): for a loop that may not run ptxas
  // serializes the products (C7514)
  int s = 0;
  // not unrolled: an unrolled loop had ptxas serialize the products (C7514) for every ring but
  // 5 slots and 2 tiles (and 6 and 1)
#pragma unroll 1
  do {
    // Late: issued below, into the slot of stage s - 1
    if (!Late && tid == 128 && s + kAhead < nst) load_stage(s + kAhead);
    const int slot = s % kStages, ab = s % C::kABufs;
    mbar_wait(bar0 + 8 * slot, (s / kStages) & 1);
    mbar_wait(abar0 + 8 * ab, (s / C::kABufs) & 1);
    const uint32_t xb = smem0 + slot * C::kStageBytes;
    const uint32_t wb = abuf0 + ab * C::kATileBytes + cw * (C::kATileBytes / 2);
    __syncwarp();
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (Probe & 4) continue;  // harness only: no products
      WgmmaSS<T>::mma(d, smem_desc(wb + 32 * j), smem_desc(xb + 32 * j), s > 0 || j > 0);
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    // products of stage s - 1 are complete: free its x and its tile of W
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
    if (s > 0 && ltid == 0) {
      mbar_arrive(ebar0 + 8 * ((s - 1) % kStages));
      if constexpr (Mc) mbar_arrive_cluster(ebar0 + 8 * ((s - 1) % kStages), rank ^ 1);
      mbar_arrive(aebar0 + 8 * ((s - 1) % C::kABufs));
    }
    // the other warpgroup's products of stage s - 1 complete at about the same time
    if (Late && tid == 128 && s + kAhead < nst) load_stage(s + kAhead);
  } while (++s < nst);
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  keep(d);

  // Output as in gemm_w4_sm90_kernel, staged in the TMA ring: every stage has landed and been
  // multiplied, and the dequantizer read its last W before signalling the last tile.
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
  const int lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int ra = ((tid - 128) >> 5) * 16 + g;  // row of W in the tile (warp of the multipliers)
#pragma unroll
  for (int j = 0; j < NTC / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = 8 * j + 2 * t + (e & 1), n = ra + 8 * (e >> 1);
      *reinterpret_cast<T*>(smem_gen + m * C::kOutStride + 2 * n) = from_float<T>(d[4 * j + e]);
    }
  }
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
  T* y = static_cast<T*>(p.y);
  constexpr int kChunks = C::kTileN / 8;  // 16-byte vectors per staged row
  for (int c = tid - 128; c < NTC * kChunks; c += 256) {
    const int ml = c / kChunks, nc = c % kChunks;
    const int64_t m = m0 + ml, n = n0 + 8 * nc;
    if (m >= p.M || n >= p.N) continue;
    const uint8_t* src = smem_gen + ml * C::kOutStride + 16 * nc;
    if (p.vec_out && n + 8 <= p.N) {
      *reinterpret_cast<uint4*>(y + m * p.N + n) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int i = 0; i < 8 && n + i < p.N; ++i)
        y[m * p.N + n + i] = reinterpret_cast<const T*>(src)[i];
    }
  }
}

// One tile (NTC = 256 rows of x) or half tile (128) of the warp-specialized kernel: all three
// warpgroups' parts. Mc: one of a cluster of two CTAs with the same rows of x and other rows of
// W; each loads half of the x tile into both (TMA multicast), halving the reads of x from L2,
// and a slot is reused once both CTAs' multipliers are done with it.
template <typename T, int GS, int NTC, int Probe, int Stages, int ABufs, bool Mc, int Opt>
__device__ __forceinline__ void gemm_ws_tile(const GemmParams& p, const CUtensorMap* map_x,
                                             const CUtensorMap* map_w, const CUtensorMap* map_s,
                                             const CUtensorMap* map_b, int64_t m0, int64_t n0,
                                             uint32_t smem0, uint8_t* smem_gen) {
  using C = GemmWsCfg<Stages, ABufs, Opt>;
  using Op = Wgmma<T>;
  constexpr int kStages = C::kStages;
  const int tid = threadIdx.x, wg = tid >> 7, ltid = tid & 127;
  const int nst = static_cast<int>(p.K / kGemmTileK);
  const uint32_t abuf0 = smem0 + kStages * C::kStageBytes;
  // full: a TMA stage has landed; empty: both multiplying warpgroups are done with its x (the
  // dequantizer is done with its W before it signals afull); afull: a dequantized tile is
  // written (128 arrivals, or 4: kWsWarpArrive); aempty: both multipliers' products of it are
  // complete
  __shared__ __align__(8) uint64_t full[kStages], empty[kStages], afull[C::kABufs],
      aempty[C::kABufs], sbfull[2];  // sbfull: a box of scales and biases landed (kTmaSb)
  const uint32_t bar0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
  const uint32_t sbbar0 = static_cast<uint32_t>(__cvta_generic_to_shared(sbfull));
  const uint32_t ebar0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
  const uint32_t abar0 = static_cast<uint32_t>(__cvta_generic_to_shared(afull));
  const uint32_t aebar0 = static_cast<uint32_t>(__cvta_generic_to_shared(aempty));
  if (tid == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbar_init(bar0 + 8 * i, 1);
      mbar_init(ebar0 + 8 * i, Mc ? 4 : 2);
    }
    for (int i = 0; i < C::kABufs; ++i) {
      mbar_init(abar0 + 8 * i, C::kWarpArrive ? 4 : 128);
      mbar_init(aebar0 + 8 * i, 2);
    }
    for (int i = 0; i < 2; ++i) mbar_init(sbbar0 + 8 * i, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  uint32_t rank = 0;
  if constexpr (Mc) {
    asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
    cluster_sync();  // the other CTA's barriers are initialized before loads reach them
  } else {
    __syncthreads();
  }

  if (wg == 0) {
    // The dequantizer: thread r writes row r of each stage's tile of W, 8 words of 8 values, as
    // 16-byte chunks c at chunk c ^ (r % 8) of its 128-byte row (the swizzle TMA gives x).
    const int r = ltid;
    const int64_t row = n0 + r < p.N ? n0 + r : p.N - 1;
    const uint32_t* sbr = p.sb + row * p.Gp;
    auto load_pairs = [&](int s, uint32_t (&v)[2]) {
      if (s < nst) {
        const int64_t gi = (static_cast<int64_t>(s) * kGemmTileK) >> p.group_shift;
        if constexpr (C::kDirect) {
          const int64_t i = row * p.Gp + gi;
          v[0] = __ldg(p.scales + i) | (static_cast<uint32_t>(__ldg(p.biases + i)) << 16);
          v[1] = GS == 32 ? __ldg(p.scales + i + 1) |
                                (static_cast<uint32_t>(__ldg(p.biases + i + 1)) << 16)
                          : v[0];
        } else {
          v[0] = __ldg(sbr + gi);
          v[1] = GS == 32 ? __ldg(sbr + gi + 1) : v[0];
        }
      }
    };
    // One stage: wait for its slot and a free tile, dequantize, signal the multipliers.
    auto stage = [&](int s, const uint32_t (&pr)[2]) {
      const int slot = s % kStages, ab = s % C::kABufs;
      if (s >= C::kABufs) mbar_wait(aebar0 + 8 * ab, ((s / C::kABufs) - 1) & 1);
      mbar_wait(bar0 + 8 * slot, (s / kStages) & 1);
      const uint32_t wrow = smem0 + slot * C::kStageBytes + C::kXBytes + r * 32;
      const uint4 lo = lds128(wrow), hi = lds128(wrow + 16);
      const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      const uint32_t arow = abuf0 + ab * C::kATileBytes + r * 128;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const uint32_t v = pr[c >> 2];  // the group of values 8c .. 8c + 7
        const uint32_t sc = __byte_perm(v, 0, 0x1010), bi = __byte_perm(v, 0, 0x3232);
        uint32_t o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // values 2j, 2j + 1 of the word: byte j, both nibbles
          const uint32_t u =
              and_or<0x000F000Fu, Op::kMagic>(__byte_perm(w[c], w[c] >> 4, j | ((j + 4) << 8)));
          o[j] = (Probe & 1) ? u : Op::deq(u, sc, bi);
        }
        sts128(arow + 16 * (c ^ (r & 7)), o[0], o[1], o[2], o[3]);
      }
      // the products read the tile through the async proxy
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      if constexpr (C::kWarpArrive) {  // the warp's writes, then one arrival for them
        __syncwarp();
        if ((r & 31) == 0) mbar_arrive(abar0 + 8 * ab);
      } else {
        mbar_arrive(abar0 + 8 * ab);
      }
    };
    if constexpr (C::kTmaSb) {
      // boxes of 8 groups, kSpb stages each (the host: G % 8 == 0): thread 0 issues boxes 0
      // and 1, then box b + 1 as box b starts (its slot's box b - 1 is done: the barrier)
      constexpr int kSpb = C::kSbGroups * GS / kGemmTileK;
      const int boxes = nst / kSpb;
      const uint32_t sb0 = smem0 + C::kSbOff;
      auto load_box = [&](int b) {
        const uint32_t dst = sb0 + (b & 1) * C::kSbBytes, bar = sbbar0 + 8 * (b & 1);
        mbar_expect_tx(bar, C::kSbBytes);
        tma_2d(dst, map_s, b * C::kSbGroups, static_cast<int>(n0), bar);
        tma_2d(dst + C::kSbBytes / 2, map_b, b * C::kSbGroups, static_cast<int>(n0), bar);
      };
      if (r == 0) {
        load_box(0);
        if (boxes > 1) load_box(1);
      }
      for (int s = 0; s < nst; ++s) {
        const int b = s / kSpb;
        if (s % kSpb == 0) {
          if (b > 0) {
            bar_sync128(4);
            if (r == 0 && b + 1 < boxes) load_box(b + 1);
          }
          mbar_wait(sbbar0 + 8 * (b & 1), (b >> 1) & 1);
        }
        const int gi = (s * kGemmTileK / GS) % C::kSbGroups;  // first group of the stage
        const uint32_t a = sb0 + (b & 1) * C::kSbBytes + r * 16 + 2 * gi;
        uint32_t pr[2];
        pr[0] = lds16(a) | (lds16(a + C::kSbBytes / 2) << 16);
        pr[1] = GS == 32 ? lds16(a + 2) | (lds16(a + 2 + C::kSbBytes / 2) << 16) : pr[0];
        stage(s, pr);
      }
    } else if constexpr (!C::kDirect) {  // the pairs (in L2) one stage ahead
      uint32_t pr[2] = {0, 0}, pn[2] = {0, 0};
      load_pairs(0, pr);
      for (int s = 0; s < nst; ++s) {
        load_pairs(s + 1, pn);
        stage(s, pr);
        pr[0] = pn[0], pr[1] = pn[1];
      }
    } else {
      // The arrays (a row's 32-byte sector holds 16 groups: from HBM once every 16-32 stages)
      // kPA stages ahead, in a ring of registers that the unrolled loop names statically: a
      // register copy of a value still loading would wait for it there.
      constexpr int kPA = 3;
      uint32_t q[kPA + 1][2] = {};
#pragma unroll
      for (int i = 0; i < kPA; ++i) load_pairs(i, q[i]);
      for (int s0 = 0; s0 < nst; s0 += kPA + 1) {
#pragma unroll
        for (int u = 0; u <= kPA; ++u) {
          if (s0 + u < nst) {
            load_pairs(s0 + u + kPA, q[(u + kPA) % (kPA + 1)]);
            stage(s0 + u, q[u]);
          }
        }
      }
    }
  } else {
    gemm_ws_mul<T, NTC, Probe, C, Mc>(p, map_x, map_w, m0, n0, smem0, smem_gen, rank, bar0, ebar0,
                                      abar0, aebar0);
  }
  if constexpr (Mc) cluster_sync();  // no CTA leaves while the other may still arrive on it
}

}  // namespace sm90
#endif

// Tiles: tile t covers rows of x (t % tiles_m) * 256 and rows of W (t / tiles_m) * 128 (Mc:
// * 256, the CTA of rank r of cluster t taking rows + 128 r). Blocks (Mc: clusters) b < p.full
// compute tile b; block p.full + 2 i + h computes half h (rows of x + 128 h, 128 of them) of
// tile p.full + i; with p.ragged, block p.full + 2 (tiles - full) + j computes the last 1-128
// rows of x (from tiles_m * 256) against rows of W j * 128 as a half tile, so that a partial
// tile of x costs a half tile rather than a whole one of mostly absent rows. map_x boxes 256 rows
// of x (Mc: 128), map_xh 128 (Mc: 64).
template <typename T, int GS, int Probe, int Stages, int ABufs, bool Mc, int Opt>
__device__ __forceinline__ void gemm_ws_body(const GemmParams& p, const CUtensorMap* map_x,
                                             const CUtensorMap* map_xh, const CUtensorMap* map_w,
                                             const CUtensorMap* map_s = nullptr,
                                             const CUtensorMap* map_b = nullptr) {
#ifdef MLXQ_WGMMA
  using C = GemmWsCfg<Stages, ABufs, Opt>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t smem0 = (raw + 1023u) & ~1023u;
  uint8_t* smem_gen = smem_raw + (smem0 - raw);
  const int64_t blk = Mc ? blockIdx.x / 2 : blockIdx.x;
  const int64_t tile_n = Mc ? 2 * C::kTileN : C::kTileN;
  const int64_t n_off = Mc ? (blockIdx.x % 2) * C::kTileN : 0;
  if (blk < p.full) {
    const int64_t m0 = (blk % p.tiles_m) * C::kNT;
    const int64_t n0 = (blk / p.tiles_m) * tile_n + n_off;
    sm90::gemm_ws_tile<T, GS, 256, Probe, Stages, ABufs, Mc, Opt>(p, map_x, map_w, map_s, map_b, m0,
                                                                  n0, smem0, smem_gen);
  } else {
    const int64_t h = blk - p.full, halves = 2 * (p.tiles - p.full);
    int64_t m0, n0;
    if (!p.ragged || h < halves) {
      const int64_t tile = p.full + h / 2;
      m0 = (tile % p.tiles_m) * C::kNT + 128 * (h % 2);
      n0 = (tile / p.tiles_m) * tile_n + n_off;
    } else {  // ragged: the last rows of x
      m0 = p.tiles_m * C::kNT;
      n0 = (h - halves) * tile_n + n_off;
    }
    if (m0 >= p.M) return;  // a half tile past M (both CTAs of a cluster)
    sm90::gemm_ws_tile<T, GS, 128, Probe, Stages, ABufs, Mc, Opt>(p, map_xh, map_w, map_s, map_b,
                                                                  m0, n0, smem0, smem_gen);
  }
#else
  __trap();  // the host only launches this kernel on sm_90 with the sm_90a build
#endif
}

// Probe (harness only): 1 skips the dequantization (the packed words as they are), 4 the
// products.
template <typename T, int GS, int Probe = 0, int Stages = 5, int ABufs = 2, int Opt = 0>
__global__ void __launch_bounds__(384, 1)
    gemm_w4_sm90_ws_kernel(const GemmParams p, const __grid_constant__ CUtensorMap map_x,
                           const __grid_constant__ CUtensorMap map_xh,
                           const __grid_constant__ CUtensorMap map_w) {
  gemm_ws_body<T, GS, Probe, Stages, ABufs, false, Opt>(p, &map_x, &map_xh, &map_w);
}
// The same with the scales and biases by TMA (kWsTmaSb in Opt): map_s / map_b, the [N, G] arrays
// in boxes of 8 groups x 128 rows
template <typename T, int GS, int Probe = 0, int Stages = 4, int ABufs = 3, int Opt = 0>
__global__ void __launch_bounds__(384, 1)
    gemm_w4_sm90_wst_kernel(const GemmParams p, const __grid_constant__ CUtensorMap map_x,
                            const __grid_constant__ CUtensorMap map_xh,
                            const __grid_constant__ CUtensorMap map_w,
                            const __grid_constant__ CUtensorMap map_s,
                            const __grid_constant__ CUtensorMap map_b) {
  gemm_ws_body<T, GS, Probe, Stages, ABufs, false, Opt>(p, &map_x, &map_xh, &map_w, &map_s, &map_b);
}
// The same in clusters of two CTAs that share their x tiles (Mc above)
template <typename T, int GS, int Probe = 0, int Stages = 5, int ABufs = 2, int Opt = 0>
__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(384, 1)
    gemm_w4_sm90_wsmc_kernel(const GemmParams p, const __grid_constant__ CUtensorMap map_x,
                             const __grid_constant__ CUtensorMap map_xh,
                             const __grid_constant__ CUtensorMap map_w) {
  gemm_ws_body<T, GS, Probe, Stages, ABufs, true, Opt>(p, &map_x, &map_xh, &map_w);
}

// The persistent form (gemm_w4_sm90_wsp_kernel; measured slower: the header): one CTA per
// multiprocessor (grid = min(SMs,
// units)), each taking the units b, b + grid, ... of the same list (whole tiles, then the half
// tiles of the last partial wave, as gemm_w4_sm90_ws_kernel's blocks), with the 43l ring counted
// across its units: the loads and the dequantization of a unit's first stages run while the
// multipliers write out the previous unit (the non-persistent kernel starts each block with an
// empty ring and ends it with idle tensor cores). y is staged in a buffer of its own (64 rows of
// x a pass per warpgroup), not in the ring, which holds the next unit's stages by then.
// kWsTmaSb as for gemm_w4_sm90_wst_kernel; without it the packed pairs (GemmParams::sb).
template <int Opt>
struct GemmWspCfg {
  using R = GemmWsCfg<4, 3, kWsLate>;                             // the ring of "43l"
  static constexpr int kThreads = 384;                            // dequantizer + two multipliers
  static constexpr int kSbGroups = 8;                             // groups of a box: a 16-byte row
  static constexpr int kSbBytes = 2 * R::kTileN * kSbGroups * 2;  // scales, then biases: 4 KB
  static constexpr int kOutRows = 64;                             // rows of x a pass of the output
  static constexpr int kOutStride = 64 * 2 + 16;  // a warpgroup's 64 values of a row, padded
  static constexpr int kSbOff = R::kStages * R::kStageBytes + R::kABufs * R::kATileBytes;
  static constexpr int kOutOff = kSbOff + 2 * kSbBytes;
  static constexpr int kSmemBytes = kOutOff + 2 * kOutRows * kOutStride + 1024;
  static constexpr bool kTmaSb = (Opt & kWsTmaSb) != 0;
  // registers a thread of the dequantizer / of the multipliers (setmaxnreg), out of the 168 of
  // 384 threads
  static constexpr int kDeqRegs = 56, kMulRegs = 224;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
  static_assert(128 * kDeqRegs + 256 * kMulRegs <= 384 * 168, "register file");
};

#ifdef MLXQ_WGMMA
namespace sm90 {

// A unit of the persistent kernel: a whole tile (256 rows of x from m0, 128 of W from n0) or a
// half tile (128 rows of x); live: there is one. 32-bit (the host checks the sizes): its
// divisions stay short.
struct WspUnit {
  int u, m0, n0;
  bool half, live;
};
// The first unit u, u + grid, ... that has rows of x (a half tile can start past M)
__device__ __forceinline__ WspUnit wsp_unit(const GemmParams& p, int u) {
  const int full = static_cast<int>(p.full), tiles_m = static_cast<int>(p.tiles_m);
  const int units = full + 2 * (static_cast<int>(p.tiles) - full);
  WspUnit it{0, 0, 0, false, false};
  for (; u < units; u += gridDim.x) {
    const bool half = u >= full;
    const int tile = half ? full + (u - full) / 2 : u;
    const int tm = tile / tiles_m;
    const int m0 = (tile - tm * tiles_m) * 256 + (half ? 128 * ((u - full) & 1) : 0);
    if (m0 < p.M) return WspUnit{u, m0, tm * 128, half, true};
  }
  return it;
}

// Thread 128's TMA load of stage ls of unit it into the ring's slot of the CTA's stage lg,
// once the stage that held it has left (both multipliers' products complete).
template <typename C>
__device__ __forceinline__ void wsp_load(const CUtensorMap* map_x, const CUtensorMap* map_xh,
                                         const CUtensorMap* map_w, const WspUnit& it, int ls,
                                         int lg, uint32_t smem0, uint32_t bar0, uint32_t ebar0) {
  using R = typename C::R;
  const int slot = lg % R::kStages;
  if (lg >= R::kStages) mbar_wait(ebar0 + 8 * slot, ((lg / R::kStages) - 1) & 1);
  const uint32_t base = smem0 + slot * R::kStageBytes, bar = bar0 + 8 * slot;
  mbar_expect_tx(bar, (it.half ? 128 : 256) * kGemmTileK * 2 + R::kWBytes);
  tma_2d(base, it.half ? map_xh : map_x, ls * kGemmTileK, it.m0, bar);
  tma_2d(base + R::kXBytes, map_w, ls * (kGemmTileK / 8), it.n0, bar);
}

// The multipliers' part of unit `it` (NTC rows of x): its stages are the CTA's g .. g + nst - 1
// in the ring; at the bottom of stage s thread 128 loads stage s + kAhead, of `nx` (the CTA's
// next unit) past the end of this one (nst >= kAhead: the host).
template <typename T, int NTC, int Probe, typename C>
__device__ __forceinline__ void wsp_mul(const GemmParams& p, const CUtensorMap* map_x,
                                        const CUtensorMap* map_xh, const CUtensorMap* map_w,
                                        const WspUnit& it, const WspUnit& nx, int g, int nst,
                                        uint32_t smem0, uint8_t* out, uint32_t bar0, uint32_t ebar0,
                                        uint32_t abar0, uint32_t aebar0) {
  using R = typename C::R;
  constexpr int kStages = R::kStages, kABufs = R::kABufs, kAhead = R::kAhead;
  const int tid = threadIdx.x, ltid = tid & 127, cw = (tid >> 7) - 1;
  const uint32_t abuf0 = smem0 + kStages * R::kStageBytes;
  float d[NTC / 2];  // the first products overwrite it (scale-d 0)
  int s = 0;
  // not unrolled (C7514, gemm_ws_mul)
#pragma unroll 1
  do {
    const int gs = g + s, slot = gs % kStages, ab = gs % kABufs;
    mbar_wait(bar0 + 8 * slot, (gs / kStages) & 1);
    mbar_wait(abar0 + 8 * ab, (gs / kABufs) & 1);
    const uint32_t xb = smem0 + slot * R::kStageBytes;
    const uint32_t wb = abuf0 + ab * R::kATileBytes + cw * (R::kATileBytes / 2);
    __syncwarp();
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (Probe & 4) continue;  // harness only: no products
      WgmmaSS<T>::mma(d, smem_desc(wb + 32 * j), smem_desc(xb + 32 * j), s > 0 || j > 0);
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
    if (s > 0 && ltid == 0) {  // products of stage s - 1 complete: free its slot and tile
      mbar_arrive(ebar0 + 8 * ((gs - 1) % kStages));
      mbar_arrive(aebar0 + 8 * ((gs - 1) % kABufs));
    }
    if (tid == 128) {
      const int ls = s + kAhead;
      if (ls < nst) {
        wsp_load<C>(map_x, map_xh, map_w, it, ls, gs + kAhead, smem0, bar0, ebar0);
      } else if (nx.live) {
        wsp_load<C>(map_x, map_xh, map_w, nx, ls - nst, gs + kAhead, smem0, bar0, ebar0);
      }
    }
  } while (++s < nst);
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  keep(d);
  if (ltid == 0) {  // the last stage's slot and tile, for the next unit
    mbar_arrive(ebar0 + 8 * ((g + nst - 1) % kStages));
    mbar_arrive(aebar0 + 8 * ((g + nst - 1) % kABufs));
  }

  // y, 64 rows of x a pass: the warpgroup's 64 x 64 values into its buffer, then 16-byte
  // vectors along the rows of y
  const int lane = tid & 31, gq = lane >> 2, t = lane & 3;
  const int ra = (ltid >> 5) * 16 + gq;  // row of W in the warpgroup's 64
  uint8_t* buf = out + cw * (C::kOutRows * C::kOutStride);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int c = 0; c < NTC / 64; ++c) {
    bar_sync128(2 + cw);  // the previous pass has read the buffer
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = 8 * j + 2 * t + (e & 1), n = ra + 8 * (e >> 1);
        *reinterpret_cast<T*>(buf + m * C::kOutStride + 2 * n) =
            from_float<T>(d[4 * (8 * c + j) + e]);
      }
    }
    bar_sync128(2 + cw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = ltid + 128 * i, ml = idx >> 3, nc = idx & 7;
      const int64_t m = it.m0 + 64 * c + ml, n = it.n0 + 64 * cw + 8 * nc;
      if (m >= p.M || n >= p.N) continue;
      const uint8_t* src = buf + ml * C::kOutStride + 16 * nc;
      if (p.vec_out && n + 8 <= p.N) {
        *reinterpret_cast<uint4*>(y + m * p.N + n) = *reinterpret_cast<const uint4*>(src);
      } else {
        for (int k = 0; k < 8 && n + k < p.N; ++k)
          y[m * p.N + n + k] = reinterpret_cast<const T*>(src)[k];
      }
    }
  }
}

}  // namespace sm90
#endif

// Probe (harness only): 1 skips the dequantization, 4 the products. map_s / map_b: the [N, G]
// scales and biases, boxes of 8 groups x 128 rows (kWsTmaSb; unused otherwise).
template <typename T, int GS, int Probe = 0, int Opt = 0>
__global__ void __launch_bounds__(384, 1)
    gemm_w4_sm90_wsp_kernel(const GemmParams p, const __grid_constant__ CUtensorMap map_x,
                            const __grid_constant__ CUtensorMap map_xh,
                            const __grid_constant__ CUtensorMap map_w,
                            const __grid_constant__ CUtensorMap map_s,
                            const __grid_constant__ CUtensorMap map_b) {
#ifdef MLXQ_WGMMA
  using namespace sm90;
  using C = GemmWspCfg<Opt>;
  using R = typename C::R;
  using Op = Wgmma<T>;
  constexpr int kStages = R::kStages, kABufs = R::kABufs;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t smem0 = (raw + 1023u) & ~1023u;
  uint8_t* smem_gen = smem_raw + (smem0 - raw);
  const int tid = threadIdx.x, wg = tid >> 7, ltid = tid & 127;
  const int nst = static_cast<int>(p.K / kGemmTileK);
  const uint32_t abuf0 = smem0 + kStages * R::kStageBytes;
  // full, empty, afull, aempty as in gemm_ws_tile; sbfull: a box of scales and biases landed
  __shared__ __align__(8) uint64_t full[kStages], empty[kStages], afull[kABufs], aempty[kABufs],
      sbfull[2];
  const uint32_t bar0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
  const uint32_t ebar0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
  const uint32_t abar0 = static_cast<uint32_t>(__cvta_generic_to_shared(afull));
  const uint32_t aebar0 = static_cast<uint32_t>(__cvta_generic_to_shared(aempty));
  const uint32_t sbbar0 = static_cast<uint32_t>(__cvta_generic_to_shared(sbfull));
  if (tid == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbar_init(bar0 + 8 * i, 1);
      mbar_init(ebar0 + 8 * i, 2);
    }
    for (int i = 0; i < kABufs; ++i) {
      mbar_init(abar0 + 8 * i, 128);
      mbar_init(aebar0 + 8 * i, 2);
    }
    for (int i = 0; i < 2; ++i) mbar_init(sbbar0 + 8 * i, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // The dequantizer (gemm_ws_tile's), over the CTA's units and their stages in turn
    if constexpr (C::kDeqRegs > 0) {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(C::kDeqRegs));
    }
    const int r = ltid;
    const uint32_t sb0 = smem0 + C::kSbOff;
    // One stage (the CTA's g-th): wait for its slot and a free tile, dequantize, signal.
    auto stage = [&](int g, const uint32_t (&pr)[2]) {
      const int slot = g % kStages, ab = g % kABufs;
      if (g >= kABufs) mbar_wait(aebar0 + 8 * ab, ((g / kABufs) - 1) & 1);
      mbar_wait(bar0 + 8 * slot, (g / kStages) & 1);
      const uint32_t wrow = smem0 + slot * R::kStageBytes + R::kXBytes + r * 32;
      const uint4 lo = lds128(wrow), hi = lds128(wrow + 16);
      const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      const uint32_t arow = abuf0 + ab * R::kATileBytes + r * 128;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const uint32_t v = pr[c >> 2];  // the group of values 8c .. 8c + 7
        const uint32_t sc = __byte_perm(v, 0, 0x1010), bi = __byte_perm(v, 0, 0x3232);
        uint32_t o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t u =
              and_or<0x000F000Fu, Op::kMagic>(__byte_perm(w[c], w[c] >> 4, j | ((j + 4) << 8)));
          o[j] = (Probe & 1) ? u : Op::deq(u, sc, bi);
        }
        sts128(arow + 16 * (c ^ (r & 7)), o[0], o[1], o[2], o[3]);
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      mbar_arrive(abar0 + 8 * ab);
    };
    int g = 0;
    if constexpr (C::kTmaSb) {
      // Boxes of 8 groups, kSpb stages each, bpu = nst / kSpb a unit (the host: G % 8 == 0).
      // Thread 0 issues the CTA's box q + 1 as box q starts (its slot's box q - 1 is done by
      // then: the barrier); boxes 0 and 1 before the first.
      constexpr int kSpb = C::kSbGroups * GS / kGemmTileK;
      const int bpu = nst / kSpb;
      auto load_box = [&](const WspUnit& u, int b, int q) {
        const uint32_t dst = sb0 + (q & 1) * C::kSbBytes, bar = sbbar0 + 8 * (q & 1);
        mbar_expect_tx(bar, C::kSbBytes);
        tma_2d(dst, &map_s, b * C::kSbGroups, u.n0, bar);
        tma_2d(dst + C::kSbBytes / 2, &map_b, b * C::kSbGroups, u.n0, bar);
      };
      WspUnit it = wsp_unit(p, blockIdx.x);
      if (ltid == 0 && it.live) {
        load_box(it, 0, 0);
        const WspUnit nx = bpu > 1 ? it : wsp_unit(p, it.u + gridDim.x);
        if (nx.live) load_box(nx, bpu > 1 ? 1 : 0, 1);
      }
      int q = 0;
      while (it.live) {
        const WspUnit nx = wsp_unit(p, it.u + gridDim.x);
        for (int s = 0; s < nst; ++s, ++g) {
          if (s % kSpb == 0) {
            if (q > 0) {
              bar_sync128(4);
              const int b = s / kSpb + 1;
              if (ltid == 0) {
                if (b < bpu) {
                  load_box(it, b, q + 1);
                } else if (nx.live) {
                  load_box(nx, 0, q + 1);
                }
              }
            }
            mbar_wait(sbbar0 + 8 * (q & 1), (q >> 1) & 1);
            ++q;
          }
          const int gi = (s * kGemmTileK / GS) % C::kSbGroups;  // first group of the stage
          const uint32_t a = sb0 + ((q - 1) & 1) * C::kSbBytes + r * 16 + 2 * gi;
          uint32_t pr[2];
          pr[0] = lds16(a) | (lds16(a + C::kSbBytes / 2) << 16);
          pr[1] = GS == 32 ? lds16(a + 2) | (lds16(a + 2 + C::kSbBytes / 2) << 16) : pr[0];
          stage(g, pr);
        }
        it = nx;
      }
    } else {
      for (WspUnit it = wsp_unit(p, blockIdx.x); it.live; it = wsp_unit(p, it.u + gridDim.x)) {
        const int64_t row = it.n0 + r < p.N ? it.n0 + r : p.N - 1;
        const uint32_t* sbr = p.sb + row * p.Gp;
        auto pairs = [&](int s, uint32_t (&v)[2]) {  // the pairs (in L2) one stage ahead
          if (s < nst) {
            const int gi = s * kGemmTileK / GS;
            v[0] = __ldg(sbr + gi);
            v[1] = GS == 32 ? __ldg(sbr + gi + 1) : v[0];
          }
        };
        uint32_t pr[2] = {0, 0}, pn[2] = {0, 0};
        pairs(0, pr);
        for (int s = 0; s < nst; ++s, ++g) {
          pairs(s + 1, pn);
          stage(g, pr);
          pr[0] = pn[0], pr[1] = pn[1];
        }
      }
    }
  } else {
    // The multipliers; thread 128 also streams the stages, kAhead ahead, across units.
    if constexpr (C::kMulRegs > 0) {
      asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(C::kMulRegs));
    }
    WspUnit it = wsp_unit(p, blockIdx.x);
    if (tid == 128) {
      for (int i = 0; i < R::kAhead && it.live; ++i) {
        wsp_load<C>(&map_x, &map_xh, &map_w, it, i, i, smem0, bar0, ebar0);
      }
    }
    uint8_t* out = smem_gen + C::kOutOff;
    for (int g = 0; it.live; g += nst) {
      const WspUnit nx = wsp_unit(p, it.u + gridDim.x);
      if (it.half) {
        wsp_mul<T, 128, Probe, C>(p, &map_x, &map_xh, &map_w, it, nx, g, nst, smem0, out, bar0,
                                  ebar0, abar0, aebar0);
      } else {
        wsp_mul<T, 256, Probe, C>(p, &map_x, &map_xh, &map_w, it, nx, g, nst, smem0, out, bar0,
                                  ebar0, abar0, aebar0);
      }
      it = nx;
    }
  }
#else
  __trap();  // the host only launches this kernel on sm_90 with the sm_90a build
#endif
}

// Whole tiles (GemmParams::full) for the warp-specialized kernel: all of them, except the last
// partial wave's when its tiles as half tiles fit one wave of the SMs (Mc: sms = the clusters
// that run at once).
inline int64_t gemm_ws_full(int64_t tiles, int64_t sms) {
  const int64_t rem = tiles % sms;
  return tiles > sms && rem > 0 && 2 * rem <= sms ? tiles - rem : tiles;
}

}  // namespace mlxq::cuda
