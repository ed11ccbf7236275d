// Prefill on Hopper tensor cores (wgmma, sm_90a) for 4-bit affine weights with fp16/bf16 x and
// scales of the same dtype: y = x @ W.T with W dequantized in registers, never in memory.
//
// A block computes a 128 (rows of W) x 128 (rows of x) tile of y^T with two warpgroups, one
// wgmma.m64n128k16 per warpgroup and 16 values of K. Stages of 64 values of K (x tile, packed W
// tile and the tile's (scale, bias) pairs) arrive by cp.async kAhead stages ahead of their use.
// Each stage's W tile is dequantized into shared memory (s * q + b with one fp16/bf16 FMA of the
// exact q: the weight is rounded once to the dtype of x, as the tiles of the cuBLAS path and
// MLX's GEMM are) while the tensor cores still multiply the previous stage; both operands are
// then read by wgmma from shared memory (K-major, 128-byte swizzle), products summed in fp32.
#include <c10/cuda/CUDAException.h>

#include <cstdlib>

#include "cuda/launch.h"

namespace mlxq::cuda {
namespace {

constexpr int kThreads = 256;                 // two warpgroups
constexpr int kTileN = 128;                   // rows of W per block (64 per warpgroup)
constexpr int kTileK = 64;                    // values of K per stage: one 128-byte row of x
constexpr int kWBytes = kTileN * kTileK / 2;  // 4 KB of packed W per stage
constexpr int kSbBytes = kTileN * 8;          // (scale, bias) of at most 2 groups per row
constexpr int kABytes = kTileN * kTileK * 2;  // dequantized W of one stage (16 KB), two of them

// NT rows of x per block (the wgmma N): 128, or 256 for large M (half the dequantization per
// product); as many stages as fit in shared memory (227 KB).
template <int NT>
struct Cfg {
  static constexpr int kXBytes = NT * kTileK * 2;  // 16 or 32 KB
  static constexpr int kStageBytes = kXBytes + kWBytes + kSbBytes;
  static constexpr int kStages = NT == 256 ? 5 : 6;  // shared-memory ring
  static constexpr int kAhead = kStages - 2;         // stages in flight (one in use, one draining)
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kABytes + 1024;  // + alignment
  static constexpr int kAcc = NT / 2;  // fp32 accumulators per thread
  static_assert(kStageBytes % 1024 == 0, "x tiles must stay 1024-byte aligned (swizzle atom)");
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an H100/H200 block has");
};

struct GemmParams {
  const uint32_t* w;   // [N, K / 8]
  const uint32_t* sb;  // [N, G]: scale in the low half, bias in the high half (dtype of x)
  const void* x;       // [M, K]
  void* y;             // [M, N]
  int64_t N;
  int64_t M;
  int64_t K;
  int64_t G;
  int group_shift;
};

__global__ void pack_sb_kernel(const uint16_t* s, const uint16_t* b, uint32_t* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<uint32_t>(s[i]) | (static_cast<uint32_t>(b[i]) << 16);
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MLXQ_WGMMA 1
#endif

#ifdef MLXQ_WGMMA
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts128(uint32_t addr, uint32_t a, uint32_t b, uint32_t c,
                                       uint32_t d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}

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
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, "
        "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, "
        "%55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(1));
  }
  static __device__ __forceinline__ void mma(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, "
        "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, "
        "%55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, "
        "%73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, "
        "%91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, "
        "%107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, "
        "%122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
          "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
          "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
          "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
          "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
          "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
          "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
          "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
          "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(1));
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
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, "
        "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, "
        "%55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(1));
  }
  static __device__ __forceinline__ void mma(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, "
        "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, "
        "%55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, "
        "%73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, "
        "%91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, "
        "%107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, "
        "%122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
          "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
          "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
          "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
          "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
          "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
          "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
          "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
          "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(1));
  }
};

// Shared-memory matrix descriptor of a K-major tile with 128-byte swizzle: rows of 128 bytes,
// 8-row atoms 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (1ull << 16) | (64ull << 32) |
         (1ull << 62);
}

#endif

template <typename T, int GS, int NT, bool LateLoads>
__global__ void __launch_bounds__(kThreads, 1) gemm_w4_sm90_kernel(const GemmParams p) {
#ifdef MLXQ_WGMMA
  using Op = Wgmma<T>;
  using C = Cfg<NT>;
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

  auto load_stage = [&](int s) {
    const uint32_t base = smem0 + (s % kStages) * kStageBytes;
    const int64_t k0 = static_cast<int64_t>(s) * kTileK;
#pragma unroll
    for (int i = tid; i < NT * 8; i += kThreads) {  // x: 8 chunks of 16 bytes per row
      const int r = i >> 3, c = i & 7;
      const bool ok = m0 + r < p.M;  // rows past M are zero-filled
      const T* src = x + (ok ? m0 + r : 0) * p.K + k0 + c * 8;
      cp_async16(base + r * 128 + ((c ^ (r & 7)) << 4), src, ok ? 16 : 0);
    }
    {  // W: 2 chunks of 16 bytes per row, the second row of each 4 swapped (no bank conflicts)
      const int r = tid >> 1, c = tid & 1;
      const int64_t n = n0 + r < p.N ? n0 + r : p.N - 1;
      cp_async16(base + kXBytes + r * 32 + ((c ^ ((r >> 2) & 1)) << 4),
                 p.w + n * row_words + k0 / 8 + c * 4, 16);
    }
    if (tid < kTileN) {  // (scale, bias) of the stage's groups: 2 for group size 32, else 1
      const int64_t n = n0 + tid < p.N ? n0 + tid : p.N - 1;
      const uint32_t* src = p.sb + n * p.G + (k0 >> p.group_shift);
      const uint32_t dst = base + kXBytes + kWBytes + tid * 8;
      if constexpr (GS == 32) {
        cp_async8(dst, src);
      } else {
        cp_async4(dst, src);
      }
    }
  };

  float d[C::kAcc];
#pragma unroll
  for (int i = 0; i < C::kAcc; ++i) d[i] = 0.f;
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < nst) load_stage(s);
    cp_async_commit();
  }
  // Dequantization: thread tid writes row tid / 2 of the tile (its own warpgroup's rows), 32
  // values (one 16-byte chunk of packed W, 4 chunks of 8 dequantized values).
  const int wg = warp >> 2;
  const int dr = tid >> 1, dh = tid & 1;
  const uint32_t a_region = smem0 + kStages * kStageBytes;

  for (int s = 0; s < nst; ++s) {
    cp_async_wait<kAhead - 1>();  // this thread's copies of stage s have landed
    // its copies visible to the tensor cores (the async proxy) before the barrier publishes them
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // everyone's copies; every warpgroup is done with stage s - 2
    if constexpr (!LateLoads) {
      if (s + kAhead < nst) load_stage(s + kAhead);
      cp_async_commit();
    }
    const uint32_t base = smem0 + (s % kStages) * kStageBytes;
    const uint32_t wbase = base + kXBytes;
    // A buffer s % 2 was last read by stage s - 2's wgmma, which has completed
    const uint32_t abuf = a_region + (s & 1) * kABytes;
    {
      const uint4 wv = lds128(wbase + dr * 32 + ((dh ^ ((dr >> 2) & 1)) << 4));
      const uint32_t pr = lds32(wbase + kWBytes + dr * 8 + (GS == 32 ? dh * 4 : 0));
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
    if constexpr (LateLoads) {  // the next loads only behind the fence (measured faster)
      if (s + kAhead < nst) load_stage(s + kAhead);
      cp_async_commit();
    }
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");  // the warpgroup's rows
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    const uint32_t a_tile = abuf + wg * 64 * 128;
#pragma unroll
    for (int i = 0; i < 4; ++i)  // 16 values of K are 32 bytes into the swizzled rows
      Op::mma(d, smem_desc(a_tile + 32 * i), smem_desc(base + 32 * i));
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // stage s - 1 is done
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

template <typename T, int GS, int NT, bool LateLoads>
void launch_nt(const GemmParams& p, cudaStream_t stream) {
  auto kernel = gemm_w4_sm90_kernel<T, GS, NT, LateLoads>;
  constexpr int smem = Cfg<NT>::kSmemBytes;
  // per launch (a cheap attribute write) rather than once: it belongs to the current device
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(static_cast<unsigned>((p.M + NT - 1) / NT),
                  static_cast<unsigned>((p.N + kTileN - 1) / kTileN));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int GS>
void launch_typed(const GemmParams& p, cudaStream_t stream) {
  const char* env = std::getenv("MLXQ_GEMM_VARIANT");  // development: pipeline variants
  const int v = env == nullptr ? 1 : std::atoi(env);
  // 256 rows of x per block once there are more than 128: half the dequantization per product
  const bool wide = v == 3 ? false : (v == 4 ? true : p.M > 128);
  if (v == 0) {
    return wide ? launch_nt<T, GS, 256, false>(p, stream) : launch_nt<T, GS, 128, false>(p, stream);
  }
  return wide ? launch_nt<T, GS, 256, true>(p, stream) : launch_nt<T, GS, 128, true>(p, stream);
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

void launch_gemm_w4_sm90(const GemmArgs& a, DType x_dtype, cudaStream_t stream) {
  // (scale, bias) pairs, so that one 4- or 8-byte copy brings a row's pairs of a stage
  const int64_t n = a.N * a.G;
  if (n > 0) {
    pack_sb_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
        static_cast<const uint16_t*>(a.scales), static_cast<const uint16_t*>(a.biases), a.sb, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  GemmParams p{a.w, a.sb, a.x, a.y, a.N, a.M, a.K, a.G, a.group_shift};
  const bool half = x_dtype == DType::kHalf;
  switch (a.group_shift) {
    case 5:
      return half ? launch_typed<__half, 32>(p, stream)
                  : launch_typed<__nv_bfloat16, 32>(p, stream);
    case 6:
      return half ? launch_typed<__half, 64>(p, stream)
                  : launch_typed<__nv_bfloat16, 64>(p, stream);
    default:
      return half ? launch_typed<__half, 128>(p, stream)
                  : launch_typed<__nv_bfloat16, 128>(p, stream);
  }
}

}  // namespace mlxq::cuda
