// Standalone harness for the fused Hopper prefill kernel (csrc/cuda/gemm_sm90.cuh), no torch:
// every block shape against a float64 CPU reference (sampled outputs; every output checked to be
// written) and timed next to dense bf16 cuBLAS on the dequantized weight, in one run (CUDA
// events over weight copies that miss the L2). Build and run on an H100/H200:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        benchmarks/cuda/gemm_harness.cu -lcuda -lcublas -o /tmp/gemm_harness && /tmp/gemm_harness
// "256sk"/"256skx" are the stream-K kernel (gemm_sm90_sk.cuh; x: x-major tile order), "256auto"
// what the op's rule picks (gemm_sk_blocks); ":nodeq" leaves the dequantization out. "ws",
// "wstail", "wshalf": the warp-specialized kernel (gemm_sm90_ws.cuh) with whole tiles, the last
// partial wave as half tiles, every tile as half tiles; "wsmc*" the same in clusters of two
// CTAs that multicast x; ":nomma" leaves the products out, ":tma" both. -DMLXQ_HARNESS_WS_ONLY
// or -DMLXQ_HARNESS_MIN (256, ws, wstail) builds fewer shapes; -DMLXQ_HARNESS_WSP the 43l ring
// against 43lt (scales and biases by TMA) and the persistent kernel ("wsp*").
// Arguments: M values (default 32 64 128 256 512 768); MLXQ_HARNESS_SHAPES="NxK,..." picks the
// shapes (default 28672x8192,8192x28672); MLXQ_HARNESS_PACK=1 times the op's packing of the
// (scale, bias) pairs with each call (see main).
#include <cublas_v2.h>
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/gemm_sm90.cuh"
#include "cuda/gemm_sm90_sk.cuh"
#include "cuda/gemm_sm90_ws.cuh"
#include "harness.h"

using namespace mlxq::cuda;

static CUtensorMap tensor_map(const void* ptr, CUtensorMapDataType type, int64_t elem, int64_t rows,
                              int64_t cols, int box_cols, int box_rows,
                              CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols * elem)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t estrides[2] = {1, 1};
  const CUresult r =
      cuTensorMapEncodeTiled(&map, type, 2, const_cast<void*>(ptr), dims, strides, box, estrides,
                             CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed (%d)\n", static_cast<int>(r));
    std::exit(1);
  }
  return map;
}

static int g_sms = 132;
static float* g_ws = nullptr;  // tail-split scratch (zeroed counters stay zero between calls)
static int* g_counters = nullptr;

// SK: 0 K split only (gemm_split_plan), 1 stream-K where gemm_sk_blocks picks it, 2 stream-K
// over sms * Occ blocks always (more than one tile)
template <int GS, int NT, int WGS, int Occ, int Probe = 0, bool Ping = true, bool Split = true,
          int SK = 0, int XMajor = 0>
static void launch(const GemmParams& p0, cudaStream_t stream) {
  using C = GemmCfg<NT, WGS, Occ>;
  auto kernel = SK ? gemm_w4_sm90_sk_kernel<__nv_bfloat16, GS, NT, WGS, Occ, Probe, Ping>
                   : gemm_w4_sm90_kernel<__nv_bfloat16, GS, NT, WGS, Occ, Probe, Ping>;
  constexpr int smem = C::kSmemBytes;
  GemmParams p = p0;
  p.tiles_m = (p.M + NT - 1) / NT;
  const int64_t tiles = p.tiles_m * ((p.N + C::kTileN - 1) / C::kTileN);
  const GemmSplit plan =
      Split ? gemm_split_plan(tiles, g_sms, p.K / kGemmTileK) : GemmSplit{tiles, 1, 0};
  if (plan.ws_floats(NT, C::kTileN) > (int64_t{32} << 20) || plan.rem > 1024) std::exit(2);
  p.full = plan.full;
  p.split = plan.split;
  p.ws = g_ws;
  p.counters = g_counters;
  p.tiles = tiles;
  p.xmajor = XMajor;
  p.sk = SK == 1   ? gemm_sk_blocks(tiles, int64_t{g_sms} * Occ, p.K / kGemmTileK)
         : SK == 2 ? (tiles > 1 ? std::min<int64_t>(int64_t{g_sms} * Occ, tiles * (p.K / 64)) : 0)
                   : 0;
  int64_t blocks = plan.full + plan.rem * plan.split;
  if (p.sk > 0) blocks = p.sk;
  if (SK && p.sk == 0) {  // the rule picks whole tiles: the other kernel
    kernel = gemm_w4_sm90_kernel<__nv_bfloat16, GS, NT, WGS, Occ, Probe, Ping>;
  }
  if (p.sk > 0 && (tiles > (1 << 16) || 2 * p.sk * NT * C::kTileN > (int64_t{32} << 20)))
    std::exit(3);
  const CUtensorMap mx = tensor_map(p.x, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, p.M, p.K, kGemmTileK,
                                    NT, CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap mw = tensor_map(p.w, CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, p.N, p.K / 8,
                                    kGemmTileK / 8, C::kTileN, CU_TENSOR_MAP_SWIZZLE_NONE);
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<static_cast<unsigned>(blocks), C::kThreads, smem, stream>>>(p, mx, mw);
  CK(cudaGetLastError());
}

// The warp-specialized kernel (gemm_sm90_ws.cuh). Tail: 0 whole tiles, 1 the last partial wave
// as half tiles where gemm_ws_full says so, 2 every tile as two half tiles (checks). Mc: in
// clusters of two CTAs sharing x (tiles of 256 rows of W for the cluster). Opt: GemmWsCfg's.
template <int GS, int Probe = 0, int Tail = 1, int Stages = 5, int ABufs = 2, bool Mc = false,
          int Opt = 0>
static void launch_ws(const GemmParams& p0, cudaStream_t stream) {
  using C = GemmWsCfg<Stages, ABufs, Opt>;
  auto kernel = Mc ? gemm_w4_sm90_wsmc_kernel<__nv_bfloat16, GS, Probe, Stages, ABufs, Opt>
                   : gemm_w4_sm90_ws_kernel<__nv_bfloat16, GS, Probe, Stages, ABufs, Opt>;
  GemmParams p = p0;
  const int cl = Mc ? 2 : 1;
  p.tiles_m = (p.M + C::kNT - 1) / C::kNT;
  const int64_t tiles = p.tiles_m * ((p.N + cl * C::kTileN - 1) / (cl * C::kTileN));
  p.full = Tail == 0 ? tiles : Tail == 2 ? 0 : gemm_ws_full(tiles, g_sms / cl);
  const int64_t blocks = cl * (p.full + 2 * (tiles - p.full));
  const CUtensorMap mx = tensor_map(p.x, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, p.M, p.K, kGemmTileK,
                                    C::kNT / cl, CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap mxh = tensor_map(p.x, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, p.M, p.K, kGemmTileK,
                                     C::kNT / 2 / cl, CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap mw = tensor_map(p.w, CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, p.N, p.K / 8,
                                    kGemmTileK / 8, C::kTileN, CU_TENSOR_MAP_SWIZZLE_NONE);
  if constexpr (C::kTmaSb) {  // the scales and biases by TMA (gemm_w4_sm90_wst_kernel)
    auto kt = gemm_w4_sm90_wst_kernel<__nv_bfloat16, GS, Probe, Stages, ABufs, Opt>;
    const CUtensorMap ms = tensor_map(p.scales, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, p.N, p.K / GS,
                                      C::kSbGroups, C::kTileN, CU_TENSOR_MAP_SWIZZLE_NONE);
    const CUtensorMap mb = tensor_map(p.biases, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, p.N, p.K / GS,
                                      C::kSbGroups, C::kTileN, CU_TENSOR_MAP_SWIZZLE_NONE);
    CK(cudaFuncSetAttribute(kt, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
    kt<<<static_cast<unsigned>(blocks), C::kThreads, C::kSmemBytes, stream>>>(p, mx, mxh, mw, ms,
                                                                              mb);
  } else {
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
    kernel<<<static_cast<unsigned>(blocks), C::kThreads, C::kSmemBytes, stream>>>(p, mx, mxh, mw);
  }
  CK(cudaGetLastError());
}

// The persistent kernel (gemm_w4_sm90_wsp_kernel): Tail as launch_ws's; Grid: CTAs (0: one per
// multiprocessor), fewer to give each several units (checks).
template <int GS, int Probe = 0, int Tail = 1, int Opt = 0, int Grid = 0>
static void launch_wsp(const GemmParams& p0, cudaStream_t stream) {
  using C = GemmWspCfg<Opt>;
  using R = typename C::R;
  auto kernel = gemm_w4_sm90_wsp_kernel<__nv_bfloat16, GS, Probe, Opt>;
  GemmParams p = p0;
  p.tiles_m = (p.M + R::kNT - 1) / R::kNT;
  p.tiles = p.tiles_m * ((p.N + R::kTileN - 1) / R::kTileN);
  p.full = Tail == 0 ? p.tiles : Tail == 2 ? 0 : gemm_ws_full(p.tiles, g_sms);
  const int64_t units = 2 * p.tiles - p.full;
  const int64_t grid = std::min<int64_t>(units, Grid ? Grid : g_sms);
  const CUtensorMap mx = tensor_map(p.x, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, p.M, p.K, kGemmTileK,
                                    R::kNT, CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap mxh = tensor_map(p.x, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, p.M, p.K, kGemmTileK,
                                     R::kNT / 2, CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap mw = tensor_map(p.w, CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, p.N, p.K / 8,
                                    kGemmTileK / 8, R::kTileN, CU_TENSOR_MAP_SWIZZLE_NONE);
  const CUtensorMap ms = tensor_map(p.scales, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, p.N, p.K / GS,
                                    C::kSbGroups, R::kTileN, CU_TENSOR_MAP_SWIZZLE_NONE);
  const CUtensorMap mb = tensor_map(p.biases, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, p.N, p.K / GS,
                                    C::kSbGroups, R::kTileN, CU_TENSOR_MAP_SWIZZLE_NONE);
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
  kernel<<<static_cast<unsigned>(grid), C::kThreads, C::kSmemBytes, stream>>>(p, mx, mxh, mw, ms,
                                                                              mb);
  CK(cudaGetLastError());
}

struct Shape {
  const char* name;
  void (*fn)(const GemmParams&, cudaStream_t);
  int gs;
  bool direct = false;  // reads the scale and bias arrays itself (no packed pairs)
};

template <int GS>
static std::vector<Shape> shapes_for(bool probes = false) {
  // SK (launch): 1 the host's rule (gemm_sk_blocks), 2 stream-K always; "x": x-major tile order
#if defined(MLXQ_HARNESS_WSP)  // the op's 43l kernel against the persistent one
  // (wsp: packed pairs; wspt: scales and biases by TMA; 3: three CTAs, h: all half tiles)
  constexpr int L = kWsLate, T = kWsTmaSb;
  // wstail43lt: the non-persistent kernel with the scales and biases by TMA; "wshalf43lt" as
  // half tiles (checks)
  std::vector<Shape> v = {{"wstail43l", launch_ws<GS, 0, 1, 4, 3, false, L>, GS},
                          {"wstail43lt", launch_ws<GS, 0, 1, 4, 3, false, L | T>, GS, true},
                          {"wspt", launch_wsp<GS, 0, 1, T>, GS, true}};
  if (!probes) v.push_back({"wshalf43lt", launch_ws<GS, 0, 2, 4, 3, false, L | T>, GS, true});
  if (!probes) v.push_back({"wsp3", launch_wsp<GS, 0, 1, 0, 3>, GS});
  if (!probes) v.push_back({"wspt3h", launch_wsp<GS, 0, 2, T, 3>, GS, true});
  if (probes) v.push_back({"wstail43lt:nodeq", launch_ws<GS, 1, 1, 4, 3, false, L | T>, GS, true});
  if (probes) v.push_back({"wstail43l:nodeq", launch_ws<GS, 1, 1, 4, 3, false, L>, GS});
  if (probes) return v;
#elif defined(MLXQ_HARNESS_MIN)  // quickest: the register-A 256-row block and the ws kernel's rings
  // (wstail<slots><tiles>[l: late loads][w: warp arrivals][d: direct scales and biases],
  // gemm_sm90_ws.cuh)
  constexpr int L = kWsLate, D = kWsDirect, W = kWsWarpArrive;
  std::vector<Shape> v = {{"256", launch<GS, 256, 2, 1, 0, false>, GS},
                          {"wstail", launch_ws<GS, 0, 1>, GS},
                          {"wstail43l", launch_ws<GS, 0, 1, 4, 3, false, L>, GS},
                          {"wstail43lw", launch_ws<GS, 0, 1, 4, 3, false, L | W>, GS},
                          {"wstail43ld", launch_ws<GS, 0, 1, 4, 3, false, L | D>, GS, true},
                          {"wstail43lwd", launch_ws<GS, 0, 1, 4, 3, false, L | W | D>, GS, true}};
  if (probes) v.push_back({"wstail43l:nodeq", launch_ws<GS, 1, 1, 4, 3, false, L>, GS});
  if (probes) return v;
#elif defined(MLXQ_HARNESS_WS_ONLY)  // a quicker build: the op's current shape, its rule, ws
  std::vector<Shape> v = {{"256", launch<GS, 256, 2, 1, 0, false>, GS},
                          {"256auto", launch<GS, 256, 2, 1, 0, false, true, 1, 1>, GS},
                          {"ws", launch_ws<GS, 0, 0>, GS},
                          {"wstail", launch_ws<GS, 0, 1>, GS},
                          {"wshalf", launch_ws<GS, 0, 2>, GS},
                          {"wsmc", launch_ws<GS, 0, 0, 5, 2, true>, GS},
                          {"wsmctail", launch_ws<GS, 0, 1, 5, 2, true>, GS},
                          {"wsmchalf", launch_ws<GS, 0, 2, 5, 2, true>, GS},
                          {"wsmc43tail", launch_ws<GS, 0, 1, 4, 3, true>, GS}};
#else
  std::vector<Shape> v = {{"64", launch<GS, 64, 2, 1>, GS},
                          {"128", launch<GS, 128, 2, 1>, GS},
                          {"128x2", launch<GS, 128, 2, 2>, GS},
                          {"256", launch<GS, 256, 2, 1, 0, false>, GS},
                          {"w256n128", launch<GS, 128, 4, 1>, GS},
                          {"256sk", launch<GS, 256, 2, 1, 0, false, true, 2>, GS},
                          {"256skx", launch<GS, 256, 2, 1, 0, false, true, 2, 1>, GS},
                          {"256auto", launch<GS, 256, 2, 1, 0, false, true, 1, 1>, GS},
                          {"ws", launch_ws<GS, 0, 0>, GS},
                          {"wstail", launch_ws<GS, 0, 1>, GS},
                          {"wshalf", launch_ws<GS, 0, 2>, GS}};
#endif
  if (probes) {
#ifndef MLXQ_HARNESS_WS_ONLY
    v.push_back({"256:nosplit", launch<GS, 256, 2, 1, 0, false, false>, GS});
    v.push_back({"64:nosplit", launch<GS, 64, 2, 1, 0, true, false>, GS});
    v.push_back({"256skx:nodeq", launch<GS, 256, 2, 1, 1, false, true, 2, 1>, GS});
#endif
    v.push_back({"ws:nodeq", launch_ws<GS, 1, 0>, GS});
    v.push_back({"ws:nomma", launch_ws<GS, 4, 0>, GS});
    v.push_back({"ws:tma", launch_ws<GS, 5, 0>, GS});
    v.push_back({"wsmc:nodeq", launch_ws<GS, 1, 0, 5, 2, true>, GS});
    v.push_back({"wsmc:nomma", launch_ws<GS, 4, 0, 5, 2, true>, GS});
    v.push_back({"wsmc:tma", launch_ws<GS, 5, 0, 5, 2, true>, GS});
  }
  return v;
}

struct Problem {
  int64_t N, K, M, GS;
  std::vector<uint32_t> w;
  std::vector<uint16_t> s, b, x;
  std::vector<uint32_t*> dw;
  std::vector<uint32_t*> dsb;
  std::vector<uint16_t*> ds, db;  // scales and biases apart, for gemm_pack_sb_kernel
  uint16_t* dx = nullptr;
  uint16_t* dy = nullptr;
  uint16_t* dwd = nullptr;  // dense dequantized weight [N, K] bf16
  int64_t G() const { return K / GS; }
};

static float deq(const Problem& P, int64_t n, int64_t k) {
  const uint32_t q = (P.w[(n * P.K + k) / 8] >> (4 * (k % 8))) & 15u;
  const int64_t gi = n * P.G() + k / P.GS;
  // s * q + b exact in double (8 + 4 significant bits), rounded once to bf16 like the kernel
  return from_bf16(to_bf16(
      static_cast<float>(static_cast<double>(from_bf16(P.s[gi])) * q + from_bf16(P.b[gi]))));
}

static void make(Problem& P, int copies) {
  const int64_t G = P.G();
  P.w.resize(P.N * P.K / 8);
  for (auto& v : P.w) v = static_cast<uint32_t>(rnd());
  P.s.resize(P.N * G);
  P.b.resize(P.N * G);
  std::vector<uint32_t> sb(P.N * G);
  for (int64_t i = 0; i < P.N * G; ++i) {
    float sc = 0.002f + 0.02f * urand();
    if (rnd() & 1) sc = -sc;
    P.s[i] = to_bf16(sc);
    P.b[i] = to_bf16(-0.1f + 0.2f * urand());
    sb[i] = P.s[i] | (static_cast<uint32_t>(P.b[i]) << 16);
  }
  for (int c = 0; c < copies; ++c) {
    uint32_t *w, *s;
    CK(cudaMalloc(&w, P.w.size() * 4));
    CK(cudaMalloc(&s, sb.size() * 4));
    CK(cudaMemcpy(w, P.w.data(), P.w.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(s, sb.data(), sb.size() * 4, cudaMemcpyHostToDevice));
    P.dw.push_back(w), P.dsb.push_back(s);
    uint16_t *ds, *db;
    CK(cudaMalloc(&ds, P.s.size() * 2));
    CK(cudaMalloc(&db, P.b.size() * 2));
    CK(cudaMemcpy(ds, P.s.data(), P.s.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(db, P.b.data(), P.b.size() * 2, cudaMemcpyHostToDevice));
    P.ds.push_back(ds), P.db.push_back(db);
  }
  std::vector<uint16_t> wd(P.N * P.K);
  for (int64_t n = 0; n < P.N; ++n)
    for (int64_t k = 0; k < P.K; ++k) wd[n * P.K + k] = to_bf16(deq(P, n, k));
  CK(cudaMalloc(&P.dwd, wd.size() * 2));
  CK(cudaMemcpy(P.dwd, wd.data(), wd.size() * 2, cudaMemcpyHostToDevice));
}

static void set_m(Problem& P, int64_t M) {
  P.M = M;
  P.x.resize(M * P.K);
  for (auto& v : P.x) v = to_bf16(-2.f + 4.f * urand());
  if (P.dx) cudaFree(P.dx), cudaFree(P.dy);
  CK(cudaMalloc(&P.dx, P.x.size() * 2));
  CK(cudaMemcpy(P.dx, P.x.data(), P.x.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&P.dy, M * P.N * 2));
}

static GemmParams params(const Problem& P, int c) {
  GemmParams p{P.dw[c],
               P.dsb[c],
               P.dx,
               P.dy,
               P.N,
               P.M,
               P.K,
               P.G(),
               __builtin_ctz(P.GS),
               P.N % 8 == 0 ? 1 : 0};
  p.scales = P.ds[c];  // for the ws kernel's direct form
  p.biases = P.db[c];
  return p;
}

// max |y - ref| / max |ref| over sampled outputs; -1 if an output was left unwritten (NaN)
static double check(const Problem& P) {
  std::vector<uint16_t> y(P.M * P.N);
  CK(cudaMemcpy(y.data(), P.dy, y.size() * 2, cudaMemcpyDeviceToHost));
  for (auto v : y)
    if (std::isnan(from_bf16(v))) return -1.0;
  double err = 0, mx = 0;
  for (int i = 0; i < 2048; ++i) {
    const int64_t m = rnd() % P.M, n = (i < 64 ? P.N - 1 - i : rnd() % P.N);
    double ref = 0;
    for (int64_t k = 0; k < P.K; ++k)
      ref += static_cast<double>(from_bf16(P.x[m * P.K + k])) * deq(P, n, k);
    err = std::max(err, std::fabs(from_bf16(y[m * P.N + n]) - ref));
    mx = std::max(mx, std::fabs(ref));
  }
  return err / mx;
}

template <typename F>
static double time_ms(F&& f, int copies) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f(i % copies);
  std::vector<double> r;
  for (int rep = 0; rep < 5; ++rep) {
    const int iters = 20;
    CK(cudaEventRecord(a));
    for (int i = 0; i < iters; ++i) f(i % copies);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    r.push_back(ms / iters);
  }
  std::sort(r.begin(), r.end());
  return r[r.size() / 2];
}

int main(int argc, char** argv) {
  harness_seed(0x2545F4914F6CDD1Dull);
  // "ncu": one launch each of the M = 512 stream-K kernel (with and without the dequantization)
  // and of the whole-tile kernel at 28672 x 8192, for a profiler
  const bool ncu = argc > 1 && std::strcmp(argv[1], "ncu") == 0;
  std::vector<int64_t> ms;
  for (int i = ncu ? 2 : 1; i < argc; ++i) ms.push_back(std::atoll(argv[i]));
  if (ms.empty()) ms = {32, 64, 128, 256, 512, 768};
  std::vector<std::pair<int64_t, int64_t>> shapes;
  const char* env = std::getenv("MLXQ_HARNESS_SHAPES");
  std::string spec = env ? env : "28672x8192,8192x28672";
  for (size_t pos = 0; pos < spec.size();) {
    size_t end = spec.find(',', pos);
    if (end == std::string::npos) end = spec.size();
    const std::string one = spec.substr(pos, end - pos);
    const size_t x = one.find('x');
    shapes.push_back({std::atoll(one.substr(0, x).c_str()), std::atoll(one.substr(x + 1).c_str())});
    pos = end + 1;
  }
  {
    int dev = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, dev));
    CK(cudaMalloc(&g_ws, sizeof(float) << 25));
    CK(cudaMalloc(&g_counters, (1 << 16) * sizeof(int)));
    CK(cudaMemset(g_counters, 0, (1 << 16) * sizeof(int)));
  }
  // MLXQ_HARNESS_PACK=1: each timed call packs its (scale, bias) pairs first, as the op does
  // (gemm_pack_sb_kernel, timed with it), so the kernel finds them in L2 rather than wherever the
  // other weight copy's call left them
  const char* pack_env = std::getenv("MLXQ_HARNESS_PACK");
  const bool pack = pack_env != nullptr && std::atoi(pack_env) != 0;
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) return 1;
  if (ncu) {
    Problem P{28672, 8192, 0, 128};
    make(P, 1);
    set_m(P, 512);
    for (const Shape& sh : shapes_for<128>(true)) {
      if (std::strcmp(sh.name, "256skx") && std::strcmp(sh.name, "256skx:nodeq") &&
          std::strcmp(sh.name, "256"))
        continue;
      sh.fn(params(P, 0), 0);
      CK(cudaDeviceSynchronize());
    }
    return 0;
  }
  // numerics at every group size on a small odd shape (rows past N, M not a multiple of NT)
  for (int gs : {32, 64, 128}) {
    Problem P{1000, 8192, 0, gs};  // 8 tiles of W rows: every shape splits its tiles' K
    make(P, 1);
    set_m(P, 77);
    std::vector<Shape> list = gs == 32   ? shapes_for<32>()
                              : gs == 64 ? shapes_for<64>()
                                         : shapes_for<128>();
    for (const Shape& sh : list) {
      CK(cudaMemset(P.dy, 0xFF, P.M * P.N * 2));
      sh.fn(params(P, 0), 0);
      CK(cudaDeviceSynchronize());
      const double e = check(P);
      std::printf("check gs=%d tile=%s: err %.2e %s\n", gs, sh.name, e,
                  e >= 0 && e < 8e-3 ? "ok" : "FAIL");
    }
  }
  for (const auto& nk : shapes) {
    const int64_t N = nk.first, K = nk.second;
    Problem P{N, K, 0, 128};
    make(P, 2);
    for (int64_t M : ms) {
      set_m(P, M);
      const float one = 1.f, zero = 0.f;
      auto dense = [&](int) {
        cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M),
                     static_cast<int>(K), &one, P.dwd, CUDA_R_16BF, static_cast<int>(K), P.dx,
                     CUDA_R_16BF, static_cast<int>(K), &zero, P.dy, CUDA_R_16BF,
                     static_cast<int>(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      };
      const double dms = time_ms(dense, 1);
      std::printf("%lldx%lld M=%lld dense %.4f", static_cast<long long>(N),
                  static_cast<long long>(K), static_cast<long long>(M), dms);
      for (const Shape& sh : shapes_for<128>(true)) {
        CK(cudaMemset(P.dy, 0xFF, P.M * P.N * 2));
        sh.fn(params(P, 0), 0);
        CK(cudaDeviceSynchronize());
        const bool probe = std::strchr(sh.name, ':') != nullptr;
        // the CPU reference is slow: above M = 128 only the stream-K shapes are checked
        const bool sk =
            std::strncmp(sh.name, "256sk", 5) == 0 || std::strncmp(sh.name, "ws", 2) == 0;
        const double e = (M <= 128 || sk) && !probe ? check(P) : 0.0;
        const double t = time_ms(
            [&](int c) {
              if (pack && !sh.direct) {  // as the op does: the pairs written just before (L2)
                gemm_pack_sb(P.ds[c], P.db[c], P.dsb[c], P.N * P.G(), 0);
              }
              sh.fn(params(P, c), 0);
            },
            2);
        std::printf(" | %s %.4f (%.2fx%s)", sh.name, t, t / dms,
                    e < 0 ? " UNWRITTEN" : (e >= 8e-3 ? " WRONG" : ""));
      }
      std::printf("\n");
      std::fflush(stdout);
    }
    for (int c = 0; c < 2; ++c) {
      cudaFree(P.dw[c]), cudaFree(P.dsb[c]), cudaFree(P.ds[c]), cudaFree(P.db[c]);
    }
    cudaFree(P.dwd), cudaFree(P.dx), cudaFree(P.dy);
  }
  return 0;
}
