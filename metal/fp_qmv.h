// fp_qmv: y = x @ W^T for a few rows of x (decode), W in one of MLX's floating-point modes.
// Laid out as affine_qmv: each simdgroup owns MLXQ_QMV_ROWS weight rows and its lanes split K,
// here in chunks of exactly one quantization group (16 or 32 values: 2, 4 or 8 packed words,
// read with vector loads), so every packed word and scale byte is read from device memory once
// for all rows of x. Per lane and group, y += scale * sum_k value(q_k) * x_k in fp32 (as the
// CPU op: the scale is applied once per group); partial sums are reduced with simd_sum.
#pragma once

#include "fp_format.h"

namespace mlxq {

// Loads the WORDS packed words of one group (8-byte aligned for nvfp4's 2 words, 16-byte
// aligned otherwise: a row holds K * BITS / 32 words with K a multiple of the group size).
template <int WORDS>
inline void load_group_words(const device uint* src, thread uint* w) {
  if (WORDS == 2) {
    const uint2 v = *(const device uint2*)src;
    w[0] = v.x;
    w[1] = v.y;
  } else {
#pragma clang loop unroll(full)
    for (int i = 0; i < WORDS; i += 4) {
      const uint4 v = *((const device uint4*)src + i / 4);
      w[i] = v.x;
      w[i + 1] = v.y;
      w[i + 2] = v.z;
      w[i + 3] = v.w;
    }
  }
}

// One group of x (GS values) as fp32, read once for all weight rows of the simdgroup.
template <typename T, int GS>
inline void load_x_group(const device T* x, thread float* xv) {
#pragma clang loop unroll(full)
  for (int j = 0; j < GS; ++j) {
    xv[j] = float(x[j]);
  }
}

// sum_j value(code_j) * x_j over one group of GS values.
template <int MODE>
inline float group_dot(const thread uint* w, const thread float* xv) {
  constexpr int GS = fp_group_size(MODE), BITS = fp_bits(MODE);
  float acc = 0.0f;
#pragma clang loop unroll(full)
  for (int j = 0; j < GS; ++j) {
    acc += fp_element<MODE>(fp_code<BITS>(w, j)) * xv[j];
  }
  return acc;
}

template <typename T, int MODE>
void fp_qmv_impl(const device T* x, const device uint* wq, const device uchar* scales,
                 const device float* global_scale, device T* y, constant AffineMatmulParams& p,
                 uint3 tgid, uint sg, uint lane) {
  constexpr int GS = fp_group_size(MODE), BITS = fp_bits(MODE);
  constexpr int WORDS = GS * BITS / 32;  // packed words of one group
  constexpr int STEP = 32 * GS;          // values of K covered by one simdgroup step
  constexpr int ROWS = MLXQ_QMV_ROWS;
  constexpr int MAXM = MLXQ_QMV_MAX_M;
  const int M = p.M, N = p.N, K = p.K, G = p.groups;
  const long Kw = long(K) * BITS / 32;

  long xb, wb;
  batch_entries(p, tgid.z, xb, wb);
  x += xb * M * K;
  wq += wb * N * Kw;
  scales += wb * N * G;
  y += long(tgid.z) * M * N;
  const float global_factor = fp_global_factor<MODE>(global_scale);

  const int n0 = (int(tgid.x) * MLXQ_QMV_SIMDGROUPS + int(sg)) * ROWS;
  float acc[MAXM][ROWS];
#pragma clang loop unroll(full)
  for (int m = 0; m < MAXM; ++m) {
#pragma clang loop unroll(full)
    for (int r = 0; r < ROWS; ++r) {
      acc[m][r] = 0.0f;
    }
  }

  for (int k0 = 0; k0 < K; k0 += STEP) {
    const int k = k0 + int(lane) * GS;  // this lane's group starts here
    if (k >= K) {
      continue;  // no collective inside the loop: lanes may leave early
    }
    uint w[ROWS][WORDS];
    float s[ROWS];
#pragma clang loop unroll(full)
    for (int r = 0; r < ROWS; ++r) {
      const int n = n0 + r;
      if (n < N) {
        load_group_words<WORDS>(wq + n * Kw + long(k) * BITS / 32, w[r]);
        s[r] = fp_scale<MODE>(uint(scales[long(n) * G + k / GS]), global_factor);
      } else {
        s[r] = 0.0f;
#pragma clang loop unroll(full)
        for (int i = 0; i < WORDS; ++i) {
          w[r][i] = 0u;
        }
      }
    }
#pragma clang loop unroll(full)
    for (int m = 0; m < MAXM; ++m) {
      if (m < M) {
        float xv[GS];
        load_x_group<T, GS>(x + long(m) * K + k, xv);
#pragma clang loop unroll(full)
        for (int r = 0; r < ROWS; ++r) {
          acc[m][r] += s[r] * group_dot<MODE>(w[r], xv);
        }
      }
    }
  }

#pragma clang loop unroll(full)
  for (int m = 0; m < MAXM; ++m) {
    if (m < M) {
#pragma clang loop unroll(full)
      for (int r = 0; r < ROWS; ++r) {
        const float t = simd_sum(acc[m][r]);
        if (lane == 0 && n0 + r < N) {
          y[long(m) * N + n0 + r] = T(t);
        }
      }
    }
  }
}

}  // namespace mlxq
