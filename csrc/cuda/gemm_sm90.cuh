// The fused Hopper prefill kernel (wgmma, sm_90a) for 4-bit affine weights with fp16/bf16 x and
// scales of the same dtype: y = x @ W.T with W dequantized on chip, never in global memory.
// Plain CUDA C++ (no ATen types): gemm_sm90.cu launches it for the op,
// benchmarks/cuda/gemm_harness.cu on its own.
//
// A block computes a 64*WGS (rows of W) x NT (rows of x: 64, 128 or 256) tile of y^T with WGS
// warpgroups (64 rows of W each, one wgmma.m64nNTk16 per 16 values of K). Thread 0 streams
// stages of 64 values of K (an NT x 64 tile of x in the 128-byte swizzled layout wgmma reads,
// and the tile of packed W) by TMA into a ring of shared memory, completing on "full" mbarriers,
// and reuses a slot once every warpgroup has arrived on its "empty" barrier. Each thread
// dequantizes its own part of W straight into the registers of wgmma's A fragment (s * q + b
// with one fp16/bf16 FMA of the exact q: the weight is rounded once to the dtype of x, as the
// tiles of the cuBLAS path and MLX's GEMM are); B (x) is read from shared memory; products are
// summed in fp32. Compared with dequantizing into shared memory (the previous version: a 16 KB
// store, a proxy fence and a barrier per stage before the tensor cores could start), this
// measured 1.5x faster at M = 32 and 1.02-1.04x at M = 128-512 on an H200 (28672 x 8192; 1.1x at
// 8192 x 28672, M = 512; with the 64-row x tiles and the K split of gemm_split_plan). A warpgroup
// waits for its own products before it dequantizes the next stage: ptxas serializes every wgmma
// if the registers of a later one are written while earlier ones are in flight (C7513), so the
// overlap comes from the other warpgroups. The output tile is staged in shared memory so that y is
// written in whole 16-byte vectors along its rows.
#pragma once

#include <cuda.h>
#include <stdint.h>

#include "cuda/kernels.cuh"
#include "cuda/mbarrier.cuh"

namespace mlxq::cuda {

constexpr int kGemmTileK = 64;  // values of K per stage: a 128-byte row of x

// NT rows of x per block (the wgmma N), WGS warpgroups, Occ blocks per multiprocessor. As many
// stages as fit in the shared memory of one block (227 KB, or half of 228 KB less 1 KB per block
// for two), at most 8; the output tile (NT rows of 64*WGS values, rows padded by 16 bytes) reuses
// the ring.
template <int NT, int WGS, int Occ>
struct GemmCfg {
  static constexpr int kThreads = 128 * WGS;               // WGS warpgroups
  static constexpr int kTileN = 64 * WGS;                  // rows of W per block
  static constexpr int kXBytes = NT * kGemmTileK * 2;      // 8, 16 or 32 KB
  static constexpr int kWBytes = kTileN * kGemmTileK / 2;  // packed W: 4 KB per 128 rows
  static constexpr int kStageBytes = kXBytes + kWBytes;
  static constexpr int kBudget = (Occ == 1 ? 227 * 1024 : 113 * 1024) - 1024 - 256;
  static constexpr int kStages = kBudget / kStageBytes < 8 ? kBudget / kStageBytes : 8;
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + alignment of the ring
  static constexpr int kAcc = NT / 2;                              // fp32 accumulators a thread
  static constexpr int kOutStride = kTileN * 2 + 16;               // bytes per staged row of y
  static_assert(kStageBytes % 1024 == 0, "x tiles must stay 1024-byte aligned (swizzle atom)");
  static_assert(kStages >= 3, "too few stages");
  static_assert(NT * kOutStride <= kStages * kStageBytes, "the output tile must fit the ring");
};

struct GemmParams {
  const uint32_t* w;   // [N, K / 8]
  const uint32_t* sb;  // [N, Gp]: scale in the low half, bias in the high half (dtype of x)
  const void* x;       // [M, K]
  void* y;             // [M, N]
  int64_t N;
  int64_t M;
  int64_t K;
  int64_t Gp;  // columns of sb
  int group_shift;
  int vec_out;  // y rows may be written in 16-byte vectors (N % 8 == 0, y 16-byte aligned)
  // Tiles: tile t covers rows of x (t % tiles_m) * NT and rows of W (t / tiles_m) * 64*WGS.
  // Block b < full computes tile b over all of K; the others split the stages of the remaining
  // tiles `split` ways (block full + r * split + part: tile full + r, part `part` of K), write
  // fp32 partial tiles to ws ([r][part][accumulator / 4][thread], float4) and count themselves in
  // counters[r]; the last of a tile sums the partials in part order (the same sum whichever
  // block is last), writes y and resets its counter to 0 for the next launch.
  int64_t tiles_m;
  int64_t full;
  int split;
  float* ws;
  int* counters;
  // Stream-K (gemm_sm90_sk.cuh; full and split unused there): the tiles' stages of K in one
  // sequence (tile t's stage k is iteration t * (K / 64) + k), cut into sk equal ranges, one per
  // block; tile t covers rows of x (t / (tiles / tiles_m)) * NT and rows of W
  // (t % (tiles / tiles_m)) * 64*WGS (xmajor 1), or the order above (xmajor 0).
  int64_t tiles;
  int64_t sk;
  int xmajor;
  // [N, Gp] scales and biases (dtype of x), read instead of sb by the warp-specialized kernel's
  // kWsDirect form (gemm_sm90_ws.cuh; harness only)
  const uint16_t* scales = nullptr;
  const uint16_t* biases = nullptr;
  // Warp-specialized kernel (gemm_sm90_ws.cuh): 1 where the last rows of x, 1-128 of them past
  // tiles_m whole tiles, run as one half tile a row of W tiles after the others (ragged M)
  int ragged = 0;
};

// The K split of gemm_split_plan: a launch of fewer tiles than half the multiprocessors leaves
// most of them idle; splitting each tile's K over up to 4 blocks (parts of at least 4096 values)
// fills them (8192 x 28672 at M = 32: 64 tiles, 0.15 instead of 0.26 ms on an H200). Splitting only
// the last, partial wave of a larger launch measured slower (28672 x 8192, M = 512: 0.49 instead of
// 0.44 ms), and so did splitting blocks that would share a multiprocessor, so neither is done.
struct GemmSplit {
  int64_t full;  // tiles computed whole
  int split;     // blocks per remaining tile (1: none)
  int64_t rem;   // remaining tiles
  int64_t ws_floats(int NT, int tile_n) const { return rem * split * NT * tile_n; }
};
// Stream-K blocks (gemm_sm90_sk.cuh), 0 where it does not pay. It pays where the last wave of
// whole tiles would leave many multiprocessors idle: one block per multiprocessor, each with an
// equal share of the stages. Measured on an H200 (benchmarks/cuda/gemm_harness.cu, 256 x 128
// blocks, bf16, ms, one run; whole tiles / stream-K / dense cuBLAS): 8192 x 28672 M=768 (192
// tiles, 1.45 waves run as 2) 0.755/0.632/0.451. Where the last wave is fuller, the cost of the
// stream-K kernel's pieces (and of its loop over them, about 10% per tile in the same run) ate
// the gain: 28672 x 8192 M=256 (1.7 waves) 0.220/0.241, M=512 (3.4) 0.443/0.448, M=768 (5.1)
// 0.672/0.645. So only where whole waves would waste at least 30%. Measured again later on an
// H200: the harness put stream-K ahead at 28672 x 8192 M=512 (3.4 waves; 0.431-0.437 against
// 0.451-0.476 whole tiles, four runs) and M=768 (0.628-0.635 against 0.687-0.72), but through the
// op (bench_ops, CUDA-graph replay, two runs) M=512 took 0.4418-0.4420 ms with stream-K and
// 0.4371-0.4385 with whole tiles, so the rule stayed. Also measured there (harness, M=512) and
// not kept: each warpgroup dequantizing the next stage into a second A fragment while its
// products of this stage run (ptxas did not serialize it), then waiting for them (whole tiles
// 0.458 against 0.481 in the same run, stream-K 0.456 against 0.437) or keeping one stage of
// products in flight (wgmma.wait_group 1: 0.461 against 0.476, stream-K 0.456 against 0.431):
// mixed, and within the harness's spread. ncu put the whole-tile kernel's tensor pipe at 58%
// busy (72% without the dequantization), its warps mostly waiting for their own products
// (WARPGROUP.DEPBAR: 36% of the stall samples).
inline int64_t gemm_sk_blocks(int64_t tiles, int64_t sms, int64_t stages) {
  if (tiles <= sms || tiles * stages < sms) return 0;
  const int64_t waves = (tiles + sms - 1) / sms;
  return 10 * waves * sms >= 13 * tiles ? sms : 0;
}
inline GemmSplit gemm_split_plan(int64_t tiles, int64_t sms, int64_t stages) {
  if (tiles <= 0 || 2 * tiles > sms) return {tiles, 1, 0};
  int64_t s = sms / tiles;
  if (s > 4) s = 4;
  if (s > stages / 64) s = stages / 64;  // parts of at least 4096 values of K
  if (s < 2) return {tiles, 1, 0};
  return {0, static_cast<int>(s), tiles};
}

// out[i] = (s[i], b[i]) for i < n: the [N, G] scale and bias arrays as (scale, bias) pairs; 8
// pairs a thread in 16-byte vectors where vec. At 28672 x 8192, group 128 (14.7 MB moved) on an
// H200 (profiler, prefill_rings.py) it takes 4.7-4.9 us; the previous form (a pair a thread, rows
// padded, a 64-bit division per pair) took 8.3-9.0, 2% of the M = 512 call.
__global__ void gemm_pack_sb_kernel(const uint16_t* s, const uint16_t* b, uint32_t* out, int64_t n,
                                    int vec) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = vec ? 8 * t : t;
  if (vec && i + 8 <= n) {
    const uint4 sv = *reinterpret_cast<const uint4*>(s + i);
    const uint4 bv = *reinterpret_cast<const uint4*>(b + i);
    uint4* o = reinterpret_cast<uint4*>(out + i);
    o[0] = make_uint4(__byte_perm(sv.x, bv.x, 0x5410), __byte_perm(sv.x, bv.x, 0x7632),
                      __byte_perm(sv.y, bv.y, 0x5410), __byte_perm(sv.y, bv.y, 0x7632));
    o[1] = make_uint4(__byte_perm(sv.z, bv.z, 0x5410), __byte_perm(sv.z, bv.z, 0x7632),
                      __byte_perm(sv.w, bv.w, 0x5410), __byte_perm(sv.w, bv.w, 0x7632));
    return;
  }
  for (int64_t j = i; j < n && j < i + (vec ? 8 : 1); ++j) {
    out[j] = static_cast<uint32_t>(s[j]) | (static_cast<uint32_t>(b[j]) << 16);
  }
}
inline void gemm_pack_sb(const uint16_t* s, const uint16_t* b, uint32_t* out, int64_t n,
                         cudaStream_t stream) {
  if (n <= 0) return;
  const bool vec = (reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(b) |
                    reinterpret_cast<uintptr_t>(out)) %
                       16 ==
                   0;
  const int64_t threads = vec ? (n + 7) / 8 : n;
  gemm_pack_sb_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
      s, b, out, n, vec ? 1 : 0);
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MLXQ_WGMMA 1
#endif

#ifdef MLXQ_WGMMA
namespace sm90 {

using mbarrier_ptx::mbar_arrive;
using mbarrier_ptx::mbar_expect_tx;
using mbarrier_ptx::mbar_init;
using mbarrier_ptx::mbar_wait;
// A 2-D box of `map` at (c0 innermost, c1) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                       uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}

// One wgmma.m64nNk16 with A from registers (the 4 registers of the thread's fragment), B from a
// shared-memory descriptor, fp32 accumulators d (scale-d 1), for TYPE "bf16" or "f16".
#define MLXQ_WGMMA_RS_M64N64K16(TYPE)                                                              \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE                                  \
      " "                                                                                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                         \
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                         \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));

#define MLXQ_WGMMA_RS_M64N128K16(TYPE)                                                             \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE                                 \
      " "                                                                                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "      \
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "      \
      "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                                   \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), \
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), \
        "+f"(d[63])                                                                                \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));

#define MLXQ_WGMMA_RS_M64N256K16(TYPE)                                                             \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE                                 \
      " "                                                                                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "      \
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "      \
      "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, "      \
      "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, "      \
      "%87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, "        \
      "%103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, "       \
      "%117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "                        \
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"                                           \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), \
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), \
        "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), \
        "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), \
        "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), \
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), \
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), \
        "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),          \
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),        \
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),        \
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),        \
        "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])         \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));

template <typename T>
struct Wgmma;
template <>
struct Wgmma<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128 | v
  static __device__ __forceinline__ uint32_t deq(uint32_t u, uint32_t s2, uint32_t b2) {
    const __nv_bfloat162 q =
        __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&u), __floats2bfloat162_rn(128.f, 128.f));
    const __nv_bfloat162 r = __hfma2(q, *reinterpret_cast<const __nv_bfloat162*>(&s2),
                                     *reinterpret_cast<const __nv_bfloat162*>(&b2));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  static __device__ __forceinline__ void mma(float (&d)[32], const uint32_t (&a)[4],
                                             uint64_t desc_b) {
    MLXQ_WGMMA_RS_M64N64K16("bf16");
  }
  static __device__ __forceinline__ void mma(float (&d)[64], const uint32_t (&a)[4],
                                             uint64_t desc_b) {
    MLXQ_WGMMA_RS_M64N128K16("bf16");
  }
  static __device__ __forceinline__ void mma(float (&d)[128], const uint32_t (&a)[4],
                                             uint64_t desc_b) {
    MLXQ_WGMMA_RS_M64N256K16("bf16");
  }
};
template <>
struct Wgmma<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024 | v
  static __device__ __forceinline__ uint32_t deq(uint32_t u, uint32_t s2, uint32_t b2) {
    const __half2 q =
        __hsub2(*reinterpret_cast<const __half2*>(&u), __floats2half2_rn(1024.f, 1024.f));
    const __half2 r =
        __hfma2(q, *reinterpret_cast<const __half2*>(&s2), *reinterpret_cast<const __half2*>(&b2));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  static __device__ __forceinline__ void mma(float (&d)[32], const uint32_t (&a)[4],
                                             uint64_t desc_b) {
    MLXQ_WGMMA_RS_M64N64K16("f16");
  }
  static __device__ __forceinline__ void mma(float (&d)[64], const uint32_t (&a)[4],
                                             uint64_t desc_b) {
    MLXQ_WGMMA_RS_M64N128K16("f16");
  }
  static __device__ __forceinline__ void mma(float (&d)[128], const uint32_t (&a)[4],
                                             uint64_t desc_b) {
    MLXQ_WGMMA_RS_M64N256K16("f16");
  }
};
#undef MLXQ_WGMMA_RS_M64N64K16
#undef MLXQ_WGMMA_RS_M64N128K16
#undef MLXQ_WGMMA_RS_M64N256K16

// Shared-memory matrix descriptor of a K-major tile with 128-byte swizzle: rows of 128 bytes,
// 8-row atoms 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (1ull << 16) | (64ull << 32) |
         (1ull << 62);
}

// Keeps registers live (and in place) up to this point: wgmma reads its A fragment and
// accumulators asynchronously, after the instruction that names them.
template <int N>
__device__ __forceinline__ void keep(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}
template <int N>
__device__ __forceinline__ void keep(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

}  // namespace sm90
#endif

// Probe (harness only): 1 skips the dequantization (A = the packed words), 2 skips the x tiles.
// Ping: the warpgroups take turns issuing their products (see below).
template <typename T, int GS, int NT, int WGS, int Occ, int Probe = 0, bool Ping = true>
__global__ void __launch_bounds__(128 * WGS, Occ)
    gemm_w4_sm90_kernel(const GemmParams p, const __grid_constant__ CUtensorMap map_x,
                        const __grid_constant__ CUtensorMap map_w) {
#ifdef MLXQ_WGMMA
  using namespace sm90;
  using Op = Wgmma<T>;
  using C = GemmCfg<NT, WGS, Occ>;
  constexpr int kStages = C::kStages, kStageBytes = C::kStageBytes, kXBytes = C::kXBytes;
  constexpr int kAhead = kStages - 2;  // stages in flight: a slot is reused two stages late
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem0 =
      (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // The block's tile and its stages s0 .. s0 + nst - 1 (GemmParams)
  const int64_t blk = blockIdx.x;
  const int nk = static_cast<int>(p.K / kGemmTileK);
  int64_t tile = blk, r_split = 0;
  int part = 0, s0 = 0, nst = nk;
  if (blk >= p.full) {
    r_split = (blk - p.full) / p.split;
    part = static_cast<int>((blk - p.full) % p.split);
    tile = p.full + r_split;
    s0 = static_cast<int>(static_cast<int64_t>(nk) * part / p.split);
    nst = static_cast<int>(static_cast<int64_t>(nk) * (part + 1) / p.split) - s0;
  }
  const int64_t m0 = (tile % p.tiles_m) * NT;         // rows of x
  const int64_t n0 = (tile / p.tiles_m) * C::kTileN;  // rows of W

  // full: a stage has landed (TMA transaction count); empty: both warpgroups are done with it
  __shared__ __align__(8) uint64_t full[kStages], empty[kStages];
  const uint32_t bar0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
  const uint32_t ebar0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
  if (tid == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbar_init(bar0 + 8 * i, 1);
      mbar_init(ebar0 + 8 * i, WGS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  // Thread 0 loads stage s (x box: 64 values x NT rows, swizzled; W box: 8 words x 128 rows;
  // rows past M or N arrive as zeros) into its slot once stage s - kStages has left it.
  auto load_stage = [&](int s) {
    const int slot = s % kStages;
    if (s >= kStages) mbar_wait(ebar0 + 8 * slot, ((s / kStages) - 1) & 1);
    const uint32_t base = smem0 + slot * kStageBytes, bar = bar0 + 8 * slot;
    mbar_expect_tx(bar, (Probe & 2) ? C::kWBytes : kStageBytes);
    const int k = s0 + s;  // stage of K
    if (!(Probe & 2)) tma_2d(base, &map_x, k * kGemmTileK, static_cast<int>(m0), bar);
    tma_2d(base + kXBytes, &map_w, k * (kGemmTileK / 8), static_cast<int>(n0), bar);
  };
  if (tid == 0) {
    for (int s = 0; s < kAhead && s < nst; ++s) load_stage(s);
  }

  // wgmma's A fragment of warp w (rows 16w .. 16w + 15 of the block's W tile) gives lane (g, t)
  // rows g and g + 8 at values 2t, 2t + 1 (registers 0, 1) and 2t + 8, 2t + 9 (registers 2, 3)
  // of each 16 values of K: byte t of every packed word of the two rows.
  const int g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;
  const int ra = warp * 16 + g;  // the thread's first row in the tile; the second is ra + 8
  const uint32_t sel = t | (t << 4) | ((t + 4) << 8) | ((t + 4) << 12);
  const uint32_t* sba = p.sb + (n0 + ra < p.N ? n0 + ra : p.N - 1) * p.Gp;
  const uint32_t* sbb = p.sb + (n0 + ra + 8 < p.N ? n0 + ra + 8 : p.N - 1) * p.Gp;
  // (scale, bias) pairs of a stage for the two rows: [row][half of the stage] (group 32 has two
  // groups a stage), loaded two stages ahead into registers
  struct Pairs {
    uint32_t v[2][2];
  };
  auto load_pairs = [&](int s) -> Pairs {
    Pairs r{};
    if (s < nst) {
      const int64_t gi = (static_cast<int64_t>(s0 + s) * kGemmTileK) >> p.group_shift;
      r.v[0][0] = __ldg(sba + gi);
      r.v[1][0] = __ldg(sbb + gi);
      if constexpr (GS == 32) {
        r.v[0][1] = __ldg(sba + gi + 1);
        r.v[1][1] = __ldg(sbb + gi + 1);
      } else {
        r.v[0][1] = r.v[0][0];
        r.v[1][1] = r.v[1][0];
      }
    }
    return r;
  };
  Pairs pr_next = load_pairs(0), pr_after = load_pairs(1);

  float d[C::kAcc];
#pragma unroll
  for (int i = 0; i < C::kAcc; ++i) d[i] = 0.f;
  uint32_t a[4][4];  // the A fragment of one stage: [16 values of K][register]

  // Each warpgroup dequantizes stage s into its registers, multiplies, and waits for the
  // products before it frees the slot. ptxas serializes wgmma whose register inputs are written
  // while earlier wgmma are still in flight (C7513), so a warpgroup does not overlap its own
  // dequantization with its products: the two warpgroups run apart (no barrier ties them within
  // a stage), and one dequantizes while the other's products run.
  for (int s = 0; s < nst; ++s) {
    if (tid == 0 && s + kAhead < nst) load_stage(s + kAhead);
    const int slot = s % kStages;
    const uint32_t base = smem0 + slot * kStageBytes;
    const Pairs pr = pr_next;
    pr_next = pr_after;
    pr_after = load_pairs(s + 2);
    mbar_wait(bar0 + 8 * slot, (s / kStages) & 1);  // stage s has landed
    const uint32_t wrow = base + kXBytes + ra * 32;
    const uint4 la = lds128(wrow), ha = lds128(wrow + 16);
    const uint4 lb = lds128(wrow + 256), hb = lds128(wrow + 256 + 16);
    const uint32_t wa[8] = {la.x, la.y, la.z, la.w, ha.x, ha.y, ha.z, ha.w};
    const uint32_t wb[8] = {lb.x, lb.y, lb.z, lb.w, hb.x, hb.y, hb.z, hb.w};
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the two halves of the stage (two groups at group size 32)
      const uint32_t sa = __byte_perm(pr.v[0][h], 0, 0x1010);
      const uint32_t ba = __byte_perm(pr.v[0][h], 0, 0x3232);
      const uint32_t sb = __byte_perm(pr.v[1][h], 0, 0x1010);
      const uint32_t bb = __byte_perm(pr.v[1][h], 0, 0x3232);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int j = 2 * h + jj;  // 16 values of K: words 2j, 2j + 1
        const uint32_t w[4] = {wa[2 * j], wb[2 * j], wa[2 * j + 1], wb[2 * j + 1]};
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const uint32_t u = and_or<0x000F000Fu, Op::kMagic>(__byte_perm(w[r], w[r] >> 4, sel));
          a[j][r] = (Probe & 1) ? w[r] : (r & 1) ? Op::deq(u, sb, bb) : Op::deq(u, sa, ba);
        }
      }
    }
    keep(a);
    // Ping: warpgroup w issues its products of stage s after warpgroup w - 1 has issued its own
    // (the first after the last's of stage s - 1), meant to keep the warpgroups' dequantization
    // apart so that one's products hide another's dequantization. Measured on an H200: 4-9%
    // slower for 128 x 256 blocks, the same to slightly faster for the smaller ones (the host
    // picks it per block shape).
    if (Ping && (s > 0 || wg > 0)) {
      asm volatile("bar.sync %0, 256;\n" ::"r"(2 + wg) : "memory");
    }
    __syncwarp();  // the waits above may leave lanes apart; wgmma instructions are .aligned
    keep(d);
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int j = 0; j < 4; ++j) Op::mma(d, a[j], smem_desc(base + 32 * j));
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    if (Ping && (s + 1 < nst || wg + 1 < WGS)) {
      asm volatile("bar.arrive %0, 256;\n" ::"r"(2 + (wg + 1) % WGS) : "memory");
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    keep(a);
    keep(d);
    if ((tid & 127) == 0) mbar_arrive(ebar0 + 8 * slot);
  }

  // Output: both warpgroups are done with the ring (all stages landed and were multiplied), so
  // the tile of y is staged there, row m of x at C::kOutStride bytes, then written out along
  // the rows of y. d[4j + e]: row of W 16 * warp + g (+ 8 for e >= 2), row of x 8j + 2t + (e & 1).
  if (blk >= p.full) {  // a part of a split tile: the last one sums the partials
    __shared__ int last;
    // partial tile `part` of tile r_split: float4 c of thread tid at (c * threads + tid) * 4
    float4* ws = reinterpret_cast<float4*>(p.ws + r_split * p.split * C::kAcc * C::kThreads);
    constexpr int kVecs = C::kAcc / 4 * C::kThreads;  // float4 of one partial tile
#pragma unroll
    for (int c = 0; c < C::kAcc / 4; ++c) {
      __stcg(ws + part * kVecs + c * C::kThreads + tid,
             make_float4(d[4 * c], d[4 * c + 1], d[4 * c + 2], d[4 * c + 3]));
    }
    __threadfence();
    asm volatile("bar.sync 1, %0;\n" ::"n"(C::kThreads) : "memory");
    if (tid == 0) last = atomicAdd(p.counters + r_split, 1) == p.split - 1;
    asm volatile("bar.sync 1, %0;\n" ::"n"(C::kThreads) : "memory");
    if (!last) return;
    __threadfence();
#pragma unroll
    for (int c = 0; c < C::kAcc / 4; ++c) {
      float4 v = __ldcg(ws + c * C::kThreads + tid);
      for (int q = 1; q < p.split; ++q) {
        const float4 u = __ldcg(ws + q * kVecs + c * C::kThreads + tid);
        v.x += u.x, v.y += u.y, v.z += u.z, v.w += u.w;
      }
      d[4 * c] = v.x, d[4 * c + 1] = v.y, d[4 * c + 2] = v.z, d[4 * c + 3] = v.w;
    }
    if (tid == 0) p.counters[r_split] = 0;
  }
  asm volatile("bar.sync 1, %0;\n" ::"n"(C::kThreads) : "memory");
  uint8_t* stage = smem_raw + (smem0 - static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)));
#pragma unroll
  for (int j = 0; j < NT / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = 8 * j + 2 * t + (e & 1), n = ra + 8 * (e >> 1);
      *reinterpret_cast<T*>(stage + m * C::kOutStride + 2 * n) = from_float<T>(d[4 * j + e]);
    }
  }
  asm volatile("bar.sync 1, %0;\n" ::"n"(C::kThreads) : "memory");
  T* y = static_cast<T*>(p.y);
  constexpr int kChunks = C::kTileN / 8;  // 16-byte vectors per staged row
  for (int c = tid; c < NT * kChunks; c += C::kThreads) {
    const int ml = c / kChunks, nc = c % kChunks;
    const int64_t m = m0 + ml, n = n0 + 8 * nc;
    if (m >= p.M || n >= p.N) continue;
    const uint8_t* src = stage + ml * C::kOutStride + 16 * nc;
    if (p.vec_out && n + 8 <= p.N) {
      *reinterpret_cast<uint4*>(y + m * p.N + n) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int i = 0; i < 8 && n + i < p.N; ++i)
        y[m * p.N + n + i] = reinterpret_cast<const T*>(src)[i];
    }
  }
#else
  __trap();  // the host only launches this kernel on sm_90 with the sm_90a build
#endif
}

}  // namespace mlxq::cuda
