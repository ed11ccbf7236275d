// Host side of the fused Hopper prefill (the kernel and its design: gemm_sm90.cuh): tensor maps,
// the block shape for M, the K split, and the (scale, bias) pairs the kernel reads.
#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>

#include "cuda/gemm_sm90.cuh"
#include "cuda/gemm_sm90_sk.cuh"
#include "cuda/gemm_sm90_ws.cuh"
#include "cuda/launch.h"

namespace mlxq::cuda {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                    cudaEnableDefault, &q));
    TORCH_CHECK(f != nullptr && q == cudaDriverEntryPointSuccess,
                "mlxq: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A row-major [rows, cols] tensor map with boxes of box_cols x box_rows.
CUtensorMap tensor_map(const void* ptr, CUtensorMapDataType type, int64_t elem, int64_t rows,
                       int64_t cols, int box_cols, int box_rows, CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols * elem)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t estrides[2] = {1, 1};
  const CUresult r =
      encode_fn()(&map, type, 2, const_cast<void*>(ptr), dims, strides, box, estrides,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "mlxq: cuTensorMapEncodeTiled failed (", static_cast<int>(r), ")");
  return map;
}

template <typename T, int GS, int NT, int WGS, int Occ, bool Ping>
void launch_nt(const GemmParams& p, bool half, int64_t blocks, cudaStream_t stream) {
  using C = GemmCfg<NT, WGS, Occ>;
  auto kernel = gemm_w4_sm90_kernel<T, GS, NT, WGS, Occ, 0, Ping>;
  if constexpr (NT == 256) {  // stream-K only for this shape (sk_for)
    if (p.sk > 0) kernel = gemm_w4_sm90_sk_kernel<T, GS, NT, WGS, Occ, 0, Ping>;
  }
  TORCH_CHECK(NT == 256 || p.sk == 0, "mlxq: stream-K launched for a block shape without it");
  constexpr int smem = C::kSmemBytes;
  const CUtensorMap mx =
      tensor_map(p.x, half ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                 p.M, p.K, kGemmTileK, NT, CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap mw = tensor_map(p.w, CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, p.N, p.K / 8,
                                    kGemmTileK / 8, C::kTileN, CU_TENSOR_MAP_SWIZZLE_NONE);
  // per launch (a cheap attribute write) rather than once: it belongs to the current device
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  TORCH_CHECK(blocks <= INT32_MAX, "mlxq: too many blocks for the fused prefill");
  kernel<<<static_cast<unsigned>(blocks), C::kThreads, smem, stream>>>(p, mx, mw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block shape (rows of x per block; 128 rows of W and two warpgroups unless said otherwise):
// "64" (one block per SM), "128" (one block per SM, 8 stages), "128x2" (two blocks per SM),
// "128w4" (256 rows of W, four warpgroups, one block per SM) or "256" (one block per SM, 6
// stages; its warpgroups do not take turns, which measured 4-9% faster at this shape).
// Measured on an H200 (benchmarks/cuda/gemm_harness.cu, 28672 x 8192, bf16, ms, three runs;
// 64 / 128x2 / 128w4 / 256 / dense bf16 cuBLAS): M=32 0.11-0.12/0.19-0.21/0.14/0.26-0.30/0.11,
// M=128 0.20-0.23/0.126-0.15/0.119-0.142/0.24-0.25/0.124-0.13, M=512
// 0.82-0.93/0.44-0.53/0.46-0.59/0.42-0.47/0.30-0.31. So 64 up to M = 64, 128w4 up to 128, 256
// above; MLXQ_CUDA_GEMM_TILE (read on every call, for benchmarks and tests) overrides it.
std::string tile_for(int64_t M) {
  const char* env = std::getenv("MLXQ_CUDA_GEMM_TILE");
  std::string tile(env == nullptr ? "" : env);
  if (tile.empty()) tile = M > 128 ? "256" : (M > 64 ? "128w4" : "64");
  return tile;
}

struct Shape {
  int nt;      // rows of x per block
  int tile_n;  // rows of W per block
};
Shape shape_of(const std::string& tile) {
  if (tile == "256") return {256, 128};
  if (tile == "128w4") return {128, 256};
  if (tile == "128x2" || tile == "128") return {128, 128};
  return {64, 128};
}

GemmSplit split_for(const Shape& sh, int64_t M, int64_t N, int64_t K, int sm_count) {
  const int64_t tiles = ((M + sh.nt - 1) / sh.nt) * ((N + sh.tile_n - 1) / sh.tile_n);
  return gemm_split_plan(tiles, sm_count, K / kGemmTileK);
}

// Stream-K blocks (gemm_sk_blocks), 0 for none: only for the 256-row block, the one shape run
// with one block per multiprocessor over several waves (it measured slower for the 64-row block,
// 28672 x 8192 at M=32: 0.150 vs 0.131 ms). MLXQ_CUDA_GEMM_SK (read on every call, for benchmarks
// and tests): 0 never, 2 wherever there are two tiles or more.
int64_t sk_for(const Shape& sh, int64_t M, int64_t N, int64_t K, int sm_count) {
  const char* env = std::getenv("MLXQ_CUDA_GEMM_SK");
  const int mode = env == nullptr || *env == '\0' ? 1 : std::atoi(env);
  const int64_t tiles = ((M + sh.nt - 1) / sh.nt) * ((N + sh.tile_n - 1) / sh.tile_n);
  if (sh.nt != 256 || mode == 0) return 0;
  if (mode == 2) return tiles > 1 ? std::min<int64_t>(sm_count, tiles * (K / kGemmTileK)) : 0;
  return gemm_sk_blocks(tiles, sm_count, K / kGemmTileK);
}

// The warp-specialized kernel (gemm_sm90_ws.cuh) for the 256-row block where it computes whole
// tiles (no K split, no stream-K), chosen by MLXQ_CUDA_GEMM_WS (read on every call, for
// benchmarks and tests): 1 whole tiles, 2 every tile as two half tiles, 3 (the default) whole
// tiles with the last partial wave as half tiles (gemm_ws_full); 0 the register-A kernel. With
// 5 TMA slots and 2 dequantized tiles it was even with the register-A kernel through the op
// (bench_ops, H200, bf16, M = 512, two runs: 28672 x 8192 0.4316-0.4341 against 0.4356-0.4386,
// 8192 x 28672 0.4312-0.4505 against 0.4250-0.4306); with 4 slots and 3 tiles (ws_ring52) it is
// ahead wherever it runs (gemm_sm90_ws.cuh has the numbers). Where the last rows of x are 1-128
// past a multiple of 256 (M > 256) and the kernel is not the persistent one, those rows run as
// one half tile a row of W tiles after the others (GemmParams::ragged; before, a whole tile of
// mostly absent rows: M = 384 cost as much as 512); MLXQ_CUDA_GEMM_WS_RAGGED=0 (read on every
// call, for benchmarks and tests) keeps the whole tiles. Products and their order are the same
// either way.
struct WsPlan {
  int64_t full = -1;    // tiles computed whole; -1 where the kernel does not run
  int64_t tiles_m = 0;  // tiles of x computed whole or as two halves, a row of W tiles
  int64_t tiles = 0;    // such tiles in all
  int ragged = 0;
  int64_t blocks = 0;
  bool runs() const { return full >= 0; }
};
WsPlan ws_plan(const Shape& sh, int64_t M, int64_t N, int64_t K, int sm_count, int64_t sk,
               const GemmSplit& plan, bool persistent) {
  const char* env = std::getenv("MLXQ_CUDA_GEMM_WS");
  const int mode = env == nullptr || *env == '\0' ? 3 : std::atoi(env);
  WsPlan w;
  if (sh.nt != 256 || mode < 1 || mode > 3 || sk > 0 || plan.split > 1 || K < kGemmTileK) {
    return w;
  }
  const char* renv = std::getenv("MLXQ_CUDA_GEMM_WS_RAGGED");
  const bool ragged_on = renv == nullptr || *renv == '\0' || std::atoi(renv) != 0;
  const int64_t tiles_n = (N + sh.tile_n - 1) / sh.tile_n;
  w.ragged = !persistent && ragged_on && M > sh.nt && M % sh.nt != 0 && M % sh.nt <= sh.nt / 2;
  w.tiles_m = w.ragged ? M / sh.nt : (M + sh.nt - 1) / sh.nt;
  w.tiles = w.tiles_m * tiles_n;
  w.full = mode == 1 ? w.tiles : mode == 2 ? 0 : gemm_ws_full(w.tiles, sm_count);
  w.blocks = w.full + 2 * (w.tiles - w.full) + (w.ragged ? tiles_n : 0);
  return w;
}

// The warp-specialized kernel's ring (gemm_sm90_ws.cuh's GemmWsCfg), MLXQ_CUDA_GEMM_WS_RING (read
// on every call, for benchmarks and tests): "52" 5 TMA slots and 2 dequantized tiles, loads
// issued 3 stages ahead (the first form); "43l": 4 slots, 3 tiles, each load issued once its
// slot is known free, 3 ahead (kWsLate), reading the (scale, bias) pairs packed before the call;
// "43lt" (the default): the same with the scales and biases TMA'd from their arrays (kWsTmaSb:
// no packing kernel) where they allow it (G % 8 == 0, both 16-byte aligned; 43l otherwise);
// bit-identical to 43l (tests/test_cuda_ops.py). "p" / "pt": the persistent kernel
// (gemm_w4_sm90_wsp_kernel) with pairs / by TMA. Through the op, the graphs replayed back to back
// in 12 rounds whose order rotates (benchmarks/cuda/wsp_ab.py, H200, bf16, g128, M = 512; median
// over dense cuBLAS, two runs in one call): 28672 x 8192 43l 1.456x / 1.469x, 43lt 1.373x /
// 1.375x, pt 1.525x; 8192 x 28672 43l 1.345x / 1.330x, 43lt 1.238x / 1.247x, pt 1.408x; the
// fastest rounds 43l 0.4015 / 43lt 0.3810 ms (dense 0.3049) and 0.3744 / 0.3491 (0.3109). An
// earlier bench_ops column had 43lt slower (0.4298 against 0.4030 ms); that run timed the two
// seconds apart, as the clock moved (its 4096 x 4096 row, where no fused kernel runs, moved as
// much). The other forms (one arrival a warp for a dequantized tile, the arrays read through
// registers: kWsDirect) measured slower through the op (gemm_sm90_ws.cuh).
enum class WsRing { k52, k43l, k43lt, kP, kPt };
WsRing ws_ring() {
  const char* env = std::getenv("MLXQ_CUDA_GEMM_WS_RING");
  const std::string r(env == nullptr ? "" : env);
  if (r == "52") return WsRing::k52;
  if (r == "43l") return WsRing::k43l;
  if (r == "p") return WsRing::kP;
  if (r == "pt") return WsRing::kPt;
  return WsRing::k43lt;
}
bool ws_tma_sb_fits(const void* scales, const void* biases, int64_t G) {
  return G % 8 == 0 &&
         (reinterpret_cast<uintptr_t>(scales) | reinterpret_cast<uintptr_t>(biases)) % 16 == 0;
}
// The persistent kernel counts in 32 bits and loads 3 stages ahead across its units: at least 3
// stages of K (the 43l kernel otherwise).
bool wsp_fits(int64_t M, int64_t N, int64_t K, int64_t units) {
  return K / kGemmTileK >= 3 && M < (int64_t{1} << 30) && N < (int64_t{1} << 30) &&
         units < (int64_t{1} << 30);
}

// The ring launch_typed runs and its plan: a persistent ring only where wsp_fits (43l in its
// place otherwise).
struct WsChoice {
  WsRing ring;
  WsPlan plan;
};
WsChoice ws_choice(const Shape& sh, int64_t M, int64_t N, int64_t K, int sm_count, int64_t sk,
                   const GemmSplit& split) {
  WsRing ring = ws_ring();
  const bool persistent = ring == WsRing::kP || ring == WsRing::kPt;
  WsPlan w = ws_plan(sh, M, N, K, sm_count, sk, split, persistent);
  if (persistent && w.runs() && !wsp_fits(M, N, K, w.blocks)) {
    ring = WsRing::k43l;
    w = ws_plan(sh, M, N, K, sm_count, sk, split, false);
  }
  return {ring, w};
}

// The tensor maps of the warp-specialized kernels: x in boxes of nt and nt / 2 rows (whole and
// half tiles), the packed W in boxes of tile_n rows.
struct WsMaps {
  CUtensorMap x, xh, w;
};
WsMaps ws_maps(const GemmParams& p, bool half, int nt, int tile_n) {
  const CUtensorMapDataType xt =
      half ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return {tensor_map(p.x, xt, 2, p.M, p.K, kGemmTileK, nt, CU_TENSOR_MAP_SWIZZLE_128B),
          tensor_map(p.x, xt, 2, p.M, p.K, kGemmTileK, nt / 2, CU_TENSOR_MAP_SWIZZLE_128B),
          tensor_map(p.w, CU_TENSOR_MAP_DATA_TYPE_UINT32, 4, p.N, p.K / 8, kGemmTileK / 8, tile_n,
                     CU_TENSOR_MAP_SWIZZLE_NONE)};
}

// The scale or bias array [N, G] as kWsTmaSb reads it: boxes of `groups` groups x tile_n rows.
CUtensorMap ws_sb_map(const void* a, const GemmParams& p, int gs, int groups, int tile_n) {
  return tensor_map(a, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, p.N, p.K / gs, groups, tile_n,
                    CU_TENSOR_MAP_SWIZZLE_NONE);
}

template <typename T, int GS, int Stages, int ABufs, int Opt>
void launch_ws(const GemmParams& p, bool half, int64_t blocks, cudaStream_t stream) {
  using C = GemmWsCfg<Stages, ABufs, Opt>;
  auto kernel = gemm_w4_sm90_ws_kernel<T, GS, 0, Stages, ABufs, Opt>;
  auto kernel_t = gemm_w4_sm90_wst_kernel<T, GS, 0, Stages, ABufs, Opt>;
  const WsMaps m = ws_maps(p, half, C::kNT, C::kTileN);
  TORCH_CHECK(blocks <= INT32_MAX, "mlxq: too many blocks for the fused prefill");
  if constexpr (C::kTmaSb) {
    const CUtensorMap ms = ws_sb_map(p.scales, p, GS, C::kSbGroups, C::kTileN);
    const CUtensorMap mb = ws_sb_map(p.biases, p, GS, C::kSbGroups, C::kTileN);
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel_t, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
    kernel_t<<<static_cast<unsigned>(blocks), C::kThreads, C::kSmemBytes, stream>>>(p, m.x, m.xh,
                                                                                    m.w, ms, mb);
  } else {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
    kernel<<<static_cast<unsigned>(blocks), C::kThreads, C::kSmemBytes, stream>>>(p, m.x, m.xh,
                                                                                  m.w);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int GS, int Opt>
void launch_wsp(const GemmParams& p, bool half, int64_t units, int sm_count, cudaStream_t stream) {
  using C = GemmWspCfg<Opt>;
  using R = typename C::R;
  auto kernel = gemm_w4_sm90_wsp_kernel<T, GS, 0, Opt>;
  const WsMaps m = ws_maps(p, half, R::kNT, R::kTileN);
  CUtensorMap ms = m.w, mb = m.w;  // unused without kWsTmaSb
  if constexpr ((Opt & kWsTmaSb) != 0) {
    ms = ws_sb_map(p.scales, p, GS, C::kSbGroups, R::kTileN);
    mb = ws_sb_map(p.biases, p, GS, C::kSbGroups, R::kTileN);
  }
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
  // MLXQ_CUDA_GEMM_WSP_GRID (read on every call, for tests): at most that many CTAs, each then
  // running more units
  const char* env = std::getenv("MLXQ_CUDA_GEMM_WSP_GRID");
  const int64_t cap = env == nullptr || std::atoll(env) <= 0 ? sm_count : std::atoll(env);
  const int64_t grid = std::min<int64_t>(units, cap);
  kernel<<<static_cast<unsigned>(grid), C::kThreads, C::kSmemBytes, stream>>>(p, m.x, m.xh, m.w, ms,
                                                                              mb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether launch_typed runs a warp-specialized kernel with the scales and biases by TMA (no
// pairs).
bool uses_tma_sb(const GemmArgs& a) {
  const Shape sh = shape_of(tile_for(a.M));
  const GemmSplit plan = split_for(sh, a.M, a.N, a.K, a.sm_count);
  const int64_t sk = sk_for(sh, a.M, a.N, a.K, a.sm_count);
  const WsChoice c = ws_choice(sh, a.M, a.N, a.K, a.sm_count, sk, plan);
  return c.plan.runs() && ws_tma_sb_fits(a.scales, a.biases, a.G) &&
         (c.ring == WsRing::k43lt || c.ring == WsRing::kPt);
}

template <typename T, int GS>
void launch_typed(GemmParams p, bool half, int sm_count, cudaStream_t stream) {
  const std::string tile = tile_for(p.M);
  const Shape sh = shape_of(tile);
  const GemmSplit plan = split_for(sh, p.M, p.N, p.K, sm_count);
  p.tiles_m = (p.M + sh.nt - 1) / sh.nt;
  p.full = plan.full;
  p.split = plan.split;
  p.tiles = p.tiles_m * ((p.N + sh.tile_n - 1) / sh.tile_n);
  p.sk = sk_for(sh, p.M, p.N, p.K, sm_count);
  p.xmajor = 1;  // measured 2-4% faster than the other order with stream-K (harness)
  const int64_t blocks = p.sk > 0 ? p.sk : plan.full + plan.rem * plan.split;
  const WsChoice ws = ws_choice(sh, p.M, p.N, p.K, sm_count, p.sk, plan);
  if (ws.plan.runs()) {
    p.full = ws.plan.full;
    p.tiles_m = ws.plan.tiles_m;
    p.tiles = ws.plan.tiles;
    p.ragged = ws.plan.ragged;
    const int64_t b = ws.plan.blocks;
    switch (ws.ring) {
      case WsRing::k52:
        return launch_ws<T, GS, 5, 2, 0>(p, half, b, stream);
      case WsRing::k43l:
        return launch_ws<T, GS, 4, 3, kWsLate>(p, half, b, stream);
      case WsRing::k43lt:
        if (ws_tma_sb_fits(p.scales, p.biases, p.K / GS)) {
          return launch_ws<T, GS, 4, 3, kWsLate | kWsTmaSb>(p, half, b, stream);
        }
        return launch_ws<T, GS, 4, 3, kWsLate>(p, half, b, stream);
      case WsRing::kPt:
        if (ws_tma_sb_fits(p.scales, p.biases, p.K / GS)) {
          return launch_wsp<T, GS, kWsTmaSb>(p, half, b, sm_count, stream);
        }
        [[fallthrough]];
      default:
        return launch_wsp<T, GS, 0>(p, half, b, sm_count, stream);
    }
  }
  if (tile == "256") return launch_nt<T, GS, 256, 2, 1, false>(p, half, blocks, stream);
  if (tile == "128w4") return launch_nt<T, GS, 128, 4, 1, true>(p, half, blocks, stream);
  if (tile == "128x2") return launch_nt<T, GS, 128, 2, 2, true>(p, half, blocks, stream);
  if (tile == "128") return launch_nt<T, GS, 128, 2, 1, true>(p, half, blocks, stream);
  return launch_nt<T, GS, 64, 2, 1, true>(p, half, blocks, stream);
}

}  // namespace

bool gemm_w4_sm90_available(int device) {
#ifdef MLXQ_CUDA_SM90A
  // read on every call, so that a benchmark can compare with the cuBLAS path in one process
  const char* env = std::getenv("MLXQ_CUDA_GEMM");
  if (env != nullptr && std::atoi(env) == 0) return false;
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0;
#else
  (void)device;
  return false;
#endif
}

int64_t gemm_w4_sm90_sb_cols(int64_t G) { return G; }

bool gemm_w4_sm90_reads_pairs(const GemmArgs& a) { return !uses_tma_sb(a); }

void launch_gemm_pack_sb(const void* scales, const void* biases, uint32_t* sb, int64_t n,
                         cudaStream_t stream) {
  // gemm_w4_sm90_sb_cols(G) == G: the pairs are the arrays' elements in order
  gemm_pack_sb(static_cast<const uint16_t*>(scales), static_cast<const uint16_t*>(biases), sb, n,
               stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

GemmWorkspace gemm_w4_sm90_workspace(int64_t M, int64_t N, int64_t K, int sm_count) {
  const Shape sh = shape_of(tile_for(M));
  const int64_t sk = sk_for(sh, M, N, K, sm_count);
  if (sk > 0) {  // two partial tiles a block at most; a counter a tile
    const int64_t tiles = ((M + sh.nt - 1) / sh.nt) * ((N + sh.tile_n - 1) / sh.tile_n);
    return {sk, 2 * sk * sh.nt * sh.tile_n, tiles};
  }
  const GemmSplit plan = split_for(sh, M, N, K, sm_count);
  const WsChoice ws = ws_choice(sh, M, N, K, sm_count, sk, plan);
  if (ws.plan.runs()) return {ws.plan.blocks, 0, 0};  // half tiles, no scratch
  return {plan.full + plan.rem * plan.split, plan.ws_floats(sh.nt, sh.tile_n), plan.rem};
}

void launch_gemm_w4_sm90(const GemmArgs& a, DType x_dtype, cudaStream_t stream) {
  const bool vec_out = a.N % 8 == 0 && reinterpret_cast<uintptr_t>(a.y) % 16 == 0;
  // (scale, bias) pairs, one 4-byte load for a thread's both; written just before the kernel,
  // they are in L2 when it reads them (reading the two arrays from HBM measured 10-40% slower
  // for the register-A kernel, 3-10% for the warp-specialized one)
  // (affine_cuda.cu may keep them from an earlier call: GemmArgs::sb_ready)
  const int64_t gp = gemm_w4_sm90_sb_cols(a.G), n = a.N * gp;
  // (the persistent kernel reads the arrays by TMA instead where it can: uses_tma_sb)
  if (n > 0 && !a.sb_ready && !uses_tma_sb(a)) {
    launch_gemm_pack_sb(a.scales, a.biases, a.sb, n, stream);
  }
  GemmParams p{a.w, a.sb, a.x, a.y,  a.N,        a.M, a.K, gp, a.group_shift, vec_out ? 1 : 0,
               1,   0,    1,   a.ws, a.counters, 0,   0,   0};
  p.scales = static_cast<const uint16_t*>(a.scales);
  p.biases = static_cast<const uint16_t*>(a.biases);
  const bool half = x_dtype == DType::kHalf;
  switch (a.group_shift) {
    case 5:
      return half ? launch_typed<__half, 32>(p, half, a.sm_count, stream)
                  : launch_typed<__nv_bfloat16, 32>(p, half, a.sm_count, stream);
    case 6:
      return half ? launch_typed<__half, 64>(p, half, a.sm_count, stream)
                  : launch_typed<__nv_bfloat16, 64>(p, half, a.sm_count, stream);
    default:
      return half ? launch_typed<__half, 128>(p, half, a.sm_count, stream)
                  : launch_typed<__nv_bfloat16, 128>(p, half, a.sm_count, stream);
  }
}

}  // namespace mlxq::cuda
