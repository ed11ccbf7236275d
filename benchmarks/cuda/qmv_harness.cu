// Standalone harness for the CUDA decode kernels (no torch): numerics against a float64 CPU
// reference and timings (CUDA-graph replay over enough weight copies to miss the L2) next to the
// device's copy and read bandwidth, in one run. Build and run on the GPU machine:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        benchmarks/cuda/qmv_harness.cu -o /tmp/qmv_harness && /tmp/qmv_harness
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda/kernels.cuh"
#include "cuda/qmv_bulk.cuh"
#include "cuda/qmv_stream.cuh"
#include "harness.h"
#include "qmv_problem.h"

using namespace mlxq::cuda;

static int g_sms = 132;
static int64_t g_smem_optin = 227 * 1024;
static int64_t g_smem_sm = 228 * 1024;
static int g_max_copies = 16;  // weight copies a timing cycles through ("small": 64)

struct Problem {
  int64_t N, K, GS;
  int M;
  bool half;
  int xspread = 0;  // x = +-(1 + u) 2^e, e uniform over [lo, lo + xspread) per value (0: [-2, 2])
  int xlo = 0;
  std::vector<uint32_t> w;
  std::vector<uint16_t> s, b, x;
  int copies = 1;
  std::vector<uint32_t*> dw;
  std::vector<uint16_t*> ds, db;
  uint16_t* dx = nullptr;
  uint16_t* dy = nullptr;
  int64_t G() const { return K / GS; }
  double packed_bytes() const { return N * K / 2.0 + 2.0 * N * G() * 2; }
};

static void make(Problem& P, int copies) {
  const int64_t G = P.G();
  P.w.resize(P.N * P.K / 8);
  for (auto& v : P.w) v = static_cast<uint32_t>(rnd());
  P.s.resize(P.N * G);
  P.b.resize(P.N * G);
  for (int64_t i = 0; i < P.N * G; ++i) {
    float sc = 0.002f + 0.02f * urand();
    if (rnd() & 1) sc = -sc;
    P.s[i] = to_h(sc, P.half);
    P.b[i] = to_h(-0.1f + 0.2f * urand(), P.half);
  }
  P.x.resize(P.M * P.K);
  for (auto& v : P.x) {
    if (P.xspread == 0) {
      v = to_h(-2.f + 4.f * urand(), P.half);
    } else {
      const int e = P.xlo + static_cast<int>(rnd() % static_cast<uint64_t>(P.xspread));
      const float m = std::ldexp(1.f + urand(), e);
      v = to_h((rnd() & 1) ? -m : m, P.half);
    }
  }
  upload(P, copies);
}

// ---- kernels under test ---------------------------------------------------------------------

template <typename T, int MT, int R, int U, bool Pre>
Launch cores() {
  return [](const QmvParams& p, cudaStream_t s) {
    const int64_t warps = (p.N + R - 1) / R;
    const int64_t blocks = (warps + kDecodeWarps - 1) / kDecodeWarps;
    qmv_kernel<4, MT, R, U, Pre, T><<<static_cast<unsigned>(blocks), kDecodeWarps * 32, 0, s>>>(p);
  };
}

template <int GS, int U, bool H, typename T, bool LoadsOnly = false, int MB = 2, int Ring = 0,
          int W = kStreamWarps, Prod P = Prod::kNative, int E = 0>
Launch stream(int kw_force = 0) {
  return [kw_force](const QmvParams& p, cudaStream_t s) {
    const StreamGrid grid = qmv_stream_grid(p.N, p.K, U, g_sms, MB, kw_force, W);
    const int smem = static_cast<int>(qmv_stream_smem(p.M, p.K, Ring * U * 1024, W));
    auto k = qmv_stream_kernel<GS, U, H, T, LoadsOnly, MB, Ring, W, P, E>;
    if (smem > 48 * 1024)
      CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    k<<<static_cast<unsigned>(grid.blocks), W * 32, smem, s>>>(p, grid.kw);
  };
}

// The interleaved form of the op's ring variant, kept here as a measured alternative (it is not
// faster). One block of Warps warps a multiprocessor, block b taking the tiles [tiles * b / B,
// tiles * (b + 1) / B) and its warps that block's (tile, step) pairs round robin, tile by tile:
// warp w takes pairs w, w + Warps, ... So the warps of a multiprocessor read neighbouring steps of
// the same 16 rows at once (with K = 8192 whole 4 KB rows, where the op's whole tiles a warp read
// 256 bytes of each of 256 rows), and every multiprocessor gets the same work within one step a
// warp (the op's 16-warp blocks of whole tiles fill 112 of 132 multiprocessors at 28672 x 8192).
// Each pair's partial sums go to shared memory, and each output adds its tile's in the order of K.
// H200, bf16, M = 1, us, one run (qmv_harness "ilv" mode then): 28672 x 8192 group 128 38.1
// against the op's 37.6, 64 40.6 / 40.1, 32 46.9 / 45.3, M = 2 39.6 / 38.1; 8192 x 28672 42.1 /
// 40.6. Splitting each block's pairs into contiguous ranges instead (up to two tiles a warp, the
// same balance without the neighbouring reads) was slower still: 42.2 / 37.2 at group 128.
static int64_t qmv_stream_ilv_pairs(int64_t N, int64_t K, int U, int blocks) {
  const int64_t tiles = (N + 15) / 16, steps = ((K / 32 + 3) / 4 + U - 1) / U;
  return (tiles + blocks - 1) / blocks * steps;  // the most pairs a block takes
}
static int64_t qmv_stream_ilv_smem(int64_t N, int64_t M, int64_t K, int U, int blocks,
                                   int64_t ring_bytes, int warps) {
  return qmv_stream_smem(M, K, ring_bytes, warps) + qmv_stream_ilv_pairs(N, K, U, blocks) * 128;
}

// Probe: 1 the copies alone, 2 the products alone (no weight copies); wrong results.
template <int GS, int U, typename T, int Ring, int Warps, int Probe = 0>
__global__ void __launch_bounds__(Warps * 32, 1) qmv_stream_ilv_kernel(const QmvParams p) {
  using S = StreamStep<GS, U>;
  static_assert(Ring >= 2, "the interleaved form streams through the ring");
  extern __shared__ __align__(16) uint8_t stream_smem[];
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int M = p.M;
  const int chunks = static_cast<int>(p.K / 32), spans = (chunks + 3) / 4;
  const int steps = (spans + U - 1) / U;  // of a tile
  const int kp = steps * U * 128;         // K padded to whole steps (<= qmv_stream_smem's)
  uint4* xs = reinterpret_cast<uint4*>(stream_smem);                               // [M][kp / 8]
  float* sx = reinterpret_cast<float*>(stream_smem + M * kp * 2);                  // [M][kp / 32]
  uint4* zeros = reinterpret_cast<uint4*>(stream_smem + M * kp * 2 + M * kp / 8);  // [16]
  constexpr uint32_t kSlot = U * 1024;
  float* red = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(zeros + 16) +
                                        Warps * Ring * kSlot);  // [pairs][2][16]

  const int64_t tiles = (p.N + 15) / 16;
  const int64_t T0 = tiles * blockIdx.x / gridDim.x, T1 = tiles * (blockIdx.x + 1) / gridDim.x;
  const int pairs = static_cast<int>(T1 - T0) * steps;
  const int n = wi < pairs ? (pairs - wi + Warps - 1) / Warps : 0;  // pairs of this warp

  StreamLane Lw, Ls;  // the pairs of the copies and of the scales, which run ahead
  Lw.chunks = chunks, Lw.spans = spans, Lw.t = t, Lw.G = static_cast<int>(p.G);
  Lw.sb_vec = p.G % 8 == 0, Lw.policy = 0;
  Ls = Lw;
  const auto point = [&](StreamLane& l, int tl) {  // tl: a tile of this block
    const int64_t n0 = (T0 + tl) * 16, last = p.N - 1;
    const int64_t ra = n0 + g < p.N ? n0 + g : last;
    const int64_t rb = n0 + g + 8 < p.N ? n0 + g + 8 : last;
    const int64_t rs = n0 + (lane & 15) < p.N ? n0 + (lane & 15) : last;
    const int64_t row_words = p.K / 8;
    l.wa = reinterpret_cast<const uint4*>(p.w + ra * row_words) + t;
    l.wb = reinterpret_cast<const uint4*>(p.w + rb * row_words) + t;
    l.sbp = static_cast<const uint16_t*>(lane < 16 ? p.scales : p.biases) + rs * p.G;
  };
  // Cursors (tile, step) of the copies, the scales and the products: each moves Warps pairs on.
  struct Cursor {
    int tile, step;
  };
  const auto advance = [&](Cursor& c) {
    c.step += Warps;
    while (c.step >= steps) c.step -= steps, ++c.tile;
  };
  const Cursor first = {wi / steps, wi % steps};
  Cursor cw = first, cs = first, cp = first;
  const uint32_t ring =
      static_cast<uint32_t>(__cvta_generic_to_shared(zeros + 16)) + wi * Ring * kSlot + lane * 16;
  const auto issue_next = [&](uint32_t slot) {
    point(Lw, cw.tile);
    if constexpr (Probe != 2) ring_issue<U>(Lw, cw.step, slot);
    advance(cw);
  };
  S cur, nxt;
  const auto load_sb_next = [&](S& st) {
    point(Ls, cs.tile);
    stream_load_sb<GS, U>(Ls, cs.step, st);
    advance(cs);
  };
  if (n > 0) issue_next(ring), load_sb_next(cur);  // on their way while x is staged
  asm volatile("cp.async.commit_group;");
#pragma unroll
  for (int s = 1; s < Ring - 1; ++s) {
    if (s < n) issue_next(ring + s * kSlot);
    asm volatile("cp.async.commit_group;");
  }

  const uint4 none[1] = {};
  stream_stage_x<T, Warps * 32, 1, false>(p, kp, xs, sx, none);
  if (threadIdx.x < 16) zeros[threadIdx.x] = make_uint4(0u, 0u, 0u, 0u);
  __syncthreads();

  // the B operand and the sums of x as in qmv_stream_kernel
  const int per_row = kp / 8, xm = g >> 2;
  const bool has_x = GS == 128 || ((g & 3) == t && xm < M);
  const uint4* xrow = has_x ? xs + (xm < M ? xm : M - 1) * per_row + t : zeros;
  const int xstride = has_x ? 16 : 0;
  const int om = t >> 1;
  const float* sxrow = sx + (om < M ? om : 0) * (kp / 32);
  for (int i = 0; i < n; ++i) {
    if (i + Ring - 1 < n) issue_next(ring + ((i + Ring - 1) % Ring) * kSlot);
    asm volatile("cp.async.commit_group;");
    asm volatile("cp.async.wait_group %0;" ::"n"(Ring - 1));
    if constexpr (Probe == 1) continue;
    ring_read<GS, U>(ring + (i % Ring) * kSlot, cur);
    if (i + 1 < n) load_sb_next(nxt);
    float acc_a = 0.f, acc_b = 0.f;
    stream_step<GS, U, T>(Lw, cp.step, xrow, xstride, sxrow, g, cur, acc_a, acc_b);
#pragma unroll
    for (int k = 0; k < S::kSbWords; ++k) cur.sb[k] = nxt.sb[k];
    if constexpr (GS != 128) {
      acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 1);
      acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 1);
    }
    if ((t & 1) == 0 && om < M) {
      float* r = red + ((cp.tile * steps + cp.step) * 2 + om) * 16;
      r[g] = acc_a, r[g + 8] = acc_b;
    }
    advance(cp);
  }
  __syncthreads();
  T* y = static_cast<T*>(p.y);
  const int outs = static_cast<int>(T1 - T0) * M * 16;
  for (int o = threadIdx.x; o < outs; o += Warps * 32) {
    const int tl = o / (M * 16), rem = o - tl * M * 16, m = rem / 16, r = rem % 16;
    float v = 0.f;
    for (int s = 0; s < steps; ++s) v += red[((tl * steps + s) * 2 + m) * 16 + r];
    const int64_t row = (T0 + tl) * 16 + r;
    if (row < p.N) y[m * p.N + row] = from_float<T>(v);
  }
}

template <int GS, int U, typename T, int Ring, int W, int Probe = 0>
Launch ilv() {
  return [](const QmvParams& p, cudaStream_t s) {
    const int64_t tiles = (p.N + 15) / 16;
    const int blocks = static_cast<int>(std::min<int64_t>(g_sms, tiles));
    const int smem =
        static_cast<int>(qmv_stream_ilv_smem(p.N, p.M, p.K, U, blocks, Ring * U * 1024, W));
    if (smem > 227 * 1024) {
      std::fprintf(stderr, "interleaved form does not fit N=%lld K=%lld M=%d\n", (long long)p.N,
                   (long long)p.K, p.M);
      std::exit(1);
    }
    auto k = qmv_stream_ilv_kernel<GS, U, T, Ring, W, Probe>;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    k<<<blocks, W * 32, smem, s>>>(p);
  };
}

template <int GS, typename T>
std::vector<std::pair<const char*, Launch>> ilv_rows() {
  return {
      {"ilv w16 U4x2", ilv<GS, 4, T, 2, 16>()},
      {"ilv w16 U2x3", ilv<GS, 2, T, 3, 16>()},
  };
}

// Blocks of 16 warps (one a multiprocessor: x staged once) with the ring of the 8-warp default
// and with deeper rings, next to that default (qmv_mma.cu records what they measured).
template <int GS, typename T>
std::vector<std::pair<const char*, Launch>> wide_rows() {
  return {
      {"w8 ring U4x2 (the default)", stream<GS, 4, true, T, false, 2, 2>()},
      {"w8 ring U2x5", stream<GS, 2, true, T, false, 2, 5>()},
      {"w16 ring U4x2", stream<GS, 4, true, T, false, 1, 2, 16>()},
      {"w16 ring U4x3", stream<GS, 4, true, T, false, 1, 3, 16>()},
      {"w16 ring U2x6", stream<GS, 2, true, T, false, 1, 6, 16>()},
      {"w14 ring U4x2", stream<GS, 4, true, T, false, 1, 2, 14>()},
      {"w14 ring U4x3", stream<GS, 4, true, T, false, 1, 3, 14>()},
  };
}

// The packed weights read once by a plain streaming kernel (no arithmetic): the floor for a
// kernel that reads them, launch included.
static uint32_t* g_sink = nullptr;
static Launch read_floor() {
  return [](const QmvParams& p, cudaStream_t s) {
    const int64_t n = p.N * p.K / 32;  // 16-byte words
    read_kernel_f<4><<<g_sms * 8, 256, 0, s>>>(reinterpret_cast<const uint4*>(p.w), n, g_sink);
  };
}

// ---- reference and timing -------------------------------------------------------------------

static bool check(Problem& P, const Launch& fn, const char* name, bool full_ref) {
  const int64_t rows = full_ref ? P.N : std::min<int64_t>(P.N, 2048);
  const auto [worst, bad] = check_float64(P, fn, rows, [&](int64_t n, int64_t k) {
    return static_cast<double>((P.w[n * (P.K / 8) + k / 8] >> (4 * (k % 8))) & 15u);
  });
  std::printf("  check %-34s N=%lld K=%lld gs=%lld M=%d %s: max err/tol %.3g, %lld bad of %lld\n",
              name, (long long)P.N, (long long)P.K, (long long)P.GS, P.M, P.half ? "fp16" : "bf16",
              worst, (long long)bad, (long long)(rows * P.M));
  return bad == 0;
}

static double time_us(Problem& P, const Launch& fn) {
  return graph_us([&](int c, cudaStream_t s) { fn(params(P, c), s); }, P.copies,
                  std::max(40, P.copies));
}

// 1 GB buffers, src set, and the time of one device-to-device copy of src to dst (us)
static double copy_1gb_us(void** src, void** dst) {
  const int64_t bytes = 1ll << 30;
  CK(cudaMalloc(src, bytes));
  CK(cudaMalloc(dst, bytes));
  CK(cudaMemset(*src, 1, bytes));
  return graph_us(
      [&](int, cudaStream_t s) {
        CK(cudaMemcpyAsync(*dst, *src, bytes, cudaMemcpyDeviceToDevice, s));
      },
      1, 5);
}

// The device-to-device copy of 1 GB (read + write), the line each mode's table starts with.
static void print_copy_bandwidth() {
  void *src, *dst;
  const double copy_us = copy_1gb_us(&src, &dst);
  std::printf("copy (read+write): %.3f TB/s\n", 2.0 * (1ll << 30) / copy_us / 1e6);
  cudaFree(src), cudaFree(dst);
}

static void bandwidth() {
  const int64_t bytes = 1ll << 30;
  void *src, *dst;
  const double copy_us = copy_1gb_us(&src, &dst);
  uint32_t* out;
  CK(cudaMalloc(&out, 4));
  const double read_us = graph_us(
      [&](int, cudaStream_t s) {
        read_kernel_f<4><<<g_sms * 8, 256, 0, s>>>(static_cast<const uint4*>(src), bytes / 16, out);
      },
      1, 5);
  std::printf("copy (read+write): %.3f TB/s; read: %.3f TB/s\n", 2.0 * bytes / copy_us / 1e6,
              bytes / read_us / 1e6);
  // The read ceiling by loads in flight per thread and blocks of 256 threads per SM, over 1 GB
  // and over 8 copies of 128 MB (each call misses the L2 as a decode step's weights would).
  const int64_t small = 128ll << 20;
  for (int f : {1, 2, 4, 8}) {
    for (int bps : {2, 4, 8}) {
      auto k = f == 1
                   ? read_kernel_f<1>
                   : (f == 2 ? read_kernel_f<2> : (f == 4 ? read_kernel_f<4> : read_kernel_f<8>));
      const double us_big = graph_us(
          [&](int, cudaStream_t s) {
            k<<<g_sms * bps, 256, 0, s>>>(static_cast<const uint4*>(src), bytes / 16, out);
          },
          1, 5);
      const double us_small = graph_us(
          [&](int c, cudaStream_t s) {
            k<<<g_sms * bps, 256, 0, s>>>(static_cast<const uint4*>(src) + c * (small / 16),
                                          small / 16, out);
          },
          8, 40);
      std::printf("  read F=%d blocks/SM=%d: 1 GB %.3f TB/s, 128 MB %.3f TB/s (%.2f us)\n", f, bps,
                  bytes / us_big / 1e6, small / us_small / 1e6, us_small);
    }
  }
  cudaFree(src), cudaFree(dst), cudaFree(out);
}

struct Row {
  const char* name;
  Launch fn;
};

static void bench(int64_t N, int64_t K, int64_t GS, int M, bool half, const std::vector<Row>& rows,
                  bool full_ref) {
  Problem P{N, K, GS, M, half};
  const double bytes = N * K / 2.0 + 4.0 * N * (K / GS);
  const int copies =
      std::max(1, std::min(g_max_copies, static_cast<int>(std::ceil(400e6 / bytes))));
  make(P, copies);
  std::printf("== N=%lld K=%lld gs=%lld M=%d %s (%.1f MB packed, %d copies)\n", (long long)N,
              (long long)K, (long long)GS, M, half ? "fp16" : "bf16", P.packed_bytes() / 1e6,
              copies);
  for (const Row& r : rows) {
    const bool probe = std::strstr(r.name, "probe") != nullptr || std::strstr(r.name, "floor");
    const bool ok = probe || check(P, r.fn, r.name, full_ref);
    const double us = time_us(P, r.fn);
    std::printf("  %-40s %8.2f us  %6.3f TB/s %s\n", r.name, us, P.packed_bytes() / us / 1e6,
                ok ? "" : "WRONG");
  }
  release(P);
}

// The checks and timings of the 16-warp and deeper-ring variants, with the default and the
// floor beside them.
static int wide_main() {
  using bf = __nv_bfloat16;
  using hf = __half;
  print_copy_bandwidth();
  int bad = 0;
  // tails: K of 4.5 spans, partial last tiles, several tile rounds, split K, M = 2, fp16
  for (int64_t gs : {32, 64, 128}) {
    const int64_t K = gs == 128 ? 640 : 576;
    for (int M : {1, 2}) {
      for (int64_t N : {100, 40100}) {
        Problem P{N, K, gs, M, N == 100};
        make(P, 1);
        const auto run = [&](auto rows) {
          for (auto& r : rows) bad += !check(P, r.second, r.first, true);
        };
        if (gs == 32) run(P.half ? wide_rows<32, hf>() : wide_rows<32, bf>());
        if (gs == 64) run(P.half ? wide_rows<64, hf>() : wide_rows<64, bf>());
        if (gs == 128) run(P.half ? wide_rows<128, hf>() : wide_rows<128, bf>());
        release(P);
      }
      Problem Z{6000, 4096 + gs, gs, M, true};  // K split over 2-8 warps
      make(Z, 1);
      if (gs == 32) bad += !check(Z, stream<32, 4, true, hf, false, 1, 3, 16>(), "w16", true);
      if (gs == 64) bad += !check(Z, stream<64, 4, true, hf, false, 1, 2, 16>(4), "w16 kw4", true);
      if (gs == 128) bad += !check(Z, stream<128, 2, true, hf, false, 2, 5>(2), "U2x5 kw2", true);
      release(Z);
    }
  }
  std::printf("checks: %d failed\n", bad);
  const auto rows_of = [](auto wide, std::vector<Row> extra) {
    std::vector<Row> rows;
    for (auto& r : wide) rows.push_back({r.first, r.second});
    for (auto& r : extra) rows.push_back(r);
    return rows;
  };
  const std::vector<Row> floor = {{"read kernel (floor)", read_floor()}};
  bench(28672, 8192, 128, 1, false, rows_of(wide_rows<128, bf>(), floor), false);
  bench(28672, 8192, 64, 1, false, rows_of(wide_rows<64, bf>(), {}), false);
  bench(28672, 8192, 32, 1, false, rows_of(wide_rows<32, bf>(), {}), false);
  // x of 57 KB: 8 warps use the register variant with K split (kw 4); 16 warps fit 2 stages at
  // M = 1 (at M = 2 x takes 115 KB: no ring of 16 warps fits)
  bench(8192, 28672, 128, 1, false,
        {{"w8 registers U4 (the default)", stream<128, 4, true, bf>()},
         {"w16 ring U4x2", stream<128, 4, true, bf, false, 1, 2, 16>()},
         {"w16 ring U2x3", stream<128, 2, true, bf, false, 1, 3, 16>()},
         {"read kernel (floor)", read_floor()}},
        false);
  bench(4096, 4096, 128, 1, false,
        {{"w8 registers U4 (the default)", stream<128, 4, true, bf>()},
         {"w16 ring U4x2", stream<128, 4, true, bf, false, 1, 2, 16>()},
         {"w16 registers U4", stream<128, 4, true, bf, false, 1, 0, 16>()},
         {"read kernel (floor)", read_floor()}},
        true);
  bench(28672, 8192, 128, 2, false,
        {{"w8 ring U4x2 M2 (the default)", stream<128, 4, true, bf, false, 2, 2>()},
         {"w16 ring U4x2 M2", stream<128, 4, true, bf, false, 1, 2, 16>()}},
        false);
  return bad == 0 ? 0 : 1;
}

// fp16 products (Prod in qmv_stream.cuh) and the prologues (Pro: 1 both register buffers of
// weights, then x 4 chunks a thread at a time; 2 the first 4 chunks of x before the weights) next
// to the native products and the first prologue: checks on the tails (K of 4.5 spans, partial
// tiles, several tile rounds, split K, M = 2, both dtypes of x) and on x spread over a huge range
// (in each span, and whole rows far from 1), then timings side by side. qmv_mma.cu records what
// they measured. Names: "early" Pro 1, "x-first" Pro 2.
constexpr Prod kNat = Prod::kNative, kSub = Prod::kHalfSub, kMag = Prod::kHalfMagic;
template <int GS, typename T, int Ring, int W, Prod P, int E>
Launch sv() {  // U = 4, 1 block a multiprocessor for 16 warps, 2 for 8
  return stream<GS, 4, true, T, false, W == 16 ? 1 : 2, Ring, W, P, E>();
}
template <int GS, typename T>
std::vector<std::pair<const char*, Launch>> f16_check_rows() {
  return {
      {"w16 ring U4x2 native x-first (the op's)", sv<GS, T, 2, 16, kNat, 2>()},
      {"w16 ring U4x2 half-sub x-first", sv<GS, T, 2, 16, kSub, 2>()},
      {"w16 ring U4x2 half-magic x-first", sv<GS, T, 2, 16, kMag, 2>()},
      {"w8 ring U4x2 half-sub", sv<GS, T, 2, 8, kSub, 0>()},
      {"w8 regs U4 half-sub early (the op's)", sv<GS, T, 0, 8, kSub, 1>()},
      {"w8 regs U4 half-sub (the op's, short x)", sv<GS, T, 0, 8, kSub, 0>()},
      {"w8 regs U4 half-sub x-first", sv<GS, T, 0, 8, kSub, 2>()},
      {"w8 regs U4 native early", sv<GS, T, 0, 8, kNat, 1>()},
  };
}
template <int GS, typename T>
std::vector<Row> f16_time_rows(bool all) {
  std::vector<Row> rows = {
      {"w16 ring U4x2 native (the op's before)", sv<GS, T, 2, 16, kNat, 0>()},
      {"w16 ring U4x2 native x-first (the op's)", sv<GS, T, 2, 16, kNat, 2>()},
      {"w16 ring U4x2 half-sub", sv<GS, T, 2, 16, kSub, 0>()},
  };
  if (all) rows.push_back({"w16 ring U4x2 half-sub x-first", sv<GS, T, 2, 16, kSub, 2>()});
  return rows;
}

static int f16_main() {
  using bf = __nv_bfloat16;
  using hf = __half;
  print_copy_bandwidth();
  int bad = 0;
  const auto run = [&](Problem& P, auto rows) {
    for (auto& r : rows) bad += !check(P, r.second, r.first, true);
  };
  const auto run_gs = [&](Problem& P) {
    if (P.GS == 32) run(P, P.half ? f16_check_rows<32, hf>() : f16_check_rows<32, bf>());
    if (P.GS == 64) run(P, P.half ? f16_check_rows<64, hf>() : f16_check_rows<64, bf>());
    if (P.GS == 128) run(P, P.half ? f16_check_rows<128, hf>() : f16_check_rows<128, bf>());
  };
  for (int64_t gs : {32, 64, 128}) {
    const int64_t K = gs == 128 ? 640 : 576;
    for (int M : {1, 2}) {
      for (int64_t N : {100, 40100}) {
        Problem P{N, K, gs, M, N == 100};
        make(P, 1);
        run_gs(P);
        release(P);
      }
      Problem Z{6000, 4096 + gs, gs, M, true};  // K split over 2-8 warps
      make(Z, 1);
      if (gs == 32) bad += !check(Z, sv<32, hf, 0, 8, kSub, 1>(), "regs kw8", true);
      if (gs == 64) bad += !check(Z, stream<64, 4, true, hf, false, 2, 2, 8, kSub>(4), "kw4", true);
      if (gs == 128)
        bad += !check(Z, stream<128, 2, true, hf, false, 2, 0, 8, kMag, 1>(2), "U2 kw2", true);
      release(Z);
    }
  }
  // bf16 x over 2^40 in every span, at [2^-20, 2^20), [2^-110, 2^-70) and [2^60, 2^100); fp16
  // x over [2^-14, 2^8)
  for (int64_t gs : {32, 128}) {
    for (int lo : {-20, -110, 60}) {
      Problem P{300, 1024, gs, 2, false};
      P.xspread = 40, P.xlo = lo;
      make(P, 1);
      std::printf("  x of bf16 over [2^%d, 2^%d):\n", lo, lo + 40);
      run_gs(P);
      release(P);
    }
    Problem H{300, 1024, gs, 1, true};
    H.xspread = 22, H.xlo = -14;
    make(H, 1);
    std::printf("  x of fp16 over [2^-14, 2^8):\n");
    run_gs(H);
    release(H);
  }
  std::printf("checks: %d failed\n", bad);
  std::vector<Row> r128 = f16_time_rows<128, bf>(true);
  r128.push_back({"read kernel (floor)", read_floor()});
  bench(28672, 8192, 128, 1, false, r128, false);
  bench(28672, 8192, 64, 1, false, f16_time_rows<64, bf>(false), false);
  bench(28672, 8192, 32, 1, false, f16_time_rows<32, bf>(false), false);
  bench(28672, 8192, 128, 2, false, f16_time_rows<128, bf>(false), false);
  bench(28672, 8192, 128, 1, true, f16_time_rows<128, hf>(false), false);
  const std::vector<Row> regs = {
      {"w8 registers U4 native (the op's before)", sv<128, bf, 0, 8, kNat, 0>()},
      {"w8 registers U4 native x-first", sv<128, bf, 0, 8, kNat, 2>()},
      {"w8 registers U4 half-sub early (the op's)", sv<128, bf, 0, 8, kSub, 1>()},
      {"w8 registers U4 half-sub (the op's, short x)", sv<128, bf, 0, 8, kSub, 0>()},
      {"w8 registers U4 half-sub x-first", sv<128, bf, 0, 8, kSub, 2>()},
      {"read kernel (floor)", read_floor()}};
  for (int M : {1, 2}) bench(8192, 28672, 128, M, false, regs, false);
  bench(4096, 4096, 128, 1, false, regs, true);
  return bad == 0 ? 0 : 1;
}

// Checks and timings of the interleaved form next to the op's launch (16-warp blocks of whole
// tiles where they fill 3/4 of the multiprocessors, else 8-warp blocks with K split), with the
// interleaved form's copies alone and products alone.
static int ilv_main() {
  using bf = __nv_bfloat16;
  using hf = __half;
  int bad = 0;
  const auto pairs = [](auto v) {
    std::vector<Row> rows;
    for (auto& r : v) rows.push_back({r.first, r.second});
    return rows;
  };
  // K tails (4.5 spans), partial last tiles, warps' pairs across tiles, 16 tiles a block
  for (int64_t gs : {32, 64, 128}) {
    for (int64_t K : {gs == 128 ? int64_t{640} : int64_t{576}, 4096 + gs}) {
      for (int M : {1, 2}) {
        for (int64_t N : {100, 6000, 33000}) {
          if (K > 4096 && N == 33000) continue;
          Problem P{N, K, gs, M, N == 6000};
          make(P, 1);
          const std::vector<Row> rows =
              gs == 32   ? (P.half ? pairs(ilv_rows<32, hf>()) : pairs(ilv_rows<32, bf>()))
              : gs == 64 ? (P.half ? pairs(ilv_rows<64, hf>()) : pairs(ilv_rows<64, bf>()))
                         : (P.half ? pairs(ilv_rows<128, hf>()) : pairs(ilv_rows<128, bf>()));
          for (auto& r : rows) bad += !check(P, r.fn, r.name, true);
          release(P);
        }
      }
    }
  }
  std::printf("checks: %d failed\n", bad);
  const auto op = [](auto k) { return Row{"w16 ring U4x2 (the op's)", k}; };
  bench(28672, 8192, 128, 1, false,
        {op(stream<128, 4, true, bf, false, 1, 2, 16>()),
         {"ilv w16 U4x2", ilv<128, 4, bf, 2, 16>()},
         {"ilv w16 U2x3", ilv<128, 2, bf, 3, 16>()},
         {"probe: ilv w16 U4x2 copies only", ilv<128, 4, bf, 2, 16, 1>()},
         {"probe: ilv w16 U4x2 products only", ilv<128, 4, bf, 2, 16, 2>()},
         {"read kernel (floor)", read_floor()}},
        false);
  bench(28672, 8192, 64, 1, false,
        {op(stream<64, 4, true, bf, false, 1, 2, 16>()), {"ilv w16 U4x2", ilv<64, 4, bf, 2, 16>()}},
        false);
  bench(28672, 8192, 32, 1, false,
        {op(stream<32, 4, true, bf, false, 1, 2, 16>()), {"ilv w16 U4x2", ilv<32, 4, bf, 2, 16>()}},
        false);
  bench(
      28672, 8192, 128, 2, false,
      {op(stream<128, 4, true, bf, false, 1, 2, 16>()), {"ilv w16 U4x2", ilv<128, 4, bf, 2, 16>()}},
      false);
  const Row regs = {"w8 registers U4 (the op's)", stream<128, 4, true, bf>()};
  bench(8192, 28672, 128, 1, false, {regs, {"ilv w16 U4x2", ilv<128, 4, bf, 2, 16>()}}, false);
  bench(4096, 4096, 128, 1, false, {regs, {"ilv w16 U4x2", ilv<128, 4, bf, 2, 16>()}}, true);
  return bad == 0 ? 0 : 1;
}

// ---- the bulk-copy kernel (qmv_bulk.cuh) next to the op's launch ------------------------------

template <int GS, typename T, int WPP, Prod P = Prod::kNative, int Probe = 0, int Ahead = 1,
          bool Sb = false, bool Lanes = false>
Launch bulk(int max_stages = kBulkMaxStages) {
  return [max_stages](const QmvParams& p, cudaStream_t s) {
    BulkShape b =
        qmv_bulk_shape(p.N, p.K, p.M, g_sms, g_smem_optin, WPP, max_stages, p.G, Sb ? 3 : 0);
    if (Sb && !b.ok)
      b = qmv_bulk_shape(p.N, p.K, p.M, g_sms, g_smem_optin, WPP, max_stages, p.G, 2);
    if (!b.ok) {
      std::fprintf(stderr, "bulk kernel does not fit N=%lld K=%lld M=%d WPP=%d\n", (long long)p.N,
                   (long long)p.K, p.M, WPP);
      std::exit(1);
    }
    auto k = qmv_bulk_kernel<GS, T, WPP, P, Probe, Ahead, Sb, Lanes>;
    CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            static_cast<int>(b.smem)));
    k<<<b.blocks, (kBulkWarps + 1) * 32, b.smem, s>>>(p, b.stages, b.tpb, b.sbs);
  };
}

struct BulkRow {
  const char* name;
  Launch fn;
  int wpp, stages;
  bool sb;
};
static bool bulk_fits(const Problem& P, const BulkRow& r) {
  const auto shape = [&](int sbs) {
    return qmv_bulk_shape(P.N, P.K, P.M, g_sms, g_smem_optin, r.wpp, r.stages, P.G(), sbs);
  };
  return r.sb ? (shape(3).ok || shape(2).ok) : shape(0).ok;
}
template <int GS, typename T>
std::vector<BulkRow> bulk_check_rows() {
  constexpr Prod kN = Prod::kNative, kS = Prod::kHalfSub;
  return {{"bulk wpp8 4st native", bulk<GS, T, 8>(4), 8, 4, false},
          {"bulk wpp8 4st half-sub", bulk<GS, T, 8, kS>(4), 8, 4, false},
          {"bulk wpp8 4st native sb", bulk<GS, T, 8, kN, 0, 1, true>(4), 8, 4, true},
          {"bulk wpp8 4st half-sub sb", bulk<GS, T, 8, kS, 0, 1, true>(4), 8, 4, true},
          {"bulk wpp4 half-sub sb", bulk<GS, T, 4, kS, 0, 1, true>(), 4, kBulkMaxStages, true},
          {"bulk wpp16 native", bulk<GS, T, 16>(), 16, kBulkMaxStages, false}};
}

// The op's choice for 28672 x 8192 (16-warp ring, x-first), the bulk variants, their probes and
// the plain read, in one run.
static int bulk_main() {
  using bf = __nv_bfloat16;
  using hf = __half;
  print_copy_bandwidth();
  int bad = 0;
  // short last chunks (K = 3072, 5120), fewer chunks than groups, few tiles (6 blocks), many
  // tiles a block, M = 2
  for (int64_t gs : {32, 64, 128}) {
    for (int64_t K : {int64_t{3072}, int64_t{5120}}) {
      for (int M : {1, 2}) {
        for (int64_t N : {int64_t{96}, int64_t{6000}, int64_t{40000}}) {
          Problem P{N, K, gs, M, N == 6000};
          make(P, 1);
          const std::vector<BulkRow> rows =
              gs == 32   ? (P.half ? bulk_check_rows<32, hf>() : bulk_check_rows<32, bf>())
              : gs == 64 ? (P.half ? bulk_check_rows<64, hf>() : bulk_check_rows<64, bf>())
                         : (P.half ? bulk_check_rows<128, hf>() : bulk_check_rows<128, bf>());
          for (auto& r : rows) {
            if (!bulk_fits(P, r)) {
              std::printf("  (%s does not fit N=%lld K=%lld M=%d)\n", r.name, (long long)N,
                          (long long)K, M);
              continue;
            }
            bad += !check(P, r.fn, r.name, N <= 6000);
          }
          release(P);
        }
      }
    }
  }
  for (int lo : {-20, -110, 60}) {  // half-sub with bf16 x over 2^40 in every span
    Problem P{320, 1024, 32, 2, false};
    P.xspread = 40, P.xlo = lo;
    make(P, 1);
    bad += !check(P, bulk<32, bf, 8, Prod::kHalfSub>(), "bulk wpp8 half-sub x spread", true);
    bad +=
        !check(P, bulk<32, bf, 8, Prod::kHalfSub, 0, 1, true>(4), "bulk wpp8 half-sub sb x", true);
    bad += !check(P, bulk<32, bf, 8>(), "bulk wpp8 native x spread", true);
    release(P);
  }
  std::printf("checks: %d failed\n", bad);
  constexpr Prod kN = Prod::kNative, kS = Prod::kHalfSub;
  const Row floor = {"read kernel (floor)", read_floor()};
  const Row op128 = {"w16 ring U4x2 x-first (the op's)",
                     stream<128, 4, true, bf, false, 1, 2, 16, kN, 2>()};
  // Run 3 (H200, us): wpp8 4 stages native 36.99, half-sub 35.69, with scales two pieces
  // ahead 38.64 / 37.13; without scale loads (probe) 33.73 / 33.19; copies alone 29.24,
  // half-sub products alone 28.86; the op's 35.80. Here: scales and biases by bulk copies too.
  constexpr bool kSb = true;
  bench(28672, 8192, 128, 1, false,
        {op128,
         {"bulk wpp8 4st half-sub", bulk<128, bf, 8, kS>(4)},
         {"bulk wpp8 4st native sb", bulk<128, bf, 8, kN, 0, 1, kSb>(4)},
         {"bulk wpp8 4st half-sub sb", bulk<128, bf, 8, kS, 0, 1, kSb>(4)},
         {"bulk wpp8 5st half-sub sb", bulk<128, bf, 8, kS, 0, 1, kSb>(5)},
         {"bulk wpp8 5st native sb", bulk<128, bf, 8, kN, 0, 1, kSb>(5)},
         {"bulk wpp4 half-sub sb", bulk<128, bf, 4, kS, 0, 1, kSb>()},
         {"bulk wpp4 6st half-sub sb", bulk<128, bf, 4, kS, 0, 1, kSb>(6)},
         {"probe: bulk wpp8 4st sb copies only", bulk<128, bf, 8, kN, 1, 1, kSb>(4)},
         {"probe: bulk wpp8 4st half-sub sb products only", bulk<128, bf, 8, kS, 2, 1, kSb>(4)},
         floor,
         {"w16 ring U4x2 x-first (the op's) again", op128.fn},
         {"bulk wpp8 4st half-sub sb again", bulk<128, bf, 8, kS, 0, 1, kSb>(4)},
         {"bulk wpp8 4st native sb again", bulk<128, bf, 8, kN, 0, 1, kSb>(4)}},
        false);
  bench(28672, 8192, 64, 1, false,
        {{"w16 ring x-first (the op's)", stream<64, 4, true, bf, false, 1, 2, 16, kN, 2>()},
         {"bulk wpp8 4st half-sub", bulk<64, bf, 8, kS>(4)},
         {"bulk wpp8 4st native sb", bulk<64, bf, 8, kN, 0, 1, kSb>(4)},
         {"bulk wpp8 4st half-sub sb", bulk<64, bf, 8, kS, 0, 1, kSb>(4)}},
        false);
  bench(28672, 8192, 32, 1, false,
        {{"w16 ring x-first (the op's)", stream<32, 4, true, bf, false, 1, 2, 16, kN, 2>()},
         {"bulk wpp8 4st native", bulk<32, bf, 8>(4)},
         {"bulk wpp8 4st native sb", bulk<32, bf, 8, kN, 0, 1, kSb>(4)},
         {"bulk wpp8 4st half-sub sb", bulk<32, bf, 8, kS, 0, 1, kSb>(4)}},
        false);
  bench(28672, 8192, 128, 2, false,
        {{"w16 ring x-first (the op's)", stream<128, 4, true, bf, false, 1, 2, 16, kN, 2>()},
         {"bulk wpp8 4st native sb", bulk<128, bf, 8, kN, 0, 1, kSb>(4)},
         {"bulk wpp8 4st half-sub sb", bulk<128, bf, 8, kS, 0, 1, kSb>(4)}},
        false);
  bench(28672, 8192, 128, 1, true,
        {{"w16 ring x-first fp16 (the op's)", stream<128, 4, true, hf, false, 1, 2, 16, kN, 2>()},
         {"bulk wpp8 4st native fp16 sb", bulk<128, hf, 8, kN, 0, 1, kSb>(4)},
         {"bulk wpp8 4st half-sub fp16 sb", bulk<128, hf, 8, kS, 0, 1, kSb>(4)}},
        false);
  bench(8192, 28672, 128, 1, false,
        {{"w8 regs half-sub early (the op's)", stream<128, 4, true, bf, false, 2, 0, 8, kS, 1>()},
         {"bulk wpp8 4st half-sub", bulk<128, bf, 8, kS>(4)},
         {"bulk wpp8 4st native sb", bulk<128, bf, 8, kN, 0, 1, kSb>(4)},
         {"bulk wpp8 4st half-sub sb", bulk<128, bf, 8, kS, 0, 1, kSb>(4)},
         floor},
        false);  // (M = 2: x takes 115 KB, no ring of groups + 2 stages fits)
  bench(4096, 4096, 128, 1, false,
        {{"w8 regs half-sub (the op's)", stream<128, 4, true, bf, false, 2, 0, 8, kS, 0>()},
         {"bulk wpp8 half-sub", bulk<128, bf, 8, kS>()},
         {"bulk wpp8 half-sub sb", bulk<128, bf, 8, kS, 0, 1, kSb>()},
         {"bulk wpp4 half-sub sb", bulk<128, bf, 4, kS, 0, 1, kSb>()},
         floor},
        true);
  return bad == 0 ? 0 : 1;
}

// ---- the shapes real models decode with ------------------------------------------------------
// Llama-3-8B-class layers at M = 1 (q / o 4096 x 4096, k / v 1024 x 4096, gate / up 14336 x 4096,
// down 4096 x 14336; Mistral alike), Qwen2.5-7B's (3584 x 3584, 3584 x 18944), next to the
// op's choice of kernel (qmv_mma.cu's launch_stream_gs, rebuilt here with its thresholds as
// arguments), the bulk kernel where its tiles give each multiprocessor fewer than 3, its row
// copies issued by 16 lanes, the register variant's shapes, probes and floors.

__global__ void empty_kernel(uint32_t* out) {
  if (threadIdx.x == 1000) out[0] = 0;  // never: a launch and nothing else
}
static Launch launch_floor() {
  return [](const QmvParams&, cudaStream_t s) { empty_kernel<<<g_sms * 2, 256, 0, s>>>(g_sink); };
}
// One 16-byte streaming load a thread, every load issued at once (the harness's read floor
// takes two in turn where its 8 blocks a multiprocessor cover less than the weight).
static Launch read_once() {
  return [](const QmvParams& p, cudaStream_t s) {
    const int64_t n = p.N * p.K / 32;
    read_kernel_f<1><<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(
        reinterpret_cast<const uint4*>(p.w), n, g_sink);
  };
}

// The op's launch (qmv_mma.cu, launch_stream_gs) for 4-bit fp16/bf16 x, M <= 2: the bulk kernel
// where it reaches (bulk_reach), else the 16-warp ring, the 8-warp ring, or the register variant
// with K split. rule 1: the op's; rule 0: the op before it took the bulk kernel down to 1 tile a
// multiprocessor where K >= 8192 and steps of 2 spans in the register variant. min_tiles > 0:
// bulk where the tiles give each multiprocessor that many (MLXQ_CUDA_BULK_TILES); lanes: its
// row copies by 16 lanes.
static bool bulk_reach(int64_t N, int64_t K, int rule, int min_tiles) {
  const int64_t tiles = N / 16;
  if (min_tiles > 0) return tiles >= int64_t{min_tiles} * g_sms;
  return tiles >= 3 * int64_t{g_sms} || (rule == 1 && tiles >= g_sms && K >= 8192);
}
template <int GS, typename T>
Launch op_choice(int rule = 1, int min_tiles = 0, bool lanes = false) {
  return [rule, min_tiles, lanes](const QmvParams& p, cudaStream_t s) {
    constexpr Prod kS = Prod::kHalfSub, kN = Prod::kNative;
    if (bulk_reach(p.N, p.K, rule, min_tiles)) {
      BulkShape b = qmv_bulk_shape(p.N, p.K, p.M, g_sms, g_smem_optin, 8, 4, p.G, 3);
      if (!b.ok) b = qmv_bulk_shape(p.N, p.K, p.M, g_sms, g_smem_optin, 8, 4, p.G, 2);
      if (b.ok) {
        return lanes ? bulk<GS, T, 8, kS, 0, 1, true, true>(4)(p, s)
                     : bulk<GS, T, 8, kS, 0, 1, true, false>(4)(p, s);
      }
    }
    const StreamGrid wide = qmv_stream_grid(p.N, p.K, 4, g_sms, 1, 0, 16);
    const int64_t ring_wide = qmv_stream_smem(p.M, p.K, 2 * 4 * 1024, 16);
    if (wide.kw == 1 && ring_wide <= g_smem_optin && 4 * wide.blocks >= 3 * g_sms) {
      return stream<GS, 4, true, T, false, 1, 2, 16, kN, 2>()(p, s);
    }
    const StreamGrid grid = qmv_stream_grid(p.N, p.K, 4, g_sms, 2);
    const int64_t ring = qmv_stream_smem(p.M, p.K, 2 * 4 * 1024);
    if (grid.kw == 1 && ring <= g_smem_optin && 2 * (ring + 1024) <= g_smem_sm) {
      return stream<GS, 4, true, T, false, 2, 2>()(p, s);
    }
    if (p.M * p.K > 8 * 8 * kStreamWarps * 32) {
      return stream<GS, 4, true, T, false, 2, 0, 8, kN, 1>()(p, s);
    }
    if (rule == 1) return stream<GS, 2, true, T, false, 2, 0, 8, kN, 0>()(p, s);
    return stream<GS, 4, true, T, false, 2, 0, 8, kN, 0>()(p, s);
  };
}

static const char* op_kernel_name(int64_t N, int64_t K, int M, int64_t G, int rule) {
  if (bulk_reach(N, K, rule, 0)) {
    BulkShape b = qmv_bulk_shape(N, K, M, g_sms, g_smem_optin, 8, 4, G, 3);
    if (!b.ok) b = qmv_bulk_shape(N, K, M, g_sms, g_smem_optin, 8, 4, G, 2);
    if (b.ok) return "bulk";
  }
  const StreamGrid wide = qmv_stream_grid(N, K, 4, g_sms, 1, 0, 16);
  if (wide.kw == 1 && qmv_stream_smem(M, K, 2 * 4 * 1024, 16) <= g_smem_optin &&
      4 * wide.blocks >= 3 * g_sms)
    return "ring w16";
  const StreamGrid grid = qmv_stream_grid(N, K, 4, g_sms, 2);
  const int64_t ring = qmv_stream_smem(M, K, 2 * 4 * 1024);
  if (grid.kw == 1 && ring <= g_smem_optin && 2 * (ring + 1024) <= g_smem_sm) return "ring w8";
  const bool u2 = rule == 1 && M * K <= 8 * 8 * kStreamWarps * 32;
  const StreamGrid g = u2 ? qmv_stream_grid(N, K, 2, g_sms, 2) : grid;
  static char bufs[2][64];  // two calls in one printf
  static int turn = 0;
  char* buf = bufs[turn ^= 1];
  std::snprintf(buf, 64, "registers w8 U%d kw%d, %lld blocks", u2 ? 2 : 4, g.kw,
                (long long)g.blocks);
  return buf;
}

template <int GS, typename T>
std::vector<Row> small_rows(int64_t N, int64_t K, int M) {
  constexpr Prod kN = Prod::kNative, kS = Prod::kHalfSub;
  std::vector<Row> rows = {{"op (before)", op_choice<GS, T>(0)},
                           {"op (now)", op_choice<GS, T>(1)},
                           {"op, bulk >= 1 tile/SM", op_choice<GS, T>(1, 1)},
                           {"op, bulk >= 1 tile/SM, 16 lanes", op_choice<GS, T>(1, 1, true)}};
  BulkShape b = qmv_bulk_shape(N, K, M, g_sms, g_smem_optin, 8, kBulkMaxStages, K / GS, 3);
  if (!b.ok) b = qmv_bulk_shape(N, K, M, g_sms, g_smem_optin, 8, kBulkMaxStages, K / GS, 2);
  if (b.ok) {
    rows.push_back({"bulk wpp8 all stages sb", bulk<GS, T, 8, kS, 0, 1, true, false>()});
    rows.push_back({"bulk wpp8 all stages sb lanes", bulk<GS, T, 8, kS, 0, 1, true, true>()});
  }
  if (M == 1) {
    rows.push_back({"w8 regs U4 native", stream<GS, 4, true, T, false, 2, 0, 8, kN, 0>()});
    rows.push_back({"w8 regs U2 native", stream<GS, 2, true, T, false, 2, 0, 8, kN, 0>()});
    rows.push_back({"w16 regs U4 native", stream<GS, 4, true, T, false, 1, 0, 16, kN, 0>()});
    rows.push_back({"w8 regs U4 half-sub", stream<GS, 4, true, T, false, 2, 0, 8, kS, 0>()});
    rows.push_back({"probe: w8 regs U4 loads only", stream<GS, 4, true, T, true>()});
    if (b.ok) {
      rows.push_back({"probe: bulk 4st copies only", bulk<GS, T, 8, kN, 1, 1, true>(4)});
      rows.push_back(
          {"probe: bulk 4st lanes copies only", bulk<GS, T, 8, kN, 1, 1, true, true>(4)});
      rows.push_back({"probe: bulk 4st products only", bulk<GS, T, 8, kS, 2, 1, true>(4)});
    }
    rows.push_back({"read kernel (floor)", read_floor()});
    rows.push_back({"floor: one load a thread", read_once()});
    rows.push_back({"floor: empty launch", launch_floor()});
  } else {
    rows.push_back({"w8 regs U4 native", stream<GS, 4, true, T, false, 2, 0, 8, kN, 0>()});
    rows.push_back({"w8 regs U2 native", stream<GS, 2, true, T, false, 2, 0, 8, kN, 0>()});
  }
  rows.push_back({"op (before) again", op_choice<GS, T>(0)});
  rows.push_back({"op (now) again", op_choice<GS, T>(1)});
  return rows;
}

static int small_main() {
  using bf = __nv_bfloat16;
  using hf = __half;
  g_max_copies = 64;  // 1024 x 4096 is 2.2 MB: 64 copies to miss the L2
  print_copy_bandwidth();
  int bad = 0;
  // the lanes' copies: short last chunks (K = 3072, 5120), fewer chunks than groups, few tiles,
  // many tiles a block, M = 2, both dtypes, every group size
  constexpr Prod kN = Prod::kNative, kS = Prod::kHalfSub;
  for (int64_t gs : {32, 64, 128}) {
    for (int64_t K : {int64_t{3072}, int64_t{5120}}) {
      for (int M : {1, 2}) {
        for (int64_t N : {int64_t{96}, int64_t{6000}}) {
          Problem P{N, K, gs, M, N == 6000};
          make(P, 1);
          const auto run = [&](auto tag) {
            using T = decltype(tag);
            if (gs == 32) {
              bad += !check(P, bulk<32, T, 8, kS, 0, 1, true, true>(4), "bulk lanes sb", true);
              bad += !check(P, bulk<32, T, 8, kN, 0, 1, false, true>(4), "bulk lanes", true);
            } else if (gs == 64) {
              bad += !check(P, bulk<64, T, 8, kS, 0, 1, true, true>(4), "bulk lanes sb", true);
              bad += !check(P, bulk<64, T, 8, kN, 0, 1, false, true>(4), "bulk lanes", true);
            } else {
              bad += !check(P, bulk<128, T, 8, kS, 0, 1, true, true>(4), "bulk lanes sb", true);
              bad += !check(P, bulk<128, T, 8, kN, 0, 1, false, true>(4), "bulk lanes", true);
            }
          };
          if (P.half)
            run(hf{});
          else
            run(bf{});
          release(P);
        }
      }
    }
  }
  // the op's choice on K tails (4.5 spans), partial tiles, K split 2-8 ways (the register
  // variant's 2-span steps), tiles for the rings, M = 1, 2, both dtypes, every group size
  for (int64_t gs : {32, 64, 128}) {
    for (int64_t K : {gs == 128 ? int64_t{640} : int64_t{576}, 4096 + gs, int64_t{8192}}) {
      for (int M : {1, 2}) {
        for (int64_t N : {int64_t{100}, int64_t{1040}, int64_t{6000}}) {
          Problem P{N, K, gs, M, N == 1040};
          make(P, 1);
          const auto run = [&](auto tag) {
            using T = decltype(tag);
            const Launch fn = gs == 32   ? op_choice<32, T>(1)
                              : gs == 64 ? op_choice<64, T>(1)
                                         : op_choice<128, T>(1);
            const std::string name = std::string("op: ") + op_kernel_name(N, K, M, K / gs, 1);
            bad += !check(P, fn, name.c_str(), true);
          };
          if (P.half)
            run(hf{});
          else
            run(bf{});
          release(P);
        }
      }
    }
  }
  std::printf("checks: %d failed\n", bad);
  struct Shape {
    int64_t N, K;
  };
  const Shape shapes[] = {{4096, 4096}, {1024, 4096},  {14336, 4096}, {4096, 14336},
                          {3584, 3584}, {3584, 18944}, {18944, 3584}, {28672, 8192}};
  for (const Shape& sh : shapes) {
    std::printf("   (op before: %s; now: %s)\n", op_kernel_name(sh.N, sh.K, 1, sh.K / 128, 0),
                op_kernel_name(sh.N, sh.K, 1, sh.K / 128, 1));
    if (sh.N == 28672) {
      bench(sh.N, sh.K, 128, 1, false,
            {{"op (now)", op_choice<128, bf>()},
             {"op, 16 lanes", op_choice<128, bf>(1, 3, true)},
             {"read kernel (floor)", read_floor()},
             {"op (now) again", op_choice<128, bf>()},
             {"op, 16 lanes again", op_choice<128, bf>(1, 3, true)}},
            false);
      continue;
    }
    bench(sh.N, sh.K, 128, 1, false, small_rows<128, bf>(sh.N, sh.K, 1),
          sh.N * sh.K <= 4096 * 4096);
  }
  for (const Shape& sh : {Shape{4096, 4096}, Shape{4096, 14336}, Shape{14336, 4096},
                          Shape{1024, 4096}, Shape{3584, 3584}}) {
    std::printf("   (op now, group 64: %s)\n", op_kernel_name(sh.N, sh.K, 1, sh.K / 64, 1));
    bench(sh.N, sh.K, 64, 1, false, small_rows<64, bf>(sh.N, sh.K, 1), false);
    std::printf("   (op now, M = 2: %s)\n", op_kernel_name(sh.N, sh.K, 2, sh.K / 128, 1));
    bench(sh.N, sh.K, 128, 2, false, small_rows<128, bf>(sh.N, sh.K, 2), false);
  }
  // fp16 x and group 32 on q / o, M = 2 where x is larger (8192 x 28672: unchanged, K split)
  std::printf("   (op now, fp16 group 32: %s)\n", op_kernel_name(4096, 4096, 1, 128, 1));
  bench(4096, 4096, 32, 1, true,
        {{"op (before)", op_choice<32, hf>(0)}, {"op (now)", op_choice<32, hf>(1)}}, true);
  std::printf("   (op now, M = 2: %s)\n", op_kernel_name(8192, 28672, 2, 224, 1));
  bench(8192, 28672, 128, 2, false,
        {{"op (before)", op_choice<128, bf>(0)}, {"op (now)", op_choice<128, bf>(1)}}, false);
  return bad == 0 ? 0 : 1;
}

int main(int argc, char** argv) {
  harness_seed(0x9E3779B97F4A7C15ull);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  g_sms = prop.multiProcessorCount;
  g_smem_optin = static_cast<int64_t>(prop.sharedMemPerBlockOptin);
  g_smem_sm = static_cast<int64_t>(prop.sharedMemPerMultiprocessor);
  CK(cudaMalloc(&g_sink, 4));
  std::printf("%s, %d SMs, L2 %d MB\n", prop.name, g_sms, prop.l2CacheSize >> 20);
  using bf = __nv_bfloat16;
  using hf = __half;
  if (argc > 1 && std::strcmp(argv[1], "san") == 0) {  // the U = 1 ring, for compute-sanitizer
    Problem Z{6000, 4128, 32, 1, true};
    make(Z, 1);
    check(Z, stream<32, 2, true, hf, false, 4, 4>(8), "ring gs32 fp16 U2 x4 kw8", true);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "ncu") == 0) {  // one launch of each, for a profiler
    Problem P{28672, 8192, 128, 1, false};
    make(P, 1);
    // the op's default (ring U4 x 2, 8 warps), the loads alone, 14-warp blocks (one wave)
    for (const Launch& fn :
         {stream<128, 4, true, bf, false, 2, 2>(), stream<128, 4, true, bf, true>(),
          stream<128, 4, true, bf, false, 1, 2, 14>(), read_floor()}) {
      fn(params(P, 0), 0);
      CK(cudaDeviceSynchronize());
    }
    release(P);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "wide") == 0) return wide_main();
  if (argc > 1 && std::strcmp(argv[1], "f16") == 0) return f16_main();
  if (argc > 1 && std::strcmp(argv[1], "ncu16") == 0) {  // the 16-warp ring's prologues, products
    Problem P{28672, 8192, 128, 1, false};
    make(P, 1);
    for (const Launch& fn : {sv<128, bf, 2, 16, kNat, 0>(), sv<128, bf, 2, 16, kNat, 2>(),
                             sv<128, bf, 2, 16, kSub, 2>()}) {
      fn(params(P, 0), 0);
      CK(cudaDeviceSynchronize());
    }
    release(P);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "ilv") == 0) return ilv_main();
  if (argc > 1 && std::strcmp(argv[1], "bulk") == 0) return bulk_main();
  if (argc > 1 && std::strcmp(argv[1], "small") == 0) return small_main();
  bandwidth();
  const bool quick = argc > 1 && std::strcmp(argv[1], "quick") == 0;
  // numerics on awkward shapes: K tails (576: 4.5 spans), N tails, split K, M = 2
  for (int64_t gs : {32, 64, 128}) {
    const int64_t K = gs == 128 ? 640 : 576;
    for (int M : {1, 2}) {
      Problem P{100, K, gs, M, false};
      make(P, 1);
      if (gs == 32) check(P, stream<32, 4, true, bf>(), "stream gs32", true);
      if (gs == 64) check(P, stream<64, 4, true, bf>(), "stream gs64", true);
      if (gs == 128) check(P, stream<128, 4, true, bf>(), "stream gs128", true);
      if (gs == 128) check(P, stream<128, 2, true, bf>(2), "stream gs128 U2 kw2", true);
      if (gs == 64) check(P, stream<64, 4, true, bf>(4), "stream gs64 kw4", true);

      release(P);
      Problem Q{100, K, gs, M, true};
      make(Q, 1);
      if (gs == 32) check(Q, stream<32, 4, true, hf>(8), "stream gs32 fp16 kw8", true);

      if (gs == 64) check(Q, stream<64, 4, true, hf>(), "stream gs64 fp16", true);
      if (gs == 128) check(Q, stream<128, 4, true, hf>(), "stream gs128 fp16", true);
      if (gs == 128)
        check(Q, stream<128, 2, true, hf, false, 4>(2), "stream gs128 fp16 U2 MB4 kw2", true);
      if (gs == 64)
        check(Q, stream<64, 2, true, hf, false, 3>(8), "stream gs64 fp16 U2 MB3 kw8", true);
      if (gs == 32) check(Q, stream<32, 4, true, hf, false, 3>(), "stream gs32 fp16 U4 MB3", true);
      release(Q);
      // several rounds of tile groups per block, and a partial last tile
      Problem R{40100, K, gs, M, false};
      make(R, 1);
      if (gs == 32) check(R, stream<32, 2, true, bf, false, 4, 2>(), "ring gs32 U2 x2", true);
      if (gs == 64) check(R, stream<64, 2, true, bf, false, 3, 3>(), "ring gs64 U2 x3", true);
      if (gs == 128) check(R, stream<128, 2, true, bf, false, 4, 3>(), "ring gs128 U2 x3", true);
      if (gs == 128) check(R, stream<128, 4, true, bf, false, 2, 2>(), "ring gs128 U4 x2", true);
      if (gs == 64) check(R, stream<64, 4, true, bf, false, 2, 2>(), "ring gs64 U4 x2", true);
      if (gs == 32) check(R, stream<32, 4, true, bf, false, 2, 2>(), "ring gs32 U4 x2", true);
      release(R);
      Problem Z{6000, 4096 + gs, gs, M, true};
      make(Z, 1);
      if (gs == 32) check(Z, stream<32, 4, true, hf>(), "stream gs32 fp16 kw8", true);
      if (gs == 64) check(Z, stream<64, 4, true, hf>(), "stream gs64 fp16 kw8", true);
      if (gs == 128)
        check(Z, stream<128, 2, true, hf, false, 3, 3>(), "ring gs128 fp16 U2 x3", true);
      if (gs == 64)
        check(Z, stream<64, 2, true, hf, false, 4, 2>(4), "ring gs64 fp16 U2 x2 kw4", true);
      if (gs == 32)
        check(Z, stream<32, 2, true, hf, false, 4, 2>(8), "ring gs32 fp16 U2 x2 kw8", true);
      release(Z);
    }
  }
  // A: ring U4 x 2 stages, 2 blocks/SM; B: ring U2 x 3 stages, 4 blocks/SM (see qmv_mma.cu)
  std::vector<Row> big = {
      {"cores d (R2 U2), the previous default", cores<bf, 1, 2, 2, false>()},
      {"stream U4 (registers, the previous default)", stream<128, 4, true, bf>()},
      {"ring A: U4 x2 stages 2 blocks/SM", stream<128, 4, true, bf, false, 2, 2>()},
      {"ring B: U2 x3 stages 4 blocks/SM", stream<128, 2, true, bf, false, 4, 3>()},
      {"ring U2 x2 stages 4 blocks/SM", stream<128, 2, true, bf, false, 4, 2>()},
      {"ring U4 x2 stages 2 blocks/SM kw2", stream<128, 4, true, bf, false, 2, 2>(2)},
      {"probe: stream U4 loads only", stream<128, 4, true, bf, true>()},
      {"read kernel (floor)", read_floor()},
  };
  bench(28672, 8192, 128, 1, false, big, false);
  bench(4096, 4096, 128, 1, false, big, true);
  if (quick) return 0;
  for (int64_t gs : {64, 32}) {
    std::vector<Row> rows = {{"cores d", cores<bf, 1, 2, 2, false>()}};
    if (gs == 64) {
      rows.push_back({"stream U4", stream<64, 4, true, bf>()});
      rows.push_back({"ring A", stream<64, 4, true, bf, false, 2, 2>()});
      rows.push_back({"ring B", stream<64, 2, true, bf, false, 4, 3>()});
    } else {
      rows.push_back({"stream U4", stream<32, 4, true, bf>()});
      rows.push_back({"ring A", stream<32, 4, true, bf, false, 2, 2>()});
      rows.push_back({"ring B", stream<32, 2, true, bf, false, 4, 3>()});
    }
    bench(28672, 8192, gs, 1, false, rows, false);
    bench(4096, 4096, gs, 1, false, rows, false);
  }
  bench(28672, 8192, 128, 1, true,
        {{"cores d fp16", cores<hf, 1, 2, 2, false>()},
         {"stream U4 fp16", stream<128, 4, true, hf>()},
         {"ring A fp16", stream<128, 4, true, hf, false, 2, 2>()}},
        false);
  for (int M : {1, 2}) {
    bench(8192, 28672, 128, M, false,
          {{"cores (M <= 2)", cores<bf, 2, 4, 4, false>()},
           {"stream U4", stream<128, 4, true, bf>()},
           {"ring A", stream<128, 4, true, bf, false, 2, 2>()},
           {"ring B", stream<128, 2, true, bf, false, 4, 3>()},
           {"ring U2 x2 4 blocks/SM", stream<128, 2, true, bf, false, 4, 2>()}},
          false);
  }
  bench(28672, 8192, 128, 2, false,
        {{"cores MT2 R4 U4", cores<bf, 2, 4, 4, false>()},
         {"stream U4 M2", stream<128, 4, true, bf>()},
         {"ring A M2", stream<128, 4, true, bf, false, 2, 2>()}},
        false);
  return 0;
}
