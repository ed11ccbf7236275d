// CPU kernels for the mlxq ops: argument checks (checks.h), layout preparation, the parallel
// split, and the choice between streaming decode kernels and dequantize-tile + dense GEMM.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/bf16_pieces.h"
#include "cpu/cpu_features.h"
#include "cpu/kernel_table.h"
#include "cpu/matmul_pairs.h"
#include "cpu/quantize.h"
#include "cpu/thread_tiles.h"
#include "mlx_rounding.h"

namespace mlxq::cpu {
namespace {

std::atomic<int> g_isa_override{-1};  // -1: not set, else an Isa value

Isa detect_isa() {
  const char* env = std::getenv("MLXQ_CPU_ISA");
  if (env != nullptr && std::string(env) == "portable") return Isa::kPortable;
#if defined(__x86_64__) || defined(_M_X64)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi") &&
      !(env != nullptr && std::string(env) == "avx2"))
    return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

ScaleType scale_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return ScaleType::kHalf;
    case at::kBFloat16:
      return ScaleType::kBFloat16;
    default:
      return ScaleType::kFloat;
  }
}

// Rows of a 2-D contiguous packed weight as raw bytes (uint32 and int32 share the bits).
QuantWeight view_weight(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                        int64_t group_size, int64_t bits) {
  QuantWeight W;
  W.w = static_cast<const uint8_t*>(wq.const_data_ptr());
  W.scales = scales.const_data_ptr();
  W.biases = biases.const_data_ptr();
  W.scale_type = scale_type_of(scales);
  W.N = wq.size(0);
  W.G = scales.size(1);
  W.K = W.G * group_size;
  W.bits = static_cast<int>(bits);
  W.group_size = static_cast<int>(group_size);
  return W;
}

// x [M, K] to and from the chunk order of the decode kernels (kernel_table.h).
at::Tensor to_chunk_order(const at::Tensor& x, int bits) {
  if (!uses_chunk_order(bits)) return x;
  const int64_t P = 8 / bits, M = x.size(0);
  return x.view({M, -1, 8, P}).transpose(2, 3).contiguous().view({M, -1});
}

at::Tensor from_chunk_order(const at::Tensor& y, int bits) {
  if (!uses_chunk_order(bits)) return y;
  const int64_t P = 8 / bits, M = y.size(0);
  return y.view({M, -1, P, 8}).transpose(2, 3).contiguous().view({M, -1});
}

// The sum of x over each group ([M, G] fp32, the decode kernels' b * sum(x) term), added in
// order in fp32 so that every path that streams these rows gets the same sums, whatever dtype
// it read them from.
at::Tensor group_sums(const at::Tensor& x, int64_t group_size) {
  const int64_t M = x.size(0), K = x.size(1), G = K / group_size;
  at::Tensor out = at::empty({M, G}, x.options().dtype(at::kFloat));
  float* op = out.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_sums", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float sum = 0.f;
        for (int64_t i = 0; i < group_size; ++i)
          sum += static_cast<float>(xp[m * K + g * group_size + i]);
        op[m * G + g] = sum;
      }
  });
  return out;
}

// Below this many rows of x, stream the packed weight (memory bound); above, dequantize tiles
// and use the dense GEMM (compute bound). Chosen from benchmarks/bench_ops.py.
constexpr int64_t kDecodeMaxRows = 16;
// Rows of W dequantized at a time on the GEMM path, as fp32: x @ W.T gives each thread its own
// tiles of about 2 MiB (a core's L2); x @ W shares 4 MiB tiles (the last-level cache).
constexpr int64_t kThreadTileBytes = int64_t{2} << 20;
constexpr int64_t kTileBytes = int64_t{4} << 20;

// The GEMM path's tile, kept per calling thread and reused: a fresh multi-MiB buffer per call
// comes from mmap and costs page faults on every call (measured: 26 ms instead of 12 ms for
// M=32, 4096x4096). Grows to the largest tile seen; never shared between threads.
float* tile_buffer(int64_t floats) {
  struct Buffer {
    float* data = nullptr;
    int64_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buf;
  if (buf.size < floats) {
    std::free(buf.data);
    constexpr size_t kHugePage = size_t{2} << 20;
    const size_t bytes =
        (static_cast<size_t>(floats) * sizeof(float) + kHugePage - 1) / kHugePage * kHugePage;
    buf.data = static_cast<float*>(std::aligned_alloc(kHugePage, bytes));
    buf.size = buf.data == nullptr ? 0 : floats;
    TORCH_CHECK(buf.data != nullptr, "mlxq: could not allocate a ", bytes, "-byte weight tile");
#ifdef __linux__
    madvise(buf.data, bytes, MADV_HUGEPAGE);
#endif
  }
  return buf.data;
}

// Rows of W per parallel task on the decode path: enough weights (~64K) that waking a thread
// costs less than the task, which matters for the small layers of small models.
int64_t decode_grain(const QuantWeight& W) {
  return std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(W.K, 1));
}

// Whether the AVX512-BF16 decode kernel beats the generic one. Its cost grows with M times
// the bf16 pieces of x; at 3, 5 and 6 bits, where each value is gathered, the generic fp32
// kernel wins from about 8 piece-rows on (measured at 4096x4096, 3 and 6 bits).
bool use_bf16_decode(const QuantWeight& W, int64_t M, at::ScalarType x_dtype) {
  if (W.bits == 8 || W.bits == 1 || W.K % bf16_block_values(W.bits) != 0) return false;
  const int64_t pieces = bf16_piece_count(x_dtype);
  return bf16_shifted_lanes(W.bits) || pieces == 1 || M * pieces <= 6;
}

// Whether every value of a contiguous fp32 tensor is finite (integer test: vectorizes).
bool all_finite(const at::Tensor& y) {
  const auto* p = static_cast<const uint32_t*>(y.const_data_ptr());
  uint32_t bad = 0;
  for (int64_t i = 0, n = y.numel(); i < n; ++i) bad |= (p[i] & 0x7F800000u) == 0x7F800000u;
  return bad == 0;
}

// x @ W.T through the bf16 decode kernel (which the caller checked applies) for x [M, K]
// contiguous in fp32, bf16 or fp16, holding values of dtype `x_dtype`; y is fp32.
at::Tensor stream_bf16(const at::Tensor& x, const QuantWeight& W, at::ScalarType x_dtype) {
  const int64_t M = x.size(0);
  const at::Tensor xsum = group_sums(x, W.group_size);
  const at::Tensor xp = bf16_pieces(x, x_dtype, W.bits);
  at::Tensor y = at::empty({M, W.N}, x.options().dtype(at::kFloat));
  const QmvBf16Args a{W,
                      static_cast<const uint16_t*>(xp.const_data_ptr()),
                      static_cast<int>(xp.size(0) / M),
                      xsum.const_data_ptr<float>(),
                      y.mutable_data_ptr<float>(),
                      M};
  const KernelTable& kt = active_kernels();
  at::parallel_for(0, W.N, decode_grain(W),
                   [&](int64_t n0, int64_t n1) { kt.qmv_bf16(a, n0, n1); });
  return y;
}

// y (fp32, or already in `dtype`) rounded to `dtype` (round to nearest even); a decode step's few
// values in one loop, since at::to costs more than the conversion there.
at::Tensor round_to(const at::Tensor& y, at::ScalarType dtype) {
  constexpr int64_t kLoopValues = 4096;
  if (y.scalar_type() == dtype) return y;
  if (y.numel() > kLoopValues) return y.to(dtype);
  at::Tensor out = at::empty(y.sizes(), y.options().dtype(dtype));
  const float* yp = y.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "round_to", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0, n = y.numel(); i < n; ++i) op[i] = static_cast<scalar_t>(yp[i]);
  });
  return out;
}

// The streaming kernels, for M <= kDecodeMaxRows rows of x (fp32 [M, in_features]).
at::Tensor decode_2d(const at::Tensor& x, const QuantWeight& W, bool transpose,
                     at::ScalarType x_dtype) {
  const KernelTable& kt = active_kernels();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, transpose ? W.N : W.K}, x.options().dtype(at::kFloat));
  if (!transpose) {
    QvmArgs a{W, x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), M};
    at::parallel_for(0, W.G, 1, [&](int64_t g0, int64_t g1) { kt.qvm(a, g0, g1); });
    return from_chunk_order(y, W.bits);
  }
  if (kt.qmv_bf16 != nullptr && use_bf16_decode(W, M, x_dtype)) return stream_bf16(x, W, x_dtype);
  const at::Tensor xsum = group_sums(x, W.group_size);
  at::Tensor xc = to_chunk_order(x, W.bits);
  QmvArgs a{W, xc.const_data_ptr<float>(), xsum.const_data_ptr<float>(),
            y.mutable_data_ptr<float>(), 0};
  for (int64_t m0 = 0; m0 < M; m0 += kMaxDecodeRows) {
    QmvArgs part = a;
    part.M = std::min(kMaxDecodeRows, M - m0);
    part.x += m0 * W.K;
    part.xsum += m0 * W.G;
    part.y += m0 * W.N;
    at::parallel_for(0, W.N, decode_grain(W),
                     [&](int64_t n0, int64_t n1) { kt.qmv(part, n0, n1); });
  }
  return y;
}

// y = x @ W.T with each thread dequantizing its own row tiles of W (`dequantize` writes `Tile`
// values) and multiplying each with a single-threaded GEMM into its columns of y (row stride N:
// BLAS writes it in place). The tiles are in x's dtype.
template <typename Tile>
void per_thread_tiles(const at::Tensor& x, const QuantWeight& W, const at::Tensor& y,
                      void (*dequantize)(const QuantWeight&, Tile*, int64_t, int64_t)) {
  const ThreadTiles split = thread_tiles(W.N, W.K, sizeof(Tile), kThreadTileBytes);
  const int64_t tile_floats = (split.rows * W.K * int64_t{sizeof(Tile)} + 3) / 4;
  // OpenMP workers do not inherit the caller's thread-local state (inference mode, excluded
  // dispatch keys), which at::mm_out needs to write into y.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, split.count, 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard same_state(caller_state);
    auto* tp = reinterpret_cast<Tile*>(tile_buffer(tile_floats));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * split.rows, n1 = std::min(W.N, n0 + split.rows);
      dequantize(W, tp, n0, n1);
      at::Tensor out = y.narrow(1, n0, n1 - n0);
      at::mm_out(out, x, at::from_blob(tp, {n1 - n0, W.K}, x.options()).t());
    }
  });
}

// Dequantize row tiles of W to fp32 and multiply them with a dense GEMM: sum_k x * (s*q + b),
// the order of MLX's own kernels.
at::Tensor gemm_2d(const at::Tensor& x, const QuantWeight& W, bool transpose) {
  const KernelTable& kt = active_kernels();
  const int64_t M = x.size(0);
  const int64_t out_features = transpose ? W.N : W.K;
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor y =
      transpose ? at::empty({M, out_features}, opts) : at::zeros({M, out_features}, opts);
  if (transpose) {
    per_thread_tiles<float>(x, W, y, kt.dequantize);
    return y;
  }
  // x @ W: every tile adds into all of y, so tiles take turns, each dequantized by all threads.
  const int64_t tile_rows = std::min(W.N, std::max<int64_t>(8, kTileBytes / (W.K * 4)));
  float* tp = tile_buffer(tile_rows * W.K);
  for (int64_t n0 = 0; n0 < W.N; n0 += tile_rows) {
    const int64_t n1 = std::min(W.N, n0 + tile_rows);
    at::parallel_for(n0, n1, 8,
                     [&](int64_t a, int64_t b) { kt.dequantize(W, tp + (a - n0) * W.K, a, b); });
    y.addmm_(x.narrow(1, n0, n1 - n0), at::from_blob(tp, {n1 - n0, W.K}, opts));
  }
  return y;
}

// x @ W.T for bf16 activations the way MLX's Metal GEMM computes it: tiles of W dequantized to
// bf16 (dequantize_bf16) and a bf16 GEMM that accumulates in fp32 and rounds once, which lets
// oneDNN use the CPU's bf16 dot products. x is bf16, or fp32 holding bf16 values; y comes back
// in bf16.
at::Tensor gemm_2d_bf16(const at::Tensor& x, const QuantWeight& W) {
  const int64_t M = x.size(0);
  const at::Tensor xb = x.to(at::kBFloat16);  // exact: the values are bf16 already
  at::Tensor y = at::empty({M, W.N}, xb.options());
  per_thread_tiles<uint16_t>(xb, W, y, active_kernels().dequantize_bf16);
  return y;
}

// x is fp32 [M, in_features] with M > 0 and W has K > 0 (checked by the caller); `x_dtype` is
// the dtype its values came in (bf16 and fp16 values need fewer bf16 pieces; bf16 x @ W.T above
// the decode rows takes the bf16 GEMM, with MLX's Metal numerics for bf16, where the CPU has bf16
// dot products: elsewhere a bf16 GEMM is emulated, slower than fp32 tiles, and exact tiles stay).
at::Tensor matmul_2d(const at::Tensor& x, const QuantWeight& W, bool transpose,
                     at::ScalarType x_dtype) {
  const int64_t M = x.size(0);
  if (M == 0 || W.N == 0) return at::zeros({M, transpose ? W.N : W.K}, x.options());
  if (M <= kDecodeMaxRows) {
    at::Tensor y = decode_2d(x, W, transpose, x_dtype);
    // The decode kernels factor each group's scale and bias out of its sum
    // (s * sum(q*x) + b * sum(x)) and the bf16 kernel splits x into bf16 pieces; with |x| near
    // the float maximum these can overflow where every x*w is finite, and an infinite x gives
    // inf - inf = NaN where x*w gives +-inf. An overflow always leaves a non-finite output, so
    // such an output is computed again as sum x*(s*q+b) (MLX's order), which gives the finite
    // result, or MLX's +-inf. Normal calls pay one scan of y.
    if (all_finite(y)) return y;
  } else if (x_dtype == at::kBFloat16 && transpose && active_kernels().dequantize_bf16 != nullptr) {
    return gemm_2d_bf16(x, W);
  }
  return gemm_2d(x, W, transpose);
}

at::Tensor affine_matmul_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                             const at::Tensor& biases, int64_t group_size, int64_t bits,
                             bool transpose) {
  // Reached below autograd (python/mlxq/ops.py owns the gradient): keep the at:: calls inside
  // from recording a graph or refusing out= arguments for an x that requires grad.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const MatmulGeometry g = check_matmul(x, wq, scales, biases, group_size, bits, transpose);
  // Empty operands: the output is empty, or its dot products are empty sums (x [M, 0] @ W with
  // N = 0). Return early: the reshapes below cannot infer a -1 dimension next to a zero.
  if (x.numel() == 0 || wq.numel() == 0) return at::zeros(g.out_shape, x.options());
  const at::Tensor w = wq.contiguous(), s = scales.contiguous(), b = biases.contiguous();
  const int64_t Kp = wq.size(-1), G = scales.size(-1), rows = g.w.rows;
  if (g.batch.empty()) {
    const QuantWeight W = view_weight(w, s, b, group_size, bits);
    if (transpose && g.M <= kDecodeMaxRows && active_kernels().qmv_bf16 != nullptr &&
        use_bf16_decode(W, g.M, x.scalar_type())) {
      // A decode step: the bf16 kernel reads x in its own dtype (no fp32 copy of x, no tensor
      // ops around the kernel), which is most of the cost of a small layer's call.
      const at::Tensor y =
          stream_bf16(x.reshape({g.M, g.in_features}).contiguous(), W, x.scalar_type());
      if (all_finite(y)) return round_to(y, x.scalar_type()).view(g.out_shape);
    }
    if (x.scalar_type() == at::kBFloat16 && transpose && g.M > kDecodeMaxRows &&
        active_kernels().dequantize_bf16 != nullptr) {
      // A bf16 prompt: the bf16 GEMM reads x as it is (an fp32 copy would be rounded back).
      return gemm_2d_bf16(x.reshape({g.M, g.in_features}).contiguous(), W).view(g.out_shape);
    }
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y = matmul_2d(xf.reshape({g.M, g.in_features}), W, transpose, x.scalar_type());
    return round_to(y, x.scalar_type()).reshape(g.out_shape);
  }
  // Batched weights: entry by entry, no weight copied (matmul_pairs.h)
  const at::Tensor w3 = w.reshape({-1, rows, Kp});
  const at::Tensor s3 = s.reshape({-1, rows, G}), b3 = b.reshape({-1, rows, G});
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor y = broadcast_batch_matmul(xf, g, [&](const at::Tensor& x2, int64_t e) {
    const QuantWeight W = view_weight(w3[e], s3[e], b3[e], group_size, bits);
    return matmul_2d(x2, W, transpose, x.scalar_type());
  });
  return y.to(x.scalar_type()).reshape(g.out_shape);
}

at::Tensor affine_dequantize_cpu(const at::Tensor& wq, const at::Tensor& scales,
                                 const at::Tensor& biases, int64_t group_size, int64_t bits) {
  const PackedGeometry g = check_dequantize(wq, scales, biases, group_size, bits);
  std::vector<int64_t> shape(wq.sizes().begin(), wq.sizes().end());
  shape.back() = g.cols;
  const int64_t R = c10::multiply_integers(wq.sizes().slice(0, wq.dim() - 1));  // no division
  at::Tensor q = at::empty({R, g.cols}, scales.options().dtype(at::kFloat));
  if (R > 0) {
    // The kernel unpacks the integers q (unit scales and zero biases make it exact); the
    // affine map is then evaluated as mx.dequantize does (mlx_rounding.h).
    const at::Tensor w = wq.contiguous().reshape({R, wq.size(-1)});
    const at::Tensor ones = at::ones({R, g.groups}, q.options());
    const at::Tensor zeros = at::zeros({R, g.groups}, q.options());
    const QuantWeight W = view_weight(w, ones, zeros, group_size, bits);
    const KernelTable& kt = active_kernels();
    float* qp = q.mutable_data_ptr<float>();
    at::parallel_for(0, R, 8,
                     [&](int64_t r0, int64_t r1) { kt.dequantize(W, qp + r0 * W.K, r0, r1); });
  }
  return mlx_affine_map(q, scales, biases, R, g.groups, group_size).reshape(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_quantize_cpu(const at::Tensor& w,
                                                                   int64_t group_size,
                                                                   int64_t bits) {
  check_quantize_input(w, group_size, bits);
  const int64_t K = w.size(-1), G = K / group_size;
  const int64_t R = c10::multiply_integers(w.sizes().slice(0, w.dim() - 1));
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  std::vector<int64_t> qshape(w.sizes().begin(), w.sizes().end());
  std::vector<int64_t> sshape = qshape;
  qshape.back() = packed_cols(K, bits);
  sshape.back() = G;
  at::Tensor wq = at::empty(qshape, w.options().dtype(at::kUInt32));
  at::Tensor s = at::empty(sshape, w.options().dtype(at::kFloat));
  at::Tensor b = at::empty(sshape, w.options().dtype(at::kFloat));
  const float* wp = wf.const_data_ptr<float>();
  auto* qp = static_cast<uint8_t*>(wq.mutable_data_ptr());
  float* sp = s.mutable_data_ptr<float>();
  float* bp = b.mutable_data_ptr<float>();
  const int64_t group_bytes = group_size * bits / 8;
  at::parallel_for(0, R * G, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      quantize_group(wp + i * group_size, static_cast<int>(group_size), static_cast<int>(bits),
                     qp + i * group_bytes, sp + i, bp + i);
  });
  return {wq, s.to(w.scalar_type()), b.to(w.scalar_type())};
}

}  // namespace

Isa active_isa_enum() {
  const int o = g_isa_override.load();
  if (o >= 0) return static_cast<Isa>(o);
  static const Isa detected = detect_isa();
  return detected;
}

const KernelTable& active_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  if (active_isa_enum() == Isa::kAvx512) return avx512_kernels();
  if (active_isa_enum() == Isa::kAvx2) return avx2_kernels();
#endif
  return portable_kernels();
}

bool threaded() {
#ifdef INTRA_OP_PARALLEL
  return true;
#else
  return false;
#endif
}

std::string active_isa() {
  switch (active_isa_enum()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
#if defined(__aarch64__) || defined(_M_ARM64)
      return "neon";
#else
      return "portable";
#endif
  }
}

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_isa_override = -1;
  } else if (name == "portable" || name == "neon") {
    g_isa_override = static_cast<int>(Isa::kPortable);
  } else if (name == "avx2") {
    TORCH_CHECK_VALUE(detect_isa() != Isa::kPortable, "mlxq: this CPU cannot run the avx2 kernels");
    g_isa_override = static_cast<int>(Isa::kAvx2);
  } else if (name == "avx512") {
    TORCH_CHECK_VALUE(detect_isa() == Isa::kAvx512,
                      "mlxq: this CPU cannot run the avx512 kernels (needs AVX512-BF16)");
    g_isa_override = static_cast<int>(Isa::kAvx512);
  } else {
    TORCH_CHECK_VALUE(false, "mlxq: unknown CPU ISA '", name,
                      "' (expected auto, portable, avx2, avx512)");
  }
}

}  // namespace mlxq::cpu

TORCH_LIBRARY_IMPL(mlxq, CPU, m) {
  m.impl("affine_quantize", &mlxq::cpu::affine_quantize_cpu);
  m.impl("affine_dequantize", &mlxq::cpu::affine_dequantize_cpu);
  m.impl("affine_matmul", &mlxq::cpu::affine_matmul_cpu);
}

// --- affine_gather_matmul (MLX's gather_qmm) ----------------------------------------------------
//
// Output pair p multiplies x matrix lhs[p] ([M, in]) with quantized matrix rhs[p] (an expert).
// Pairs that share an expert are grouped and their x rows stacked, so each selected expert's
// packed rows are read once per call however many tokens chose it, and experts nobody chose are
// never touched. Each group is one matmul with the dense op's kernels and the same numerics:
// small groups (decode) run the streaming qmv kernels, all groups inside one parallel region
// (a fork per expert would cost more than a small expert's weights take to stream); large
// groups (prefill) take matmul_2d's dequantize-tile + GEMM path.

namespace mlxq::cpu {
namespace {

// Matrix `e` of contiguous [E, rows, Kp] packed weights and [E, rows, G] scales/biases, without
// creating tensors (decode calls are small: a tensor per expert would show).
QuantWeight expert_weight(const at::Tensor& w, const at::Tensor& s, const at::Tensor& b, int64_t e,
                          int64_t group_size, int64_t bits) {
  QuantWeight W;
  W.N = w.size(1);
  W.G = s.size(2);
  W.K = W.G * group_size;
  W.bits = static_cast<int>(bits);
  W.group_size = static_cast<int>(group_size);
  W.scale_type = scale_type_of(s);
  W.w = static_cast<const uint8_t*>(w.const_data_ptr()) + e * w.stride(0) * w.element_size();
  W.scales = static_cast<const uint8_t*>(s.const_data_ptr()) + e * s.stride(0) * s.element_size();
  W.biases = static_cast<const uint8_t*>(b.const_data_ptr()) + e * b.stride(0) * b.element_size();
  return W;
}

// One expert group on the streaming path, with its stacked x rows in the layout its kernel
// reads (the same tensors matmul_2d builds for these rows).
struct DecodeGroup {
  QuantWeight W;
  int64_t rows = 0;    // pairs * M
  float* y = nullptr;  // its first output row; rows of W.N values
  bool bf16 = false;
  at::Tensor x;     // bf16: the bf16 pieces; else fp32 rows in chunk order
  at::Tensor xsum;  // [rows, G]
};

// The groups' output rows taken as one run of rows, in order, split evenly between the threads
// (as one weight of all their rows would be), so that small groups neither get a thread each
// nor leave one idle.
void run_decode_groups(const std::vector<DecodeGroup>& groups) {
  if (groups.empty()) return;
  const KernelTable& kt = active_kernels();
  std::vector<int64_t> first(groups.size() + 1, 0);  // first[i]: group i's first row in the run
  for (size_t i = 0; i < groups.size(); ++i) first[i + 1] = first[i] + groups[i].W.N;
  at::parallel_for(0, first.back(), decode_grain(groups[0].W), [&](int64_t r0, int64_t r1) {
    for (size_t i = 0; i < groups.size(); ++i) {
      const int64_t n0 = std::max(r0, first[i]) - first[i];
      const int64_t n1 = std::min(r1, first[i + 1]) - first[i];
      if (n0 >= n1) continue;
      const DecodeGroup& d = groups[i];
      if (d.bf16) {
        const QmvBf16Args a{d.W,
                            static_cast<const uint16_t*>(d.x.const_data_ptr()),
                            static_cast<int>(d.x.size(0) / d.rows),
                            d.xsum.const_data_ptr<float>(),
                            d.y,
                            d.rows};
        kt.qmv_bf16(a, n0, n1);
        continue;
      }
      for (int64_t m0 = 0; m0 < d.rows; m0 += kMaxDecodeRows) {
        const QmvArgs a{d.W, d.x.const_data_ptr<float>() + m0 * d.W.K,
                        d.xsum.const_data_ptr<float>() + m0 * d.W.G, d.y + m0 * d.W.N,
                        std::min(kMaxDecodeRows, d.rows - m0)};
        kt.qmv(a, n0, n1);
      }
    }
  });
}

at::Tensor affine_gather_matmul_cpu(const at::Tensor& x, const at::Tensor& wq,
                                    const at::Tensor& scales, const at::Tensor& biases,
                                    const std::optional<at::Tensor>& lhs_indices,
                                    const std::optional<at::Tensor>& rhs_indices,
                                    int64_t group_size, int64_t bits, bool transpose,
                                    bool sorted_indices) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in affine_matmul_cpu
  const GatherGeometry g = check_gather_matmul(x, wq, scales, biases, lhs_indices, rhs_indices,
                                               group_size, bits, transpose);
  const auto [lhs, rhs] = gather_pair_indices(g, x, lhs_indices, rhs_indices);
  const int64_t P = lhs.numel(), M = g.M, in = g.in_features, out = g.out_features;
  if (P == 0 || M == 0 || out == 0 || in == 0) return at::zeros(g.out_shape, x.options());
  const at::Tensor xf = x.to(at::kFloat).contiguous().view({g.x_batch * M, in});
  const at::Tensor w = wq.contiguous().view({g.w_batch, g.w.rows, wq.size(-1)});
  const at::Tensor s = scales.contiguous().view({g.w_batch, g.w.rows, g.w.groups});
  const at::Tensor b = biases.contiguous().view({g.w_batch, g.w.rows, g.w.groups});
  const int64_t* lp = lhs.const_data_ptr<int64_t>();
  std::vector<int64_t> order;
  const std::vector<ExpertGroup> groups =
      group_pairs(rhs.const_data_ptr<int64_t>(), P, sorted_indices, order);

  at::Tensor y = at::empty({P * M, out}, xf.options());  // pairs in `order`, M rows each
  const KernelTable& kt = active_kernels();
  at::Tensor xsum_all, xc_all;  // built once, for the streaming groups only
  std::vector<DecodeGroup> decode;
  for (const ExpertGroup& e : groups) {
    const QuantWeight W = expert_weight(w, s, b, e.expert, group_size, bits);
    const std::vector<int64_t> rows = group_rows(e, order, lp, M);
    const int64_t n_rows = static_cast<int64_t>(rows.size());
    if (!transpose || n_rows > kDecodeMaxRows) {
      const at::Tensor ye = matmul_2d(take_rows(xf, rows), W, transpose, x.scalar_type());
      y.narrow(0, e.begin * M, n_rows).copy_(ye);
      continue;
    }
    if (!xsum_all.defined()) xsum_all = group_sums(xf, W.group_size);
    DecodeGroup d;
    d.W = W;
    d.rows = n_rows;
    d.y = y.mutable_data_ptr<float>() + e.begin * M * out;
    d.xsum = take_rows(xsum_all, rows);
    d.bf16 = kt.qmv_bf16 != nullptr && use_bf16_decode(W, n_rows, x.scalar_type());
    if (d.bf16) {
      d.x = bf16_pieces(take_rows(xf, rows), x.scalar_type(), W.bits);
    } else {
      if (!xc_all.defined()) xc_all = to_chunk_order(xf, W.bits).contiguous();
      d.x = take_rows(xc_all, rows);
    }
    decode.push_back(std::move(d));
  }
  run_decode_groups(decode);

  const at::Tensor result = in_pair_order(y, order, M);
  return result.to(x.scalar_type()).reshape(g.out_shape);
}

// --- affine_matmul_many: sibling projections of one input --------------------------------------
//
// A decode step of a small model spends much of a projection's time forking threads and
// preparing x; q/k/v (or gate/up) read the same x, so the streaming kernels take all of them in
// one parallel region with x prepared once. Each output row comes from the same kernel call on
// the same prepared x as in affine_matmul, so the outputs are bit for bit affine_matmul's. Other
// sizes (prompts) and rare cases (a non-finite output, recomputed in MLX's order) go through
// affine_matmul_cpu one weight at a time.

std::vector<at::Tensor> affine_matmul_many_cpu(const at::Tensor& x, at::TensorList wq,
                                               at::TensorList scales, at::TensorList biases,
                                               int64_t group_size, int64_t bits) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto shapes = matmul_many_out_shapes(x, wq, scales, biases, group_size, bits);
  const size_t n = wq.size();
  auto one = [&](size_t i) {
    return affine_matmul_cpu(x, wq[i], scales[i], biases[i], group_size, bits, true);
  };
  const int64_t K = x.size(-1), M = K == 0 ? 0 : x.numel() / K;
  std::vector<at::Tensor> out;
  if (M == 0 || M > kDecodeMaxRows || K == 0 || bits == 1) {
    for (size_t i = 0; i < n; ++i) out.push_back(one(i));
    return out;
  }
  const KernelTable& kt = active_kernels();
  std::vector<at::Tensor> w(n), s(n), b(n), y(n);
  std::vector<DecodeGroup> groups(n);
  for (size_t i = 0; i < n; ++i) {
    w[i] = wq[i].contiguous(), s[i] = scales[i].contiguous(), b[i] = biases[i].contiguous();
    groups[i].W = view_weight(w[i], s[i], b[i], group_size, bits);
    groups[i].rows = M;
    y[i] = at::empty({M, groups[i].W.N}, x.options().dtype(at::kFloat));
    groups[i].y = y[i].mutable_data_ptr<float>();
  }
  // affine_matmul's choice (same bits, K and M for every weight): the bf16 kernel on x in its
  // own dtype, or the generic kernel on fp32 x in chunk order.
  const bool bf16 = kt.qmv_bf16 != nullptr && use_bf16_decode(groups[0].W, M, x.scalar_type());
  const at::Tensor x2 = x.reshape({M, K}).contiguous();
  const at::Tensor xin = bf16 ? x2 : x2.to(at::kFloat);
  const at::Tensor xsum = group_sums(xin, group_size);
  const at::Tensor xk = bf16 ? bf16_pieces(xin, x.scalar_type(), static_cast<int>(bits))
                             : to_chunk_order(xin, static_cast<int>(bits)).contiguous();
  for (DecodeGroup& d : groups) d.bf16 = bf16, d.x = xk, d.xsum = xsum;
  run_decode_groups(groups);
  for (size_t i = 0; i < n; ++i)
    out.push_back(all_finite(y[i]) ? round_to(y[i], x.scalar_type()).view_symint(shapes[i])
                                   : one(i));
  return out;
}

}  // namespace
}  // namespace mlxq::cpu

TORCH_LIBRARY_IMPL(mlxq, CPU, m) {
  m.impl("affine_gather_matmul", &mlxq::cpu::affine_gather_matmul_cpu);
  m.impl("affine_matmul_many", &mlxq::cpu::affine_matmul_many_cpu);
}
