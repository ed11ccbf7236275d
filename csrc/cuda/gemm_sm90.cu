// Prefill on Hopper tensor cores (wgmma, sm_90a) for 4-bit affine weights with fp16/bf16 x and
// scales of the same dtype: y = x @ W.T with W dequantized on chip (shared memory), never in
// global memory.
//
// A block computes a 128 (rows of W) x NT (rows of x; 128, or 256 for large M) tile of y^T with
// two warpgroups, one wgmma.m64nNTk16 per warpgroup and 16 values of K. Stages of 64 values of K
// (x tile and packed W tile) arrive by TMA (cp.async.bulk.tensor, completion on an mbarrier)
// kAhead stages ahead of their use, the (scale, bias) pairs by plain loads into registers two
// stages ahead; the x tile lands in the 128-byte
// swizzled layout that wgmma reads. Each stage's W tile is dequantized into shared memory
// (s * q + b with one fp16/bf16 FMA of the exact q: the weight is rounded once to the dtype of x,
// as the tiles of the cuBLAS path and MLX's GEMM are) while the tensor cores still multiply the
// previous stage; both operands are then read by wgmma from shared memory, products summed in
// fp32. The threads that write the dequantized tile issue no copies of their own: the proxy
// fence that publishes their stores to the tensor cores then waits for nothing else (with
// cp.async loads in flight it cost ~2x, measured on an H200). The two warpgroups are tied only
// by per-stage "empty" barriers that the loading thread waits on before reusing a slot.
#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdlib>
#include <string>

#include "cuda/launch.h"

namespace mlxq::cuda {
namespace {

constexpr int kThreads = 256;                 // two warpgroups
constexpr int kTileN = 128;                   // rows of W per block (64 per warpgroup)
constexpr int kTileK = 64;                    // values of K per stage: one 128-byte row of x
constexpr int kWBytes = kTileN * kTileK / 2;  // 4 KB of packed W per stage
constexpr int kABytes = kTileN * kTileK * 2;  // dequantized W of one stage (16 KB), two of them

// NT rows of x per block (the wgmma N): 128, or 256 for large M (half the dequantization per
// product); Occ blocks per multiprocessor. As many stages as fit in shared memory (227 KB per SM).
template <int NT, int Occ>
struct Cfg {
  static constexpr int kXBytes = NT * kTileK * 2;  // 16 or 32 KB
  static constexpr int kStageBytes = kXBytes + kWBytes;
  static constexpr int kStages = Occ == 2 ? 3 : (NT == 256 ? 5 : 6);  // shared-memory ring
  static constexpr int kAhead = kStages - 2;  // stages in flight (one in use, one draining)
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kABytes + 1024;  // + alignment
  static constexpr int kAcc = NT / 2;  // fp32 accumulators per thread
  static_assert(kStageBytes % 1024 == 0, "x tiles must stay 1024-byte aligned (swizzle atom)");
  static_assert(Occ * (kSmemBytes + 1024) <= 228 * 1024, "more shared memory than an SM has");
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
};

// out[r, g] = (s[r, g], b[r, g]) for g < G; rows padded to Gp (a multiple of 4: TMA strides are
// multiples of 16 bytes) with zeros.
__global__ void pack_sb_kernel(const uint16_t* s, const uint16_t* b, uint32_t* out, int64_t G,
                               int64_t Gp, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t r = i / Gp, g = i - r * Gp;
  out[i] = g < G ? static_cast<uint32_t>(s[r * G + g]) | (static_cast<uint32_t>(b[r * G + g]) << 16)
                 : 0u;
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MLXQ_WGMMA 1
#endif

#ifdef MLXQ_WGMMA
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t phase) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(phase)
      : "memory");
}
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
__device__ __forceinline__ void sts128(uint32_t addr, uint32_t a, uint32_t b, uint32_t c,
                                       uint32_t d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}

// One wgmma.m64nNk16 (fp32 accumulators d, A and B from shared-memory descriptors, scale-d 1)
// for TYPE "bf16" or "f16": the 64 or 128 accumulator operands written out once.
#define MLXQ_WGMMA_M64N128K16(TYPE)                                                                \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE                                 \
      " "                                                                                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, " \
      "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, " \
      "%55, %56, %57, %58, %59, %60, %61, %62, %63}, "                                             \
      "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                              \
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
      : "l"(desc_a), "l"(desc_b), "r"(1));

#define MLXQ_WGMMA_M64N256K16(TYPE)                                                                \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE                                 \
      " "                                                                                          \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, " \
      "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, " \
      "%55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, " \
      "%73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, " \
      "%91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, "    \
      "%107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, " \
      "%122, %123, %124, %125, %126, %127}, "                                                      \
      "%128, %129, p, 1, 1, 0, 0;\n}\n"                                                            \
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
      : "l"(desc_a), "l"(desc_b), "r"(1));

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
  static __device__ __forceinline__ void mma(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
    MLXQ_WGMMA_M64N128K16("bf16");
  }
  static __device__ __forceinline__ void mma(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
    MLXQ_WGMMA_M64N256K16("bf16");
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
  static __device__ __forceinline__ void mma(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
    MLXQ_WGMMA_M64N128K16("f16");
  }
  static __device__ __forceinline__ void mma(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
    MLXQ_WGMMA_M64N256K16("f16");
  }
};
#undef MLXQ_WGMMA_M64N128K16
#undef MLXQ_WGMMA_M64N256K16

// Shared-memory matrix descriptor of a K-major tile with 128-byte swizzle: rows of 128 bytes,
// 8-row atoms 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (1ull << 16) | (64ull << 32) |
         (1ull << 62);
}

#endif

template <typename T, int GS, int NT, int Occ>
__global__ void __launch_bounds__(kThreads, Occ)
    gemm_w4_sm90_kernel(const GemmParams p, const __grid_constant__ CUtensorMap map_x,
                        const __grid_constant__ CUtensorMap map_w) {
#ifdef MLXQ_WGMMA
  using Op = Wgmma<T>;
  using C = Cfg<NT, Occ>;
  constexpr int kStages = C::kStages, kAhead = C::kAhead, kStageBytes = C::kStageBytes;
  constexpr int kXBytes = C::kXBytes;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem0 =
      (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * NT;      // rows of x
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;  // rows of W
  const int nst = static_cast<int>(p.K / kTileK);
  const T* x = static_cast<const T*>(p.x);
  const int64_t row_words = p.K / 8;

  // full: a stage has landed (TMA transaction count); empty: both warpgroups are done with it
  __shared__ __align__(8) uint64_t full[kStages], empty[kStages];
  const uint32_t bar0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
  const uint32_t ebar0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
  if (tid == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbar_init(bar0 + 8 * i, 1);
      mbar_init(ebar0 + 8 * i, 2);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  // One thread loads a stage: x box (64 values x NT rows, swizzled) and W box (8 words x 128
  // rows); rows past M or N arrive as zeros.
  auto load_stage = [&](int s) {
    const uint32_t base = smem0 + (s % kStages) * kStageBytes;
    const uint32_t bar = bar0 + 8 * (s % kStages);
    const int k0 = s * kTileK;
    mbar_expect_tx(bar, kStageBytes);
    tma_2d(base, &map_x, k0, static_cast<int>(m0), bar);
    tma_2d(base + kXBytes, &map_w, k0 / 8, static_cast<int>(n0), bar);
  };

  float d[C::kAcc];
#pragma unroll
  for (int i = 0; i < C::kAcc; ++i) d[i] = 0.f;
  if (tid == 0) {
    for (int s = 0; s < kAhead && s < nst; ++s) load_stage(s);
  }
  __syncwarp();  // warp 0 converged again: the wgmma instructions are .aligned
  // Dequantization: thread tid writes row tid / 2 of the tile (its own warpgroup's rows), 32
  // values (one 16-byte chunk of packed W, 4 chunks of 8 dequantized values).
  const int wg = warp >> 2;
  const int dr = tid >> 1, dh = tid & 1;
  const uint32_t a_region = smem0 + kStages * kStageBytes;
  // The thread's (scale, bias) pair of each stage, loaded two stages ahead into registers (a
  // 4-byte TMA box of them faulted; a cp.async would slow the proxy fence below).
  const int64_t sb_row = (n0 + dr < p.N ? n0 + dr : p.N - 1) * p.Gp;
  auto load_pair = [&](int s) -> uint32_t {
    if (s >= nst) return 0u;
    const int64_t k = static_cast<int64_t>(s) * kTileK + (GS == 32 ? 32 * dh : 0);
    return __ldg(p.sb + sb_row + (k >> p.group_shift));
  };
  uint32_t pair_next = load_pair(0), pair_after = load_pair(1);

  for (int s = 0; s < nst; ++s) {
    // The warpgroups run on their own (no block-wide barrier per stage), so that one
    // dequantizes while the other's products run; only the loading thread waits until both are
    // done with stage s - 2, whose slot stage s + kAhead takes.
    if (tid == 0 && s + kAhead < nst) {
      if (s >= 2) mbar_wait(ebar0 + 8 * ((s - 2) % kStages), ((s - 2) / kStages) & 1);
      load_stage(s + kAhead);
    }
    __syncwarp();
    mbar_wait(bar0 + 8 * (s % kStages), (s / kStages) & 1);  // stage s has landed
    const uint32_t base = smem0 + (s % kStages) * kStageBytes;
    const uint32_t wbase = base + kXBytes;
    // A buffer s % 2 was last read by stage s - 2's wgmma, which has completed
    const uint32_t abuf = a_region + (s & 1) * kABytes;
    {
      const uint4 wv = lds128(wbase + dr * 32 + dh * 16);
      const uint32_t pr = pair_next;
      pair_next = pair_after;
      pair_after = load_pair(s + 2);
      const uint32_t s2 = __byte_perm(pr, pr, 0x1010), b2 = __byte_perm(pr, pr, 0x3232);
      const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // word j: values 8j .. 8j+7 of the thread's 32
        const uint32_t w = words[j], w4 = w >> 4;
        uint32_t o[4];
#pragma unroll
        for (int b = 0; b < 4; ++b) {  // byte b: values 2b, 2b+1
          const uint32_t sel = b | (b << 4) | ((b + 4) << 8) | ((b + 4) << 12);
          o[b] = Op::deq((__byte_perm(w, w4, sel) & 0x000F000Fu) | Op::kMagic, s2, b2);
        }
        const int c = 4 * dh + j;  // chunk of the 128-byte row, swizzled like x
        sts128(abuf + dr * 128 + ((c ^ (dr & 7)) << 4), o[0], o[1], o[2], o[3]);
      }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // A visible to wgmma
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");   // the warpgroup's rows
    __syncwarp();  // the waits above may leave lanes apart; wgmma instructions are .aligned
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    const uint32_t a_tile = abuf + wg * 64 * 128;
#pragma unroll
    for (int i = 0; i < 4; ++i)  // 16 values of K are 32 bytes into the swizzled rows
      Op::mma(d, smem_desc(a_tile + 32 * i), smem_desc(base + 32 * i));
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // stage s - 1 is done
    if ((tid & 127) == 0 && s >= 1) mbar_arrive(ebar0 + 8 * ((s - 1) % kStages));
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
  for (int i = 0; i < C::kAcc; ++i) asm volatile("" : "+f"(d[i])::"memory");

  // d[4j + e]: row of W 16 * warp + g (+ 8 for e >= 2), row of x 8j + 2t + (e & 1)
  const int r0 = warp * 16 + g;
  T* y = static_cast<T*>(p.y);
  const int64_t na = n0 + r0, nb = na + 8;
#pragma unroll
  for (int j = 0; j < NT / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t m = m0 + 8 * j + 2 * t + (e & 1);
      const int64_t n = e < 2 ? na : nb;
      if (m < p.M && n < p.N) y[m * p.N + n] = from_float<T>(d[4 * j + e]);
    }
  }
#else
  __trap();  // the host only launches this kernel on sm_90 with the sm_90a build
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                    cudaEnableDefault, &q));
    TORCH_CHECK(f != nullptr && q == cudaDriverEntryPointSuccess,
                "mlxq: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A row-major [rows, cols] tensor map with boxes of box_cols x box_rows.
CUtensorMap tensor_map(const void* ptr, CUtensorMapDataType type, int64_t elem, int64_t rows,
                       int64_t cols, int box_cols, int box_rows, CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols * elem)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t estrides[2] = {1, 1};
  const CUresult r =
      encode_fn()(&map, type, 2, const_cast<void*>(ptr), dims, strides, box, estrides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "mlxq: cuTensorMapEncodeTiled failed (", static_cast<int>(r), ")");
  return map;
}

template <typename T, int GS, int NT, int Occ>
void launch_nt(const GemmParams& p, bool half, cudaStream_t stream) {
  auto kernel = gemm_w4_sm90_kernel<T, GS, NT, Occ>;
  constexpr int smem = Cfg<NT, Occ>::kSmemBytes;
  const CUtensorMap mx =
      tensor_map(p.x, half ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                 p.M, p.K, kTileK, NT, CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap mw = tensor_map(p.w, CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, p.N, p.K / 8,
                                    kTileK / 8, kTileN, CU_TENSOR_MAP_SWIZZLE_NONE);
  // per launch (a cheap attribute write) rather than once: it belongs to the current device
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(static_cast<unsigned>((p.M + NT - 1) / NT),
                  static_cast<unsigned>((p.N + kTileN - 1) / kTileN));
  kernel<<<grid, kThreads, smem, stream>>>(p, mx, mw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block shape: "256" (256 rows of x, one block per SM), "128" (one block per SM, 6 stages) or
// "128x2" (two blocks per SM, 3 stages each, so that one block's dequantization and waits overlap
// the other's products). Measured on an H200 (28672 x 8192, bf16, ms; 256 / 128 / 128x2):
// M=32 0.311/0.194/0.205, M=128 0.260/0.193/0.154, M=512 0.476/0.648/0.514, M=768
// 0.703/1.012/0.791. So 128 up to M = 64, 128x2 up to 128, 256 above; MLXQ_CUDA_GEMM_TILE (read
// on every call, for benchmarks) overrides it.
template <typename T, int GS>
void launch_typed(const GemmParams& p, bool half, cudaStream_t stream) {
  const char* env = std::getenv("MLXQ_CUDA_GEMM_TILE");
  std::string tile(env == nullptr ? "" : env);
  if (tile.empty()) tile = p.M > 128 ? "256" : (p.M > 64 ? "128x2" : "128");
  if (tile == "256") return launch_nt<T, GS, 256, 1>(p, half, stream);
  if (tile == "128x2") return launch_nt<T, GS, 128, 2>(p, half, stream);
  return launch_nt<T, GS, 128, 1>(p, half, stream);
}

}  // namespace

bool gemm_w4_sm90_available(int device) {
#ifdef MLXQ_CUDA_SM90A
  // read on every call, so that a benchmark can compare with the cuBLAS path in one process
  const char* env = std::getenv("MLXQ_CUDA_GEMM");
  if (env != nullptr && std::atoi(env) == 0) return false;
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0;
#else
  (void)device;
  return false;
#endif
}

int64_t gemm_w4_sm90_sb_cols(int64_t G) { return G; }

void launch_gemm_w4_sm90(const GemmArgs& a, DType x_dtype, cudaStream_t stream) {
  // (scale, bias) pairs: one 4-byte load gives a thread both
  const int64_t gp = gemm_w4_sm90_sb_cols(a.G), n = a.N * gp;
  if (n > 0) {
    pack_sb_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
        static_cast<const uint16_t*>(a.scales), static_cast<const uint16_t*>(a.biases), a.sb, a.G,
        gp, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  GemmParams p{a.w, a.sb, a.x, a.y, a.N, a.M, a.K, gp, a.group_shift};
  const bool half = x_dtype == DType::kHalf;
  switch (a.group_shift) {
    case 5:
      return half ? launch_typed<__half, 32>(p, half, stream)
                  : launch_typed<__nv_bfloat16, 32>(p, half, stream);
    case 6:
      return half ? launch_typed<__half, 64>(p, half, stream)
                  : launch_typed<__nv_bfloat16, 64>(p, half, stream);
    default:
      return half ? launch_typed<__half, 128>(p, half, stream)
                  : launch_typed<__nv_bfloat16, 128>(p, half, stream);
  }
}

}  // namespace mlxq::cuda
