// CPU kernels for the floating-point modes of MLX (mxfp4, nvfp4, mxfp8): argument checks
// (checks.h), quantize and dequantize reproducing mx.quantize / mx.dequantize on the CPU bit for
// bit (fp_format.h), and matmul through the decode kernels (small M) or dequantized fp32 tiles
// and a dense GEMM (fp_kernels.h).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/bf16_pieces.h"
#include "cpu/cpu_features.h"
#include "cpu/fp_format.h"
#include "cpu/kernel_table.h"
#include "cpu/matmul_pairs.h"
#include "cpu/thread_tiles.h"

namespace mlxq::cpu {
namespace {

ScaleType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return ScaleType::kHalf;
    case at::kBFloat16:
      return ScaleType::kBFloat16;
    default:
      return ScaleType::kFloat;
  }
}

// nvfp4's global scale as a float (one element, checked), or none.
c10::optional<float> global_value(const c10::optional<at::Tensor>& global_scale) {
  if (!global_scale.has_value()) return c10::nullopt;
  return global_scale->to(at::kCPU).item<float>();
}

// Rows below which the decode kernel streams the weight (as for the affine ops).
constexpr int64_t kFpDecodeMaxRows = 16;
// fp32 tile per thread on the GEMM path: about a core's L2.
constexpr int64_t kFpTileBytes = int64_t{2} << 20;

// Matrix `matrix` of a contiguous packed weight [..., N, Kp] with scales [..., N, G] (a 2-D weight
// is matrix 0), without creating tensors (decode calls are small: a tensor per expert shows).
FpWeight view_fp_weight(const at::Tensor& wq, const at::Tensor& scales, int mode,
                        int64_t group_size, int64_t bits, float global, int64_t matrix = 0) {
  FpWeight W;
  W.N = wq.size(-2);
  W.G = scales.size(-1);
  W.K = W.G * group_size;
  W.w = static_cast<const uint8_t*>(wq.const_data_ptr()) +
        matrix * W.N * wq.size(-1) * wq.element_size();
  W.scales = scales.const_data_ptr<uint8_t>() + matrix * W.N * W.G;
  W.mode = static_cast<FpMode>(mode);
  W.bits = static_cast<int>(bits);
  W.group_size = static_cast<int>(group_size);
  W.global = global;
  return W;
}

// Rows of W per parallel task on the decode path (~64K weights, as for the affine ops).
int64_t fp_decode_grain(const FpWeight& W) {
  return std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(W.K, 1));
}

// x [M, K] fp32 in the decode kernel's order (FpQmvArgs): chunks of 16 values for the FP4 modes.
at::Tensor fp_chunk_order(const at::Tensor& x, FpMode mode) {
  if (!fp_uses_chunk_order(mode)) return x;
  const int64_t M = x.size(0);
  return x.view({M, -1, 8, 2}).transpose(2, 3).contiguous().view({M, -1});
}

// x @ W.T through the bf16 decode kernel (which the caller checked applies): x [M, K] fp32
// holding values of dtype `x_dtype` (which sets the number of bf16 pieces), y fp32.
at::Tensor fp_stream_bf16(const at::Tensor& x, const FpWeight& W, at::ScalarType x_dtype,
                          const KernelTable& kt) {
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, W.N}, x.options().dtype(at::kFloat));
  const at::Tensor xp = bf16_pieces(x, x_dtype, W.bits);
  const FpQmvBf16Args a{W, reinterpret_cast<const uint16_t*>(xp.const_data_ptr<c10::BFloat16>()),
                        bf16_piece_count(x_dtype), y.mutable_data_ptr<float>(), M};
  at::parallel_for(0, W.N, fp_decode_grain(W),
                   [&](int64_t n0, int64_t n1) { kt.fp_qmv_bf16(a, n0, n1); });
  return y;
}

// x fp32 [M, in_features] (values of dtype `x_dtype`) -> y fp32 [M, out_features].
at::Tensor fp_matmul_2d(const at::Tensor& x, const FpWeight& W, bool transpose,
                        at::ScalarType x_dtype) {
  const int64_t M = x.size(0);
  const int64_t out_features = transpose ? W.N : W.K;
  auto opts = x.options().dtype(at::kFloat);
  if (M == 0 || W.N == 0) return at::zeros({M, out_features}, opts);
  const KernelTable& kt = active_kernels();
  if (transpose && M <= kFpDecodeMaxRows && kt.fp_qmv_bf16 != nullptr && fp_bf16_decode_fits(W))
    return fp_stream_bf16(x, W, x_dtype, kt);
  if (transpose && M <= kFpDecodeMaxRows) {
    at::Tensor y = at::empty({M, out_features}, opts);
    const at::Tensor xc = fp_chunk_order(x, W.mode);
    const int64_t grain = fp_decode_grain(W);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxDecodeRows) {
      FpQmvArgs a{W, xc.const_data_ptr<float>() + m0 * W.K, y.mutable_data_ptr<float>() + m0 * W.N,
                  std::min(kMaxDecodeRows, M - m0)};
      at::parallel_for(0, W.N, grain, [&](int64_t n0, int64_t n1) { kt.fp_qmv(a, n0, n1); });
    }
    return y;
  }
  if (transpose) {
    // Each thread dequantizes its own row tiles and runs a single-threaded GEMM into its
    // columns of y (see affine_cpu.cpp for why no barrier is needed).
    at::Tensor y = at::empty({M, out_features}, opts);
    const ThreadTiles split = thread_tiles(W.N, W.K, sizeof(float), kFpTileBytes);
    const int64_t rows = split.rows, tiles = split.count;
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      const at::ThreadLocalStateGuard same_state(caller_state);
      at::Tensor tile = at::empty({rows, W.K}, opts);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * rows, n1 = std::min(W.N, n0 + rows);
        kt.fp_dequantize(W, tile.mutable_data_ptr<float>(), n0, n1);
        at::Tensor out = y.narrow(1, n0, n1 - n0);
        at::mm_out(out, x, tile.narrow(0, 0, n1 - n0).t());
      }
    });
    return y;
  }
  // x @ W: tiles of W's rows take turns, each dequantized by all threads.
  at::Tensor y = at::zeros({M, out_features}, opts);
  const int64_t tile_rows = std::min(W.N, std::max<int64_t>(8, kFpTileBytes * 2 / (W.K * 4)));
  at::Tensor tile = at::empty({tile_rows, W.K}, opts);
  float* tp = tile.mutable_data_ptr<float>();
  for (int64_t n0 = 0; n0 < W.N; n0 += tile_rows) {
    const int64_t n1 = std::min(W.N, n0 + tile_rows);
    at::parallel_for(n0, n1, 8,
                     [&](int64_t a, int64_t b) { kt.fp_dequantize(W, tp + (a - n0) * W.K, a, b); });
    y.addmm_(x.narrow(1, n0, n1 - n0), tile.narrow(0, 0, n1 - n0));
  }
  return y;
}

at::Tensor fp_matmul_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                         c10::string_view mode, int64_t group_size, int64_t bits, bool transpose,
                         const c10::optional<at::Tensor>& global_scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int m = check_fp_mode(mode, group_size, bits);
  const MatmulGeometry g = check_fp_matmul(x, wq, scales, group_size, bits, transpose);
  check_fp_global_scale(global_scale, m, wq.device());
  if (x.numel() == 0 || wq.numel() == 0) return at::zeros(g.out_shape, x.options());
  // Dequantized values are scale * value * global_scale / (448*6), as mx.dequantize computes
  // the last two factors: one fp32 rounding of the group's scale.
  const auto gv = global_value(global_scale);
  const float global = gv.has_value() ? *gv / 2688.0f : 1.0f;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor w = wq.contiguous(), s = scales.contiguous();
  const int64_t Kp = wq.size(-1), G = scales.size(-1), rows = g.w.rows;
  if (g.batch.empty()) {
    const FpWeight W = view_fp_weight(w, s, m, group_size, bits, global);
    at::Tensor y = fp_matmul_2d(xf.reshape({g.M, g.in_features}), W, transpose, x.scalar_type());
    return y.to(x.scalar_type()).reshape(g.out_shape);
  }
  const at::Tensor w3 = w.reshape({-1, rows, Kp});
  const at::Tensor s3 = s.reshape({-1, rows, G});
  const at::Tensor y = broadcast_batch_matmul(xf, g, [&](const at::Tensor& x2, int64_t e) {
    const FpWeight W = view_fp_weight(w3[e], s3[e], m, group_size, bits, global);
    return fp_matmul_2d(x2, W, transpose, x.scalar_type());
  });
  return y.to(x.scalar_type()).reshape(g.out_shape);
}

// mx.dequantize's CPU graph in the output dtype `t`: element value and scale are each rounded
// to t, then their product; with a global scale the factor global/(448*6) is fp32 and so is
// the product (MLX then returns float32).
template <FpMode Mode>
void fp_dequantize_rows(const uint8_t* w, const uint8_t* scales, int64_t rows, int64_t groups,
                        ScaleType t, c10::optional<float> global, float* out) {
  constexpr int kBits = Mode == FpMode::kMxfp8 ? 8 : 4;
  constexpr int kGroup = Mode == FpMode::kNvfp4 ? 16 : 32;
  const float inv_enc = global.has_value() ? *global / 2688.0f : 1.0f;
  at::parallel_for(0, rows * groups, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t sb = scales[i];
      float scale;
      if constexpr (Mode == FpMode::kNvfp4) {
        scale = round_to(e4m3_value(sb), t);
        if (global.has_value()) scale *= inv_enc;
      } else {
        const float e = round_to(static_cast<float>(sb), t) - 127.0f;
        scale = round_to(std::pow(2.0f, e), t);
      }
      const ScaleType pt = global.has_value() ? ScaleType::kFloat : t;
      const uint8_t* wg = w + i * (kGroup * kBits / 8);
      float* og = out + i * kGroup;
      for (int j = 0; j < kGroup; ++j) {
        float v;
        if constexpr (kBits == 8) {
          v = e4m3_value(wg[j]);
        } else {
          v = kFp4Values[(wg[j / 2] >> ((j % 2) * 4)) & 0xF];
        }
        og[j] = round_to(round_to(v, t) * scale, pt);
      }
    }
  });
}

at::Tensor fp_dequantize_cpu(const at::Tensor& wq, const at::Tensor& scales, c10::string_view mode,
                             int64_t group_size, int64_t bits,
                             const c10::optional<at::Tensor>& global_scale,
                             c10::optional<at::ScalarType> dtype) {
  const int m = check_fp_mode(mode, group_size, bits);
  const PackedGeometry g = check_fp_packed(wq, scales, group_size, bits, /*min_dim=*/1);
  check_fp_global_scale(global_scale, m, wq.device());
  const at::ScalarType requested = check_fp_dequantize_dtype(dtype);
  const auto gv = global_value(global_scale);
  // As mx.dequantize: the float32 global scale promotes the result to float32.
  const at::ScalarType out_dtype = gv.has_value() ? at::kFloat : requested;
  std::vector<int64_t> shape(wq.sizes().begin(), wq.sizes().end());
  shape.back() = g.cols;
  const int64_t R = wq.numel() / wq.size(-1);
  at::Tensor out = at::empty({R, g.cols}, wq.options().dtype(at::kFloat));
  if (R > 0) {
    const at::Tensor w = wq.contiguous(), s = scales.contiguous();
    const auto* wp = static_cast<const uint8_t*>(w.const_data_ptr());
    const uint8_t* sp = s.const_data_ptr<uint8_t>();
    const ScaleType t = dtype_of(requested);
    float* op = out.mutable_data_ptr<float>();
    switch (static_cast<FpMode>(m)) {
      case FpMode::kMxfp4:
        fp_dequantize_rows<FpMode::kMxfp4>(wp, sp, R, g.groups, t, gv, op);
        break;
      case FpMode::kNvfp4:
        fp_dequantize_rows<FpMode::kNvfp4>(wp, sp, R, g.groups, t, gv, op);
        break;
      default:
        fp_dequantize_rows<FpMode::kMxfp8>(wp, sp, R, g.groups, t, gv, op);
        break;
    }
  }
  return out.to(out_dtype).reshape(shape);  // values already rounded to out_dtype: exact
}

std::tuple<at::Tensor, at::Tensor> fp_quantize_cpu(const at::Tensor& w, c10::string_view mode,
                                                   int64_t group_size, int64_t bits,
                                                   const c10::optional<at::Tensor>& global_scale) {
  const int m = check_fp_mode(mode, group_size, bits);
  check_fp_quantize_input(w, group_size);
  check_fp_global_scale(global_scale, m, w.device());
  const auto gv = global_value(global_scale);
  const float enc = gv.has_value() ? 2688.0f / *gv : 1.0f;
  const int64_t K = w.size(-1), G = K / group_size, R = w.numel() / K;
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  std::vector<int64_t> qshape(w.sizes().begin(), w.sizes().end());
  std::vector<int64_t> sshape = qshape;
  qshape.back() = packed_cols(K, bits);
  sshape.back() = G;
  at::Tensor wq = at::empty(qshape, w.options().dtype(at::kUInt32));
  at::Tensor s = at::empty(sshape, w.options().dtype(at::kByte));
  const float* wp = wf.const_data_ptr<float>();
  auto* qp = static_cast<uint8_t*>(wq.mutable_data_ptr());
  uint8_t* sp = s.mutable_data_ptr<uint8_t>();
  const int64_t group_bytes = group_size * bits / 8;
  const ScaleType t = dtype_of(w.scalar_type());
  const auto fm = static_cast<FpMode>(m);
  at::parallel_for(0, R * G, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      quantize_fp_group(wp + i * group_size, static_cast<int>(group_size), fm, t, enc,
                        qp + i * group_bytes, sp + i);
  });
  return {wq, s};
}

}  // namespace
}  // namespace mlxq::cpu

// --- fp_gather_matmul (mx.gather_qmm with mode mxfp4 / nvfp4 / mxfp8) --------------------------
//
// The pairs are grouped by expert as for affine_gather_matmul (matmul_pairs.h) and each group is
// one fp_matmul of its stacked x rows, with the dense op's kernels and numerics: small groups
// (decode) run the streaming decode kernels (fp_qmv, or the bf16 one), all of them inside one
// parallel region; large groups (prefill) and x @ W take fp_matmul_2d's dequantized fp32 tiles and
// a dense GEMM.

namespace mlxq::cpu {
namespace {

at::Tensor fp_gather_matmul_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                                c10::string_view mode, int64_t group_size, int64_t bits,
                                const std::optional<at::Tensor>& lhs_indices,
                                const std::optional<at::Tensor>& rhs_indices, bool transpose,
                                const c10::optional<at::Tensor>& global_scale,
                                bool sorted_indices) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in fp_matmul_cpu
  const int m = check_fp_mode(mode, group_size, bits);
  const GatherGeometry g = check_fp_gather_matmul(x, wq, scales, m, group_size, bits, lhs_indices,
                                                  rhs_indices, transpose, global_scale);
  const auto [lhs, rhs] = gather_pair_indices(g, x, lhs_indices, rhs_indices);
  const int64_t P = lhs.numel(), M = g.M, in = g.in_features, out = g.out_features;
  if (P == 0 || M == 0 || out == 0 || in == 0) return at::zeros(g.out_shape, x.options());
  // One factor global_scale[e] / (448*6) per expert, rounded once in fp32 as fp_matmul does.
  std::vector<float> global(g.w_batch, 1.0f);
  if (global_scale.has_value()) {
    const at::Tensor gs = global_scale->to(at::kCPU).contiguous();
    const float* gp = gs.const_data_ptr<float>();
    for (int64_t e = 0; e < g.w_batch; ++e) global[e] = gp[e] / 2688.0f;
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous().view({g.x_batch * M, in});
  const at::Tensor w = wq.contiguous(), s = scales.contiguous();
  const int64_t* lp = lhs.const_data_ptr<int64_t>();
  std::vector<int64_t> order;
  const std::vector<ExpertGroup> groups =
      group_pairs(rhs.const_data_ptr<int64_t>(), P, sorted_indices, order);

  at::Tensor y = at::empty({P * M, out}, xf.options());  // pairs in `order`, M rows each
  struct DecodeGroup {
    FpWeight W;
    int64_t rows, y_row;
    bool bf16 = false;  // the bf16 kernel (x: its bf16 pieces), else fp_qmv
    at::Tensor x;       // the group's x rows in the decode kernel's order
  };
  const KernelTable& kt = active_kernels();
  std::vector<DecodeGroup> decode;
  at::Tensor xc_all;  // x in the decode kernel's order, built once for the streaming groups
  for (const ExpertGroup& e : groups) {
    const FpWeight W =
        view_fp_weight(w, s, m, group_size, bits, global[e.expert], /*matrix=*/e.expert);
    const std::vector<int64_t> rows = group_rows(e, order, lp, M);
    const int64_t n_rows = static_cast<int64_t>(rows.size());
    if (!transpose || n_rows > kFpDecodeMaxRows) {
      y.narrow(0, e.begin * M, n_rows)
          .copy_(fp_matmul_2d(take_rows(xf, rows), W, transpose, x.scalar_type()));
      continue;
    }
    if (kt.fp_qmv_bf16 != nullptr && fp_bf16_decode_fits(W)) {
      decode.push_back({W, n_rows, e.begin * M, true,
                        bf16_pieces(take_rows(xf, rows), x.scalar_type(), W.bits)});
      continue;
    }
    if (!xc_all.defined()) xc_all = fp_chunk_order(xf, W.mode).contiguous();
    decode.push_back({W, n_rows, e.begin * M, false, take_rows(xc_all, rows)});
  }
  if (!decode.empty()) {
    struct Task {
      int64_t group, n0, n1;
    };
    std::vector<Task> tasks;
    for (size_t i = 0; i < decode.size(); ++i) {
      const int64_t N = decode[i].W.N, grain = fp_decode_grain(decode[i].W);
      for (int64_t n0 = 0; n0 < N; n0 += grain)
        tasks.push_back({static_cast<int64_t>(i), n0, std::min(N, n0 + grain)});
    }
    float* yp = y.mutable_data_ptr<float>();
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const DecodeGroup& d = decode[tasks[t].group];
        if (d.bf16) {
          const FpQmvBf16Args a{
              d.W, reinterpret_cast<const uint16_t*>(d.x.const_data_ptr<c10::BFloat16>()),
              bf16_piece_count(x.scalar_type()), yp + d.y_row * out, d.rows};
          kt.fp_qmv_bf16(a, tasks[t].n0, tasks[t].n1);
          continue;
        }
        for (int64_t m0 = 0; m0 < d.rows; m0 += kMaxDecodeRows) {
          const FpQmvArgs a{d.W, d.x.const_data_ptr<float>() + m0 * d.W.K,
                            yp + (d.y_row + m0) * out, std::min(kMaxDecodeRows, d.rows - m0)};
          kt.fp_qmv(a, tasks[t].n0, tasks[t].n1);
        }
      }
    });
  }
  return in_pair_order(y, order, M).to(x.scalar_type()).reshape(g.out_shape);
}

}  // namespace
}  // namespace mlxq::cpu

TORCH_LIBRARY_IMPL(mlxq, CPU, m) {
  m.impl("fp_gather_matmul", &mlxq::cpu::fp_gather_matmul_cpu);
  m.impl("fp_quantize", &mlxq::cpu::fp_quantize_cpu);
  m.impl("fp_dequantize", &mlxq::cpu::fp_dequantize_cpu);
  m.impl("fp_matmul", &mlxq::cpu::fp_matmul_cpu);
}
