#include "metal_host/dispatch_plan.h"

#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cstring>
#include <limits>

#include "../../metal/mlxq_params.h"

namespace mlxq::metal {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

uint32_t ceil_div(int64_t a, int64_t b) { return static_cast<uint32_t>((a + b - 1) / b); }

int32_t to_i32(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v >= 0 && v <= kInt32Max, "mlxq: ", what, " = ", v,
                    " is too large for the Metal kernels (limit 2^31 - 1)");
  return static_cast<int32_t>(v);
}

template <typename P>
std::vector<uint8_t> to_bytes(const P& p) {
  std::vector<uint8_t> out(sizeof(P));
  std::memcpy(out.data(), &p, sizeof(P));
  return out;
}

std::string host_name(const std::string& op, const std::string& dtype, int64_t gs, int64_t bits) {
  return op + "_" + dtype + "_gs" + std::to_string(gs) + "_b" + std::to_string(bits);
}

// Strides (in batch entries) of a contiguous operand with batch dims `dims`, right-aligned
// against the broadcast batch shape `batch`; 0 along broadcast dimensions.
std::vector<int64_t> broadcast_strides(const std::vector<int64_t>& batch,
                                       const std::vector<int64_t>& dims) {
  std::vector<int64_t> strides(batch.size(), 0);
  int64_t stride = 1;
  const int64_t off = static_cast<int64_t>(batch.size()) - static_cast<int64_t>(dims.size());
  for (int64_t d = static_cast<int64_t>(dims.size()) - 1; d >= 0; --d) {
    strides[off + d] = dims[d] == 1 ? 0 : stride;
    stride *= dims[d];
  }
  return strides;
}

int64_t qvm_threadgroup_bytes(int64_t gs) { return int64_t{MLXQ_QVM_TG_FLOATS(gs)} * 4; }

}  // namespace

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float";
    case at::kHalf:
      return "half";
    case at::kBFloat16:
      return "bfloat";
    default:
      TORCH_CHECK_TYPE(false, "mlxq: no Metal kernel for dtype ", t);
  }
  return {};
}

namespace {

// The matmul plan without a kernel: params (no batch strides yet), output shape, and an empty
// grid when there is nothing to compute. Shared by the affine and floating-point families.
DispatchPlan matmul_plan_base(const MatmulGeometry& g, at::ScalarType dtype) {
  DispatchPlan plan;
  plan.dtype = dtype_name(dtype);
  AffineMatmulParams p{};
  p.M = to_i32(g.M, "M (rows of x)");
  p.N = to_i32(g.w.rows, "N (rows of wq)");
  p.K = to_i32(g.w.cols, "K (columns of the weight)");
  p.groups = to_i32(g.w.groups, "groups");
  p.in_features = to_i32(g.in_features, "in_features");
  p.out_features = to_i32(g.out_features, "out_features");
  to_i32(g.M * std::max(g.in_features, g.out_features), "rows x features of one batch entry");
  // Batch entries; their shape and strides are filled in by set_batch_strides.
  p.batch = to_i32(g.batch_size, "batch size");
  plan.out_shapes.push_back(g.out_shape);
  plan.params = to_bytes(p);
  return plan;
}

// The tiled qmm kernel `name` (prefill shapes), over (out_features, M, batch).
void use_qmm(DispatchPlan& plan, const MatmulGeometry& g, const std::string& name) {
  plan.kernel = name;
  plan.grid = {ceil_div(g.out_features, MLXQ_QMM_BN), ceil_div(g.M, MLXQ_QMM_BM),
               static_cast<uint32_t>(g.batch_size)};
  plan.threads = {MLXQ_QMM_THREADS, 1, 1};
  plan.threadgroup_memory.emplace_back(0, int64_t{MLXQ_QMM_TG_FLOATS} * 4);
}

// The decode kernel `name` (qmv layout: MLXQ_QMV_ROWS rows per simdgroup), over (N, 1, batch).
void use_qmv(DispatchPlan& plan, const MatmulGeometry& g, const std::string& name) {
  plan.kernel = name;
  const int64_t rows_per_tg = MLXQ_QMV_SIMDGROUPS * MLXQ_QMV_ROWS;
  plan.grid = {ceil_div(g.w.rows, rows_per_tg), 1, static_cast<uint32_t>(g.batch_size)};
  plan.threads = {32 * MLXQ_QMV_SIMDGROUPS, 1, 1};
}

void skip_if_empty(DispatchPlan& plan, const MatmulGeometry& g) {
  if (g.M == 0 || g.out_features == 0 || g.in_features == 0 || g.batch_size == 0) {
    plan.grid = {0, 0, 0};
  }
}

// Batch strides of x and w against the broadcast batch shape (merging dimensions that are one
// contiguous run for both), written into the plan's params.
void set_batch_strides(DispatchPlan& plan, const at::Tensor& x, const MatmulGeometry& g) {
  if (g.batch.empty()) return;
  std::vector<int64_t> xdims(x.sizes().begin(), x.sizes().end() - 2);
  std::vector<int64_t> shape = g.batch;
  std::vector<int64_t> xs = broadcast_strides(shape, xdims);
  std::vector<int64_t> ws = broadcast_strides(shape, g.w.batch);
  std::vector<int64_t> s2, x2, w2;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    if (!s2.empty() && x2.back() == xs[d] * shape[d] && w2.back() == ws[d] * shape[d]) {
      s2.back() *= shape[d];  // dims d-1 and d are one contiguous run for x and w alike
      x2.back() = xs[d];
      w2.back() = ws[d];
      continue;
    }
    s2.push_back(shape[d]);
    x2.push_back(xs[d]);
    w2.push_back(ws[d]);
  }
  TORCH_CHECK_VALUE(s2.size() <= MLXQ_MAX_BATCH_DIMS, "mlxq: the Metal kernels support at most ",
                    MLXQ_MAX_BATCH_DIMS, " non-mergeable batch dimensions, got batch shape ",
                    at::IntArrayRef(g.batch));
  AffineMatmulParams p;
  std::memcpy(&p, plan.params.data(), sizeof(p));
  p.batch_ndim = static_cast<int>(s2.size());
  for (size_t d = 0; d < s2.size(); ++d) {
    p.batch_shape[d] = to_i32(s2[d], "batch dimension");
    p.x_batch_strides[d] = to_i32(x2[d], "x batch stride");
    p.w_batch_strides[d] = to_i32(w2[d], "wq batch stride");
  }
  plan.params = to_bytes(p);
}

}  // namespace

DispatchPlan plan_affine_matmul(const MatmulGeometry& g, at::ScalarType dtype, int64_t group_size,
                                int64_t bits, bool transpose) {
  check_bits_group(bits, group_size);
  DispatchPlan plan = matmul_plan_base(g, dtype);
  const bool small_m = g.M <= MLXQ_QMV_MAX_M;
  if (transpose && small_m) {
    use_qmv(plan, g, host_name("affine_qmv", plan.dtype, group_size, bits));
  } else if (!transpose && small_m) {
    plan.kernel = host_name("affine_qvm", plan.dtype, group_size, bits);
    plan.grid = {ceil_div(g.w.cols, MLXQ_QVM_COLS), 1, static_cast<uint32_t>(g.batch_size)};
    plan.threads = {32 * MLXQ_QVM_SIMDGROUPS, 1, 1};
    plan.threadgroup_memory.emplace_back(0, qvm_threadgroup_bytes(group_size));
  } else {
    use_qmm(plan, g,
            host_name(transpose ? "affine_qmm_t" : "affine_qmm_n", plan.dtype, group_size, bits));
  }
  skip_if_empty(plan, g);
  plan.bindings = {{0, "x"}, {1, "wq"}, {2, "scales"}, {3, "biases"}, {4, "out"}, {5, "params"}};
  return plan;
}

DispatchPlan plan_affine_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                                const at::Tensor& biases, int64_t group_size, int64_t bits,
                                bool transpose) {
  const MatmulGeometry g = check_matmul(x, wq, scales, biases, group_size, bits, transpose);
  DispatchPlan plan = plan_affine_matmul(g, x.scalar_type(), group_size, bits, transpose);
  set_batch_strides(plan, x, g);
  return plan;
}

DispatchPlan plan_affine_quantize(const at::Tensor& w, int64_t group_size, int64_t bits) {
  check_quantize_input(w, group_size, bits);
  DispatchPlan plan;
  plan.dtype = dtype_name(w.scalar_type());
  plan.kernel = host_name("affine_quantize", plan.dtype, group_size, bits);
  const int64_t K = w.size(-1);
  const int64_t rows = c10::multiply_integers(w.sizes().slice(0, w.dim() - 1));  // no division
  AffineQuantParams p{};
  p.rows = to_i32(rows, "rows of w");
  p.K = to_i32(K, "K (last dimension of w)");
  p.groups = to_i32(K / group_size, "groups");
  to_i32(rows * (K / group_size), "number of groups");
  plan.grid = {ceil_div(rows * (K / group_size), MLXQ_QUANT_THREADS), 1, 1};
  plan.threads = {MLXQ_QUANT_THREADS, 1, 1};
  plan.bindings = {{0, "w"}, {1, "wq"}, {2, "scales"}, {3, "biases"}, {4, "params"}};
  plan.params = to_bytes(p);
  std::vector<int64_t> lead(w.sizes().begin(), w.sizes().end() - 1);
  std::vector<int64_t> qshape = lead, sshape = lead;
  qshape.push_back(packed_cols(K, bits));
  sshape.push_back(K / group_size);
  plan.out_shapes = {qshape, sshape, sshape};
  if (rows == 0) plan.grid = {0, 0, 0};
  return plan;
}

DispatchPlan plan_affine_dequantize(const at::Tensor& wq, const at::Tensor& scales,
                                    const at::Tensor& biases, int64_t group_size, int64_t bits) {
  const PackedGeometry g = check_dequantize(wq, scales, biases, group_size, bits);
  DispatchPlan plan;
  plan.dtype = dtype_name(scales.scalar_type());
  plan.kernel = host_name("affine_dequantize", plan.dtype, group_size, bits);
  const int64_t rows = c10::multiply_integers(scales.sizes().slice(0, scales.dim() - 1));
  AffineQuantParams p{};
  p.rows = to_i32(rows, "rows of wq");
  p.K = to_i32(g.cols, "K (logical columns)");
  p.groups = to_i32(g.groups, "groups");
  to_i32(rows * g.groups, "number of groups");
  plan.grid = {ceil_div(rows * g.groups, MLXQ_QUANT_THREADS), 1, 1};
  plan.threads = {MLXQ_QUANT_THREADS, 1, 1};
  plan.bindings = {{0, "wq"}, {1, "scales"}, {2, "biases"}, {3, "out"}, {4, "params"}};
  plan.params = to_bytes(p);
  std::vector<int64_t> shape(wq.sizes().begin(), wq.sizes().end() - 1);
  shape.push_back(g.cols);
  plan.out_shapes = {shape};
  if (rows == 0) plan.grid = {0, 0, 0};
  return plan;
}

}  // namespace mlxq::metal

// --- affine_gather_matmul ---------------------------------------------------------------------

namespace mlxq::metal {

namespace {
constexpr int64_t kSortedMinRun = 4;  // average rows per expert for the sorted gather qmm

// One pair of a gather ([M, in] against one [rows, K] matrix) as a dense matmul geometry.
MatmulGeometry pair_geometry(const GatherGeometry& g) {
  MatmulGeometry one;
  one.w = g.w;
  one.w.batch.clear();
  one.M = g.M;
  one.in_features = g.in_features;
  one.out_features = g.out_features;
  one.out_shape = g.out_shape;
  return one;
}

// Turns the dense plan of one pair (kernel `family` + "_<kind>_<suffix>") into the gather plan:
// the kernel's gather variant over grid z = pairs, or with `sorted` (use_sorted_gather already
// checked) the sorted gather qmm over all rows; params.batch = pairs, the indices at 6 and 7.
void make_gather_plan(DispatchPlan& plan, const GatherGeometry& g, const std::string& family,
                      const std::string& sorted_kernel, bool sorted) {
  plan.kernel = family + "_gather_" + plan.kernel.substr(family.size() + 1);
  const int64_t pairs = c10::multiply_integers(g.index_shape);
  // the indices are uint32 and the offsets they give are computed in 64 bits in the kernels
  to_i32(g.x_batch, "matrices in x");
  to_i32(g.w_batch, "matrices in wq");
  AffineMatmulParams p;
  std::memcpy(&p, plan.params.data(), sizeof(p));
  p.batch = to_i32(pairs, "number of pairs");
  p.batch_ndim = 0;
  plan.params = to_bytes(p);
  const bool empty = plan.empty() || pairs == 0;
  if (sorted) {
    // One [pairs * M, in_features] matrix of rows, tiled as qmm (see affine_gather_rhs.h).
    const int64_t rows = to_i32(pairs * g.M, "rows of all pairs (pairs x M)");
    plan.kernel = sorted_kernel;
    plan.grid = {ceil_div(g.out_features, MLXQ_QMM_BN), ceil_div(rows, MLXQ_QMM_BM), 1};
    plan.threads = {MLXQ_QMM_THREADS, 1, 1};
    plan.threadgroup_memory = {{0, int64_t{MLXQ_QMM_TG_FLOATS} * 4},
                               {1, int64_t{2 * MLXQ_QMM_BM} * 4}};
  } else {
    plan.grid[2] = static_cast<uint32_t>(pairs);
  }
  if (empty) plan.grid = {0, 0, 0};
  plan.bindings.push_back({6, "lhs_indices"});
  plan.bindings.push_back({7, "rhs_indices"});
}
}  // namespace

bool use_sorted_gather(const GatherGeometry& g) {
  const int64_t rows = c10::multiply_integers(g.index_shape) * g.M;
  return g.M < MLXQ_QMM_BM && rows >= MLXQ_QMM_BM && rows >= kSortedMinRun * g.w_batch;
}

DispatchPlan plan_affine_gather_matmul(const GatherGeometry& g, at::ScalarType dtype,
                                       int64_t group_size, int64_t bits, bool transpose,
                                       bool sorted_indices) {
  DispatchPlan plan = plan_affine_matmul(pair_geometry(g), dtype, group_size, bits, transpose);
  const std::string sorted_kernel =
      host_name(transpose ? "affine_gather_qmm_rhs_t" : "affine_gather_qmm_rhs_n", plan.dtype,
                group_size, bits);
  make_gather_plan(plan, g, "affine", sorted_kernel, sorted_indices && use_sorted_gather(g));
  return plan;
}

DispatchPlan plan_affine_gather_matmul(const at::Tensor& x, const at::Tensor& wq,
                                       const at::Tensor& scales, const at::Tensor& biases,
                                       const std::optional<at::Tensor>& lhs_indices,
                                       const std::optional<at::Tensor>& rhs_indices,
                                       int64_t group_size, int64_t bits, bool transpose,
                                       bool sorted_indices) {
  const GatherGeometry g = check_gather_matmul(x, wq, scales, biases, lhs_indices, rhs_indices,
                                               group_size, bits, transpose);
  return plan_affine_gather_matmul(g, x.scalar_type(), group_size, bits, transpose, sorted_indices);
}

}  // namespace mlxq::metal

// --- fp_matmul: MLX's floating-point modes ----------------------------------------------------

namespace mlxq::metal {

namespace {
const char* fp_mode_name(int mode) {
  static const char* const kModeNames[] = {"mxfp4", "nvfp4", "mxfp8"};
  TORCH_INTERNAL_ASSERT(mode >= 0 && mode < 3, "mlxq: fp mode index ", mode);
  return kModeNames[mode];
}
}  // namespace

DispatchPlan plan_fp_matmul(const MatmulGeometry& g, at::ScalarType dtype, int mode,
                            bool transpose) {
  DispatchPlan plan = matmul_plan_base(g, dtype);
  const std::string suffix = "_" + plan.dtype + "_" + fp_mode_name(mode);
  if (transpose && g.M <= MLXQ_QMV_MAX_M) {
    use_qmv(plan, g, "fp_qmv" + suffix);
  } else {
    // No qvm variant: transpose=False runs the tiled kernel at every M (correct, not tuned).
    use_qmm(plan, g, (transpose ? "fp_qmm_t" : "fp_qmm_n") + suffix);
  }
  skip_if_empty(plan, g);
  plan.bindings = {{0, "x"},   {1, "wq"},    {2, "scales"}, {3, "global_scale"},
                   {4, "out"}, {5, "params"}};
  return plan;
}

DispatchPlan plan_fp_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                            const std::optional<at::Tensor>& global_scale, c10::string_view mode,
                            int64_t group_size, int64_t bits, bool transpose) {
  const int m = check_fp_mode(mode, group_size, bits);
  check_fp_global_scale(global_scale, m, wq.device());
  MatmulGeometry g = check_fp_matmul(x, wq, scales, group_size, bits, transpose);
  // check_fp_matmul leaves batch_size at 1 (the CPU kernels walk g.batch themselves).
  g.batch_size = 1;
  for (const int64_t d : g.batch) g.batch_size = to_i32(g.batch_size * d, "batch size");
  DispatchPlan plan = plan_fp_matmul(g, x.scalar_type(), m, transpose);
  set_batch_strides(plan, x, g);
  return plan;
}

DispatchPlan plan_fp_gather_matmul(const GatherGeometry& g, at::ScalarType dtype, int mode,
                                   bool transpose, bool sorted_indices) {
  DispatchPlan plan = plan_fp_matmul(pair_geometry(g), dtype, mode, transpose);
  const std::string sorted_kernel =
      std::string(transpose ? "fp_gather_qmm_rhs_t_" : "fp_gather_qmm_rhs_n_") + plan.dtype + "_" +
      fp_mode_name(mode);
  make_gather_plan(plan, g, "fp", sorted_kernel, sorted_indices && use_sorted_gather(g));
  return plan;
}

DispatchPlan plan_fp_gather_matmul(const at::Tensor& x, const at::Tensor& wq,
                                   const at::Tensor& scales, c10::string_view mode,
                                   int64_t group_size, int64_t bits,
                                   const std::optional<at::Tensor>& lhs_indices,
                                   const std::optional<at::Tensor>& rhs_indices, bool transpose,
                                   const std::optional<at::Tensor>& global_scale,
                                   bool sorted_indices) {
  const int m = check_fp_mode(mode, group_size, bits);
  const GatherGeometry g = check_fp_gather_matmul(x, wq, scales, m, group_size, bits, lhs_indices,
                                                  rhs_indices, transpose, global_scale);
  return plan_fp_gather_matmul(g, x.scalar_type(), m, transpose, sorted_indices);
}

at::ScalarType fp_dequantize_dtype(const std::optional<at::Tensor>& global_scale,
                                   std::optional<at::ScalarType> dtype) {
  const at::ScalarType requested = dtype.value_or(at::kBFloat16);
  return global_scale.has_value() ? at::kFloat : requested;
}

DispatchPlan plan_fp_dequantize(const at::Tensor& wq, const at::Tensor& scales,
                                c10::string_view mode, int64_t group_size, int64_t bits,
                                const std::optional<at::Tensor>& global_scale,
                                std::optional<at::ScalarType> dtype) {
  const int m = check_fp_mode(mode, group_size, bits);
  const PackedGeometry g = check_fp_packed(wq, scales, group_size, bits, /*min_dim=*/1);
  check_fp_global_scale(global_scale, m, wq.device());
  const at::ScalarType requested = check_fp_dequantize_dtype(dtype);
  DispatchPlan plan;
  plan.dtype = dtype_name(requested);
  plan.kernel = "fp_dequantize_" + plan.dtype + "_" + fp_mode_name(m);
  if (global_scale.has_value() && requested != at::kFloat) plan.kernel += "_to_float";
  const int64_t rows = wq.numel() / wq.size(-1);
  AffineQuantParams p{};
  p.rows = to_i32(rows, "rows of wq");
  p.K = to_i32(g.cols, "K (logical columns)");
  p.groups = to_i32(g.groups, "groups");
  to_i32(rows * g.groups, "number of groups");
  plan.grid = {ceil_div(rows * g.groups, MLXQ_QUANT_THREADS), 1, 1};
  plan.threads = {MLXQ_QUANT_THREADS, 1, 1};
  plan.bindings = {{0, "wq"}, {1, "scales"}, {2, "global_scale"}, {3, "out"}, {4, "params"}};
  plan.params = to_bytes(p);
  std::vector<int64_t> shape(wq.sizes().begin(), wq.sizes().end());
  shape.back() = g.cols;
  plan.out_shapes = {shape};
  if (rows == 0) plan.grid = {0, 0, 0};
  return plan;
}

DispatchPlan plan_fp_quantize(const at::Tensor& w, c10::string_view mode, int64_t group_size,
                              int64_t bits, const std::optional<at::Tensor>& global_scale) {
  const int m = check_fp_mode(mode, group_size, bits);
  check_fp_quantize_input(w, group_size);
  check_fp_global_scale(global_scale, m, w.device());
  DispatchPlan plan;
  plan.dtype = dtype_name(w.scalar_type());
  plan.kernel = "fp_quantize_" + plan.dtype + "_" + fp_mode_name(m);
  const int64_t K = w.size(-1);
  const int64_t rows = c10::multiply_integers(w.sizes().slice(0, w.dim() - 1));  // no division
  AffineQuantParams p{};
  p.rows = to_i32(rows, "rows of w");
  p.K = to_i32(K, "K (last dimension of w)");
  p.groups = to_i32(K / group_size, "groups");
  to_i32(rows * (K / group_size), "number of groups");
  plan.grid = {ceil_div(rows * (K / group_size), MLXQ_QUANT_THREADS), 1, 1};
  plan.threads = {MLXQ_QUANT_THREADS, 1, 1};
  plan.bindings = {{0, "w"}, {1, "wq"}, {2, "scales"}, {3, "global_scale"}, {4, "params"}};
  plan.params = to_bytes(p);
  std::vector<int64_t> qshape(w.sizes().begin(), w.sizes().end() - 1);
  std::vector<int64_t> sshape = qshape;
  qshape.push_back(packed_cols(K, bits));
  sshape.push_back(K / group_size);
  plan.out_shapes = {qshape, sshape};
  if (rows == 0) plan.grid = {0, 0, 0};
  return plan;
}

}  // namespace mlxq::metal
