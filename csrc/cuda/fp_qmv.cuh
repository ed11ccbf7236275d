// Body of fp_qmv_<mode>.cu: the streaming decode kernel of one floating-point mode
// (MLXQ_FP_MODE: kFpMxfp4, kFpNvfp4 or kFpMxfp8) and its launcher.
//
// Layout (as qmv_kernel's for affine weights, kernels.cuh): one warp owns R consecutive rows of
// W; lane l takes the 16-byte chunks l, l + 32, ... of each row, U chunks of each of its R rows
// loaded (ld.global.nc, not kept in L1: the weights are read once) before any arithmetic, so each
// thread keeps U * R * 16 bytes of loads in flight. A chunk is 32 FP4 codes (one mxfp4 group,
// two nvfp4 groups) or 16 FP8 codes (half an mxfp8 group), so chunks never straddle groups.
// x is read through the read-only cache (each value serves the warp's R rows) and converted to
// fp32; the lanes' partial sums are reduced with shuffles at the end. Rows of x past M repeat
// row M - 1 (no branch in the inner loop) and are not written. The grid's y dimension runs the
// pairs of a gather (fp_gather_matmul's decode: each pair its own x and weight matrix).
//
// Numerics (the CPU op's, fp_kernels.h): every code value is decoded exactly, products with x and
// sums in fp32, and each group's scale (nvfp4: its E4M3 value times global_scale / 2688 in fp32)
// multiplies the group's partial dot product once; the output is rounded once to x's dtype.
//
// Decoding, without tables: an FP4 E2M1 code's magnitude bits placed at fp16 bits 9..11 (its sign
// at bit 15) are the fp16 number value * 2^-14, subnormal code 0.5 included, so a word of 8 codes
// becomes 4 half2 with shifts and masks, then fp32 exactly; the group's partial sum is scaled back
// by 2^14 (exact) before its scale. FP8 E4M3 pairs convert to half2 exactly with cuda_fp8.h's
// conversion (one instruction from sm_89 on; 0x7F/0xFF are NaN). E8M0 scales are fp32 exponent
// fields (byte 0 the subnormal 2^-127, 255 infinity).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "cuda/fp_qmv.h"
#include "cuda/kernels.cuh"

#ifndef MLXQ_FP_MODE
#error "define MLXQ_FP_MODE before including fp_qmv.cuh"
#endif

namespace mlxq::cuda {
namespace {

// A 16-byte chunk of streamed weights: non-coherent, not allocated in L1.
__device__ __forceinline__ uint4 fp_load_chunk(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// FP4 codes I and I + 4 of a word of 8 codes (code j at bits 4j..4j+3) as fp32, times 2^-14.
template <int I>
__device__ __forceinline__ float2 fp4_pair(uint32_t w) {
  uint32_t a;  // code I's bits at 9..12, code I + 4's at 25..28
  if constexpr (I < 3) {
    a = w << (9 - 4 * I);
  } else {
    a = w >> 3;
  }
  const uint32_t h = (a & 0x0E000E00u) | ((a << 3) & 0x80008000u);
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// Two FP8 E4M3 codes (low byte first) as fp32, exactly.
__device__ __forceinline__ float2 e4m3_pair(uint32_t two) {
  const __half2_raw r =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xFFFFu), __NV_E4M3);
  return __half22float2(__half2(r));
}

__device__ __forceinline__ float e4m3_value(uint32_t byte) {
  return __half2float(
      __half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(byte), __NV_E4M3)));
}

__device__ __forceinline__ float e8m0_value(uint32_t byte) {
  return __uint_as_float(byte == 0 ? 0x00400000u : byte << 23);
}

template <int Mode>
struct FpChunk {
  static constexpr int kOctets = Mode == kFpMxfp8 ? 2 : 4;    // 8-value pieces per chunk
  static constexpr int kSegments = Mode == kFpNvfp4 ? 2 : 1;  // groups (scales) per chunk
  static constexpr int kOctetsPerSegment = kOctets / kSegments;
  static constexpr int kValues = kOctets * 8;
  static constexpr float kPost = Mode == kFpMxfp8 ? 1.0f : 16384.0f;  // undoes fp4_pair's 2^-14
};

// Values [8P, 8P + 8) of a chunk as fp32 (FP4: times 2^-14).
template <int Mode, int P>
__device__ __forceinline__ void fp_octet(const uint4& w, float (&q)[8]) {
  const uint32_t* words = &w.x;
  if constexpr (Mode == kFpMxfp8) {
    const uint32_t a = words[2 * P], b = words[2 * P + 1];
    const float2 f0 = e4m3_pair(a), f1 = e4m3_pair(a >> 16), f2 = e4m3_pair(b),
                 f3 = e4m3_pair(b >> 16);
    q[0] = f0.x, q[1] = f0.y, q[2] = f1.x, q[3] = f1.y;
    q[4] = f2.x, q[5] = f2.y, q[6] = f3.x, q[7] = f3.y;
  } else {
    const uint32_t v = words[P];
    const float2 f0 = fp4_pair<0>(v), f1 = fp4_pair<1>(v), f2 = fp4_pair<2>(v), f3 = fp4_pair<3>(v);
    q[0] = f0.x, q[4] = f0.y, q[1] = f1.x, q[5] = f1.y;
    q[2] = f2.x, q[6] = f2.y, q[3] = f3.x, q[7] = f3.y;
  }
}

// The scale of segment `h` of chunk `c` of a row whose scale bytes start at `srow`.
template <int Mode>
__device__ __forceinline__ void fp_chunk_scales(const uint8_t* srow, int64_t c, float factor,
                                                float (&s)[FpChunk<Mode>::kSegments]) {
  if constexpr (Mode == kFpMxfp4) {
    s[0] = e8m0_value(__ldg(srow + c));
  } else if constexpr (Mode == kFpMxfp8) {
    s[0] = e8m0_value(__ldg(srow + (c >> 1)));
  } else {  // groups 2c and 2c + 1: one 2-byte load (G is even, the rows 2-byte aligned)
    const uint32_t two = __ldg(reinterpret_cast<const uint16_t*>(srow) + c);
    s[0] = e4m3_value(two & 0xFFu) * factor;
    s[1] = e4m3_value(two >> 8) * factor;
  }
}

// Rows of x from which the group's scale multiplies each decoded value (then the products add
// straight into the accumulators) instead of the group's partial dot products: that frees the
// MT * R partial sums' registers for loads in flight, for one multiplication per value and row.
template <int MT>
constexpr bool kFoldScales = MT >= 4;

// Piece P of the chunk: out[m][r] += value * sw[r] * x (Scaled) or value * x for its 8 values.
template <int Mode, int P, int MT, int R, typename T, bool Scaled>
__device__ __forceinline__ void fp_octet_dot(const uint4 (&w)[R], const T* const (&xrow)[MT],
                                             int64_t k0, const float (&sw)[R],
                                             float (&out)[MT][R]) {
  float q[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    fp_octet<Mode, P>(w[r], q[r]);
    if constexpr (Scaled) {
#pragma unroll
      for (int j = 0; j < 8; ++j) q[r][j] *= sw[r];
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float xv[8];
    load_x8(xrow[m] + k0 + P * 8, xv);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < R; ++r) out[m][r] = fmaf(q[r][j], xv[j], out[m][r]);
  }
}

// The octets of segment H (one group) of a chunk into `out`.
template <int Mode, int H, int MT, int R, typename T, bool Scaled>
__device__ __forceinline__ void fp_segment_octets(const uint4 (&w)[R], const T* const (&xrow)[MT],
                                                  int64_t k0, const float (&sw)[R],
                                                  float (&out)[MT][R]) {
  constexpr int kP = H * FpChunk<Mode>::kOctetsPerSegment;
  fp_octet_dot<Mode, kP, MT, R, T, Scaled>(w, xrow, k0, sw, out);
  fp_octet_dot<Mode, kP + 1, MT, R, T, Scaled>(w, xrow, k0, sw, out);
  if constexpr (FpChunk<Mode>::kOctetsPerSegment == 4) {
    fp_octet_dot<Mode, kP + 2, MT, R, T, Scaled>(w, xrow, k0, sw, out);
    fp_octet_dot<Mode, kP + 3, MT, R, T, Scaled>(w, xrow, k0, sw, out);
  }
}

// Segment H (one group) of chunk c: acc += scale * (its partial dot products), or for
// kFoldScales the products of the scaled values. s: the rows' scales of the chunk's groups.
template <int Mode, int H, int MT, int R, typename T>
__device__ __forceinline__ void fp_segment(const uint4 (&w)[R], const T* const (&xrow)[MT],
                                           int64_t k0,
                                           const float (&s)[R][FpChunk<Mode>::kSegments],
                                           float (&acc)[MT][R]) {
  using F = FpChunk<Mode>;
  float sw[R];
  if constexpr (kFoldScales<MT>) {
    // value * 2^-14 times scale * 2^14 (exact but for overflow past 2^114): the fp32 weight
    // of the composite op, rounded once where nvfp4's global factor makes the scale inexact
#pragma unroll
    for (int r = 0; r < R; ++r) sw[r] = s[r][H] * F::kPost;
    fp_segment_octets<Mode, H, MT, R, T, true>(w, xrow, k0, sw, acc);
  } else {
    float dot[MT][R];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) dot[m][r] = 0.f;
    fp_segment_octets<Mode, H, MT, R, T, false>(w, xrow, k0, sw, dot);
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] = fmaf(dot[m][r] * F::kPost, s[r][H], acc[m][r]);
  }
}

template <int Mode, int MT, int R, int U, typename T>
__global__ void __launch_bounds__(kFpWarps * 32, MT >= 2 ? 2 : 1)
    fp_qmv_kernel(const FpQmvParams p) {
  using F = FpChunk<Mode>;
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kFpWarps + (threadIdx.x >> 5);
  const int64_t n0 = warp * R;
  if (n0 >= p.N) return;
  const int64_t pair = blockIdx.y;
  int64_t e = 0, xi = 0;  // this pair's weight and x matrices
  if (p.rhs != nullptr) {
    e = __ldg(p.rhs + pair);
    xi = __ldg(p.lhs + pair);
    MLXQ_DEVICE_CHECK(e >= 0 && e < p.w_batch && xi >= 0 && xi < p.x_batch,
                      "mlxq: fp_gather_matmul: lhs_indices or rhs_indices out of range");
  }
  const int64_t C = p.chunks;
  const uint4* wrow[R];
  const uint8_t* srow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r < p.N ? n0 + r : p.N - 1;
    wrow[r] = p.w + e * p.w_matrix + n * C;
    srow[r] = p.scales + e * p.s_matrix + n * p.G;
  }
  const T* x = static_cast<const T*>(p.x) + xi * p.M * p.K;
  const T* xrow[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) xrow[m] = x + static_cast<int64_t>(m < p.M ? m : p.M - 1) * p.K;
  float factor = 1.0f;  // nvfp4: global_scale / (448 * 6), one IEEE division as the CPU op
  if constexpr (Mode == kFpNvfp4) {
    if (p.global != nullptr) factor = __fdiv_rn(__ldg(p.global + e), 2688.0f);
  }

  float acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  for (int64_t c0 = lane; c0 < C; c0 += 32 * U) {
    uint4 w[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + 32 * u;
#pragma unroll
      for (int r = 0; r < R; ++r)
        w[u][r] = c < C ? fp_load_chunk(wrow[r] + c) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= C) break;
      float s[R][F::kSegments];
#pragma unroll
      for (int r = 0; r < R; ++r) fp_chunk_scales<Mode>(srow[r], c, factor, s[r]);
      const int64_t k0 = c * F::kValues;
      fp_segment<Mode, 0, MT, R, T>(w[u], xrow, k0, s, acc);
      if constexpr (F::kSegments == 2) fp_segment<Mode, 1, MT, R, T>(w[u], xrow, k0, s, acc);
    }
  }

#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = warp_sum(acc[m][r]);
  if (lane == 0) {
    T* y = static_cast<T*>(p.y) + pair * p.M * p.N;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (m < p.M && n0 + r < p.N)
          y[static_cast<int64_t>(m) * p.N + n0 + r] = from_float<T>(acc[m][r]);
  }
}

template <int MT, int R, int U, typename T>
void fp_launch_shape(const FpQmvParams& p, cudaStream_t stream) {
  const int64_t warps = (p.N + R - 1) / R;
  const int64_t blocks = (warps + kFpWarps - 1) / kFpWarps;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.pairs));
  fp_qmv_kernel<MLXQ_FP_MODE, MT, R, U, T><<<grid, kFpWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Kernel shapes (rows per warp R, chunks per row in flight U; fp_qmv_rows_per_warp agrees), by
// `variant`. M = 1: 'a' R2 U4, 'b' R4 U2, 'c' R4 U4, 'd' R1 U8. Measured on an H200 (bf16 x, ms,
// a/b/c/d): 28672 x 8192 mxfp4 0.050/0.048/0.053/0.070, nvfp4 0.058/0.054/0.056/0.073, mxfp8
// 0.063/0.076/0.072/0.068; 4096 x 4096 mxfp4 0.0060/0.0070/0.0069/0.0072 (runs differ by ~10%).
// More rows of x: 'a' R4 (U2, U1 at M > 4), 'b' R2 U2, 'c' R1 U4, 'd' R2 U1: four rows of W share
// each load and conversion of x, which dominate once the FMAs per value grow with M (28672 x 8192,
// M = 8, before kFoldScales: R4 U1 0.186 ms, R2 U2 0.249). Above M = 1 the kernel is held to 128
// registers, so that two blocks fit a multiprocessor.
template <int MT, typename T>
void fp_launch_rows(const FpQmvParams& p, char variant, cudaStream_t stream) {
  switch (variant) {
    case 'b':
      return fp_launch_shape<MT, 2, 2, T>(p, stream);
    case 'c':
      return fp_launch_shape<MT, 1, 4, T>(p, stream);
    case 'd':
      return fp_launch_shape<MT, 2, 1, T>(p, stream);
    default:
      return fp_launch_shape<MT, 4, (MT == 8 ? 1 : 2), T>(p, stream);
  }
}

template <typename T>
void fp_launch_typed(const FpQmvParams& p, char variant, cudaStream_t stream) {
  if (p.M <= 1) {
    switch (variant) {
      case 'b':
        return fp_launch_shape<1, 4, 2, T>(p, stream);
      case 'c':
        return fp_launch_shape<1, 4, 4, T>(p, stream);
      case 'd':
        return fp_launch_shape<1, 1, 8, T>(p, stream);
      default:
        return fp_launch_shape<1, 2, 4, T>(p, stream);
    }
  }
  if (p.M <= 2) return fp_launch_rows<2, T>(p, variant, stream);
  if (p.M <= 4) return fp_launch_rows<4, T>(p, variant, stream);
  return fp_launch_rows<8, T>(p, variant, stream);
}

}  // namespace

template <>
void launch_fp_qmv<MLXQ_FP_MODE>(const FpQmvParams& p, DType x_dtype, char variant,
                                 cudaStream_t stream) {
  switch (x_dtype) {
    case DType::kHalf:
      return fp_launch_typed<__half>(p, variant, stream);
    case DType::kBFloat16:
      return fp_launch_typed<__nv_bfloat16>(p, variant, stream);
    default:
      return fp_launch_typed<float>(p, variant, stream);
  }
}

}  // namespace mlxq::cuda
