#include "checks.h"

#include <c10/core/SymBool.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <utility>

namespace mlxq {
namespace {

using c10::SymInt;
using c10::SymIntArrayRef;

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// The geometries of checks.h with sizes that may be symbolic.
struct SymPacked {
  std::vector<SymInt> batch;
  SymInt rows, cols, groups;
};

struct SymMatmul {
  SymPacked w;
  std::vector<SymInt> out_shape, batch;
  SymInt batch_size = 1, M, in_features, out_features;
};

std::string shape_str(SymIntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

std::string shape_str(at::IntArrayRef s) { return shape_str(c10::fromIntArrayRefSlow(s)); }

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// Whether a condition on sizes holds. Concrete conditions are evaluated; a symbolic one that
// cannot be decided while tracing is assumed, and the traced graph asserts it at run time.
bool holds(const c10::SymBool& cond) { return cond.expect_true(__FILE__, __LINE__); }

bool same_sizes(SymIntArrayRef a, SymIntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!holds(a[i].sym_eq(b[i]))) return false;
  return true;
}

// *out = a * b. False when concrete sizes overflow int64; symbolic sizes multiply symbolically
// (the real kernel checks the concrete product at run time).
bool mul_fits(const SymInt& a, const SymInt& b, SymInt* out) {
  const auto ia = a.maybe_as_int(), ib = b.maybe_as_int();
  if (ia && ib) {
    int64_t r = 0;
    if (__builtin_mul_overflow(*ia, *ib, &r)) return false;
    *out = SymInt(r);
    return true;
  }
  *out = a * b;
  return true;
}

// *out = product of dims; false when a partial product overflows int64 (as torch refuses such
// a tensor even when a later dimension is 0).
bool product_fits(SymIntArrayRef dims, SymInt* out) {
  SymInt p = 1;
  for (const SymInt& d : dims)
    if (!mul_fits(p, d, &p)) return false;
  *out = std::move(p);
  return true;
}

void check_one_device(std::initializer_list<std::pair<const char*, const at::Tensor*>> operands) {
  const at::Device first = operands.begin()->second->device();
  bool same = true;
  for (const auto& [name, t] : operands) same = same && t->device() == first;
  if (same) return;
  std::ostringstream listed;
  const char* sep = "";
  for (const auto& [name, t] : operands) {
    listed << sep << name << " on " << t->device();
    sep = ", ";
  }
  TORCH_CHECK_VALUE(false, "mlxq: all operands must be on one device, got ", listed.str());
}

// `x` (matmul only) joins the one-device check.
SymPacked check_packed_sym(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                           int64_t group_size, int64_t bits, int64_t min_dim,
                           const at::Tensor* x = nullptr) {
  check_bits_group(bits, group_size);
  TORCH_CHECK_TYPE(wq.scalar_type() == at::kUInt32 || wq.scalar_type() == at::kInt,
                   "mlxq: wq (packed weight) must be uint32 or int32, got ", wq.scalar_type());
  const SymIntArrayRef ws = wq.sym_sizes(), ss = scales.sym_sizes(), bs = biases.sym_sizes();
  TORCH_CHECK_VALUE(wq.dim() >= min_dim, "mlxq: wq (packed weight) must have at least ", min_dim,
                    " dimensions, got shape ", shape_str(ws));
  TORCH_CHECK_TYPE(is_float(scales.scalar_type()),
                   "mlxq: scales must be float32, float16 or bfloat16, got ", scales.scalar_type());
  TORCH_CHECK_TYPE(biases.scalar_type() == scales.scalar_type(), "mlxq: biases dtype ",
                   biases.scalar_type(), " must match scales dtype ", scales.scalar_type());
  if (x != nullptr) {
    check_one_device({{"x", x}, {"wq", &wq}, {"scales", &scales}, {"biases", &biases}});
  } else {
    check_one_device({{"wq", &wq}, {"scales", &scales}, {"biases", &biases}});
  }
  TORCH_CHECK_VALUE(same_sizes(ss, bs), "mlxq: scales shape ", shape_str(ss),
                    " must equal biases shape ", shape_str(bs));
  const size_t d = ws.size();
  TORCH_CHECK_VALUE(ss.size() == d && same_sizes(ss.slice(0, d - 1), ws.slice(0, d - 1)),
                    "mlxq: scales shape ", shape_str(ss), " must match wq shape ", shape_str(ws),
                    " in every dimension but the last");
  SymPacked g;
  g.batch.assign(ws.begin(), ws.end() - (d >= 2 ? 2 : 1));
  g.rows = d >= 2 ? ws[d - 2] : SymInt(1);
  g.groups = ss[d - 1];
  TORCH_CHECK_VALUE(holds(g.groups.sym_gt(0)),
                    "mlxq: scales must have at least one group, got shape ", shape_str(ss));
  TORCH_CHECK_VALUE(mul_fits(g.groups, group_size, &g.cols), "mlxq: scales shape ", shape_str(ss),
                    " has ", g.groups, " groups of group_size ", group_size, ": K = ", g.groups,
                    " * ", group_size, " exceeds the int64 range (at most ", kInt64Max, ")");
  const SymInt words = g.cols / 32 * bits;  // packed_cols; cols is a multiple of 32
  TORCH_CHECK_VALUE(holds(ws[d - 1].sym_eq(words)), "mlxq: wq last dimension ", ws[d - 1],
                    " does not fit scales with ", g.groups, " groups of ", group_size,
                    " values at ", bits, " bits (expected ", words, " uint32 words, K=", g.cols,
                    ")");
  return g;
}

SymMatmul check_matmul_sym(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                           const at::Tensor& biases, int64_t group_size, int64_t bits,
                           bool transpose) {
  SymMatmul g;
  g.w = check_packed_sym(wq, scales, biases, group_size, bits, /*min_dim=*/2, &x);
  TORCH_CHECK_TYPE(is_float(x.scalar_type()), "mlxq: x must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "mlxq: x must have at least 1 dimension, got a scalar");
  const SymIntArrayRef xs = x.sym_sizes(), ws = wq.sym_sizes();
  const size_t xd = xs.size();
  g.in_features = transpose ? g.w.cols : g.w.rows;
  g.out_features = transpose ? g.w.rows : g.w.cols;
  TORCH_CHECK_VALUE(holds(xs[xd - 1].sym_eq(g.in_features)), "mlxq: x last dimension ", xs[xd - 1],
                    " must equal ", g.in_features, " (", transpose ? "K" : "N",
                    " of the quantized weight with shape [", g.w.rows, ", ", g.w.cols,
                    "], transpose=", transpose ? "True" : "False", ")");
  if (g.w.batch.empty()) {
    // All leading dims of x are rows (also when K or N is 0); x exists, so this fits.
    TORCH_CHECK_VALUE(product_fits(xs.slice(0, xd - 1), &g.M), "mlxq: x shape ", shape_str(xs),
                      " has more rows than int64 can count");
    g.out_shape.assign(xs.begin(), xs.end() - 1);
  } else {
    TORCH_CHECK_VALUE(xd >= 2, "mlxq: with a batched wq of shape ", shape_str(ws),
                      ", x needs at least 2 dimensions, got shape ", shape_str(xs));
    try {
      g.batch = at::infer_size_symint(xs.slice(0, xd - 2), g.w.batch);
    } catch (const c10::Error&) {
      TORCH_CHECK_VALUE(false, "mlxq: batch dimensions of x ", shape_str(xs), " and wq ",
                        shape_str(ws), " do not broadcast");
    }
    TORCH_CHECK_VALUE(product_fits(g.batch, &g.batch_size), "mlxq: batch dimensions of x ",
                      shape_str(xs), " and wq ", shape_str(ws), " broadcast to ",
                      shape_str(g.batch), ", more batch entries than int64 can count");
    g.M = xs[xd - 2];
    g.out_shape = g.batch;
    g.out_shape.push_back(g.M);
  }
  g.out_shape.push_back(g.out_features);
  SymInt numel;
  TORCH_CHECK_VALUE(product_fits(g.out_shape, &numel), "mlxq: the output of x ", shape_str(xs),
                    " times the quantized weight (wq ", shape_str(ws), ", K=", g.w.cols,
                    ") would have shape ", shape_str(g.out_shape),
                    ", more elements than int64 can count");
  return g;
}

// affine_dequantize's output: wq's shape with K columns.
std::vector<SymInt> dequantize_shape(const at::Tensor& wq, const SymPacked& g) {
  std::vector<SymInt> shape(wq.sym_sizes().begin(), wq.sym_sizes().end() - 1);
  shape.push_back(g.cols);
  return shape;
}

SymPacked check_dequantize_sym(const at::Tensor& wq, const at::Tensor& scales,
                               const at::Tensor& biases, int64_t group_size, int64_t bits) {
  SymPacked g = check_packed_sym(wq, scales, biases, group_size, bits, /*min_dim=*/1);
  const std::vector<SymInt> shape = dequantize_shape(wq, g);
  SymInt numel;
  TORCH_CHECK_VALUE(product_fits(shape, &numel), "mlxq: wq shape ", shape_str(wq.sym_sizes()),
                    " dequantizes to shape ", shape_str(shape),
                    ", more elements than int64 can count");
  return g;
}

// Sizes of a real (non-symbolic) tensor's checks as plain integers.
std::vector<int64_t> concrete(const std::vector<SymInt>& v) {
  std::vector<int64_t> out;
  out.reserve(v.size());
  for (const SymInt& s : v) out.push_back(s.expect_int());
  return out;
}

PackedGeometry concrete(const SymPacked& s) {
  return {concrete(s.batch), s.rows.expect_int(), s.cols.expect_int(), s.groups.expect_int()};
}

}  // namespace

void check_bits_group(int64_t bits, int64_t group_size) {
  TORCH_CHECK_VALUE(
      bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8,
      "mlxq: bits must be one of 1, 2, 3, 4, 5, 6, 8, got ", bits);
  TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128,
                    "mlxq: group_size must be one of 32, 64, 128, got ", group_size);
}

PackedGeometry check_dequantize(const at::Tensor& wq, const at::Tensor& scales,
                                const at::Tensor& biases, int64_t group_size, int64_t bits) {
  return concrete(check_dequantize_sym(wq, scales, biases, group_size, bits));
}

std::vector<c10::SymInt> dequantize_out_shape(const at::Tensor& wq, const at::Tensor& scales,
                                              const at::Tensor& biases, int64_t group_size,
                                              int64_t bits) {
  return dequantize_shape(wq, check_dequantize_sym(wq, scales, biases, group_size, bits));
}

std::vector<std::vector<c10::SymInt>> quantize_out_shapes(const at::Tensor& w, int64_t group_size,
                                                          int64_t bits) {
  check_bits_group(bits, group_size);
  TORCH_CHECK_TYPE(is_float(w.scalar_type()), "mlxq: w must be float32, float16 or bfloat16, got ",
                   w.scalar_type());
  const SymIntArrayRef ws = w.sym_sizes();
  TORCH_CHECK_VALUE(w.dim() >= 1 && holds(ws.back().sym_gt(0)),
                    "mlxq: w must have a non-empty last dimension, got shape ", shape_str(ws));
  const SymInt& K = ws.back();
  TORCH_CHECK_VALUE(holds((K % group_size).sym_eq(0)), "mlxq: w last dimension ", K,
                    " must be divisible by group_size ", group_size);
  std::vector<SymInt> qshape(ws.begin(), ws.end()), sshape(ws.begin(), ws.end());
  qshape.back() = K / 32 * bits;  // packed_cols (K is a multiple of 32); no wider than w
  sshape.back() = K / group_size;
  return {qshape, sshape, sshape};
}

void check_quantize_input(const at::Tensor& w, int64_t group_size, int64_t bits) {
  quantize_out_shapes(w, group_size, bits);
}

MatmulGeometry check_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits,
                            bool transpose) {
  const SymMatmul s = check_matmul_sym(x, wq, scales, biases, group_size, bits, transpose);
  MatmulGeometry g;
  g.w = concrete(s.w);
  g.out_shape = concrete(s.out_shape);
  g.batch = concrete(s.batch);
  g.batch_size = s.batch_size.expect_int();
  g.M = s.M.expect_int();
  g.in_features = s.in_features.expect_int();
  g.out_features = s.out_features.expect_int();
  return g;
}

std::vector<c10::SymInt> matmul_out_shape(const at::Tensor& x, const at::Tensor& wq,
                                          const at::Tensor& scales, const at::Tensor& biases,
                                          int64_t group_size, int64_t bits, bool transpose) {
  return check_matmul_sym(x, wq, scales, biases, group_size, bits, transpose).out_shape;
}

std::vector<std::vector<c10::SymInt>> matmul_many_out_shapes(const at::Tensor& x, at::TensorList wq,
                                                             at::TensorList scales,
                                                             at::TensorList biases,
                                                             int64_t group_size, int64_t bits) {
  TORCH_CHECK_VALUE(!wq.empty(), "mlxq: affine_matmul_many needs at least one weight");
  TORCH_CHECK_VALUE(scales.size() == wq.size() && biases.size() == wq.size(),
                    "mlxq: affine_matmul_many got ", wq.size(), " weights, ", scales.size(),
                    " scales and ", biases.size(), " biases (one of each per weight)");
  std::vector<std::vector<c10::SymInt>> shapes;
  for (size_t i = 0; i < wq.size(); ++i) {
    TORCH_CHECK_VALUE(wq[i].dim() == 2, "mlxq: affine_matmul_many: wq[", i,
                      "] must be 2-D (one projection), got shape ", wq[i].sym_sizes());
    shapes.push_back(
        check_matmul_sym(x, wq[i], scales[i], biases[i], group_size, bits, true).out_shape);
  }
  return shapes;
}

// --- MLX's floating-point modes ----------------------------------------------------------------

int check_fp_mode(c10::string_view mode, int64_t group_size, int64_t bits) {
  struct Mode {
    const char* name;
    int64_t group_size, bits;
  };
  static constexpr Mode kModes[] = {{"mxfp4", 32, 4}, {"nvfp4", 16, 4}, {"mxfp8", 32, 8}};
  for (int i = 0; i < 3; ++i) {
    const Mode& m = kModes[i];
    if (mode != m.name) continue;
    TORCH_CHECK_VALUE(group_size == m.group_size, "mlxq: group_size must be ", m.group_size,
                      " for mode '", m.name, "', got ", group_size);
    TORCH_CHECK_VALUE(bits == m.bits, "mlxq: bits must be ", m.bits, " for mode '", m.name,
                      "', got ", bits);
    return i;
  }
  TORCH_CHECK_VALUE(false, "mlxq: mode must be one of 'mxfp4', 'nvfp4', 'mxfp8' here, got '",
                    std::string(mode), "' (affine weights use the affine_* ops)");
  return -1;
}

void check_fp_global_scale(const c10::optional<at::Tensor>& global_scale, int mode,
                           const at::Device& device) {
  if (!global_scale.has_value()) return;
  const at::Tensor& g = *global_scale;
  TORCH_CHECK_VALUE(mode == 1, "mlxq: global_scale is only used by mode 'nvfp4', got mode '",
                    mode == 0 ? "mxfp4" : "mxfp8", "'");
  TORCH_CHECK_TYPE(g.scalar_type() == at::kFloat, "mlxq: global_scale must be float32, got ",
                   g.scalar_type());
  TORCH_CHECK_VALUE(g.numel() == 1, "mlxq: global_scale must hold one value, got shape ",
                    shape_str(g.sizes()));
  TORCH_CHECK_VALUE(g.device() == device, "mlxq: global_scale is on ", g.device(),
                    " but the weight is on ", device);
}

at::ScalarType check_fp_dequantize_dtype(const c10::optional<at::ScalarType>& dtype) {
  const at::ScalarType requested = dtype.value_or(at::kBFloat16);
  TORCH_CHECK_TYPE(requested == at::kFloat || requested == at::kHalf || requested == at::kBFloat16,
                   "mlxq: dtype must be float32, float16 or bfloat16, got ", requested);
  return requested;
}

PackedGeometry check_fp_packed(const at::Tensor& wq, const at::Tensor& scales, int64_t group_size,
                               int64_t bits, int64_t min_dim) {
  TORCH_CHECK_TYPE(wq.scalar_type() == at::kUInt32 || wq.scalar_type() == at::kInt,
                   "mlxq: wq (packed weight) must be uint32 or int32, got ", wq.scalar_type());
  TORCH_CHECK_VALUE(wq.dim() >= min_dim, "mlxq: wq (packed weight) must have at least ", min_dim,
                    " dimensions, got shape ", shape_str(wq.sizes()));
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kByte,
                   "mlxq: scales of a floating-point mode must be uint8, got ",
                   scales.scalar_type());
  TORCH_CHECK_VALUE(scales.device() == wq.device(),
                    "mlxq: wq and scales must be on one device, got ", wq.device(), ", ",
                    scales.device());
  const int64_t d = wq.dim();
  TORCH_CHECK_VALUE(
      scales.dim() == d && scales.sizes().slice(0, d - 1) == wq.sizes().slice(0, d - 1),
      "mlxq: scales shape ", shape_str(scales.sizes()), " must match wq shape ",
      shape_str(wq.sizes()), " in every dimension but the last");
  PackedGeometry g;
  g.batch.assign(wq.sizes().begin(), wq.sizes().end() - (d >= 2 ? 2 : 1));
  g.rows = d >= 2 ? wq.size(-2) : 1;
  g.groups = scales.size(-1);
  TORCH_CHECK_VALUE(g.groups > 0, "mlxq: scales must have at least one group, got shape ",
                    shape_str(scales.sizes()));
  TORCH_CHECK_VALUE(g.groups <= std::numeric_limits<int64_t>::max() / group_size,
                    "mlxq: scales last dimension ", g.groups, " is too large");
  g.cols = g.groups * group_size;
  TORCH_CHECK_VALUE(wq.size(-1) == packed_cols(g.cols, bits), "mlxq: wq last dimension ",
                    wq.size(-1), " does not fit scales with ", g.groups, " groups of ", group_size,
                    " values at ", bits, " bits (expected ", packed_cols(g.cols, bits),
                    " uint32 words, K=", g.cols, ")");
  return g;
}

void check_fp_quantize_input(const at::Tensor& w, int64_t group_size) {
  TORCH_CHECK_TYPE(is_float(w.scalar_type()), "mlxq: w must be float32, float16 or bfloat16, got ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() >= 1 && w.size(-1) > 0,
                    "mlxq: w must have a non-empty last dimension, got shape ",
                    shape_str(w.sizes()));
  TORCH_CHECK_VALUE(w.size(-1) % group_size == 0, "mlxq: w last dimension ", w.size(-1),
                    " must be divisible by group_size ", group_size);
}

MatmulGeometry check_fp_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                               int64_t group_size, int64_t bits, bool transpose) {
  MatmulGeometry g;
  g.w = check_fp_packed(wq, scales, group_size, bits, /*min_dim=*/2);
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
    g.M = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
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

// What every gather check shares once the weight's own operands are checked (g.w): x, the
// indices, and the output shape.
void check_gather_operands(GatherGeometry& g, const at::Tensor& x, const at::Tensor& wq,
                           const std::optional<at::Tensor>& lhs_indices,
                           const std::optional<at::Tensor>& rhs_indices, bool transpose) {
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
  // The pairs are flattened (one int64 index each) and the output allocated: sizes whose
  // products overflow int64 are refused by name here, not by torch's "numel: integer
  // multiplication overflow" deep inside the kernel (stride-0 index tensors give any size).
  SymInt count;
  TORCH_CHECK_VALUE(product_fits(c10::fromIntArrayRefSlow(g.index_shape), &count),
                    "mlxq: lhs_indices shape ", shape_str(lhs_shape), " and rhs_indices shape ",
                    shape_str(rhs_shape), " broadcast to ", shape_str(g.index_shape),
                    ", more index pairs than int64 can count");
  g.out_shape = g.index_shape;
  g.out_shape.push_back(g.M);
  g.out_shape.push_back(g.out_features);
  TORCH_CHECK_VALUE(product_fits(c10::fromIntArrayRefSlow(g.out_shape), &count),
                    "mlxq: the output of the gather of x ", shape_str(x.sizes()),
                    " with the quantized weights (wq ", shape_str(wq.sizes()),
                    ") over index shape ", shape_str(g.index_shape), " would have shape ",
                    shape_str(g.out_shape), ", more elements than int64 can count");
}

}  // namespace

GatherGeometry check_gather_matmul(const at::Tensor& x, const at::Tensor& wq,
                                   const at::Tensor& scales, const at::Tensor& biases,
                                   const std::optional<at::Tensor>& lhs_indices,
                                   const std::optional<at::Tensor>& rhs_indices, int64_t group_size,
                                   int64_t bits, bool transpose) {
  GatherGeometry g;
  g.w = concrete(check_packed_sym(wq, scales, biases, group_size, bits, /*min_dim=*/2));
  check_gather_operands(g, x, wq, lhs_indices, rhs_indices, transpose);
  return g;
}

GatherGeometry check_fp_gather_matmul(const at::Tensor& x, const at::Tensor& wq,
                                      const at::Tensor& scales, int mode, int64_t group_size,
                                      int64_t bits, const std::optional<at::Tensor>& lhs_indices,
                                      const std::optional<at::Tensor>& rhs_indices, bool transpose,
                                      const c10::optional<at::Tensor>& global_scale) {
  GatherGeometry g;
  g.w = check_fp_packed(wq, scales, group_size, bits, /*min_dim=*/2);
  check_gather_operands(g, x, wq, lhs_indices, rhs_indices, transpose);
  if (global_scale.has_value()) {
    const at::Tensor& s = *global_scale;
    TORCH_CHECK_VALUE(mode == 1, "mlxq: global_scale is only used by mode 'nvfp4', got mode '",
                      mode == 0 ? "mxfp4" : "mxfp8", "'");
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "mlxq: global_scale must be float32, got ",
                     s.scalar_type());
    TORCH_CHECK_VALUE(s.sizes() == at::IntArrayRef(g.w.batch),
                      "mlxq: global_scale must hold one value per matrix of wq, shape ",
                      shape_str(at::IntArrayRef(g.w.batch)), " (wq shape ", shape_str(wq.sizes()),
                      "), got shape ", shape_str(s.sizes()));
    TORCH_CHECK_VALUE(s.device() == wq.device(), "mlxq: global_scale is on ", s.device(),
                      " but wq is on ", wq.device());
  }
  return g;
}

namespace {

// One side of gather_pair_indices: `indices` (or the arange over `batch_shape`) flattened and
// checked to lie in [0, limit).
at::Tensor gather_flat_indices(const std::optional<at::Tensor>& indices,
                               const std::vector<int64_t>& batch_shape, const GatherGeometry& g,
                               int64_t limit, const char* name, const at::Device& device,
                               IndexCheck check) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor idx = indices.has_value()
                       ? indices->to(at::kLong)
                       : at::arange(c10::multiply_integers(batch_shape), opts).reshape(batch_shape);
  idx = idx.expand(g.index_shape).reshape({-1}).contiguous();
  // The default arange lies in [0, limit) by construction; given indices are read back once
  // (their min and max in one device-to-host copy: one synchronization on a GPU), or checked
  // on the device.
  if (!indices.has_value() || idx.numel() == 0 || check == IndexCheck::kInKernel) return idx;
  const auto [lo, hi] = at::aminmax(idx);
  const char* of = name[0] == 'l' ? "x" : "wq";
  if (check == IndexCheck::kAsync) {
    at::_assert_async(at::logical_and(lo >= 0, hi < limit),
                      std::string("mlxq: ") + name + " values must lie in [0, " +
                          std::to_string(limit) + ") (the number of matrices in " + of + ")");
    return idx;
  }
  const at::Tensor range = at::stack({lo, hi}).to(at::kCPU);
  const int64_t min = range.const_data_ptr<int64_t>()[0], max = range.const_data_ptr<int64_t>()[1];
  TORCH_CHECK_INDEX(min >= 0 && max < limit, "mlxq: ", name, " values must lie in [0, ", limit,
                    ") (the number of matrices in ", of, "), got values from ", min, " to ", max);
  return idx;
}

}  // namespace

GatherPairs gather_pair_indices(const GatherGeometry& g, const at::Tensor& x,
                                const std::optional<at::Tensor>& lhs_indices,
                                const std::optional<at::Tensor>& rhs_indices, IndexCheck check) {
  const std::vector<int64_t> x_batch(x.sizes().begin(), x.sizes().end() - 2);
  return {
      gather_flat_indices(lhs_indices, x_batch, g, g.x_batch, "lhs_indices", x.device(), check),
      gather_flat_indices(rhs_indices, g.w.batch, g, g.w_batch, "rhs_indices", x.device(), check)};
}

}  // namespace mlxq

// --- decode_attention ---------------------------------------------------------------------------

namespace mlxq {
namespace {

// The last dimension of `t` is unit-stride (or has at most one element).
bool unit_last_stride(const at::Tensor& t) {
  return holds(t.sym_size(-1).sym_le(1)) || holds(t.sym_stride(-1).sym_eq(1));
}

std::vector<SymInt> check_decode_attention_sym(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v,
                                               const std::optional<at::Tensor>& mask,
                                               std::optional<double> scale) {
  // a NaN or infinite scale makes every score NaN (or inf - inf): refused, not computed
  TORCH_CHECK_VALUE(!scale.has_value() || std::isfinite(*scale),
                    "mlxq: decode_attention: scale must be finite, got ", scale.value_or(0.0));
  TORCH_CHECK_TYPE(is_float(q.scalar_type()), "mlxq: q must be float32, float16 or bfloat16, got ",
                   q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "mlxq: q, k and v must have one dtype, got q ", q.scalar_type(), ", k ",
                   k.scalar_type(), ", v ", v.scalar_type());
  if (mask.has_value()) {
    check_one_device({{"q", &q}, {"k", &k}, {"v", &v}, {"mask", &*mask}});
  } else {
    check_one_device({{"q", &q}, {"k", &k}, {"v", &v}});
  }
  const SymIntArrayRef qs = q.sym_sizes(), ks = k.sym_sizes(), vs = v.sym_sizes();
  TORCH_CHECK_VALUE(q.dim() == 4, "mlxq: q must be [batch, heads, queries, head_dim], got shape ",
                    shape_str(qs));
  TORCH_CHECK_VALUE(k.dim() == 4, "mlxq: k must be [batch, kv_heads, keys, head_dim], got shape ",
                    shape_str(ks));
  TORCH_CHECK_VALUE(same_sizes(ks, vs), "mlxq: v shape ", shape_str(vs), " must equal k shape ",
                    shape_str(ks));
  TORCH_CHECK_VALUE(holds(ks[0].sym_eq(qs[0])) && holds(ks[3].sym_eq(qs[3])), "mlxq: k shape ",
                    shape_str(ks), " must match q shape ", shape_str(qs),
                    " in batch (dim 0) and head_dim (dim 3)");
  TORCH_CHECK_VALUE(holds(ks[1].sym_ge(1)) && holds((qs[1] % ks[1]).sym_eq(0)),
                    "mlxq: the kv heads of k (shape ", shape_str(ks),
                    ") must be at least 1 and divide the query heads of q (shape ", shape_str(qs),
                    ")");
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK_VALUE(unit_last_stride(*t), "mlxq: ", name,
                      " must have a unit-stride last dimension, got strides ",
                      shape_str(t->sym_strides()), " (call .contiguous())");
  }
  const std::vector<SymInt> out(qs.begin(), qs.end());
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || is_float(m.scalar_type()),
                     "mlxq: mask must be bool (True attends) or float32, float16, bfloat16 "
                     "(added to the scores), got ",
                     m.scalar_type());
    const std::vector<SymInt> target = {qs[0], qs[1], qs[2], ks[2]};
    const SymIntArrayRef ms = m.sym_sizes();
    bool fits = m.dim() <= 4;
    for (int64_t i = 0; fits && i < m.dim(); ++i) {
      const SymInt& size = ms[m.dim() - 1 - i];
      fits = holds(size.sym_eq(target[3 - i])) || holds(size.sym_eq(1));
    }
    TORCH_CHECK_VALUE(fits, "mlxq: mask shape ", shape_str(ms),
                      " does not broadcast to [batch, heads, queries, keys] = ",
                      shape_str(SymIntArrayRef(target)));
  }
  return out;
}

}  // namespace

AttentionGeometry check_decode_attention(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                         std::optional<double> scale) {
  check_decode_attention_sym(q, k, v, mask, scale);
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
}

std::vector<c10::SymInt> decode_attention_out_shape(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const std::optional<at::Tensor>& mask,
                                                    std::optional<double> scale) {
  return check_decode_attention_sym(q, k, v, mask, scale);
}

at::ScalarType check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK_TYPE(is_float(x.scalar_type()), "mlxq: rms_norm: x must be float32, float16 or ",
                   "bfloat16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(is_float(weight.scalar_type()), "mlxq: rms_norm: weight must be float32, ",
                   "float16 or bfloat16, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.sym_size(-1) >= 1, "mlxq: rms_norm: x must have a last ",
                    "dimension of at least one value, got shape ", x.sym_sizes());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.sym_size(0) == x.sym_size(-1),
                    "mlxq: rms_norm: weight must have shape [", x.sym_size(-1), "] (x's last ",
                    "dimension), got ", weight.sym_sizes());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "mlxq: rms_norm: eps must be finite and >= 0, ",
                    "got ", eps);
  check_one_device({{"x", &x}, {"weight", &weight}});
  return c10::promoteTypes(x.scalar_type(), weight.scalar_type());
}

void check_rotary_embedding(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                            const at::Tensor& sin) {
  TORCH_CHECK_TYPE(is_float(q.scalar_type()), "mlxq: rotary_embedding: q must be float32, ",
                   "float16 or bfloat16, got ", q.scalar_type());
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor*>{"k", &k}, {"cos", &cos}, {"sin", &sin}})
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "mlxq: rotary_embedding: ", name,
                     " must have q's dtype ", q.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4, "mlxq: rotary_embedding: q and k must be 4-D ",
                    "[batch, heads, positions, head_dim], got shapes ", q.sym_sizes(), " and ",
                    k.sym_sizes());
  TORCH_CHECK_VALUE(cos.dim() == 3 && sin.sym_sizes().equals(cos.sym_sizes()),
                    "mlxq: rotary_embedding: cos and sin must be 3-D [batch, positions, head_dim] ",
                    "of one shape, got ", cos.sym_sizes(), " and ", sin.sym_sizes());
  const c10::SymInt &B = q.sym_size(0), &L = q.sym_size(2), &D = q.sym_size(3);
  TORCH_CHECK_VALUE(k.sym_size(0) == B && k.sym_size(2) == L && k.sym_size(3) == D,
                    "mlxq: rotary_embedding: k must have q's batch, positions and head_dim ", "(q ",
                    q.sym_sizes(), "), got ", k.sym_sizes());
  TORCH_CHECK_VALUE((cos.sym_size(0) == 1 || cos.sym_size(0) == B) && cos.sym_size(1) == L &&
                        cos.sym_size(2) == D,
                    "mlxq: rotary_embedding: cos must have shape [1 or ", B, ", ", L, ", ", D,
                    "] (q ", q.sym_sizes(), "), got ", cos.sym_sizes());
  TORCH_CHECK_VALUE(D % 2 == 0, "mlxq: rotary_embedding: head_dim must be even, got ", D);
  check_one_device({{"q", &q}, {"k", &k}, {"cos", &cos}, {"sin", &sin}});
}

}  // namespace mlxq
