// fp_matmul and fp_gather_matmul on CUDA: the streaming decode kernel (fp_qmv.cuh) for
// y = x @ W.T with up to kDecodeMaxRows rows of x (a 2-D weight; a gather of few pairs), the
// composite ops (composite/: the weight decoded by ATen ops, then cuBLAS; the gather's pairs
// grouped by expert) for everything else. Both keep the CPU op's
// numerics for decode sizes: exact fp32 weights, fp32 products and sums, one rounding of y.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "composite/composite.h"
#include "cuda/dtype.h"
#include "cuda/fp_qmv.h"

namespace mlxq::cuda {
namespace {

// MLXQ_CUDA_FP_DECODE=composite sends every call to the composite op (benchmarks compare the two
// in one process: read on every call, so a CUDA graph keeps the path chosen at capture).
bool decode_kernel_enabled() {
  const char* env = std::getenv("MLXQ_CUDA_FP_DECODE");
  return env == nullptr || std::string(env) != "composite";
}

// The kernel shape (fp_qmv.cuh): MLXQ_CUDA_FP_VARIANT=a|b|c|d, read on every call; by default
// 'a', and for fp32 x at M = 1 'b' (four rows of W share each load of x, twice the bytes of a
// bf16 x): on an H200, 28672 x 8192, ms a/b, mxfp4 0.128/0.084, nvfp4 0.129/0.084, mxfp8
// 0.080/0.064 (fp16 x: 0.053/0.066, 0.060/0.069, 0.062/0.061).
char decode_variant(at::ScalarType x_dtype, int64_t M) {
  const char* env = std::getenv("MLXQ_CUDA_FP_VARIANT");
  if (env != nullptr && env[0] >= 'a' && env[0] <= 'd') return env[0];
  return x_dtype == at::kFloat && M == 1 ? 'b' : 'a';
}

// Contiguous, with a data pointer aligned to `bytes`: a view that starts off alignment is
// copied (a fresh allocation is aligned).
at::Tensor aligned_to(const at::Tensor& t, uintptr_t bytes) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % bytes != 0) c = c.clone();
  return c;
}

// The decode kernel's parameters of a matmul (one pair; the gather adds its pairs): x, W and the
// scales contiguous and aligned, y [pairs, M, N], gs one float32 or undefined.
FpQmvParams decode_params(const at::Tensor& xc, const at::Tensor& wc, const at::Tensor& sc,
                          const at::Tensor& gs, at::Tensor& y, int64_t N, int64_t K, int64_t G,
                          int64_t row_bytes, int64_t M) {
  FpQmvParams p;
  p.w = static_cast<const uint4*>(wc.const_data_ptr());
  p.scales = static_cast<const uint8_t*>(sc.const_data_ptr());
  p.global = gs.defined() ? gs.const_data_ptr<float>() : nullptr;
  p.x = xc.const_data_ptr();
  p.y = y.mutable_data_ptr();
  p.N = N;
  p.K = K;
  p.G = G;
  p.chunks = row_bytes / 16;
  p.M = static_cast<int>(M);
  return p;
}

// y = x @ W.T by the decode kernel of mode `m` on the current stream.
void launch(int m, const FpQmvParams& p, at::ScalarType x_dtype, char variant) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DType dt = dtype_of(x_dtype);
  switch (m) {
    case kFpMxfp4:
      return launch_fp_qmv<kFpMxfp4>(p, dt, variant, stream);
    case kFpNvfp4:
      return launch_fp_qmv<kFpNvfp4>(p, dt, variant, stream);
    default:
      return launch_fp_qmv<kFpMxfp8>(p, dt, variant, stream);
  }
}

at::Tensor fp_matmul_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                          c10::string_view mode, int64_t group_size, int64_t bits, bool transpose,
                          const c10::optional<at::Tensor>& global_scale) {
  // Reached below autograd (csrc/autograd.cpp owns the gradient).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int m = check_fp_mode(mode, group_size, bits);
  const MatmulGeometry g = check_fp_matmul(x, wq, scales, group_size, bits, transpose);
  check_fp_global_scale(global_scale, m, wq.device());
  const int64_t N = g.w.rows, K = g.w.cols;
  const int64_t row_bytes = K / 8 * bits;  // K is a multiple of 16 (of 32 unless nvfp4)
  const char variant = decode_variant(x.scalar_type(), g.M);
  const int64_t rows_per_warp = fp_qmv_rows_per_warp(g.M, variant);
  const int64_t warps = (N + rows_per_warp - 1) / rows_per_warp;
  // The kernel streams whole 16-byte chunks of a 2-D weight's rows (nvfp4 with an odd number
  // of groups per row has none); batched weights, x @ W and prefill sizes take the composite.
  const bool decode = transpose && g.batch.empty() && g.M >= 1 && g.M <= kDecodeMaxRows && N > 0 &&
                      row_bytes % 16 == 0 && (warps + kFpWarps - 1) / kFpWarps <= INT32_MAX &&
                      decode_kernel_enabled();
  if (!decode) {
    return composite::fp_matmul(x, wq, scales, mode, group_size, bits, transpose, global_scale);
  }
  const c10::cuda::CUDAGuard device(x.device());
  const at::Tensor xc = aligned_to(x, 16).view({g.M, K});
  const at::Tensor wc = aligned_to(wq, 16);
  const at::Tensor sc = aligned_to(scales, 2);
  at::Tensor gs;
  if (global_scale.has_value()) gs = global_scale->contiguous();  // one float32 (checked)
  at::Tensor y = at::empty({g.M, N}, x.options());
  const FpQmvParams p = decode_params(xc, wc, sc, gs, y, N, K, g.w.groups, row_bytes, g.M);
  launch(m, p, x.scalar_type(), variant);
  return y.view(g.out_shape);
}

// The most pairs the gather kernel takes: each pair streams its expert's weight, so from a few
// dozen pairs on the composite's grouping by expert (each selected expert read once) wins.
constexpr int64_t kGatherMaxPairs = 64;

at::Tensor fp_gather_matmul_cuda(const at::Tensor& x, const at::Tensor& wq,
                                 const at::Tensor& scales, c10::string_view mode,
                                 int64_t group_size, int64_t bits,
                                 const std::optional<at::Tensor>& lhs_indices,
                                 const std::optional<at::Tensor>& rhs_indices, bool transpose,
                                 const c10::optional<at::Tensor>& global_scale,
                                 bool sorted_indices) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // ops.py owns the gradient
  const int m = check_fp_mode(mode, group_size, bits);
  const GatherGeometry g = check_fp_gather_matmul(x, wq, scales, m, group_size, bits, lhs_indices,
                                                  rhs_indices, transpose, global_scale);
  const int64_t N = g.w.rows, K = g.w.cols;
  const int64_t P = c10::multiply_integers(g.index_shape);
  const int64_t row_bytes = K / 8 * bits;
  const char variant = decode_variant(x.scalar_type(), g.M);
  const int64_t rows_per_warp = fp_qmv_rows_per_warp(g.M, variant);
  const int64_t warps = (N + rows_per_warp - 1) / rows_per_warp;
  const c10::cuda::CUDAGuard device(x.device());
  const bool capturing = stream_capturing();
  // Decode sizes of x @ W.T with few pairs: one launch, each pair streaming its own expert
  // (no sort, no device-to-host copy of the experts); the rest groups the pairs by expert.
  // While a graph is captured the grouping cannot read the experts back: every decode size
  // takes the kernel, the rest the composite pair by pair (affine_cuda.cu's rule).
  const bool decode = transpose && g.M >= 1 && g.M <= kDecodeMaxRows && N > 0 && P >= 1 &&
                      P <= (capturing ? kFpMaxPairs : std::min(kGatherMaxPairs, kFpMaxPairs)) &&
                      row_bytes % 16 == 0 && (warps + kFpWarps - 1) / kFpWarps <= INT32_MAX &&
                      decode_kernel_enabled();
  if (!decode) {
    return composite::fp_gather_matmul(x, wq, scales, mode, group_size, bits, lhs_indices,
                                       rhs_indices, transpose, global_scale, sorted_indices,
                                       capturing);
  }
  // checked: every index lies in its batch (one device-to-host read of their range; while
  // capturing, by the kernel on the device)
  const auto [lhs, rhs] = gather_pair_indices(
      g, x, lhs_indices, rhs_indices, capturing ? IndexCheck::kInKernel : IndexCheck::kHost);
  const at::Tensor xc = aligned_to(x, 16);
  const at::Tensor wc = aligned_to(wq, 16);
  const at::Tensor sc = aligned_to(scales, 2);
  at::Tensor gs;  // one float32 per weight matrix (checked)
  if (global_scale.has_value()) gs = global_scale->contiguous();
  at::Tensor y = at::empty({P, g.M, N}, x.options());
  FpQmvParams p = decode_params(xc, wc, sc, gs, y, N, K, g.w.groups, row_bytes, g.M);
  p.lhs = lhs.const_data_ptr<int64_t>();
  p.rhs = rhs.const_data_ptr<int64_t>();
  p.pairs = P;
  p.x_batch = g.x_batch;
  p.w_batch = g.w_batch;
  p.w_matrix = N * p.chunks;
  p.s_matrix = N * p.G;
  launch(m, p, x.scalar_type(), variant);
  return y.view(g.out_shape);
}

}  // namespace
}  // namespace mlxq::cuda

TORCH_LIBRARY_IMPL(mlxq, CUDA, m) {
  m.impl("fp_matmul", &mlxq::cuda::fp_matmul_cuda);
  m.impl("fp_gather_matmul", &mlxq::cuda::fp_gather_matmul_cuda);
}
