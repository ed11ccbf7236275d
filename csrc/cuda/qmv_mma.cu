// Launchers of the tensor-core decode kernels (4-bit weights, fp16/bf16 x, M <= 8); see
// qmv_mma4_kernel in kernels.cuh and qmv_stream_kernel in qmv_stream.cuh.
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <string>

#include "cuda/launch.h"
#include "cuda/qmv_bulk.cuh"
#include "cuda/qmv_stream.cuh"

namespace mlxq::cuda {
namespace {

template <int GS, typename T>
void launch_gs(const QmvParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.N + 15) / 16;
  qmv_mma4_kernel<GS, T><<<static_cast<unsigned>(blocks), kMmaWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const QmvParams& p, cudaStream_t stream) {
  switch (p.group_shift) {
    case 5:
      return launch_gs<32, T>(p, stream);
    case 6:
      return launch_gs<64, T>(p, stream);
    default:
      return launch_gs<128, T>(p, stream);
  }
}

// Spans (of 128 values) per step of the streaming kernel: 4 KB of loads in flight per warp. On an
// H200 (28672 x 8192, bf16, group 128, M = 1), with weights double-buffered in registers, 4 spans
// took 52.4 us, 2 spans 57.6, 8 spilled (72.8); rotating each warp's start over its row 53.0, and
// 1 + q/16 operands (no HSUB2, x sums taken off afterwards) 52.1 bf16 / 49.7 fp16 against 52.1 /
// 52.1: kept out. One LOP3 per nibble pair and no zeroing of B (kernels.cuh, qmv_stream.cuh) took
// it to 44.8 us, straight-line steps (x staged to whole steps) to 42.0.
constexpr int kStreamSpans = 4;
// Stages of the ring variant (weights copied to shared memory with cp.async, no registers held
// for them: 104 instead of 128). Where the tiles alone fill the GPU (KW = 1) and two blocks fit
// in a multiprocessor's shared memory it is faster: H200, M = 1, bf16, us, registers / ring:
// 28672 x 8192 group 128 42.1 / 39.9, group 64 42.9 / 40.7, group 32 49.2 / 45.4; with K split
// it is slower (4096 x 4096: 6.5 / 6.9; 8192 x 28672, whose x takes 57 KB: 39.5 / 44.8). Also
// measured there: U2 x 2-4 stages at 2-4 blocks per multiprocessor 44.7-50.8 us (before the
// straight-line steps); 3 stages of 4 spans do not fit twice; two accumulator chains per span, no
// gain; an L2 prefetch of 128 or 256 bytes on the weight loads lifts the loads alone from 34 to
// 30 us (the 64-byte row pieces cost the memory side) but not the kernel (39.9 / 39.7), which is
// bound by its instruction stream: each warp's mma chains and unpacking, at 16 warps a
// multiprocessor. More weight bytes in flight do not help either (H200, M = 1, bf16, us, one
// run, qmv_harness "wide"; 28672 x 8192 groups 128 / 64 / 32): this ring 39.4 / 41.6 / 45.8;
// one block of 16 warps a multiprocessor (x staged once) with the same ring 38.9 / 39.9 / 47.1,
// with 3 stages 43.6 / 44.6 / 52.0 (12 KB in flight a warp), U2 x 6 stages 50.2 / 52.3 / 57.9;
// copies of whole 256-byte row pieces per instruction (8 / U rows a cp.async, lanes then read
// each other's bytes) slower in every case (41.9 with 8 warps, 45.3 with 16 x 3 stages).
// 8192 x 28672: the register variant 40.0, 16 warps with this ring 40.0. A plain read kernel
// takes 28.1 (4.45 TB/s).
constexpr int kRingStages = 2;

template <int GS, typename T, int Ring, int Warps = kStreamWarps, int MinBlocks = 2,
          Prod P = Prod::kNative, int Pro = 0, int U = kStreamSpans>
void launch_stream_shape(const QmvParams& p, const StreamGrid& grid, int64_t smem,
                         cudaStream_t stream) {
  auto kernel = qmv_stream_kernel<GS, U, true, T, false, MinBlocks, Ring, Warps, P, Pro>;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(grid.blocks), Warps * 32, smem, stream>>>(p, grid.kw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Blocks of 16 warps (one a multiprocessor, x staged once for all of them) with the same ring,
// where the tiles fill at least 3/4 of the multiprocessors that way. Once x was staged without
// bank conflicts they measured faster than two blocks of 8 (H200, bf16, us, two runs each,
// qmv_harness "wide"; 28672 x 8192 groups 128 / 64 / 32 at M = 1 37.1 / 39.8 / 45.4 against
// 38.2 / 41.5 / 46.3, at M = 2 37.3 against 41.2; 112 blocks on 132 multiprocessors). Slower
// there since: 28 or 32 warps a multiprocessor (2 spans a step, 64-72 registers, K split), and
// one block a multiprocessor with each block's (tile, step) pairs split evenly among its warps, so
// that all 132 work (38.1 against 37.6 at group 128; the README has the numbers, qmv_harness.cu
// the interleaved form).
constexpr int kWideWarps = 16;

// Products and prologues (qmv_stream.cuh: Prod, Pro; qmv_harness "f16", H200, bf16 x, us, runs
// A / B / C in that order, each variant beside the one it replaces in the same run):
// - The 16-warp ring (28672 x 8192, groups 128 / 64 / 32 at M = 1, then M = 2, fp16 x): the first
//   4 chunks of x a thread loaded before the first step's weights (Pro 2; x then staged 4 chunks
//   at a time) 35.77 / 37.81 / 43.67 / 35.69 / 36.62 against 36.72 / 39.40 / 44.42 / 37.59 /
//   37.60 (C): ncu had 6% of the kernel's stall samples on the first wait for x. Every ring slot
//   loading before x is staged instead was slower (B: 40.0 / 43.6 / 47.6 against 37.8 / 40.6 /
//   44.9: x waits behind the weights), a third slot slower still (42.8 / 45.6 / 53.2).
// - fp16 products (Prod::kHalfSub: 1 SHF and 4 LOP3 per word of 8 nibbles instead of 3 SHF, 4
//   LOP3 and 4 HSUB2) do not pay in the rings: 38.1 / 40.7 / 45.1 against 37.8 / 40.6 / 44.9
//   (B), with x-first 36.39 against 35.77 (C); with 0x6400-biased nibbles (4 HSUB2 a word more)
//   the same (A: 37.7 against 36.6). ncu on the 16-warp ring at group 128: they cut the
//   instructions 17% (ALU pipe 42.6% -> 33.0% of cycles) and not the time; the stalls move to
//   waiting on the ring's copies (long scoreboard 0.55 -> 1.35 cycles an instruction) and the
//   shared loads. Before their x was staged so that each mma's B is two adjacent registers,
//   ptxas added two moves a mma (A: 37.6 against 36.6).
// - The register variant (K split) gains from both: 8192 x 28672 M = 1 native 41.5 / 41.7 (B),
//   41.1 (C) -> fp16 products with both buffers of weights and x 4 chunks at a time loading
//   before x is staged (Pro 1) 39.9 / 40.1, 39.2; M = 2 63.7 / 63.8, 63.0 -> 57.9 / 57.9, 57.3
//   (the batched x: native with Pro 1 58.4 / 58.4). 4096 x 4096 (2 steps a warp): native 6.70 /
//   6.67, 6.64; fp16 products 6.48 / 6.44 (B), with Pro 1 6.66 / 6.65, 6.64: Pro 1 only where a
//   thread stages more than 8 chunks of x (2 at 4096 x 4096, 14 at 8192 x 28672).
// The 2-block ring of 8 warps keeps the first prologue and native products (not measured).
// Even so the M = 1 target (2x tinygemm, ~31 us at 28672 x 8192) is not met: 35.8 us, 1.31x
// the plain read's 27.4 (C); bench_ops in C (before x-first): 0.0380 ms against tinygemm 0.0626.
constexpr Prod kRegsProd = Prod::kNative;

// The bulk-copy kernel (qmv_bulk.cuh: one persistent block of 16 + 1 warps a multiprocessor, all
// 132 busy, one thread issuing cp.async.bulk copies of 16 row pieces a piece into a ring, mbarrier
// waits). H200, bf16, M = 1, us, qmv_harness "bulk", four runs (R1-R4), the op's choice beside it
// in each run; plain read 27.4-28.3:
// - R1 (pieces of 16 rows x 256 / 512 / 1024 bytes, WPP 2 / 4 / 8): copies alone 78.2 / 41.1 us
//   at WPP 2 / 4: about 45 ns a bulk copy per multiprocessor whatever its size up to 1 KB, so
//   row pieces must be 2 KB or more; WPP 8 41.7 against the op's 36.7.
// - R2 (no divisions in the loops: with pc / nc, pc % stages a piece the products alone took 38.2,
//   without 33.5; rows of a slot 64 bytes apart in pairs): copies alone WPP 8 / 16 29.3 / 29.1,
//   products alone 33.5 / 33.3 (fp16 products 29.2 / 29.1); together WPP 8 at 4 stages 37.5, at 6
//   39.0, WPP 16 39.3 against the op's 35.8. 8192 x 28672 38.3 against 39.3 (registers, K split).
// - R3: fp16 products (Prod::kHalfSub) WPP 8 at 4 stages 35.7 (op 35.8 / 36.2); scales two pieces
//   ahead in registers (spills) 37.1; with no scale loads at all (probe) 33.2: the per-lane global
//   loads of scales cost ~2.5 us. Group 64 36.4 (op 38.7), 32 43.1 (op 44.3), 8192 x 28672 37.8
//   (op 39.2), 4096 x 4096 6.53 (op 6.47).
// - R4: a tile's scales and biases by two bulk copies into a ring of their own (SbSmem), read from
//   shared memory (16-way bank conflicts: rows 2 G bytes apart): fp16 products 35.00 / 35.00
//   against the op's 35.63 / 35.94; copies alone 31.9, products alone 32.0 (both up from R3);
//   group 64 36.85 (op 38.05), 32 43.00 (op 44.61), M = 2 35.81 (op 35.80), fp16 x 34.96 (op
//   36.91), 8192 x 28672 38.17 (op 39.94), 4096 x 4096 6.95 (op 6.50).
// So: 2-5% under the op's kernels where the tiles fill 3 blocks a multiprocessor, far from the
// M = 1 target (31 us): the products alone take as long as the copies alone (~29-32 us each,
// 896 spans of 16 rows a multiprocessor), and they overlap to ~35. The op takes R4's best there
// (bulk_wanted below): WPP 8, 4 stages, fp16 products, scales by bulk copies.
constexpr int kBulkWpp = 8, kBulkStages = 4;

template <int GS, typename T>
void launch_bulk(const QmvParams& p, const BulkShape& b, cudaStream_t stream) {
  auto kernel = qmv_bulk_kernel<GS, T, kBulkWpp, Prod::kHalfSub, 0, 1, true>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(b.smem)));
  kernel<<<static_cast<unsigned>(b.blocks), (kBulkWarps + 1) * 32, b.smem, stream>>>(p, b.stages,
                                                                                     b.tpb, b.sbs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// On by default since the lead's device run (bench_ops through the op, one call: 28672 x 8192
// M = 1 0.0376 -> 0.0354 ms, 8192 x 28672 0.0456 -> 0.0416; M = 2 0.0368 -> 0.0364);
// MLXQ_CUDA_BULK=0 keeps the ring / register kernels (read on every call).
bool bulk_wanted() {
  const char* env = std::getenv("MLXQ_CUDA_BULK");
  return env == nullptr || std::string(env) != "0";
}

// The bulk kernel's reach: the 16-row tiles give each multiprocessor 3 or more, or 1 or more
// where a tile's K is 2 or more of its 4096-value pieces (K >= 8192), so that each block's ring
// holds several pieces. Measured on the shapes real models use (H200, bf16, us, qmv_harness
// "small", two runs R1 / R2, the op's kernel before / bulk): down 4096 x 14336 (256 tiles, 4
// pieces a tile, the last short; before: registers with K split 8 ways) M = 1 15.50 / 11.86, R2
// 15.69 / 11.87; group 64 17.01 / 12.83, R2 17.11 / 12.84; M = 2 16.83 / 14.17, R2 16.93 / 14.14;
// through bench_ops (R1, MLXQ_CUDA_BULK_TILES=1 beside the default in one process) 0.0157 /
// 0.0120 ms (1.31x; group 64 1.29x, M = 2 1.18x). With one piece a tile it loses: 4096 x 4096
// (2 tiles a block, one piece for each group of 8 warps: nothing to pipeline) 6.72 / 6.81 against
// the register variant's 5.89 with U = 2 (below; M = 2: bulk 6.90, U = 2 6.67). Shapes whose
// scales rows are not 16-byte multiples (G % 8, Qwen2.5's K = 3584 and 18944) never take it.
// MLXQ_CUDA_BULK_TILES=n (read on every call, for benchmarks) takes it where the tiles give each
// multiprocessor n or more, whatever K. The K >= 8192 reach and the register variant's 2-span
// steps (below) ran through the whole of tests/test_cuda_ops.py on an H200; both are the default.
// The reach's one failure in loaded runs (fp16, K = 8704) was the test's: a row of wide-range x
// summed past fp16's max, which the op rightly rounds to inf (the CPU op too; the oracle now takes
// it). 10 processes x ~5900 rounds of its 12 cases on one GPU gave bitwise the same outputs.
// Through the op it takes 4096 x 14336 M = 1 from 0.0173 to 0.0138 ms; MLXQ_CUDA_DECODE_SMALL=0
// (read on every call) leaves those shapes to the register kernel.
// Also measured, not taken: a piece's 16 row copies issued by 16 lanes at once (qmv_bulk_kernel's
// Lanes) instead of one lane in turn: 28672 x 8192 34.98 -> 37.92 (R2 35.42 -> 38.66), 14336 x
// 4096 12.99 -> 13.78, 4096 x 14336 11.86 -> 11.93: the ~45 ns a row copy is the
// multiprocessor's copy engine, not the issuing thread.
bool small_shape_choices() {
  const char* env = std::getenv("MLXQ_CUDA_DECODE_SMALL");
  return env == nullptr || std::string(env) != "0";
}

bool bulk_reaches(const QmvParams& p, int sm_count) {
  const int64_t tiles = p.N / 16;
  const char* env = std::getenv("MLXQ_CUDA_BULK_TILES");
  const int forced = env != nullptr ? std::atoi(env) : 0;
  if (forced > 0) return tiles >= int64_t{forced} * sm_count;
  return tiles >= 3 * int64_t{sm_count} ||
         (small_shape_choices() && tiles >= sm_count && p.K >= 2 * 4096);
}

// The register variant's steps: 2 spans (through the op, 4096 x 4096 M = 1 0.0074 -> 0.0064 ms
// against 4); MLXQ_CUDA_REGS_SPANS=2 or 4 (read on every call) picks either.
int regs_spans() {
  const char* env = std::getenv("MLXQ_CUDA_REGS_SPANS");
  if (env != nullptr && (std::string(env) == "2" || std::string(env) == "4")) {
    return std::atoi(env);
  }
  return 2;
}

template <int GS, typename T>
void launch_stream_gs(const QmvParams& p, const StreamDevice& dev, cudaStream_t stream) {
  if (dev.bulk && bulk_reaches(p, dev.sm_count) && bulk_wanted()) {
    const auto shape = [&](int sbs) {
      return qmv_bulk_shape(p.N, p.K, p.M, dev.sm_count, dev.smem_per_block, kBulkWpp, kBulkStages,
                            p.G, sbs);
    };
    BulkShape b = shape(3);
    if (!b.ok) b = shape(2);
    if (b.ok) return launch_bulk<GS, T>(p, b, stream);
  }
  const StreamGrid wide = qmv_stream_grid(p.N, p.K, kStreamSpans, dev.sm_count, 1, 0, kWideWarps);
  const int64_t ring_wide =
      qmv_stream_smem(p.M, p.K, kRingStages * kStreamSpans * 1024, kWideWarps);
  if (wide.kw == 1 && ring_wide <= dev.smem_per_block && 4 * wide.blocks >= 3 * dev.sm_count) {
    return launch_stream_shape<GS, T, kRingStages, kWideWarps, 1, Prod::kNative, 2>(
        p, wide, ring_wide, stream);
  }
  const StreamGrid grid = qmv_stream_grid(p.N, p.K, kStreamSpans, dev.sm_count, 2);
  const int64_t ring = qmv_stream_smem(p.M, p.K, kRingStages * kStreamSpans * 1024);
  // 1 KB of each block's shared memory is reserved by the system
  if (grid.kw == 1 && ring <= dev.smem_per_block && 2 * (ring + 1024) <= dev.smem_per_sm) {
    return launch_stream_shape<GS, T, kRingStages>(p, grid, ring, stream);
  }
  // registers (K split): where each thread stages more than 8 chunks of x, both steps' weights
  // and x 4 chunks at a time loading before x is staged; else steps of 2 spans (U = 2, 2 KB a
  // warp): a warp's second step loads while its first is multiplied, where with 4 spans most
  // warps had one step, multiplied only once all of it had landed (4096 x 4096: the loads alone
  // take 5.1 us, the kernel 6.7). H200, bf16, us, qmv_harness "small", U = 4 / U = 2, runs R1, R2:
  // 4096 x 4096 M = 1 6.69 / 5.86, R2 6.68 / 5.89 (group 64 7.32 / 6.65, R2 7.32 / 6.69; fp16
  // group 32 R2 7.94 / 6.99; M = 2 R2 7.49 / 6.67); Qwen2.5's 3584 x 3584 7.24 / 6.59, R2 7.26 /
  // 6.57 (224 blocks of K split 8 ways instead of 112 of 4; group 64 R2 7.11 / 5.92, M = 2 7.84 /
  // 7.16); 1024 x 4096 4.36 / 4.29, R2 4.38 / 4.25 (group 64 4.63 / 4.48, M = 2 4.99 / 4.90). Pro
  // 1's shapes stay: 3584 x 18944 (x of 18944 values) U = 2 without Pro 1 21.02 against 21.43.
  const int64_t smem = qmv_stream_smem(p.M, p.K);
  if (p.M * p.K > 8 * 8 * kStreamWarps * 32) {
    return launch_stream_shape<GS, T, 0, kStreamWarps, 2, kRegsProd, 1>(p, grid, smem, stream);
  }
  if (regs_spans() == 4) {
    return launch_stream_shape<GS, T, 0, kStreamWarps, 2, kRegsProd, 0>(p, grid, smem, stream);
  }
  const StreamGrid grid2 = qmv_stream_grid(p.N, p.K, 2, dev.sm_count, 2);
  return launch_stream_shape<GS, T, 0, kStreamWarps, 2, kRegsProd, 0, 2>(p, grid2, smem, stream);
}

template <typename T>
void launch_stream_typed(const QmvParams& p, const StreamDevice& dev, cudaStream_t stream) {
  switch (p.group_shift) {
    case 5:
      return launch_stream_gs<32, T>(p, dev, stream);
    case 6:
      return launch_stream_gs<64, T>(p, dev, stream);
    default:
      return launch_stream_gs<128, T>(p, dev, stream);
  }
}

}  // namespace

bool qmv_stream4_fits(int64_t M, int64_t K, const StreamDevice& dev) {
  return M >= 1 && M <= 2 && qmv_stream_smem(M, K) <= dev.smem_per_block;
}

void launch_qmv_stream4(const QmvParams& p, DType x_dtype, const StreamDevice& dev,
                        cudaStream_t stream) {
  if (x_dtype == DType::kHalf) return launch_stream_typed<__half>(p, dev, stream);
  return launch_stream_typed<__nv_bfloat16>(p, dev, stream);
}

void launch_qmv_mma4(const QmvParams& p, DType x_dtype, cudaStream_t stream) {
  if (x_dtype == DType::kHalf) return launch_typed<__half>(p, stream);
  return launch_typed<__nv_bfloat16>(p, stream);
}

}  // namespace mlxq::cuda
