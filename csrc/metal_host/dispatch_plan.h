// The dispatch plan of the Metal kernels in plain C++ (no Metal types): which kernel, how many
// threadgroups of how many threads, which tensor goes to which buffer index, how much
// threadgroup memory, and the bytes of the params struct (metal/mlxq_params.h). The MPS backend
// turns a plan into setBuffer/setBytes/dispatchThreadgroups calls; the emulator and the
// runtime-compiled fallback execute the same plan. Validation goes through csrc/checks.h.
//
// What an executor of a plan must do:
//  - bind contiguous tensors whose data starts 16-byte aligned (the kernels use uint4/uint2
//    loads on packed rows); int32 packed weights are bound as they are (same bits);
//  - pass scales/biases in the kernel's dtype (`dtype`; for affine_matmul that of x);
//  - bind `params` with setBytes, and each threadgroup_memory entry with
//    setThreadgroupMemoryLength(bytes, index);
//  - skip the launch when empty() (the outputs are empty tensors of out_shapes);
//  - compile the library for MSL 3.1 (bfloat).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"

namespace mlxq::metal {

struct Binding {
  int index;         // [[buffer(index)]]
  std::string role;  // "x", "w", "wq", "scales", "biases", "out", "params"
};

struct DispatchPlan {
  std::string kernel;                                       // host name in the metallib
  std::string dtype;                                        // kernel dtype: float, half, bfloat
  std::array<uint32_t, 3> grid{0, 0, 0};                    // threadgroups per grid
  std::array<uint32_t, 3> threads{1, 1, 1};                 // threads per threadgroup
  std::vector<Binding> bindings;                            // device buffers and params
  std::vector<std::pair<int, int64_t>> threadgroup_memory;  // [[threadgroup(i)]] -> bytes
  std::vector<uint8_t> params;                              // bytes for the "params" binding
  std::vector<std::vector<int64_t>> out_shapes;             // outputs, in binding order
  // Nothing to launch (an empty tensor): the caller returns the empty outputs.
  bool empty() const { return grid[0] == 0 || grid[1] == 0 || grid[2] == 0; }
};

// Kernel dtype name for x / scales: float, half or bfloat.
std::string dtype_name(at::ScalarType t);

// affine_matmul from validated geometry: qmv (transpose, M <= MLXQ_QMV_MAX_M), qvm
// (!transpose, small M) or qmm (otherwise).
DispatchPlan plan_affine_matmul(const MatmulGeometry& g, at::ScalarType dtype, int64_t group_size,
                                int64_t bits, bool transpose);
DispatchPlan plan_affine_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                                const at::Tensor& biases, int64_t group_size, int64_t bits,
                                bool transpose);
DispatchPlan plan_affine_quantize(const at::Tensor& w, int64_t group_size, int64_t bits);
DispatchPlan plan_affine_dequantize(const at::Tensor& wq, const at::Tensor& scales,
                                    const at::Tensor& biases, int64_t group_size, int64_t bits);

}  // namespace mlxq::metal

namespace mlxq::metal {

// affine_gather_matmul (mx.gather_qmm): the kernel affine_matmul picks for one pair ([M, in]
// against one [rows, K] matrix) in its gather variant (affine_gather_qmv/qvm/qmm_t/qmm_n,
// metal/affine_gather_*.metal), with grid z = the number of pairs and batch_ndim = 0. Binds the
// broadcast, flattened indices as contiguous uint32 tensors (roles "lhs_indices" and
// "rhs_indices") at buffers 6 and 7; their values are checked by the caller
// (mlxq::gather_pair_indices) before a launch.
// With sorted_indices (rhs_indices sorted by expert, as mlx-lm's MoE prefill passes them) and
// use_sorted_gather(g), the sorted gather qmm instead (affine_gather_qmm_rhs_t/_n,
// metal/affine_gather_qmm_rhs.metal): grid (ceil(out / 32), ceil(pairs * M / 32), 1), params.M =
// rows per pair and params.batch = pairs, threadgroup memory 0 as qmm plus 1 (the block's
// indices). Its result does not depend on the hint being true, only its speed.
DispatchPlan plan_affine_gather_matmul(const GatherGeometry& g, at::ScalarType dtype,
                                       int64_t group_size, int64_t bits, bool transpose,
                                       bool sorted_indices = false);
DispatchPlan plan_affine_gather_matmul(const at::Tensor& x, const at::Tensor& wq,
                                       const at::Tensor& scales, const at::Tensor& biases,
                                       const std::optional<at::Tensor>& lhs_indices,
                                       const std::optional<at::Tensor>& rhs_indices,
                                       int64_t group_size, int64_t bits, bool transpose,
                                       bool sorted_indices = false);

// Whether sorted indices go to the sorted gather qmm: each pair has fewer rows than a 32-row
// tile (M < MLXQ_QMM_BM: with a full tile per pair, the per-pair qmm already reads a weight tile
// once per 32 rows), there is at least one full tile of rows (pairs * M >= MLXQ_QMM_BM), and an
// expert of wq has at least 4 rows on average (pairs * M >= 4 * experts; MLX uses the same
// B / E >= 4). A block of 32 rows then spans few runs: it reads about (32 / run + 1) expert
// tiles instead of one per pair, while a block split into many short runs would multiply its
// tile-GEMM work by the number of runs (decode-sized calls stay on qmv/qvm).
bool use_sorted_gather(const GatherGeometry& g);

}  // namespace mlxq::metal

namespace mlxq::metal {

// fp_matmul (mxfp4, nvfp4, mxfp8; mode index as check_fp_mode): fp_qmv (transpose, M <=
// MLXQ_QMV_MAX_M) or fp_qmm_t / fp_qmm_n (metal/fp_*.metal), with AffineMatmulParams. Binds x,
// wq, the uint8 scales, the float32 global scale (role "global_scale": the tensor's own for
// nvfp4, else one value 448 * 6, which makes nvfp4's factor exactly 1 and is never read by the
// mx modes), out and params at buffers 0-5.
DispatchPlan plan_fp_matmul(const MatmulGeometry& g, at::ScalarType dtype, int mode,
                            bool transpose);
DispatchPlan plan_fp_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                            const std::optional<at::Tensor>& global_scale, c10::string_view mode,
                            int64_t group_size, int64_t bits, bool transpose);

// The float-mode gather (mx.gather_qmm with mode=), from validated geometry: the kernel
// plan_fp_matmul picks for one pair in its gather variant (fp_gather_qmv / fp_gather_qmm_t /
// fp_gather_qmm_n, metal/fp_gather_*.metal) over grid z = pairs, or with sorted_indices and
// use_sorted_gather(g) the sorted gather qmm (fp_gather_qmm_rhs_t/_n) as for the affine gather.
// Bindings as plan_fp_matmul's plus the indices at 6 and 7; "global_scale" holds one float32
// per matrix of wq (pair z reads rhs[z]'s; an executor binds 448 * 6 for each when nvfp4 has
// none).
DispatchPlan plan_fp_gather_matmul(const GatherGeometry& g, at::ScalarType dtype, int mode,
                                   bool transpose, bool sorted_indices = false);
// The same from tensors, after the float-mode gather op's argument checks
// (check_fp_gather_matmul; arguments in the op's order, the mode as its name).
DispatchPlan plan_fp_gather_matmul(const at::Tensor& x, const at::Tensor& wq,
                                   const at::Tensor& scales, c10::string_view mode,
                                   int64_t group_size, int64_t bits,
                                   const std::optional<at::Tensor>& lhs_indices,
                                   const std::optional<at::Tensor>& rhs_indices, bool transpose,
                                   const std::optional<at::Tensor>& global_scale,
                                   bool sorted_indices = false);

// fp_dequantize: fp_dequantize_<dtype>_<mode> (metal/fp_dequantize.metal), one thread per group,
// binding wq, the uint8 scales, the global scale (as plan_fp_matmul), out and params at 0-4.
// The output is float32 with a global scale, else `dtype` (default bfloat16, as MLX):
// fp_dequantize_dtype.
DispatchPlan plan_fp_dequantize(const at::Tensor& wq, const at::Tensor& scales,
                                c10::string_view mode, int64_t group_size, int64_t bits,
                                const std::optional<at::Tensor>& global_scale,
                                std::optional<at::ScalarType> dtype);
at::ScalarType fp_dequantize_dtype(const std::optional<at::Tensor>& global_scale,
                                   std::optional<at::ScalarType> dtype);

// fp_quantize: fp_quantize_<dtype of w>_<mode> (metal/fp_quantize.metal), one thread per group,
// binding w, the outputs wq (uint32) and scales (uint8), the global scale and params at 0-4.
DispatchPlan plan_fp_quantize(const at::Tensor& w, c10::string_view mode, int64_t group_size,
                              int64_t bits, const std::optional<at::Tensor>& global_scale);

}  // namespace mlxq::metal
