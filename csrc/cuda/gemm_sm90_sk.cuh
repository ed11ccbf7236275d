// The stream-K form of the fused Hopper prefill kernel (gemm_sm90.cuh: the design, the helpers
// and GemmParams): one block per multiprocessor, each with an equal range of the sequence of all
// tiles' stages of K (GemmParams::sk), so that no multiprocessor idles through a last, partial
// wave of whole tiles. A block computes the pieces of tiles its range holds one after another
// (each as a block of gemm_w4_sm90_kernel computes its tile: the same ring, dequantization and
// products). A tile cut between blocks is summed as the K split's are: every piece writes its
// fp32 partial to ws (slot 2 * block for a block's first piece, 2 * block + 1 for its last),
// counts itself in counters[tile], and the last to count sums the pieces in the order of K (the
// cuts depend on sk and the shape alone, so the sum is the same whichever block is last); no
// block waits for another.
#pragma once

#include "cuda/gemm_sm90.cuh"

namespace mlxq::cuda {

// Probe (harness only): 1 skips the dequantization (A = the packed words), 2 skips the x tiles.
// Ping: the warpgroups take turns issuing their products (see below).
template <typename T, int GS, int NT, int WGS, int Occ, int Probe = 0, bool Ping = true>
__global__ void __launch_bounds__(128 * WGS, Occ)
    gemm_w4_sm90_sk_kernel(const GemmParams p, const __grid_constant__ CUtensorMap map_x,
                           const __grid_constant__ CUtensorMap map_w) {
#ifdef MLXQ_WGMMA
  using namespace sm90;
  using Op = Wgmma<T>;
  using C = GemmCfg<NT, WGS, Occ>;
  constexpr int kStages = C::kStages, kStageBytes = C::kStageBytes, kXBytes = C::kXBytes;
  constexpr int kAhead = kStages - 2;  // stages in flight: a slot is reused two stages late
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem0 =
      (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t blk = blockIdx.x;
  const int nk = static_cast<int>(p.K / kGemmTileK);
  // The block's iterations [it, it_end) (tile * nk + stage of K), computed piece by piece
  const int64_t total = p.tiles * nk;
  int64_t it = total * blk / p.sk;
  const int64_t it_end = total * (blk + 1) / p.sk;
  const int64_t it_first = it;

  // full: a stage has landed (TMA transaction count); empty: both warpgroups are done with it
  __shared__ __align__(8) uint64_t full[kStages], empty[kStages];
  __shared__ int last;
  const uint32_t bar0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
  const uint32_t ebar0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
  if (tid == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbar_init(bar0 + 8 * i, 1);
      mbar_init(ebar0 + 8 * i, WGS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // wgmma's A fragment of warp w (rows 16w .. 16w + 15 of the block's W tile) gives lane (g, t)
  // rows g and g + 8 at values 2t, 2t + 1 (registers 0, 1) and 2t + 8, 2t + 9 (registers 2, 3)
  // of each 16 values of K: byte t of every packed word of the two rows.
  const int g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;
  const int ra = warp * 16 + g;  // the thread's first row in the tile; the second is ra + 8
  const uint32_t sel = t | (t << 4) | ((t + 4) << 8) | ((t + 4) << 12);
  uint8_t* stage = smem_raw + (smem0 - static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)));
  uint32_t gbase = 0;  // stages this block has consumed: slot and phase of the ring
  float d[C::kAcc];
  uint32_t a[4][4];  // the A fragment of one stage: [16 values of K][register]

  while (it < it_end) {
    const int64_t tile = it / nk;
    const int s0 = static_cast<int>(it % nk);
    const int nst = static_cast<int>(nk - s0 < it_end - it ? nk - s0 : it_end - it);
    int64_t m0, n0;  // rows of x, rows of W
    if (p.xmajor) {
      const int64_t tiles_n = p.tiles / p.tiles_m;
      m0 = (tile / tiles_n) * NT;
      n0 = (tile % tiles_n) * C::kTileN;
    } else {
      m0 = (tile % p.tiles_m) * NT;
      n0 = (tile / p.tiles_m) * C::kTileN;
    }

    // Thread 0 loads stage s of the piece (x box: 64 values x NT rows, swizzled; W box: 8 words x
    // 128 rows; rows past M or N arrive as zeros) into its slot once the block's stage
    // gbase + s - kStages has left it.
    auto load_stage = [&](int s) {
      const uint32_t q = gbase + s;
      const int slot = q % kStages;
      if (q >= kStages) mbar_wait(ebar0 + 8 * slot, ((q / kStages) - 1) & 1);
      const uint32_t base = smem0 + slot * kStageBytes, bar = bar0 + 8 * slot;
      mbar_expect_tx(bar, (Probe & 2) ? C::kWBytes : kStageBytes);
      const int k = s0 + s;  // stage of K
      if (!(Probe & 2)) tma_2d(base, &map_x, k * kGemmTileK, static_cast<int>(m0), bar);
      tma_2d(base + kXBytes, &map_w, k * (kGemmTileK / 8), static_cast<int>(n0), bar);
    };
    if (tid == 0) {
      for (int s = 0; s < kAhead && s < nst; ++s) load_stage(s);
    }

    const uint32_t* sba = p.sb + (n0 + ra < p.N ? n0 + ra : p.N - 1) * p.Gp;
    const uint32_t* sbb = p.sb + (n0 + ra + 8 < p.N ? n0 + ra + 8 : p.N - 1) * p.Gp;
    // (scale, bias) pairs of a stage for the two rows: [row][half of the stage] (group 32 has two
    // groups a stage), loaded two stages ahead into registers
    struct Pairs {
      uint32_t v[2][2];
    };
    auto load_pairs = [&](int s) -> Pairs {
      Pairs r{};
      if (s < nst) {
        const int64_t gi = (static_cast<int64_t>(s0 + s) * kGemmTileK) >> p.group_shift;
        r.v[0][0] = __ldg(sba + gi);
        r.v[1][0] = __ldg(sbb + gi);
        if constexpr (GS == 32) {
          r.v[0][1] = __ldg(sba + gi + 1);
          r.v[1][1] = __ldg(sbb + gi + 1);
        } else {
          r.v[0][1] = r.v[0][0];
          r.v[1][1] = r.v[1][0];
        }
      }
      return r;
    };
    Pairs pr_next = load_pairs(0), pr_after = load_pairs(1);

    // Where the piece's partial goes (my_slot) if the tile is cut, the tile's counter, its pieces
    // and their slots in the order of K (slot0 + 2 * q, plus slot0_extra for the first):
    // worked out here, where no accumulators are live across the 64-bit divisions' calls.
    int64_t my_slot = 0, counter = 0, slot0 = 0;
    int pieces = 1, slot0_extra = 0;
    if (nst < nk) {
      my_slot = 2 * blk + (it == it_first ? 0 : 1);
      counter = tile;
      const int64_t t0 = tile * nk, t1 = t0 + nk;
      int64_t b = t0 * p.sk / total;  // the block holding iteration t0
      while (b > 0 && total * b / p.sk > t0) --b;
      while (total * (b + 1) / p.sk <= t0) ++b;
      int64_t e = b;  // the block holding iteration t1 - 1
      while (total * (e + 1) / p.sk < t1) ++e;
      pieces = static_cast<int>(e - b + 1);
      // a block's piece is its first (slot 2b) unless its range starts before the tile (2b + 1)
      slot0 = 2 * b;
      slot0_extra = total * b / p.sk < t0 ? 1 : 0;
    }

#pragma unroll
    for (int i = 0; i < C::kAcc; ++i) d[i] = 0.f;

    // Each warpgroup dequantizes stage s into its registers, multiplies, and waits for the
    // products before it frees the slot. ptxas serializes wgmma whose register inputs are written
    // while earlier wgmma are still in flight (C7513), so a warpgroup does not overlap its own
    // dequantization with its products: the two warpgroups run apart (no barrier ties them within
    // a stage), and one dequantizes while the other's products run.
    for (int s = 0; s < nst; ++s) {
      if (tid == 0 && s + kAhead < nst) load_stage(s + kAhead);
      const uint32_t q = gbase + s;
      const int slot = q % kStages;
      const uint32_t base = smem0 + slot * kStageBytes;
      const Pairs pr = pr_next;
      pr_next = pr_after;
      pr_after = load_pairs(s + 2);
      mbar_wait(bar0 + 8 * slot, (q / kStages) & 1);  // stage s has landed
      const uint32_t wrow = base + kXBytes + ra * 32;
      const uint4 la = lds128(wrow), ha = lds128(wrow + 16);
      const uint4 lb = lds128(wrow + 256), hb = lds128(wrow + 256 + 16);
      const uint32_t wa[8] = {la.x, la.y, la.z, la.w, ha.x, ha.y, ha.z, ha.w};
      const uint32_t wb[8] = {lb.x, lb.y, lb.z, lb.w, hb.x, hb.y, hb.z, hb.w};
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // the two halves of the stage (two groups at group size 32)
        const uint32_t sa = __byte_perm(pr.v[0][h], 0, 0x1010);
        const uint32_t ba = __byte_perm(pr.v[0][h], 0, 0x3232);
        const uint32_t sb = __byte_perm(pr.v[1][h], 0, 0x1010);
        const uint32_t bb = __byte_perm(pr.v[1][h], 0, 0x3232);
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int j = 2 * h + jj;  // 16 values of K: words 2j, 2j + 1
          const uint32_t w[4] = {wa[2 * j], wb[2 * j], wa[2 * j + 1], wb[2 * j + 1]};
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const uint32_t u = and_or<0x000F000Fu, Op::kMagic>(__byte_perm(w[r], w[r] >> 4, sel));
            a[j][r] = (Probe & 1) ? w[r] : (r & 1) ? Op::deq(u, sb, bb) : Op::deq(u, sa, ba);
          }
        }
      }
      keep(a);
      // Ping: warpgroup w issues its products of stage s after warpgroup w - 1 has issued its own
      // (the first after the last's of stage s - 1), meant to keep the warpgroups' dequantization
      // apart so that one's products hide another's dequantization. Measured on an H200: 4-9%
      // slower for 128 x 256 blocks, the same to slightly faster for the smaller ones (the host
      // picks it per block shape).
      if (Ping && (s > 0 || wg > 0)) {
        asm volatile("bar.sync %0, 256;\n" ::"r"(2 + wg) : "memory");
      }
      __syncwarp();  // the waits above may leave lanes apart; wgmma instructions are .aligned
      keep(d);
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
      for (int j = 0; j < 4; ++j) Op::mma(d, a[j], smem_desc(base + 32 * j));
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      if (Ping && (s + 1 < nst || wg + 1 < WGS)) {
        asm volatile("bar.arrive %0, 256;\n" ::"r"(2 + (wg + 1) % WGS) : "memory");
      }
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
      keep(a);
      keep(d);
      if ((tid & 127) == 0) mbar_arrive(ebar0 + 8 * slot);
    }
    gbase += nst;
    it += nst;

    // A piece of a tile cut in K: write the partial, and the last piece sums them in K order.
    bool write = true;
    if (nst < nk) {
      constexpr int kVecs = C::kAcc / 4 * C::kThreads;  // float4 of one partial tile
      float4* ws = reinterpret_cast<float4*>(p.ws);
#pragma unroll
      for (int c = 0; c < C::kAcc / 4; ++c) {
        __stcg(ws + my_slot * kVecs + c * C::kThreads + tid,
               make_float4(d[4 * c], d[4 * c + 1], d[4 * c + 2], d[4 * c + 3]));
      }
      __threadfence();
      asm volatile("bar.sync 1, %0;\n" ::"n"(C::kThreads) : "memory");
      if (tid == 0) last = atomicAdd(p.counters + counter, 1) == pieces - 1;
      asm volatile("bar.sync 1, %0;\n" ::"n"(C::kThreads) : "memory");
      write = last;
      if (write) {
        __threadfence();
        const float4* src = ws + (slot0 + slot0_extra) * kVecs + tid;
#pragma unroll
        for (int c = 0; c < C::kAcc / 4; ++c) {
          float4 v = __ldcg(src + c * C::kThreads);
          for (int q = 1; q < pieces; ++q) {
            const float4 u = __ldcg(ws + (slot0 + 2 * q) * kVecs + c * C::kThreads + tid);
            v.x += u.x, v.y += u.y, v.z += u.z, v.w += u.w;
          }
          d[4 * c] = v.x, d[4 * c + 1] = v.y, d[4 * c + 2] = v.z, d[4 * c + 3] = v.w;
        }
        if (tid == 0) p.counters[counter] = 0;
      }
    }

    // Output: the warpgroups are done with the ring (all stages of the piece landed and were
    // multiplied, and no later stage is loaded before the barrier at the end), so the tile of y is
    // staged there, row m of x at C::kOutStride bytes, then written out along the rows of y.
    // d[4j + e]: row of W 16 * warp + g (+ 8 for e >= 2), row of x 8j + 2t + (e & 1).
    if (write) {
      asm volatile("bar.sync 1, %0;\n" ::"n"(C::kThreads) : "memory");
#pragma unroll
      for (int j = 0; j < NT / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = 8 * j + 2 * t + (e & 1), n = ra + 8 * (e >> 1);
          *reinterpret_cast<T*>(stage + m * C::kOutStride + 2 * n) = from_float<T>(d[4 * j + e]);
        }
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(C::kThreads) : "memory");
      T* y = static_cast<T*>(p.y);
      constexpr int kChunks = C::kTileN / 8;  // 16-byte vectors per staged row
      for (int c = tid; c < NT * kChunks; c += C::kThreads) {
        const int ml = c / kChunks, nc = c % kChunks;
        const int64_t m = m0 + ml, n = n0 + 8 * nc;
        if (m >= p.M || n >= p.N) continue;
        const uint8_t* src = stage + ml * C::kOutStride + 16 * nc;
        if (p.vec_out && n + 8 <= p.N) {
          *reinterpret_cast<uint4*>(y + m * p.N + n) = *reinterpret_cast<const uint4*>(src);
        } else {
          for (int i = 0; i < 8 && n + i < p.N; ++i)
            y[m * p.N + n + i] = reinterpret_cast<const T*>(src)[i];
        }
      }
    }
    if (it < it_end) {  // the next piece's loads overwrite the staged tile: all reads done first
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      asm volatile("bar.sync 1, %0;\n" ::"n"(C::kThreads) : "memory");
    }
  }
#else
  __trap();  // the host only launches this kernel on sm_90 with the sm_90a build
#endif
}

}  // namespace mlxq::cuda
