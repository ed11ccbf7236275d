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
  const ushort quad_lead = ushort(lane & ~3u);

  simdgroup_matrix<float, 8, 8> acc[2][2];
#pragma clang loop unroll(full)
  for (int i = 0; i < 2; ++i) {
#pragma clang loop unroll(full)
    for (int j = 0; j < 2; ++j) {
      acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }

  float s = 0.0f, b = 0.0f;  // scale and bias of the group this thread's pack lies in
  for (int r0 = 0; r0 < IN; r0 += BK) {
    // x tile: row m0 + tr, reduction columns r0 + tc .. +8.
    {
      const int m = m0 + tr;
#pragma clang loop unroll(full)
      for (int j = 0; j < 8; ++j) {
        const int r = r0 + tc + j;
        xs[tr * LD + tc + j] = (m < M && r < IN) ? float(x[long(m) * IN + r]) : 0.0f;
      }
    }
    // Weight tile: 32 weight rows x 32 weight columns, one pack of 8 values per thread.
    {
      const int wr = (TRANSPOSE ? o0 : r0) + tr;  // weight row (n)
      const int wc = (TRANSPOSE ? r0 : o0) + tc;  // first weight column (k) of the pack
      const bool ok = wr < N;
      const ulong pk = ok ? load_pack<BITS>(wbytes + wr * row_bytes, wc / 8) : ulong(0);
      // With TRANSPOSE a thread keeps its weight row and walks K, so a group's scale and bias
      // are loaded once when the walk enters the group (r0 is uniform: so is the shuffle).
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
          ws[(tc + j) * LD + tr] = v;  // B[k][n] = W[n][k]
        } else {
          ws[tr * LD + tc + j] = v;  // B[n][k] = W[n][k]
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

#pragma clang loop unroll(full)
    for (int kk = 0; kk < BK; kk += 8) {
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
          simdgroup_multiply_accumulate(acc[i][j], a[i], bm[j], acc[i][j]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Stage the output tile in threadgroup memory, then write the valid part with rounding.
#pragma clang loop unroll(full)
  for (int i = 0; i < 2; ++i) {
#pragma clang loop unroll(full)
    for (int j = 0; j < 2; ++j) {
      simdgroup_store(acc[i][j], xs + (sy * 16 + i * 8) * LD + sx * 16 + j * 8, LD);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int m = m0 + tr;
  if (m < M) {
#pragma clang loop unroll(full)
    for (int j = 0; j < 8; ++j) {
      const int o = o0 + tc + j;
      if (o < OUT) {
        y[long(m) * OUT + o] = T(xs[tr * LD + tc + j]);
      }
    }
  }
}

}  // namespace mlxq
