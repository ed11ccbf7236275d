// CUDA kernel bodies for the mlxq ops. Plain CUDA C++ (no ATen types), included by the
// per-bit-width translation units (qmv_b*.cu) and by affine_cuda.cu.
//
// Conventions shared by every kernel here:
// - a "chunk" is 32 consecutive values of one row: `Bits` uint32 words (8 values always fill
//   exactly `Bits` bytes), so a chunk never straddles a group (group sizes are 32, 64, 128) and
//   every chunk starts at a multiple of 4*Bits bytes of its row;
// - dequantization and accumulation are fp32; only the output is rounded to its dtype;
// - index math is 64-bit wherever it can exceed 2^31 (rows times row length).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "cuda/float_convert.cuh"

namespace mlxq::cuda {

// A gather index outside its batch stops the kernel with a device-side assert (cudaErrorAssert,
// as torch's own index kernels do, e.g. index_select) rather than reading outside the tensor.
// The host checks the indices first (one device-to-host read) except while the stream is being
// captured in a CUDA graph, where this is the only check. __assert_fail directly, since assert()
// is compiled out under NDEBUG; no torch header, so that the standalone harnesses build.
#define MLXQ_DEVICE_CHECK(cond, msg)                               \
  do {                                                             \
    if (!(cond)) __assert_fail(msg, __FILE__, __LINE__, __func__); \
  } while (0)

// Dtype of the scales and biases (runtime: it does not change the inner loops).
enum class ScaleType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// Arguments of the decode kernel: y[m, n] = sum_k x[m, k] * (s[n, g] * q[n, k] + b[n, g]).
struct QmvParams {
  const uint32_t* w;   // [N, K * bits / 32], 16-byte aligned
  const void* scales;  // [N, G]
  const void* biases;  // [N, G]
  const void* x;       // [M, K] in the kernel's activation dtype, 16-byte aligned
  void* y;             // [M, N] in the activation dtype
  int64_t N;
  int64_t K;
  int64_t G;
  int M;            // rows of x (<= the kernel's MT)
  int group_shift;  // log2(group_size)
  ScaleType scale_type;
  // The gather (affine_gather_matmul, CUDA-core kernel only): pair i = blockIdx.y multiplies the
  // M rows of x matrix lhs[i] by weight matrix rhs[i] into y matrix i. For a plain matmul: one
  // pair, lhs = rhs = nullptr.
  const int64_t* lhs = nullptr;  // [pairs], in [0, x_batch) (MLXQ_DEVICE_CHECK)
  const int64_t* rhs = nullptr;  // [pairs], in [0, w_batch)
  int64_t pairs = 1;             // the grid's y dimension (<= 65535)
  int64_t x_batch = 1;           // matrices in x
  int64_t w_batch = 1;           // matrices in W
  int64_t w_matrix = 0;          // words per weight matrix (N * K * bits / 32)
  int64_t s_matrix = 0;          // scales (and biases) per weight matrix (N * G)
};

// Arguments of the dequantize kernel: out[r, k] = s[r, g] * q[r, k] + b[r, g].
struct DequantParams {
  const uint32_t* w;
  const void* scales;
  const void* biases;
  void* out;  // [R, K] in the output dtype
  int64_t R;
  int64_t K;
  int64_t G;
  int group_shift;
  ScaleType scale_type;
};

__device__ __forceinline__ float load_scale(const void* p, int64_t i, ScaleType t) {
  switch (t) {
    case ScaleType::kHalf:
      return __half2float(static_cast<const __half*>(p)[i]);
    case ScaleType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// Sum of v over the 32 lanes of a warp (the same butterfly order in every lane).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---- packed chunks --------------------------------------------------------------------------

// Loads the `Bits` words of one chunk with the widest accesses its alignment allows
// (chunk bytes 4*Bits: 8 for 2 bits, 16 for 4, 32 for 8, 24 for 6; 12 and 20 take words).
template <int Bits>
__device__ __forceinline__ void load_chunk(const uint32_t* p, uint32_t (&w)[Bits]) {
  if constexpr (Bits == 4 || Bits == 8) {
#pragma unroll
    for (int i = 0; i < Bits / 4; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
      w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
    }
  } else if constexpr (Bits == 2 || Bits == 6) {
#pragma unroll
    for (int i = 0; i < Bits / 2; ++i) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + i);
      w[2 * i] = v.x, w[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < Bits; ++i) w[i] = __ldg(p + i);
  }
}

// The float of a small unsigned integer v (< 2^23) without the quarter-rate I2F instruction:
// 0x4B000000 | v is the float 2^23 + v, and subtracting 2^23 is exact.
__device__ __forceinline__ float magic_to_float(uint32_t bits_with_magic) {
  return __uint_as_float(bits_with_magic) - 8388608.f;
}

// Value I (0..31) of a chunk as a float. Byte-aligned widths pick their byte with one PRMT
// (the magic exponent byte comes from the second operand); the others shift and mask.
template <int Bits, int I>
__device__ __forceinline__ float chunk_value(const uint32_t (&w)[Bits]) {
  constexpr int kOffset = I * Bits, kWord = kOffset / 32, kShift = kOffset % 32;
  constexpr uint32_t kMask = (1u << Bits) - 1u;
  if constexpr (Bits == 8) {
    // bytes [w.byte_k, 0, 0, 0x4B]
    return magic_to_float(__byte_perm(w[kWord], 0x4B000000u, 0x7440u | (kShift / 8)));
  } else if constexpr (kShift + Bits <= 32) {
    return magic_to_float(((w[kWord] >> kShift) & kMask) | 0x4B000000u);
  } else {
    return magic_to_float((__funnelshift_r(w[kWord], w[kWord + 1], kShift) & kMask) | 0x4B000000u);
  }
}

// Eight values [8*P, 8*P + 8) of a chunk. For 4 bits the 8 nibbles of one word are split into
// two byte planes (2 logic ops), and each value is one PRMT.
template <int Bits, int P>
__device__ __forceinline__ void chunk_piece(const uint32_t (&w)[Bits], float (&q)[8]) {
  if constexpr (Bits == 4) {
    const uint32_t lo = w[P] & 0x0F0F0F0Fu, hi = (w[P] >> 4) & 0x0F0F0F0Fu;
    q[0] = magic_to_float(__byte_perm(lo, 0x4B000000u, 0x7440u));
    q[1] = magic_to_float(__byte_perm(hi, 0x4B000000u, 0x7440u));
    q[2] = magic_to_float(__byte_perm(lo, 0x4B000000u, 0x7441u));
    q[3] = magic_to_float(__byte_perm(hi, 0x4B000000u, 0x7441u));
    q[4] = magic_to_float(__byte_perm(lo, 0x4B000000u, 0x7442u));
    q[5] = magic_to_float(__byte_perm(hi, 0x4B000000u, 0x7442u));
    q[6] = magic_to_float(__byte_perm(lo, 0x4B000000u, 0x7443u));
    q[7] = magic_to_float(__byte_perm(hi, 0x4B000000u, 0x7443u));
  } else {
    q[0] = chunk_value<Bits, 8 * P + 0>(w);
    q[1] = chunk_value<Bits, 8 * P + 1>(w);
    q[2] = chunk_value<Bits, 8 * P + 2>(w);
    q[3] = chunk_value<Bits, 8 * P + 3>(w);
    q[4] = chunk_value<Bits, 8 * P + 4>(w);
    q[5] = chunk_value<Bits, 8 * P + 5>(w);
    q[6] = chunk_value<Bits, 8 * P + 6>(w);
    q[7] = chunk_value<Bits, 8 * P + 7>(w);
  }
}

// Eight activations x[k0 .. k0+8) as fp32 (k0 a multiple of 8; x 16-byte aligned).
__device__ __forceinline__ void load_x8(const float* x, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(x));
  const float4 b = __ldg(reinterpret_cast<const float4*>(x) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load_x8(const __nv_bfloat16* x, float (&v)[8]) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(x));
  const uint32_t u[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 is the top half of an fp32
    v[2 * i] = __uint_as_float(u[i] << 16);
    v[2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void load_x8(const __half* x, float (&v)[8]) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(x));
  const uint32_t u[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u[i]));
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}

// ---- decode: y = x @ W.T for M <= MT rows of x (M <= 8)
// ----------------------------------------------
//
// One warp owns R consecutive rows of W; its lanes take the row's chunks round robin (lane l:
// chunks l, l+32, ...), U chunks per row in flight before any arithmetic, so that each thread
// keeps U*R*4*Bits bytes of loads outstanding (twice that with Prefetch). Per chunk and row of x:
//   acc += s * sum_j q_j x_j + b * sum_j x_j
// (the group's affine map applied to the chunk's partial dot product, in fp32). The lanes'
// partial sums are reduced with shuffles at the end. Rows of x past M repeat row M-1 (no
// branch in the inner loop) and are not written. A gather runs its pairs as the grid's y
// dimension, each block streaming the rows of its pair's weight matrix (QmvParams::rhs).

constexpr int kDecodeWarps = 8;  // warps per block

// Loads U chunks (lane's chunks c0, c0 + 32, ...) of each of the warp's R rows.
template <int Bits, int R, int U>
__device__ __forceinline__ void qmv_load(const uint32_t* const (&wrow)[R], int64_t c0, int64_t C,
                                         uint32_t (&w)[U][R][Bits]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t c = c0 + 32 * u;
    if (c < C) {
#pragma unroll
      for (int r = 0; r < R; ++r) load_chunk<Bits>(wrow[r] + c * Bits, w[u][r]);
    }
  }
}

// Adds the loaded chunks' contributions to acc[m][r].
template <int Bits, int MT, int R, int U, typename T>
__device__ __forceinline__ void qmv_step(const QmvParams& p, const int64_t (&srow)[R],
                                         const T* const (&xrow)[MT], int64_t c0, int64_t C,
                                         const uint32_t (&w)[U][R][Bits], float (&acc)[MT][R]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t c = c0 + 32 * u;
    if (c >= C) break;
    const int64_t g = (c * 32) >> p.group_shift;
    float s[R], b[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      s[r] = load_scale(p.scales, srow[r] + g, p.scale_type);
      b[r] = load_scale(p.biases, srow[r] + g, p.scale_type);
    }
    float dot[MT][R], xs[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      xs[m] = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) dot[m][r] = 0.f;
    }
#pragma unroll
    for (int piece = 0; piece < 4; ++piece) {
      float q[R][8];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        switch (piece) {  // piece is a compile-time constant after unrolling
          case 0:
            chunk_piece<Bits, 0>(w[u][r], q[r]);
            break;
          case 1:
            chunk_piece<Bits, 1>(w[u][r], q[r]);
            break;
          case 2:
            chunk_piece<Bits, 2>(w[u][r], q[r]);
            break;
          default:
            chunk_piece<Bits, 3>(w[u][r], q[r]);
            break;
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        float xv[8];
        load_x8(xrow[m] + c * 32 + piece * 8, xv);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          xs[m] += xv[j];
#pragma unroll
          for (int r = 0; r < R; ++r) dot[m][r] = fmaf(q[r][j], xv[j], dot[m][r]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] += fmaf(s[r], dot[m][r], b[r] * xs[m]);
  }
}

// Prefetch: the next U chunks of each row are loaded before the current ones are used (twice
// the registers for loads, but the warp never waits for memory with nothing in flight).
// Gather: the pairs of p.lhs/p.rhs (a template flag, so that the plain matmul's kernels keep
// their registers: the pair's offsets cost some 40 more in several shapes).
template <int Bits, int MT, int R, int U, bool Prefetch, typename T, bool Gather = false>
__global__ void __launch_bounds__(kDecodeWarps * 32) qmv_kernel(const QmvParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kDecodeWarps + (threadIdx.x >> 5);
  const int64_t n0 = warp * R;
  if (n0 >= p.N) return;
  int64_t e = 0, xi = 0;  // this pair's weight and x matrices
  if constexpr (Gather) {
    e = __ldg(p.rhs + blockIdx.y);
    xi = __ldg(p.lhs + blockIdx.y);
    MLXQ_DEVICE_CHECK(e >= 0 && e < p.w_batch && xi >= 0 && xi < p.x_batch,
                      "mlxq: affine_gather_matmul: lhs_indices or rhs_indices out of range");
  }
  const int64_t C = p.K / 32;  // chunks per row
  const int64_t row_words = C * Bits;
  const uint32_t* wrow[R];
  int64_t srow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r < p.N ? n0 + r : p.N - 1;
    wrow[r] = p.w + e * p.w_matrix + n * row_words;
    srow[r] = e * p.s_matrix + n * p.G;
  }
  const T* x = static_cast<const T*>(p.x) + xi * p.M * p.K;
  const T* xrow[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) xrow[m] = x + static_cast<int64_t>(m < p.M ? m : p.M - 1) * p.K;

  float acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  uint32_t w[U][R][Bits];
  if constexpr (Prefetch) qmv_load<Bits, R, U>(wrow, lane, C, w);
  for (int64_t c0 = lane; c0 < C; c0 += 32 * U) {
    if constexpr (Prefetch) {
      uint32_t next[U][R][Bits];
      qmv_load<Bits, R, U>(wrow, c0 + 32 * U, C, next);
      qmv_step<Bits, MT, R, U, T>(p, srow, xrow, c0, C, w, acc);
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int i = 0; i < Bits; ++i) w[u][r][i] = next[u][r][i];
    } else {
      qmv_load<Bits, R, U>(wrow, c0, C, w);
      qmv_step<Bits, MT, R, U, T>(p, srow, xrow, c0, C, w, acc);
    }
  }

#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = warp_sum(acc[m][r]);
  if (lane == 0) {
    T* y = static_cast<T*>(p.y);
    if constexpr (Gather) y += static_cast<int64_t>(blockIdx.y) * p.M * p.N;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (m < p.M && n0 + r < p.N)
          y[static_cast<int64_t>(m) * p.N + n0 + r] = from_float<T>(acc[m][r]);
  }
}

// ---- decode on tensor cores: 4-bit weights, fp16/bf16 x, M <= 8 ---------------------------
//
// The CUDA-core kernel above spends ~5 instructions per weight value unpacking and multiplying,
// which caps it near 2 TB/s at 4 bits. Here the products go to the tensor cores (mma.sync
// m16n8k16, fp32 accumulation): the 4-bit values become exact fp16/bf16 integers with one mask
// and one subtraction per two values, x is the B operand as it is (exact: x already has that
// dtype), and the products q*x are exact, so this is still "dequantize in fp32, accumulate in
// fp32": per group, y += s * sum(q*x) + b * sum(x), with sum(x) from a second mma against ones.
//
// A block owns 16 rows of W; its 8 warps take the groups round robin and are summed through
// shared memory at the end. In a warp, lane (g, t) = (lane / 4, lane % 4) holds, per group,
// GS/32 words of rows g and g+8 (words t*GS/32 ... of the group) and the x values under them.
// The order of k inside an mma is free as long as A and B agree: a word's nibbles split into
// the pairs (v0,v4), (v1,v5), (v2,v6), (v3,v7), and x's 8 values are paired the same way.

template <typename T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  // bf16 0x4300 is 128: 0x4300 | v is 128 + v for v < 128
  static constexpr uint32_t kMagic = 0x43004300u;
  static __device__ __forceinline__ uint32_t unbias(uint32_t u) {
    const __nv_bfloat162 r =
        __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&u), __floats2bfloat162_rn(128.f, 128.f));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t ones() { return 0x3F803F80u; }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // the host only picks this kernel on compute capability >= 8.0
#endif
  }
};
template <>
struct MmaType<__half> {
  // fp16 0x6400 is 1024: 0x6400 | v is 1024 + v for v < 1024
  static constexpr uint32_t kMagic = 0x64006400u;
  static __device__ __forceinline__ uint32_t unbias(uint32_t u) {
    const __half2 r =
        __hsub2(*reinterpret_cast<const __half2*>(&u), __floats2half2_rn(1024.f, 1024.f));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t ones() { return 0x3C003C00u; }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

template <int N>
__device__ __forceinline__ void load_words(const uint32_t* p, uint32_t (&w)[N]) {
  if constexpr (N == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (N == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x, w[1] = v.y;
  } else {
    w[0] = __ldg(p);
  }
}

// (a & mask) | magic as one LOP3. Written as C++, ptxas emits two (a LOP3 takes one immediate and
// it does not keep the second constant in a register), which made the nibble unpacking of the
// decode kernels ALU-bound.
template <uint32_t Mask, uint32_t Magic>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(Mask), "n"(Magic));
  return d;
}

// c += the products of one 32-bit word of 8 nibbles of row g (qa) and of row g + 8 (qb) with
// the 8 values of x under them, as two mma.sync m16n8k16: the word's nibbles pair up as (0,4),
// (1,5) for the first and (2,6), (3,7) for the second, and b holds x in that order, (x0,x4)
// (x1,x5) (x2,x6) (x3,x7). Each nibble becomes an exact fp16/bf16 integer (one LOP3 and one
// HSUB2 per two values).
template <typename T>
__device__ __forceinline__ void mma_nibble_words(float (&c)[4], uint32_t qa, uint32_t qb,
                                                 uint32_t b0, uint32_t b1, uint32_t b2,
                                                 uint32_t b3) {
  using Mma = MmaType<T>;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int s0 = 8 * h, s1 = 8 * h + 4;
    const uint32_t a0 = Mma::unbias(and_or<0x000F000Fu, Mma::kMagic>(qa >> s0));
    const uint32_t a1 = Mma::unbias(and_or<0x000F000Fu, Mma::kMagic>(qb >> s0));
    const uint32_t a2 = Mma::unbias(and_or<0x000F000Fu, Mma::kMagic>(qa >> s1));
    const uint32_t a3 = Mma::unbias(and_or<0x000F000Fu, Mma::kMagic>(qb >> s1));
    Mma::mma(c, a0, a1, a2, a3, h == 0 ? b0 : b2, h == 0 ? b1 : b3);
  }
}

constexpr int kMmaWarps = 8;  // warps per block of the tensor-core decode kernel

template <int GS, typename T>
__global__ void __launch_bounds__(kMmaWarps * 32) qmv_mma4_kernel(const QmvParams p) {
  using Mma = MmaType<T>;
  constexpr int WPL = GS / 32;  // words of one row per lane and group
  constexpr int UG = 512 / GS;  // groups in flight per warp: 32 words per lane
  __shared__ float partial[kMmaWarps][32][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t ra = n0 + g < p.N ? n0 + g : p.N - 1;
  const int64_t rb = n0 + g + 8 < p.N ? n0 + g + 8 : p.N - 1;
  const int64_t row_words = p.K / 8;
  const uint32_t* wa = p.w + ra * row_words + t * WPL;
  const uint32_t* wb = p.w + rb * row_words + t * WPL;
  const bool has_x = g < p.M;  // B column g is row g of x (zero past M)
  const T* xr =
      static_cast<const T*>(p.x) + static_cast<int64_t>(has_x ? g : 0) * p.K + t * 8 * WPL;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t gi0 = warp; gi0 < p.G; gi0 += kMmaWarps * UG) {
    // Only the weights are held in registers across the loads (x is small and stays in L1),
    // so that each lane keeps 2 * UG * WPL words = 128 bytes of weights in flight.
    uint32_t qa[UG][WPL], qb[UG][WPL];
#pragma unroll
    for (int u = 0; u < UG; ++u) {
      const int64_t gi = gi0 + kMmaWarps * u;
      if (gi < p.G) {
        load_words<WPL>(wa + gi * (GS / 8), qa[u]);
        load_words<WPL>(wb + gi * (GS / 8), qb[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < UG; ++u) {
      const int64_t gi = gi0 + kMmaWarps * u;
      if (gi >= p.G) break;
      float cq[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < WPL; ++j) {
        // x0..x7 as (x0,x1) (x2,x3) (x4,x5) (x6,x7)
        const uint4 x = has_x ? __ldg(reinterpret_cast<const uint4*>(xr + gi * GS + j * 8))
                              : make_uint4(0u, 0u, 0u, 0u);
        const uint32_t b[4] = {__byte_perm(x.x, x.z, 0x5410), __byte_perm(x.x, x.z, 0x7632),
                               __byte_perm(x.y, x.w, 0x5410), __byte_perm(x.y, x.w, 0x7632)};
        mma_nibble_words<T>(cq, qa[u][j], qb[u][j], b[0], b[1], b[2], b[3]);
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // sum(x) of the same values, against ones
          Mma::mma(c1, Mma::ones(), Mma::ones(), Mma::ones(), Mma::ones(), b[2 * h], b[2 * h + 1]);
        }
      }
      // c[0], c[1]: row g, x rows 2t and 2t+1; c[2], c[3]: row g+8
      const float s_a = load_scale(p.scales, ra * p.G + gi, p.scale_type);
      const float b_a = load_scale(p.biases, ra * p.G + gi, p.scale_type);
      const float s_b = load_scale(p.scales, rb * p.G + gi, p.scale_type);
      const float b_b = load_scale(p.biases, rb * p.G + gi, p.scale_type);
      acc[0] += fmaf(s_a, cq[0], b_a * c1[0]);
      acc[1] += fmaf(s_a, cq[1], b_a * c1[1]);
      acc[2] += fmaf(s_b, cq[2], b_b * c1[2]);
      acc[3] += fmaf(s_b, cq[3], b_b * c1[3]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) partial[warp][lane][i] = acc[i];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int w = 1; w < kMmaWarps; ++w)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] += partial[w][lane][i];
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = 2 * t + (i & 1);
    const int64_t n = n0 + g + (i >= 2 ? 8 : 0);
    if (m < p.M && n < p.N) y[static_cast<int64_t>(m) * p.N + n] = from_float<T>(acc[i]);
  }
}

// ---- dequantize: one thread per chunk -------------------------------------------------------

template <typename O>
__device__ __forceinline__ void store8(O* out, const float (&v)[8]);
template <>
__device__ __forceinline__ void store8<float>(float* out, const float (&v)[8]) {
  reinterpret_cast<float4*>(out)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(out)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename O>
__device__ __forceinline__ void store8(O* out, const float (&v)[8]) {
  uint32_t u[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const O lo = from_float<O>(v[2 * i]), hi = from_float<O>(v[2 * i + 1]);
    u[i] = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&lo)) |
           (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
  }
  *reinterpret_cast<uint4*>(out) = make_uint4(u[0], u[1], u[2], u[3]);
}

// One thread per 8 consecutive values of a row (their `Bits` bytes), so that the threads of a
// warp write one contiguous run of output (16-byte stores for fp16/bf16, 2 x 16 for fp32);
// out must be 16-byte aligned. The values' bytes are read as the (at most three) aligned words
// that hold them.
template <int Bits, typename O>
__global__ void __launch_bounds__(256) dequantize_kernel(const DequantParams p) {
  const int64_t per_row = p.K / 8;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.R * per_row) return;
  const int64_t r = i / per_row, t = i - r * per_row;
  const int64_t row_words = p.K * Bits / 32;
  const int64_t byte0 = t * Bits;  // first byte of the 8 values in their row
  const uint32_t* wp = p.w + r * row_words + byte0 / 4;
  const int shift = static_cast<int>(byte0 % 4) * 8;
  const int64_t left = row_words - byte0 / 4;  // words of this row from wp on
  // 8 values need 8*Bits bits from `shift` on: one word for 2 and 4 bits (shift 0), else two
  // (at most 24 + 40 = 64 bits), never past the row's last word.
  uint64_t v = __ldg(wp);
  if constexpr (Bits != 2 && Bits != 4) {
    if (left > 1) v |= static_cast<uint64_t>(__ldg(wp + 1)) << 32;
  }
  v >>= shift;
  const int64_t g = r * p.G + ((t * 8) >> p.group_shift);
  const float s = load_scale(p.scales, g, p.scale_type);
  const float b = load_scale(p.biases, g, p.scale_type);
  constexpr uint32_t kMask = (1u << Bits) - 1u;
  float q[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t qj = static_cast<uint32_t>(v >> (j * Bits)) & kMask;
    q[j] = fmaf(magic_to_float(qj | 0x4B000000u), s, b);  // the CPU kernels' FMA
  }
  store8<O>(static_cast<O*>(p.out) + r * p.K + t * 8, q);
}

// ---- quantize: one thread per group, the arithmetic of csrc/cpu/quantize.h ------------------
//
// Bit-exact with the CPU op: the same fp32 operations in the same order, IEEE division and
// round-half-even (rintf, the CPU's nearbyint), no contraction into FMAs (there is no
// multiply-add in it), and std::min/std::max's NaN behaviour written out as comparisons.

__device__ __forceinline__ float std_min(float a, float b) { return b < a ? b : a; }
__device__ __forceinline__ float std_max(float a, float b) { return a < b ? b : a; }

// Templated only so that this header can be included by several translation units.
template <int Unused = 0>
__global__ void __launch_bounds__(256)
    quantize_kernel(const float* __restrict__ w, int64_t groups, int group_size, int bits,
                    uint8_t* __restrict__ out, float* __restrict__ scales,
                    float* __restrict__ biases) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= groups) return;
  const float* wg = w + i * group_size;
  const float n_bins = static_cast<float>((1 << bits) - 1);
  float w_min = wg[0], w_max = wg[0];
  for (int j = 1; j < group_size; ++j) {
    w_min = std_min(w_min, wg[j]);
    w_max = std_max(w_max, wg[j]);
  }
  const bool min_is_edge = fabsf(w_min) > fabsf(w_max);
  float s = std_max(__fdiv_rn(__fsub_rn(w_max, w_min), n_bins), 1e-7f);
  s = min_is_edge ? s : -s;
  const float edge = min_is_edge ? w_min : w_max;
  const float q0 = rintf(__fdiv_rn(edge, s));
  float b = 0.f;
  if (q0 != 0.f) {
    s = __fdiv_rn(edge, q0);
    b = edge;
  }
  uint8_t* og = out + i * (group_size * bits / 8);
  for (int c = 0; c < group_size / 8; ++c) {
    uint64_t packed = 0;
    for (int j = 0; j < 8; ++j) {
      float q = rintf(__fdiv_rn(__fsub_rn(wg[c * 8 + j], b), s));
      q = q > 0.f ? std_min(q, n_bins) : 0.f;  // NaN clamps to 0, as on the CPU
      packed |= static_cast<uint64_t>(q) << (j * bits);
    }
    for (int k = 0; k < bits; ++k) og[c * bits + k] = static_cast<uint8_t>(packed >> (8 * k));
  }
  scales[i] = s;
  biases[i] = b;
}

}  // namespace mlxq::cuda
