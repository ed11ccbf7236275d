// The CPU kernels' interface. kernels.h implements it once as templates; each ISA translation
// unit (kernels_portable.cpp: the build target's baseline, NEON on arm64; kernels_avx2.cpp;
// kernels_avx512.cpp, which adds the bf16 decode) compiles that text for its instruction set and
// exposes a table of entry points. Entry points work on contiguous 2-D operands and a range of
// rows or groups, so the caller decides the parallel split.
#pragma once

#include <atomic>
#include <cstdint>

namespace mlxq::cpu {

enum class ScaleType { kFloat, kHalf, kBFloat16 };

// A contiguous 2-D packed weight: `w` is N rows of K*bits/8 bytes; scales and biases are
// [N, G] in `scale_type`, G = K / group_size.
struct QuantWeight {
  const uint8_t* w = nullptr;
  const void* scales = nullptr;
  const void* biases = nullptr;
  ScaleType scale_type = ScaleType::kFloat;
  int64_t N = 0, K = 0, G = 0;
  int bits = 4, group_size = 64;
};

// The decode kernels for 2, 4 and 8 bits read x (qmv) and write y (qvm) in "chunk order" with
// L byte lanes: within each run of L*P values (P = 8/bits values per byte), value l*P + j sits
// at j*L + l, so that L zero-extended packed bytes line up with L consecutive x values.
// The generic kernels use L = 8 (one 8-lane vector); QmvBf16Args has its own order.
inline bool uses_chunk_order(int bits) { return bits == 2 || bits == 4 || bits == 8; }

// y[m, n] = sum_k x[m, k] * W[n, k] for M <= kMaxDecodeRows; xsum[m, g] = sum of x over group g.
struct QmvArgs {
  QuantWeight W;
  const float* x = nullptr;
  const float* xsum = nullptr;
  float* y = nullptr;
  int64_t M = 0;
};

// y[m, k] = sum_n x[m, n] * W[n, k] for M <= kMaxDecodeRows.
struct QvmArgs {
  QuantWeight W;
  const float* x = nullptr;
  float* y = nullptr;
  int64_t M = 0;
};

constexpr int64_t kMaxDecodeRows = 4;

// Decode through bf16 dot products (AVX512-BF16), for bits 2 to 6 and K a multiple of
// bf16_block_values(bits). x is given as `pieces` bf16 tensors [pieces, M, K] whose sum is x
// (exact for bf16 and fp16 x; three pieces carry fp32's precision). At 2 and 4 bits the kernel
// reads W in blocks of 64 bytes as kBf16Lanes 16-bit lanes of 16/bits values each, and a K that
// ends in half a block ends with 32 bytes widened to 16-bit lanes of 8/bits values; x follows
// the same order: within a block whose lanes hold PL values, value l*PL + j sits at
// j*kBf16Lanes + l. At 3, 5 and 6 bits each lane holds one value (PL = 1): natural order.
struct QmvBf16Args {
  QuantWeight W;
  const uint16_t* x = nullptr;
  int pieces = 1;
  const float* xsum = nullptr;
  float* y = nullptr;
  int64_t M = 0;
};
constexpr int kBf16Lanes = 32;
constexpr bool bf16_shifted_lanes(int bits) { return bits == 2 || bits == 4; }
// K must be a multiple of this: half a 64-byte block at 2 and 4 bits, else 32 values.
inline int64_t bf16_block_values(int bits) {
  return bf16_shifted_lanes(bits) ? kBf16Lanes * 8 / bits : kBf16Lanes;
}
// Values per 16-bit lane of x's bf16 order for the block that starts at k0 (see QmvBf16Args).
inline int64_t bf16_lane_values(int64_t k0, int64_t K, int bits) {
  if (!bf16_shifted_lanes(bits)) return 1;
  return k0 + kBf16Lanes * 16 / bits <= K ? 16 / bits : 8 / bits;
}

// MLX's floating-point quantization modes (cpu/fp_format.h describes them).
enum class FpMode { kMxfp4 = 0, kNvfp4 = 1, kMxfp8 = 2 };

// A contiguous 2-D weight in one of MLX's floating-point modes (fp_format.h): `w` is N rows of
// K*bits/8 bytes (FP4 codes two per byte, low nibble first, or FP8 E4M3 bytes), `scales` is
// [N, G] scale bytes (E8M0 for mx modes, E4M3 for nvfp4); every value is further multiplied by
// `global` (nvfp4's global_scale / (448*6), else 1).
struct FpWeight {
  const uint8_t* w = nullptr;
  const uint8_t* scales = nullptr;
  int64_t N = 0, K = 0, G = 0;
  FpMode mode = FpMode::kMxfp4;
  int bits = 4, group_size = 32;
  float global = 1.f;
};

// y[m, n] = sum_k x[m, k] * W[n, k] for M <= kMaxDecodeRows. For the FP4 modes x is in chunk
// order of 16 values (8 bytes): x_chunk[j*8 + l] = x[l*2 + j]; FP8: natural order.
inline bool fp_uses_chunk_order(FpMode mode) { return mode != FpMode::kMxfp8; }
struct FpQmvArgs {
  FpWeight W;
  const float* x = nullptr;
  float* y = nullptr;
  int64_t M = 0;
};

// Decode of the floating-point modes through bf16 dot products (AVX512-BF16): FP4 and FP8
// values are exact in bf16. x is given as bf16 pieces in QmvBf16Args's order for W.bits, and K
// must be a multiple of bf16_block_values(W.bits).
struct FpQmvBf16Args {
  FpWeight W;
  const uint16_t* x = nullptr;
  int pieces = 1;
  float* y = nullptr;
  int64_t M = 0;
};
inline bool fp_bf16_decode_fits(const FpWeight& W) { return W.K % bf16_block_values(W.bits) == 0; }

// Attention of a few queries against a KV cache (attention_kernels.h), read in place. A "unit"
// is one (batch, kv head) pair; its R = (Hq / Hkv) * Lq rows are the (query head, query) pairs
// that read that kv head, row r being query head hkv * Hq/Hkv + r / Lq, query r % Lq. A task is
// (unit, row group, key block): rows [g * rows_per_group, ...) against keys
// [blk * block_keys, ...). Strides are in elements; the last dimension of q, k, v is unit-stride.
enum class MaskType { kNone, kBool, kFloat, kHalf, kBFloat16 };
struct AttentionArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  ScaleType dtype = ScaleType::kFloat;  // of q, k, v and out
  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0;
  int64_t q_stride[3] = {};  // batch, head, query
  int64_t k_stride[3] = {};  // batch, head, key
  int64_t v_stride[3] = {};
  // The mask broadcast to [B, Hq, Lq, Lk] (stride 0 along broadcast dimensions); bool: true
  // attends, float: added to the scores.
  const void* mask = nullptr;
  MaskType mask_type = MaskType::kNone;
  int64_t mask_stride[4] = {};
  float scale = 1.f;
  void* out = nullptr;  // [B, Hq, Lq, D] contiguous, dtype; written directly when blocks == 1
  int64_t rows_per_group = 1, row_groups = 1;
  int64_t block_keys = 1, blocks = 1;
  // blocks > 1: each task leaves its running max, sum of exponentials and unnormalised output
  // per row, at index (unit * R + r) * blocks + blk (part_o: times D), and counts itself in
  // blocks_done[unit * row_groups + group]; the last block of a row group merges them.
  float* part_m = nullptr;
  float* part_l = nullptr;
  float* part_o = nullptr;
  std::atomic<int64_t>* blocks_done = nullptr;
  int64_t rows() const { return Hq / Hkv * Lq; }  // R
  int64_t tasks() const { return B * Hkv * row_groups * blocks; }
};

struct KernelTable {
  const char* name;
  void (*qmv)(const QmvArgs& a, int64_t n_begin, int64_t n_end);  // output columns range
  void (*qvm)(const QvmArgs& a, int64_t g_begin, int64_t g_end);  // groups of K range
  // out[n - n_begin, k] = W[n, k] in fp32 for rows [n_begin, n_end); `out` is [n_end-n_begin, K].
  void (*dequantize)(const QuantWeight& W, float* out, int64_t n_begin, int64_t n_end);
  // Optional (null where the CPU lacks it): decode at 2 to 6 bits through bf16 dot products.
  void (*qmv_bf16)(const QmvBf16Args& a, int64_t n_begin, int64_t n_end) = nullptr;
  // The floating-point modes (fp_kernels.h): decode for M <= kMaxDecodeRows, and rows of W
  // dequantized to fp32 (exact: every FP4/FP8 value times its scale is an fp32 number).
  void (*fp_qmv)(const FpQmvArgs& a, int64_t n_begin, int64_t n_end) = nullptr;
  void (*fp_dequantize)(const FpWeight& W, float* out, int64_t n_begin, int64_t n_end) = nullptr;
  // Optional (null where the CPU lacks it): decode through bf16 dot products.
  void (*fp_qmv_bf16)(const FpQmvBf16Args& a, int64_t n_begin, int64_t n_end) = nullptr;
  // Optional (null where the CPU has no bf16 dot products for the GEMM to use): rows of W as
  // bf16 bits, rounded as mx.dequantize does in bf16 (the bf16 prefill's tiles).
  void (*dequantize_bf16)(const QuantWeight& W, uint16_t* out, int64_t n_begin,
                          int64_t n_end) = nullptr;
  // Decode attention: tasks [t_begin, t_end) of AttentionArgs.
  void (*attention)(const AttentionArgs& a, int64_t t_begin, int64_t t_end) = nullptr;
  // y = exp(x) elementwise (the kernels' own vector exp, exposed for its accuracy test).
  void (*exp)(const float* x, float* y, int64_t n) = nullptr;
};

const KernelTable& portable_kernels();
#if defined(__x86_64__) || defined(_M_X64)
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
#endif
// The table of the instruction set the kernels run with (active_isa_enum, cpu_features.h).
const KernelTable& active_kernels();

}  // namespace mlxq::cpu
