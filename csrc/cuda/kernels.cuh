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

namespace mlxq::cuda {

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

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
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

// ---- decode: y = x @ W.T for M <= MT rows of x ----------------------------------------------
//
// One warp owns R consecutive rows of W; its lanes take the row's chunks round robin (lane l:
// chunks l, l+32, ...), U chunks per row in flight before any arithmetic, so that each thread
// keeps U*R*4*Bits bytes of loads outstanding. Per chunk and row of x:
//   acc += s * sum_j q_j x_j + b * sum_j x_j
// (the group's affine map applied to the chunk's partial dot product, in fp32). The lanes'
// partial sums are reduced with shuffles at the end. Rows of x past M repeat row M-1 (no
// branch in the inner loop) and are not written.

template <int Bits>
struct DecodeShape {
  static constexpr int kUnroll = Bits == 2 ? 8 : (Bits == 8 ? 2 : 4);  // chunks in flight
};

constexpr int kDecodeWarps = 8;  // warps per block

template <int Bits, int MT, int R, typename T>
__global__ void __launch_bounds__(kDecodeWarps * 32) qmv_kernel(const QmvParams p) {
  constexpr int U = DecodeShape<Bits>::kUnroll;
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kDecodeWarps + (threadIdx.x >> 5);
  const int64_t n0 = warp * R;
  if (n0 >= p.N) return;
  const int64_t C = p.K / 32;  // chunks per row
  const int64_t row_words = C * Bits;
  const uint32_t* wrow[R];
  int64_t srow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r < p.N ? n0 + r : p.N - 1;
    wrow[r] = p.w + n * row_words;
    srow[r] = n * p.G;
  }
  const T* xrow[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m)
    xrow[m] = static_cast<const T*>(p.x) + static_cast<int64_t>(m < p.M ? m : p.M - 1) * p.K;

  float acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  for (int64_t c0 = lane; c0 < C; c0 += 32 * U) {
    uint32_t w[U][R][Bits];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c < C) {
#pragma unroll
        for (int r = 0; r < R; ++r) load_chunk<Bits>(wrow[r] + c * Bits, w[u][r]);
      }
    }
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

#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[m][r] = v;
    }
  if (lane == 0) {
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (m < p.M && n0 + r < p.N)
          y[static_cast<int64_t>(m) * p.N + n0 + r] = from_float<T>(acc[m][r]);
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

template <int Bits, int P, typename O>
__device__ __forceinline__ void dequantize_piece(const uint32_t (&w)[Bits], float s, float b,
                                                 O* out) {
  float q[8];
  chunk_piece<Bits, P>(w, q);
#pragma unroll
  for (int j = 0; j < 8; ++j) q[j] = fmaf(q[j], s, b);  // the CPU kernels' FMA
  store8<O>(out + 8 * P, q);
}

// out must be 16-byte aligned (each thread writes 32 values: 64 or 128 bytes).
template <int Bits, typename O>
__global__ void __launch_bounds__(256) dequantize_kernel(const DequantParams p) {
  const int64_t C = p.K / 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.R * C) return;
  const int64_t r = i / C, c = i - r * C;
  uint32_t w[Bits];
  load_chunk<Bits>(p.w + i * Bits, w);
  const int64_t g = r * p.G + ((c * 32) >> p.group_shift);
  const float s = load_scale(p.scales, g, p.scale_type);
  const float b = load_scale(p.biases, g, p.scale_type);
  O* out = static_cast<O*>(p.out) + r * p.K + c * 32;
  dequantize_piece<Bits, 0>(w, s, b, out);
  dequantize_piece<Bits, 1>(w, s, b, out);
  dequantize_piece<Bits, 2>(w, s, b, out);
  dequantize_piece<Bits, 3>(w, s, b, out);
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
