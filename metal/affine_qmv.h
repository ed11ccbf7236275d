// qmv: y = x @ W^T for a few rows of x (decode). Each simdgroup owns MLXQ_QMV_ROWS weight rows;
// its lanes split K in chunks of 32 values (= `bits` packed words, read with vector loads), so
// every packed word, scale and bias is read from device memory exactly once for all rows of x.
//
// Per lane and group, y += s * sum_k(q_k x_k) + b * sum_k(x_k): x is pre-scaled once per chunk
// (for 2/4/8 bits divided by the power of two of each value's position inside a 16-bit half,
// so the masked but unshifted weight bits multiply it directly) and its plain sum is kept for
// the bias. Partial sums are reduced across lanes with simd_sum; all math is fp32.
#pragma once

#include "mlxq_utils.h"

namespace mlxq {

// Loads 32 values of x as fp32, pre-scaled for dot32, and returns their plain sum.
template <typename T, int BITS>
inline float load_x32(const device T* x, thread float* xs) {
  float sum = 0.0f;
#pragma clang loop unroll(full)
  for (int j = 0; j < 32; ++j) {
    const float v = float(x[j]);
    sum += v;
    if (BITS == 2 || BITS == 4 || BITS == 8) {
      const int per16 = 16 / BITS;
      xs[j] = v / float(1u << ((j % per16) * BITS));
    } else {
      xs[j] = v;
    }
  }
  return sum;
}

// sum_j q_j * x_j over 32 values held in BITS words, with xs from load_x32.
template <int BITS>
inline float dot32(const thread uint* w, const thread float* xs) {
  float acc = 0.0f;
  if (BITS == 2 || BITS == 4 || BITS == 8) {
    const int per16 = 16 / BITS;
    const uint mask = (1u << BITS) - 1u;
#pragma clang loop unroll(full)
    for (int h = 0; h < 2 * BITS; ++h) {
      const uint half16 = (w[h / 2] >> (16 * (h % 2))) & 0xffffu;
#pragma clang loop unroll(full)
      for (int i = 0; i < per16; ++i) {
        acc += xs[h * per16 + i] * float(half16 & (mask << (i * BITS)));
      }
    }
  } else {
#pragma clang loop unroll(full)
    for (int j = 0; j < 32; ++j) {
      acc += xs[j] * float(extract32<BITS>(w, j));
    }
  }
  return acc;
}

template <typename T, int GS, int BITS>
void affine_qmv_impl(const device T* x, const device uint* wq, const device T* scales,
                     const device T* biases, device T* y, constant AffineMatmulParams& p,
                     uint3 tgid, uint sg, uint lane) {
  constexpr int LV = MLXQ_QMV_LANE_VALUES;
  constexpr int STEP = 32 * LV;  // values of K covered by one simdgroup step
  constexpr int LPG = GS / LV;   // lanes that share one quantization group
  constexpr int ROWS = MLXQ_QMV_ROWS;
  constexpr int MAXM = MLXQ_QMV_MAX_M;
  const int M = p.M, N = p.N, K = p.K, G = p.groups;
  const long Kw = long(K) * BITS / 32;

  long xb, wb;
  batch_entries(p, tgid.z, xb, wb);
  x += xb * M * K;
  wq += wb * N * Kw;
  scales += wb * N * G;
  biases += wb * N * G;
  y += long(tgid.z) * M * N;

  const int n0 = (int(tgid.x) * MLXQ_QMV_SIMDGROUPS + int(sg)) * ROWS;
  const ushort lead = ushort(lane & ~uint(LPG - 1));

  float acc[MAXM][ROWS];
#pragma clang loop unroll(full)
  for (int m = 0; m < MAXM; ++m) {
#pragma clang loop unroll(full)
    for (int r = 0; r < ROWS; ++r) {
      acc[m][r] = 0.0f;
    }
  }

  for (int k0 = 0; k0 < K; k0 += STEP) {
    const int k = k0 + int(lane) * LV;
    const bool active = k < K;
    uint w[ROWS][BITS];
    float s[ROWS], b[ROWS];
#pragma clang loop unroll(full)
    for (int r = 0; r < ROWS; ++r) {
      const int n = n0 + r;
      const bool ok = active && n < N;
      if (ok) {
        load_words<BITS>(wq + n * Kw + long(k) * BITS / 32, w[r]);
      } else {
#pragma clang loop unroll(full)
        for (int i = 0; i < BITS; ++i) {
          w[r][i] = 0u;
        }
      }
      // One lane per group reads the scale and bias; the others get them by shuffle.
      float sv = 0.0f, bv = 0.0f;
      if (ok && ushort(lane) == lead) {
        sv = float(scales[long(n) * G + k / GS]);
        bv = float(biases[long(n) * G + k / GS]);
      }
      s[r] = simd_shuffle(sv, lead);
      b[r] = simd_shuffle(bv, lead);
    }
    if (active) {
#pragma clang loop unroll(full)
      for (int m = 0; m < MAXM; ++m) {
        if (m < M) {
          float xs[32];
          const float xsum = load_x32<T, BITS>(x + long(m) * K + k, xs);
#pragma clang loop unroll(full)
          for (int r = 0; r < ROWS; ++r) {
            acc[m][r] += s[r] * dot32<BITS>(w[r], xs) + b[r] * xsum;
          }
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
