// Sorted gather qmm for MLX's floating-point modes: the body of affine_gather_rhs.h with the
// weight tiles of fp_qmm (load_w_pack: one pack of 8 values per thread, its group's scale byte
// shared by shuffle, packs past K zero-filled since nvfp4's K is a multiple of 16, not 32).
// nvfp4's global scale is one float per matrix of wq (buffer 3), read once per pass.
#pragma once

#include "affine_gather_rhs.h"
#include "fp_qmm.h"

namespace mlxq {

template <int MODE, bool TRANSPOSE>
struct FpTiles {
  const device uint* wq;
  const device uchar* scales;
  const device float* global_scale;
  int N, K, G;
  long row_bytes;
  const device uchar* w_e;
  const device uchar* s_e;
  float factor;

  void select(uint e) {
    const long w0 = long(e) * N;  // first row of expert e
    w_e = (const device uchar*)wq + w0 * row_bytes;
    s_e = scales + w0 * G;
    factor = fp_global_factor<MODE>(global_scale + e);
  }
  void stage(int o0, int r0, int tr, int tc, uint lane, threadgroup float* ws) {
    const int wr = (TRANSPOSE ? o0 : r0) + tr;  // weight row (n)
    const int wc = (TRANSPOSE ? r0 : o0) + tc;  // first weight column (k) of the pack
    load_w_pack<MODE, TRANSPOSE>(w_e, s_e, ws, N, K, G, row_bytes, factor, wr, wc, tr, tc, lane);
  }
};

template <typename T, int MODE, bool TRANSPOSE>
void fp_gather_qmm_rhs_impl(const device T* x, const device uint* wq, const device uchar* scales,
                            const device float* global_scale, device T* y,
                            constant AffineMatmulParams& p, const device uint* lhs,
                            const device uint* rhs, threadgroup float* tg,
                            threadgroup uint* tile_rows, uint3 tgid, uint tid, uint sg, uint lane) {
  FpTiles<MODE, TRANSPOSE> tiles;
  tiles.wq = wq;
  tiles.scales = scales;
  tiles.global_scale = global_scale;
  tiles.N = p.N;
  tiles.K = p.K;
  tiles.G = p.groups;
  tiles.row_bytes = long(p.K) * fp_bits(MODE) / 8;
  gather_rhs_impl<T>(x, y, p, tiles, lhs, rhs, tg, tile_rows, tgid, tid, sg, lane);
}

}  // namespace mlxq
