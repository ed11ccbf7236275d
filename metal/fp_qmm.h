// fp_qmm: tiled y = x @ W^T (TRANSPOSE) or x @ W for many rows of x (prefill), W in one of
// MLX's floating-point modes. The tiling is affine_qmm's: a threadgroup computes a BM x BN
// output tile with 4 simdgroups in a 2 x 2 layout, each owning 16 x 16 outputs as 2 x 2
// simdgroup_matrix<float, 8, 8> accumulators; the reduction runs in steps of BK = 32 with the
// x tile (as fp32) and the dequantized weight tile staged in threadgroup memory. Each of the
// 128 threads dequantizes one pack of 8 values (4 or 8 bytes, read once) with its group's
// scale (a pack never straddles a group: groups are 16 or 32 values). K is a multiple of the
// group size, not of 32 (nvfp4: 16), so weight packs past K are zero-filled like partial tiles
// of M and N, and outputs past M or out_features are masked on store.
#pragma once

#include "fp_format.h"

namespace mlxq {

constant constexpr int kQmmLoadCols = 8;  // tile columns one thread loads (one pack)

// x tile: row m0 + tr, reduction columns r0 + tc .. + 8, as fp32 (0 outside x).
template <typename T>
inline void load_x_tile(const device T* x, threadgroup float* xs, int M, int IN, int m0, int r0,
                        int tr, int tc) {
  const int m = m0 + tr;
#pragma clang loop unroll(full)
  for (int j = 0; j < kQmmLoadCols; ++j) {
    const int r = r0 + tc + j;
    xs[tr * MLXQ_QMM_LD + tc + j] = (m < M && r < IN) ? float(x[long(m) * IN + r]) : 0.0f;
  }
}

// One pack of 8 weight values W[wr][wc .. wc + 8], dequantized to fp32 (0 outside W), stored
// reduction-major in the weight tile: ws[k][n] for TRANSPOSE, ws[n][k] otherwise. The GS / 8
// consecutive lanes whose packs share a group (same row, consecutive columns) get its scale
// from their first lane by shuffle, so each scale byte is read once per tile (all lanes call
// this: the shuffle is uniform).
template <int MODE, bool TRANSPOSE>
inline void load_w_pack(const device uchar* wbytes, const device uchar* scales,
                        threadgroup float* ws, int N, int K, int G, long row_bytes,
                        float global_factor, int wr, int wc, int tr, int tc, uint lane) {
  constexpr int GS = fp_group_size(MODE), BITS = fp_bits(MODE);
  const bool ok = wr < N && wc < K;
  const ulong pk = ok ? load_pack<BITS>(wbytes + wr * row_bytes, wc / 8) : ulong(0);
  const ushort lead = ushort(lane & ~uint(GS / 8 - 1));
  float sv = 0.0f;
  if (ok && ushort(lane) == lead) {
    sv = fp_scale<MODE>(uint(scales[long(wr) * G + wc / GS]), global_factor);
  }
  const float s = simd_shuffle(sv, lead);
#pragma clang loop unroll(full)
  for (int j = 0; j < kQmmLoadCols; ++j) {
    const float v = s * fp_element<MODE>(pack_value<BITS>(pk, j));
    if (TRANSPOSE) {
      ws[(tc + j) * MLXQ_QMM_LD + tr] = v;  // B[k][n] = W[n][k]
    } else {
      ws[tr * MLXQ_QMM_LD + tc + j] = v;  // B[n][k] = W[n][k]
    }
  }
}

// acc (2 x 2 blocks of 8 x 8, row-major) += the simdgroup's 16 x 16 share of
// (x tile) @ (weight tile) over one BK step.
inline void tile_multiply(const threadgroup float* xs, const threadgroup float* ws, int sy, int sx,
                          thread simdgroup_matrix<float, 8, 8>* acc) {
  constexpr int LD = MLXQ_QMM_LD;
#pragma clang loop unroll(full)
  for (int kk = 0; kk < MLXQ_QMM_BK; kk += 8) {
    simdgroup_matrix<float, 8, 8> a[2], b[2];
#pragma clang loop unroll(full)
    for (int i = 0; i < 2; ++i) {
      simdgroup_load(a[i], xs + (sy * 16 + i * 8) * LD + kk, LD);
      simdgroup_load(b[i], ws + kk * LD + sx * 16 + i * 8, LD);
    }
#pragma clang loop unroll(full)
    for (int i = 0; i < 2; ++i) {
#pragma clang loop unroll(full)
      for (int j = 0; j < 2; ++j) {
        simdgroup_multiply_accumulate(acc[2 * i + j], a[i], b[j], acc[2 * i + j]);
      }
    }
  }
}

template <typename T, int MODE, bool TRANSPOSE>
void fp_qmm_impl(const device T* x, const device uint* wq, const device uchar* scales,
                 const device float* global_scale, device T* y, constant AffineMatmulParams& p,
                 threadgroup float* tg, uint3 tgid, uint tid, uint sg, uint lane) {
  constexpr int BM = MLXQ_QMM_BM, BN = MLXQ_QMM_BN, BK = MLXQ_QMM_BK, LD = MLXQ_QMM_LD;
  static_assert(BM == 32 && BN == 32 && BK == 32, "the load mapping assumes 32x32x32 tiles");
  constexpr int BITS = fp_bits(MODE);
  const int M = p.M, N = p.N, K = p.K, G = p.groups;
  const int IN = p.in_features, OUT = p.out_features;
  const long row_bytes = long(K) * BITS / 8;

  long xb, wb;
  batch_entries(p, tgid.z, xb, wb);
  x += xb * M * IN;
  const device uchar* wbytes = (const device uchar*)wq + wb * N * row_bytes;
  scales += wb * N * G;
  y += long(tgid.z) * M * OUT;
  const float global_factor = fp_global_factor<MODE>(global_scale);

  threadgroup float* xs = tg;            // [BM][LD]: x tile, later the output tile
  threadgroup float* ws = tg + BM * LD;  // [BK][LD]: dequantized weight, reduction-major

  const int m0 = int(tgid.y) * BM;
  const int o0 = int(tgid.x) * BN;
  const int sy = int(sg) / 2, sx = int(sg) % 2;  // this simdgroup's 16x16 sub-tile
  const int tr = int(tid) / 4;                   // tile row this thread loads
  const int tc = (int(tid) % 4) * kQmmLoadCols;  // first of its 8 tile columns

  simdgroup_matrix<float, 8, 8> acc[4];
#pragma clang loop unroll(full)
  for (int i = 0; i < 4; ++i) {
    acc[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }

  for (int r0 = 0; r0 < IN; r0 += BK) {
    load_x_tile<T>(x, xs, M, IN, m0, r0, tr, tc);
    const int wr = (TRANSPOSE ? o0 : r0) + tr;  // weight row (n)
    const int wc = (TRANSPOSE ? r0 : o0) + tc;  // first weight column (k) of the pack
    load_w_pack<MODE, TRANSPOSE>(wbytes, scales, ws, N, K, G, row_bytes, global_factor, wr, wc, tr,
                                 tc, lane);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    tile_multiply(xs, ws, sy, sx, acc);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Stage the output tile in threadgroup memory, then write the valid part with rounding.
#pragma clang loop unroll(full)
  for (int i = 0; i < 2; ++i) {
#pragma clang loop unroll(full)
    for (int j = 0; j < 2; ++j) {
      simdgroup_store(acc[2 * i + j], xs + (sy * 16 + i * 8) * LD + sx * 16 + j * 8, LD);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int m = m0 + tr;
  if (m < M) {
#pragma clang loop unroll(full)
    for (int j = 0; j < kQmmLoadCols; ++j) {
      const int o = o0 + tc + j;
      if (o < OUT) {
        y[long(m) * OUT + o] = T(xs[tr * LD + tc + j]);
      }
    }
  }
}

}  // namespace mlxq
