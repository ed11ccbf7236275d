#include "checks.h"

#include <c10/util/Exception.h>

#include <sstream>

namespace mlxq {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

}  // namespace

void check_bits_group(int64_t bits, int64_t group_size) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8,
                    "mlxq: bits must be one of 2, 3, 4, 5, 6, 8, got ", bits);
  TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128,
                    "mlxq: group_size must be one of 32, 64, 128, got ", group_size);
}

PackedGeometry check_packed(const at::Tensor& wq, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits,
                            int64_t min_dim) {
  check_bits_group(bits, group_size);
  TORCH_CHECK_TYPE(wq.scalar_type() == at::kUInt32 || wq.scalar_type() == at::kInt,
                   "mlxq: wq (packed weight) must be uint32 or int32, got ", wq.scalar_type());
  TORCH_CHECK_VALUE(wq.dim() >= min_dim, "mlxq: wq (packed weight) must have at least ", min_dim,
                    " dimensions, got shape ", shape_str(wq.sizes()));
  TORCH_CHECK_TYPE(is_float(scales.scalar_type()),
                   "mlxq: scales must be float32, float16 or bfloat16, got ", scales.scalar_type());
  TORCH_CHECK_TYPE(biases.scalar_type() == scales.scalar_type(), "mlxq: biases dtype ",
                   biases.scalar_type(), " must match scales dtype ", scales.scalar_type());
  TORCH_CHECK_VALUE(scales.device() == wq.device() && biases.device() == wq.device(),
                    "mlxq: wq, scales and biases must be on one device, got ", wq.device(), ", ",
                    scales.device(), ", ", biases.device());
  TORCH_CHECK_VALUE(scales.sizes() == biases.sizes(), "mlxq: scales shape ",
                    shape_str(scales.sizes()), " must equal biases shape ",
                    shape_str(biases.sizes()));
  const int64_t d = wq.dim();
  TORCH_CHECK_VALUE(
      scales.dim() == d && scales.sizes().slice(0, d - 1) == wq.sizes().slice(0, d - 1),
      "mlxq: scales shape ", shape_str(scales.sizes()), " must match wq shape ",
      shape_str(wq.sizes()), " in every dimension but the last");
  PackedGeometry g;
  g.batch.assign(wq.sizes().begin(), wq.sizes().end() - (d >= 2 ? 2 : 1));
  g.rows = d >= 2 ? wq.size(-2) : 1;
  g.groups = scales.size(-1);
  g.cols = g.groups * group_size;
  TORCH_CHECK_VALUE(g.groups > 0, "mlxq: scales must have at least one group, got shape ",
                    shape_str(scales.sizes()));
  TORCH_CHECK_VALUE(wq.size(-1) == packed_cols(g.cols, bits), "mlxq: wq last dimension ",
                    wq.size(-1), " does not fit scales with ", g.groups, " groups of ", group_size,
                    " values at ", bits, " bits (expected ", packed_cols(g.cols, bits),
                    " uint32 words, K=", g.cols, ")");
  return g;
}

void check_quantize_input(const at::Tensor& w, int64_t group_size, int64_t bits) {
  check_bits_group(bits, group_size);
  TORCH_CHECK_TYPE(is_float(w.scalar_type()), "mlxq: w must be float32, float16 or bfloat16, got ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() >= 1 && w.size(-1) > 0,
                    "mlxq: w must have a non-empty last dimension, got shape ",
                    shape_str(w.sizes()));
  TORCH_CHECK_VALUE(w.size(-1) % group_size == 0, "mlxq: w last dimension ", w.size(-1),
                    " must be divisible by group_size ", group_size);
}

MatmulGeometry check_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits,
                            bool transpose) {
  MatmulGeometry g;
  g.w = check_packed(wq, scales, biases, group_size, bits, /*min_dim=*/2);
  TORCH_CHECK_TYPE(is_float(x.scalar_type()), "mlxq: x must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == wq.device(), "mlxq: x is on ", x.device(), " but wq is on ",
                    wq.device());
  TORCH_CHECK_VALUE(x.dim() >= 1, "mlxq: x must have at least 1 dimension, got a scalar");
  g.in_features = transpose ? g.w.cols : g.w.rows;
  g.out_features = transpose ? g.w.rows : g.w.cols;
  TORCH_CHECK_VALUE(x.size(-1) == g.in_features, "mlxq: x last dimension ", x.size(-1),
                    " must equal ", g.in_features, " (", transpose ? "K" : "N",
                    " of the quantized weight with shape [", g.w.rows, ", ", g.w.cols,
                    "], transpose=", transpose ? "True" : "False", ")");
  if (g.w.batch.empty()) {
    g.M = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));  // also when K or N is 0
    g.out_shape.assign(x.sizes().begin(), x.sizes().end() - 1);
  } else {
    TORCH_CHECK_VALUE(x.dim() >= 2, "mlxq: with a batched wq of shape ", shape_str(wq.sizes()),
                      ", x needs at least 2 dimensions, got shape ", shape_str(x.sizes()));
    auto xb = x.sizes().slice(0, x.dim() - 2);
    try {
      g.batch = at::infer_size(xb, g.w.batch);
    } catch (const c10::Error&) {
      TORCH_CHECK_VALUE(false, "mlxq: batch dimensions of x ", shape_str(x.sizes()), " and wq ",
                        shape_str(wq.sizes()), " do not broadcast");
    }
    g.M = x.size(-2);
    g.out_shape = g.batch;
    g.out_shape.push_back(g.M);
  }
  g.out_shape.push_back(g.out_features);
  return g;
}

}  // namespace mlxq

// --- affine_gather_matmul -----------------------------------------------------------------------

namespace mlxq {
namespace {

void check_index_tensor(const std::optional<at::Tensor>& t, const char* name,
                        const at::Device& device) {
  if (!t.has_value()) return;
  const at::ScalarType s = t->scalar_type();
  TORCH_CHECK_TYPE(at::isIntegralType(s, /*includeBool=*/false), "mlxq: ", name,
                   " must be an integer tensor, got ", s);
  TORCH_CHECK_VALUE(t->device() == device, "mlxq: ", name, " is on ", t->device(), " but wq is on ",
                    device);
}

std::vector<int64_t> index_shape_or_batch(const std::optional<at::Tensor>& t,
                                          at::IntArrayRef batch) {
  if (t.has_value()) return std::vector<int64_t>(t->sizes().begin(), t->sizes().end());
  return std::vector<int64_t>(batch.begin(), batch.end());
}

}  // namespace

GatherGeometry check_gather_matmul(const at::Tensor& x, const at::Tensor& wq,
                                   const at::Tensor& scales, const at::Tensor& biases,
                                   const std::optional<at::Tensor>& lhs_indices,
                                   const std::optional<at::Tensor>& rhs_indices, int64_t group_size,
                                   int64_t bits, bool transpose) {
  GatherGeometry g;
  g.w = check_packed(wq, scales, biases, group_size, bits, /*min_dim=*/2);
  TORCH_CHECK_TYPE(is_float(x.scalar_type()), "mlxq: x must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == wq.device(), "mlxq: x is on ", x.device(), " but wq is on ",
                    wq.device());
  TORCH_CHECK_VALUE(x.dim() >= 2, "mlxq: x must have at least 2 dimensions [..., M, K], got shape ",
                    shape_str(x.sizes()));
  check_index_tensor(lhs_indices, "lhs_indices", wq.device());
  check_index_tensor(rhs_indices, "rhs_indices", wq.device());
  g.in_features = transpose ? g.w.cols : g.w.rows;
  g.out_features = transpose ? g.w.rows : g.w.cols;
  TORCH_CHECK_VALUE(x.size(-1) == g.in_features, "mlxq: x last dimension ", x.size(-1),
                    " must equal ", g.in_features, " (", transpose ? "K" : "N",
                    " of the quantized weights with shape [", g.w.rows, ", ", g.w.cols,
                    "], transpose=", transpose ? "True" : "False", ")");
  const auto x_batch = x.sizes().slice(0, x.dim() - 2);
  g.x_batch = c10::multiply_integers(x_batch);
  g.w_batch = c10::multiply_integers(g.w.batch);
  g.M = x.size(-2);
  const auto lhs_shape = index_shape_or_batch(lhs_indices, x_batch);
  const auto rhs_shape = index_shape_or_batch(rhs_indices, g.w.batch);
  try {
    g.index_shape = at::infer_size(lhs_shape, rhs_shape);
  } catch (const c10::Error&) {
    TORCH_CHECK_VALUE(false, "mlxq: lhs_indices shape ", shape_str(lhs_shape),
                      " and rhs_indices shape ", shape_str(rhs_shape),
                      " do not broadcast (an absent index is the batch shape of x, resp. wq)");
  }
  g.out_shape = g.index_shape;
  g.out_shape.push_back(g.M);
  g.out_shape.push_back(g.out_features);
  return g;
}

at::Tensor gather_flat_indices(const std::optional<at::Tensor>& indices,
                               const std::vector<int64_t>& batch_shape, const GatherGeometry& g,
                               int64_t limit, const char* name, const at::Device& device) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor idx = indices.has_value()
                       ? indices->to(at::kLong)
                       : at::arange(c10::multiply_integers(batch_shape), opts).reshape(batch_shape);
  idx = idx.expand(g.index_shape).reshape({-1}).contiguous();
  if (idx.numel() > 0) {
    const auto [lo, hi] = at::aminmax(idx);
    const int64_t min = lo.item<int64_t>(), max = hi.item<int64_t>();
    TORCH_CHECK_INDEX(min >= 0 && max < limit, "mlxq: ", name, " values must lie in [0, ", limit,
                      ") (the number of matrices in ", name[0] == 'l' ? "x" : "wq",
                      "), got values from ", min, " to ", max);
  }
  return idx;
}

}  // namespace mlxq
