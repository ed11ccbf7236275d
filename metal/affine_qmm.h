// qmm: tiled y = x @ W^T (TRANSPOSE) or x @ W for many rows of x (prefill).
// A threadgroup computes a BM x BN output tile with 4 simdgroups in a 2 x 2 layout, each owning
// 16 x 16 outputs as 2 x 2 simdgroup_matrix<float, 8, 8> accumulators. The reduction runs in
// steps of BK = 32: the x tile (converted to fp32) and the dequantized weight tile are staged in
// threadgroup memory, then multiplied with 8x8 multiply-accumulates. K is a multiple of 32, so
// a 32-value weight chunk lies inside one quantization group: each of the 128 threads
// dequantizes one pack of 8 values (BITS bytes, read once), and one lane of every 4 reads the
// chunk's scale and bias and shares them by shuffle (with TRANSPOSE only when the K walk enters
// a new group). Packed weights are thus read from device memory once per row-block of x; so are
// scales and biases, except that with !TRANSPOSE and group_size > BN the tiles that share a
// group each read its scale (group_size / 32 times per row-block). Partial tiles (M, N, or the
// reduction length N for transpose=False) are zero-filled on load and masked on store.
#pragma once

#include "mlxq_utils.h"

namespace mlxq {

// The pieces of one BM x BN tile, shared with the sorted gather kernel (affine_gather_rhs.h).
// Thread `tid` of the 128 stages tile row tr = tid / 4, columns tc = (tid % 4) * 8 .. + 8.

// x tile: reduction columns r0 + tc .. + 8 of the row `xrow` (when `ok`, else zeros), as fp32.
template <typename T>
inline void qmm_stage_x(const device T* xrow, bool ok, int IN, int r0, int tr, int tc,
                        threadgroup float* xs) {
#pragma clang loop unroll(full)
  for (int j = 0; j < 8; ++j) {
    const int r = r0 + tc + j;
    xs[tr * MLXQ_QMM_LD + tc + j] = (ok && r < IN) ? float(xrow[r]) : 0.0f;
  }
}

// Weight tile of the reduction step at r0 for output columns o0..: 32 weight rows x 32 weight
// columns of one [N, K] matrix, one pack of 8 values per thread, dequantized to fp32 and stored
// reduction-major. `s` and `b` carry the scale and bias of the thread's group between steps:
// with TRANSPOSE a thread keeps its weight row and walks K, so a group's scale and bias are
// loaded once when the walk enters the group (r0 is uniform: so is the shuffle). All lanes call
// this (the shuffle needs them).
template <typename T, int GS, int BITS, bool TRANSPOSE>
inline void qmm_stage_w(const device uchar* wbytes, const device T* scales, const device T* biases,
                        int N, int G, long row_bytes, int o0, int r0, int tr, int tc, uint lane,
                        thread float& s, thread float& b, threadgroup float* ws) {
  const ushort quad_lead = ushort(lane & ~3u);
  const int wr = (TRANSPOSE ? o0 : r0) + tr;  // weight row (n)
  const int wc = (TRANSPOSE ? r0 : o0) + tc;  // first weight column (k) of the pack
  const bool ok = wr < N;
  const ulong pk = ok ? load_pack<BITS>(wbytes + wr * row_bytes, wc / 8) : ulong(0);
  if (!TRANSPOSE || r0 % GS == 0) {
    float sv = 0.0f, bv = 0.0f;
    if (ok && ushort(lane) == quad_lead) {
      sv = float(scales[long(wr) * G + wc / GS]);
      bv = float(biases[long(wr) * G + wc / GS]);
    }
    s = simd_shuffle(sv, quad_lead);
    b = simd_shuffle(bv, quad_lead);
  }
#pragma clang loop unroll(full)
  for (int j = 0; j < 8; ++j) {
    const float v = ok ? s * float(pack_value<BITS>(pk, j)) + b : 0.0f;
    if (TRANSPOSE) {
      ws[(tc + j) * MLXQ_QMM_LD + tr] = v;  // B[k][n] = W[n][k]
    } else {
      ws[tr * MLXQ_QMM_LD + tc + j] = v;  // B[n][k] = W[n][k]
    }
  }
}

// acc[2 * i + j] (the simdgroup's 16 x 16 share, 2 x 2 blocks of 8 x 8) += x tile @ weight tile
// over one BK step.
inline void qmm_multiply(const threadgroup float* xs, const threadgroup float* ws, int sy, int sx,
                         thread simdgroup_matrix<float, 8, 8>* acc) {
  constexpr int LD = MLXQ_QMM_LD;
#pragma clang loop unroll(full)
  for (int kk = 0; kk < MLXQ_QMM_BK; kk += 8) {
    simdgroup_matrix<float, 8, 8> a[2], bm[2];
#pragma clang loop unroll(full)
    for (int i = 0; i < 2; ++i) {
      simdgroup_load(a[i], xs + (sy * 16 + i * 8) * LD + kk, LD);
      simdgroup_load(bm[i], ws + kk * LD + sx * 16 + i * 8, LD);
    }
#pragma clang loop unroll(full)
    for (int i = 0; i < 2; ++i) {
#pragma clang loop unroll(full)
      for (int j = 0; j < 2; ++j) {
        simdgroup_multiply_accumulate(acc[2 * i + j], a[i], bm[j], acc[2 * i + j]);
      }
    }
  }
}

inline void qmm_clear(thread simdgroup_matrix<float, 8, 8>* acc) {
#pragma clang loop unroll(full)
  for (int i = 0; i < 4; ++i) {
    acc[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
}

// Stages the accumulators as the fp32 output tile in `xs` (the caller then synchronises).
inline void qmm_stage_out(const thread simdgroup_matrix<float, 8, 8>* acc, int sy, int sx,
                          threadgroup float* xs) {
#pragma clang loop unroll(full)
  for (int i = 0; i < 2; ++i) {
#pragma clang loop unroll(full)
    for (int j = 0; j < 2; ++j) {
      simdgroup_store(acc[2 * i + j], xs + (sy * 16 + i * 8) * MLXQ_QMM_LD + sx * 16 + j * 8,
                      MLXQ_QMM_LD);
    }
  }
}

// Writes this thread's 8 columns of staged output row tr to `yrow` (columns o0 + tc ..), rounded
// to T; columns past OUT are masked.
template <typename T>
inline void qmm_write_row(const threadgroup float* xs, device T* yrow, int OUT, int o0, int tr,
                          int tc) {
#pragma clang loop unroll(full)
  for (int j = 0; j < 8; ++j) {
    const int o = o0 + tc + j;
    if (o < OUT) {
      yrow[o] = T(xs[tr * MLXQ_QMM_LD + tc + j]);
    }
  }
}

template <typename T, int GS, int BITS, bool TRANSPOSE>
void affine_qmm_impl(const device T* x, const device uint* wq, const device T* scales,
                     const device T* biases, device T* y, constant AffineMatmulParams& p,
                     threadgroup float* tg, uint3 tgid, uint tid, uint sg, uint lane) {
  constexpr int BM = MLXQ_QMM_BM, BN = MLXQ_QMM_BN, BK = MLXQ_QMM_BK, LD = MLXQ_QMM_LD;
  static_assert(BM == 32 && BN == 32 && BK == 32, "the load mapping assumes 32x32x32 tiles");
  const int M = p.M, N = p.N, K = p.K, G = p.groups;
  const int IN = p.in_features, OUT = p.out_features;
  const long row_bytes = long(K) * BITS / 8;

  long xb, wb;
  batch_entries(p, tgid.z, xb, wb);
  x += xb * M * IN;
  const device uchar* wbytes = (const device uchar*)(wq + wb * N * (row_bytes / 4));
  scales += wb * N * G;
  biases += wb * N * G;
  y += long(tgid.z) * M * OUT;

  threadgroup float* xs = tg;            // [BM][LD]: x tile, later the output tile
  threadgroup float* ws = tg + BM * LD;  // [BK][LD]: dequantized weight, reduction-major

  const int m0 = int(tgid.y) * BM;
  const int o0 = int(tgid.x) * BN;
  const int sy = int(sg) / 2, sx = int(sg) % 2;  // this simdgroup's 16x16 sub-tile
  const int tr = int(tid) / 4;                   // tile row this thread loads
  const int tc = (int(tid) % 4) * 8;             // first of its 8 tile columns
  const int m = m0 + tr;                         // the row of x (and y) this thread stages
  const bool m_ok = m < M;
  const device T* xrow = x + (m_ok ? long(m) * IN : 0);

  simdgroup_matrix<float, 8, 8> acc[4];
  qmm_clear(acc);
  float s = 0.0f, b = 0.0f;  // scale and bias of the group this thread's pack lies in
  for (int r0 = 0; r0 < IN; r0 += BK) {
    qmm_stage_x<T>(xrow, m_ok, IN, r0, tr, tc, xs);
    qmm_stage_w<T, GS, BITS, TRANSPOSE>(wbytes, scales, biases, N, G, row_bytes, o0, r0, tr, tc,
                                        lane, s, b, ws);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    qmm_multiply(xs, ws, sy, sx, acc);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Stage the output tile in threadgroup memory, then write the valid part with rounding.
  qmm_stage_out(acc, sy, sx, xs);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (m_ok) {
    qmm_write_row<T>(xs, y + long(m) * OUT, OUT, o0, tr, tc);
  }
}

}  // namespace mlxq
