// qvm: y = x @ W for a few rows of x (transpose=False, e.g. the gradient of a decode step).
// W is [N, K]; the output has K columns. A threadgroup of 64 threads owns MLXQ_QVM_COLS = 128
// output columns: 16 column packs of 8 values (BITS bytes of a weight row, one aligned load for
// 2/4/8 bits) times MLXQ_QVM_PHASES = 4 threads per pack that split the rows. Rows are walked in
// chunks of MLXQ_QVM_ROW_CHUNK: the chunk's x values and the scales/biases of the
// threadgroup's groups are staged in threadgroup memory by one thread each, so packed words,
// scales and biases are read from device memory exactly once (x once per threadgroup). The
// four phases' partial sums meet in threadgroup memory at the end; all math is fp32.
#pragma once

#include "mlxq_utils.h"

namespace mlxq {

template <typename T, int GS, int BITS>
void affine_qvm_impl(const device T* x, const device uint* wq, const device T* scales,
                     const device T* biases, device T* y, constant AffineMatmulParams& p,
                     threadgroup float* tg, uint3 tgid, uint tid) {
  constexpr int MAXM = MLXQ_QMV_MAX_M;
  constexpr int CHUNK = MLXQ_QVM_ROW_CHUNK;
  constexpr int COLS = MLXQ_QVM_COLS;
  constexpr int PHASES = MLXQ_QVM_PHASES;
  constexpr int PACKS = COLS / 8;
  constexpr int NG = COLS / GS;  // groups per row inside the threadgroup's columns
  static_assert(PACKS * PHASES == 32 * MLXQ_QVM_SIMDGROUPS, "one thread per (pack, phase)");
  static_assert(CHUNK == 32 * MLXQ_QVM_SIMDGROUPS, "one staging thread per chunk row");
  const int M = p.M, N = p.N, K = p.K, G = p.groups;
  const long row_bytes = long(K) * BITS / 8;

  long xb, wb;
  batch_entries(p, tgid.z, xb, wb);
  x += xb * M * N;
  const device uchar* wbytes = (const device uchar*)(wq + wb * N * (row_bytes / 4));
  scales += wb * N * G;
  biases += wb * N * G;
  y += long(tgid.z) * M * K;

  threadgroup float* xs = tg;                 // [MAXM][CHUNK]
  threadgroup float* ss = xs + MAXM * CHUNK;  // [CHUNK][NG]
  threadgroup float* sb = ss + CHUNK * NG;    // [CHUNK][NG]
  threadgroup float* red = sb + CHUNK * NG;   // [PHASES][MAXM][COLS]

  const int pack = int(tid) % PACKS;
  const int phase = int(tid) / PACKS;
  const int c0 = int(tgid.x) * COLS;
  const int c = c0 + pack * 8;  // first of this thread's 8 columns
  const bool col_ok = c < K;
  const int lg = (pack * 8) / GS;  // this thread's group inside the threadgroup's columns

  float acc[MAXM][8];
#pragma clang loop unroll(full)
  for (int m = 0; m < MAXM; ++m) {
#pragma clang loop unroll(full)
    for (int j = 0; j < 8; ++j) {
      acc[m][j] = 0.0f;
    }
  }

  for (int nb = 0; nb < N; nb += CHUNK) {
    // Stage x[:, nb + tid] and the scales/biases of row nb + tid.
    const int ns = nb + int(tid);
    const bool row_ok = ns < N;
    for (int m = 0; m < M; ++m) {
      xs[m * CHUNK + tid] = row_ok ? float(x[long(m) * N + ns]) : 0.0f;
    }
#pragma clang loop unroll(full)
    for (int g = 0; g < NG; ++g) {
      const int gi = c0 / GS + g;
      const bool ok = row_ok && gi < G;
      ss[tid * NG + g] = ok ? float(scales[long(ns) * G + gi]) : 0.0f;
      sb[tid * NG + g] = ok ? float(biases[long(ns) * G + gi]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Phase f takes rows f, f + 4, ...: the 16 threads of a phase read one row's 16 packs.
    for (int i = 0; i < CHUNK / PHASES; ++i) {
      const int r = i * PHASES + phase;
      const int n = nb + r;
      if (n < N && col_ok) {
        const ulong pk = load_pack<BITS>(wbytes + n * row_bytes, c / 8);
        const float s = ss[r * NG + lg];
        const float b = sb[r * NG + lg];
        float q[8];
#pragma clang loop unroll(full)
        for (int j = 0; j < 8; ++j) {
          q[j] = float(pack_value<BITS>(pk, j));
        }
#pragma clang loop unroll(full)
        for (int m = 0; m < MAXM; ++m) {
          if (m < M) {
            const float xv = xs[m * CHUNK + r];
            const float sx = xv * s, bx = xv * b;
#pragma clang loop unroll(full)
            for (int j = 0; j < 8; ++j) {
              acc[m][j] += sx * q[j] + bx;
            }
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Every phase hands over its partial sums; each thread then sums the phases of 2 columns.
  for (int m = 0; m < M; ++m) {
#pragma clang loop unroll(full)
    for (int j = 0; j < 8; ++j) {
      red[(phase * MAXM + m) * COLS + pack * 8 + j] = acc[m][j];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int col = int(tid); col < COLS; col += 32 * MLXQ_QVM_SIMDGROUPS) {
    if (c0 + col < K) {
      for (int m = 0; m < M; ++m) {
        float t = 0.0f;
#pragma clang loop unroll(full)
        for (int f = 0; f < PHASES; ++f) {
          t += red[(f * MAXM + m) * COLS + col];
        }
        y[long(m) * K + c0 + col] = T(t);
      }
    }
  }
}

}  // namespace mlxq
