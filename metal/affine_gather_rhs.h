// Sorted gather qmm (MoE prefill; MLX calls its version gather_qmm_rhs). mlx-lm sorts the
// (token, expert) pairs of a prompt by expert and passes sorted_indices=True: consecutive pairs
// then mostly share their expert. The per-pair gather kernels (affine_gather.h) read an expert's
// weights once per pair; here the rows of all pairs form one [P * M, in_features] matrix (row f
// is row f % M of pair f / M: x's matrix lhs[f / M], expert rhs[f / M], output row f) that is
// tiled like affine_qmm, so a weight tile is read once per block of 32 rows instead of once per
// pair. A block whose rows belong to several experts (a run boundary, or indices that are not
// sorted after all: the hint is never trusted for correctness) is computed once per run of
// equal experts, each pass reading that expert's weight tile with only the run's x rows staged
// (the other rows are zeros) and storing only the run's output rows. The body is generic over
// how a weight tile is staged (`Tiles`: AffineTiles here, FpTiles in fp_gather_rhs.h).
#pragma once

#include "affine_qmm.h"

namespace mlxq {

// Weight tiles of affine experts: select(e) points at expert e of the stacked [E * N] rows,
// stage(...) dequantizes one 32 x 32 tile (qmm_stage_w; `s`, `b` carry the group's scale and
// bias between the K steps of one pass).
template <typename T, int GS, int BITS, bool TRANSPOSE>
struct AffineTiles {
  const device uint* wq;
  const device T* scales;
  const device T* biases;
  int N, G;
  long row_bytes;
  const device uchar* w_e;
  const device T* s_e;
  const device T* b_e;
  float s, b;

  void select(uint e) {
    const long w0 = long(e) * N;  // first row of expert e
    w_e = (const device uchar*)wq + w0 * row_bytes;
    s_e = scales + w0 * G;
    b_e = biases + w0 * G;
    s = 0.0f;
    b = 0.0f;
  }
  void stage(int o0, int r0, int tr, int tc, uint lane, threadgroup float* ws) {
    qmm_stage_w<T, GS, BITS, TRANSPOSE>(w_e, s_e, b_e, N, G, row_bytes, o0, r0, tr, tc, lane, s, b,
                                        ws);
  }
};

template <typename T, typename Tiles>
void gather_rhs_impl(const device T* x, device T* y, constant AffineMatmulParams& p,
                     thread Tiles& tiles, const device uint* lhs, const device uint* rhs,
                     threadgroup float* tg, threadgroup uint* tile_rows, uint3 tgid, uint tid,
                     uint sg, uint lane) {
  constexpr int BM = MLXQ_QMM_BM, BN = MLXQ_QMM_BN, BK = MLXQ_QMM_BK, LD = MLXQ_QMM_LD;
  static_assert(BM == 32 && BN == 32 && BK == 32, "the load mapping assumes 32x32x32 tiles");
  const int M = p.M;
  const int IN = p.in_features, OUT = p.out_features;
  const long rows = long(p.batch) * long(M);  // rows of all pairs (p.batch = pairs)
  const long f0 = long(tgid.y) * BM;          // first row of this block
  const int block_rows = rows - f0 < BM ? int(rows - f0) : BM;

  threadgroup float* xs = tg;                // [BM][LD]: x tile, later the output tile
  threadgroup float* ws = tg + BM * LD;      // [BK][LD]: dequantized weight, reduction-major
  threadgroup uint* expert = tile_rows;      // [BM]: rhs index of each row of the block
  threadgroup uint* x_mat = tile_rows + BM;  // [BM]: lhs index (x's matrix) of each row

  // Each row's pair indices are read once per threadgroup, by one thread.
  if (int(tid) < block_rows) {
    const long pair = (f0 + long(tid)) / M;
    expert[tid] = rhs[pair];
    x_mat[tid] = lhs[pair];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const int o0 = int(tgid.x) * BN;
  const int sy = int(sg) / 2, sx = int(sg) % 2;  // this simdgroup's 16x16 sub-tile
  const int tr = int(tid) / 4;                   // block row this thread stages and writes
  const int tc = (int(tid) % 4) * 8;             // first of its 8 tile columns
  const bool row_ok = tr < block_rows;
  const long f = f0 + tr;
  const device T* xrow = x + (row_ok ? (long(x_mat[tr]) * M + f % M) * IN : 0);
  device T* yrow = y + (row_ok ? f * OUT : 0);

  simdgroup_matrix<float, 8, 8> acc[4];
  // Runs of equal experts, in order; every thread walks the same staged indices, so the loop
  // (and the barriers in it) is uniform over the threadgroup.
  for (int a = 0; a < block_rows;) {
    const uint e = expert[a];
    int b = a + 1;
    while (b < block_rows && expert[b] == e) {
      ++b;
    }
    const bool in_run = row_ok && tr >= a && tr < b;
    tiles.select(e);
    qmm_clear(acc);
    for (int r0 = 0; r0 < IN; r0 += BK) {
      qmm_stage_x<T>(xrow, in_run, IN, r0, tr, tc, xs);
      tiles.stage(o0, r0, tr, tc, lane, ws);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      qmm_multiply(xs, ws, sy, sx, acc);
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    qmm_stage_out(acc, sy, sx, xs);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // No barrier before the next run: a thread reads back exactly the xs elements it stages
    // next (row tr, columns tc .. + 8), and ws was last read before the K loop's last barrier.
    if (in_run) {
      qmm_write_row<T>(xs, yrow, OUT, o0, tr, tc);
    }
    a = b;
  }
}

template <typename T, int GS, int BITS, bool TRANSPOSE>
void affine_gather_qmm_rhs_impl(const device T* x, const device uint* wq, const device T* scales,
                                const device T* biases, device T* y, constant AffineMatmulParams& p,
                                const device uint* lhs, const device uint* rhs,
                                threadgroup float* tg, threadgroup uint* tile_rows, uint3 tgid,
                                uint tid, uint sg, uint lane) {
  AffineTiles<T, GS, BITS, TRANSPOSE> tiles;
  tiles.wq = wq;
  tiles.scales = scales;
  tiles.biases = biases;
  tiles.N = p.N;
  tiles.G = p.groups;
  tiles.row_bytes = long(p.K) * BITS / 8;
  gather_rhs_impl<T>(x, y, p, tiles, lhs, rhs, tg, tile_rows, tgid, tid, sg, lane);
}

}  // namespace mlxq
