// The flat eager CPU decode step of a Llama-family decoder layer (python/mlxq/integrations/
// cpu_layers.py) as two native calls: `attention_input` (the input norm, the q/k/v projections,
// their head views and the rotary embedding) before the KV cache update, and `output` (o_proj,
// the residual, the post-attention norm, gate/up, SiLU, down and the residual) after the
// attention, or `attention_output`, which begins with mlxq's decode attention op. In a small
// model's decode step the Python step spent about 2 us of Python per op call, 15 calls a layer,
// next to kernels of a few microseconds. These calls reach, through the dispatcher, the very ops
// the Python step calls (mlxq::rms_norm, mlxq::affine_matmul(_many), mlxq::rotary_embedding,
// aten::add / silu / mul and the same views), in the same order with the same arguments, so every
// output is bit for bit the layer's own forward.
//
// The layer's tensors are held here once; the Python step checks at each call that the modules
// still hold those very tensors (a replaced one, `model.to(dtype)` say, has it build a new
// object first), so a step never computes with stale weights. Exposed as mlxq._C.FlatDecoderLayer;
// not public API.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace mlxq::composite {
namespace {

using AffineMatmulFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, int64_t, int64_t, bool);
using AffineMatmulManyFn = std::vector<at::Tensor>(const at::Tensor&, at::TensorList,
                                                   at::TensorList, at::TensorList, int64_t,
                                                   int64_t);
using RmsNormFn = at::Tensor(const at::Tensor&, const at::Tensor&, double);
using AttentionFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, std::optional<double>);
using RotaryFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&);

template <typename Fn>
c10::TypedOperatorHandle<Fn> mlxq_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace

// An affine AffineLinear as the Python side hands it over: weight, scales, biases, the linear
// bias (or None), group size, bits.
using ProjectionArgs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, int64_t, int64_t>;

// Sibling projections on one input (q/k/v, gate/up, or one alone): one affine_matmul_many call
// when they share a format, as the Python step's projection group computes them, else one
// affine_matmul each (bit for bit the same outputs either way), then each bias.
class Projections {
 public:
  explicit Projections(const std::vector<ProjectionArgs>& members) {
    TORCH_CHECK(!members.empty(), "mlxq: a projection list needs a member");
    for (const auto& [w, s, b, bias, group_size, bits] : members) {
      weights_.push_back(w);
      scales_.push_back(s);
      biases_.push_back(b);
      bias_.push_back(bias);
      group_size_.push_back(group_size);
      bits_.push_back(bits);
    }
    one_call_ = members.size() > 1;
    for (size_t i = 1; i < members.size(); ++i)
      one_call_ = one_call_ && group_size_[i] == group_size_[0] && bits_[i] == bits_[0] &&
                  scales_[i].scalar_type() == scales_[0].scalar_type() &&
                  weights_[i].size(-1) == weights_[0].size(-1);
  }

  std::vector<at::Tensor> operator()(const at::Tensor& x) const {
    static const auto matmul = mlxq_op<AffineMatmulFn>("mlxq::affine_matmul");
    static const auto matmul_many = mlxq_op<AffineMatmulManyFn>("mlxq::affine_matmul_many");
    std::vector<at::Tensor> ys;
    if (one_call_) {
      ys = matmul_many.call(x, weights_, scales_, biases_, group_size_[0], bits_[0]);
    } else {
      for (size_t i = 0; i < weights_.size(); ++i)
        ys.push_back(
            matmul.call(x, weights_[i], scales_[i], biases_[i], group_size_[i], bits_[i], true));
    }
    for (size_t i = 0; i < ys.size(); ++i)  // AffineLinear.add_bias
      if (bias_[i].has_value()) ys[i] = ys[i] + bias_[i]->to(ys[i].scalar_type());
    return ys;
  }

  size_t size() const { return weights_.size(); }

 private:
  std::vector<at::Tensor> weights_, scales_, biases_;
  std::vector<std::optional<at::Tensor>> bias_;
  std::vector<int64_t> group_size_, bits_;
  bool one_call_ = false;
};

namespace {

// x's sizes without the last, then `last...` (Python's (*input_shape, ...)).
template <typename... Last>
std::vector<int64_t> leading_then(const at::Tensor& x, Last... last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  (shape.push_back(last), ...);
  return shape;
}

// Whether mlxq's apply_rotary_pos_emb stand-in (integrations/cpu_rope.py, `_fits`) sends
// q [B, H, L, D] and k of this step to mlxq::rotary_embedding: one float dtype, CPU cos and sin
// [1 or B, L, D] of one shape, an even D. (The rest of `_fits`, the tensor types, gradients,
// compile and L <= MAX_POSITIONS, the Python side checks before it passes cos and sin.)
bool rotary_fits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                 const at::Tensor& sin) {
  const at::ScalarType t = q.scalar_type();
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) return false;
  if (k.scalar_type() != t || cos.scalar_type() != t || sin.scalar_type() != t) return false;
  if (!cos.device().is_cpu() || !sin.device().is_cpu()) return false;
  if (cos.dim() != 3 || !sin.sizes().equals(cos.sizes())) return false;
  const int64_t B = q.size(0), L = q.size(2), D = q.size(3);
  return (cos.size(0) == 1 || cos.size(0) == B) && cos.size(1) == L && cos.size(2) == D &&
         D % 2 == 0;
}

}  // namespace

class FlatDecoderLayer {
 public:
  FlatDecoderLayer(at::Tensor norm_in, at::Tensor norm_post, const std::vector<ProjectionArgs>& qkv,
                   const ProjectionArgs& o_proj, const std::vector<ProjectionArgs>& gate_up,
                   const ProjectionArgs& down_proj, int64_t head_dim)
      : norm_in_(std::move(norm_in)),
        norm_post_(std::move(norm_post)),
        qkv_(qkv),
        o_proj_({o_proj}),
        gate_up_(gate_up),
        down_proj_({down_proj}),
        head_dim_(head_dim) {
    TORCH_CHECK(qkv_.size() == 3 && gate_up_.size() == 2,
                "mlxq: a flat decoder layer takes q/k/v and gate/up projections");
    TORCH_CHECK(head_dim > 0, "mlxq: head_dim must be positive, got ", head_dim);
  }

  // LlamaAttention.forward up to the cache update, from the input norm on: q, k, v as
  // [B, H, L, head_dim] views and whether q and k went through mlxq::rotary_embedding. The
  // Python side passes cos and sin only where its module's apply_rotary_pos_emb is mlxq's
  // stand-in, which calls that op exactly when `rotary_fits`; otherwise it applies the
  // function itself.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> attention_input(
      const at::Tensor& hidden, double eps, const std::optional<at::Tensor>& cos,
      const std::optional<at::Tensor>& sin) const {
    static const auto rms_norm = mlxq_op<RmsNormFn>("mlxq::rms_norm");
    static const auto rotary = mlxq_op<RotaryFn>("mlxq::rotary_embedding");
    TORCH_CHECK(cos.has_value() == sin.has_value(), "mlxq: give both cos and sin or neither");
    const at::Tensor h = rms_norm.call(hidden, norm_in_, eps);
    std::vector<at::Tensor> qkv = qkv_(h);
    const std::vector<int64_t> heads = leading_then(h, -1, head_dim_);
    for (at::Tensor& y : qkv) y = y.view(heads).transpose(1, 2);
    const bool roped = cos.has_value() && rotary_fits(qkv[0], qkv[1], *cos, *sin);
    if (roped) std::tie(qkv[0], qkv[1]) = rotary.call(qkv[0], qkv[1], *cos, *sin);
    return {qkv[0], qkv[1], qkv[2], roped};
  }

  // The rest of the layer from the attention interface's output ([B, L, H, head_dim]).
  at::Tensor output(const at::Tensor& attention, const at::Tensor& residual, double eps) const {
    static const auto rms_norm = mlxq_op<RmsNormFn>("mlxq::rms_norm");
    const at::Tensor flat = attention.reshape(leading_then(residual, -1)).contiguous();
    const at::Tensor hidden = residual + o_proj_(flat)[0];
    const at::Tensor h = rms_norm.call(hidden, norm_post_, eps);
    const std::vector<at::Tensor> gate_up = gate_up_(h);
    return hidden + down_proj_(at::silu(gate_up[0]) * gate_up[1])[0];
  }

  // `output` of mlxq::decode_attention(q, k, v, mask, scale) in the [B, L, H, head_dim] layout
  // mlxq's attention interface returns (integrations/cpu_attention.py: the Python side passes
  // the mask and scale its `native_arguments` gives).
  at::Tensor attention_output(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask, std::optional<double> scale,
                              const at::Tensor& residual, double eps) const {
    static const auto attention = mlxq_op<AttentionFn>("mlxq::decode_attention");
    return output(attention.call(q, k, v, mask, scale).transpose(1, 2).contiguous(), residual, eps);
  }

 private:
  at::Tensor norm_in_, norm_post_;
  Projections qkv_, o_proj_, gate_up_, down_proj_;
  int64_t head_dim_;
};

// A transformers DynamicLayer's keys (or values) [B, H, n, D] are a view of the first n positions
// of `buf` [B, H, capacity, D], made here.
bool views_start_of(const at::Tensor& t, const at::Tensor& buf) {
  return buf.defined() && t.data_ptr() == buf.data_ptr() && t.dtype() == buf.dtype() &&
         t.size(0) == buf.size(0) && t.size(1) == buf.size(1) && t.size(3) == buf.size(3) &&
         t.strides() == buf.strides();
}

// dst = src for [B, H, L, D] tensors whose last dimension is unit-stride: a row copy each.
void copy_rows(const at::Tensor& dst, const at::Tensor& src) {
  if (dst.stride(3) != 1 || src.stride(3) != 1) {
    dst.copy_(src);
    return;
  }
  const int64_t bytes = src.size(3) * src.element_size();
  auto* d = static_cast<char*>(dst.data_ptr());
  const auto* s = static_cast<const char*>(src.const_data_ptr());
  const int64_t es = src.element_size();
  for (int64_t b = 0; b < src.size(0); ++b)
    for (int64_t h = 0; h < src.size(1); ++h)
      for (int64_t l = 0; l < src.size(2); ++l)
        std::memcpy(d + (b * dst.stride(0) + h * dst.stride(1) + l * dst.stride(2)) * es,
                    s + (b * src.stride(0) + h * src.stride(1) + l * src.stride(2)) * es, bytes);
}

// What DynamicLayer.update computes, cat([keys, k], -2) and cat([values, v], -2), into buffers
// with room to grow: the new positions are copied in place and the results are views of the
// first n + L positions (the same values, no copy of the n before; a cat copies the whole cache
// every token: 20 us a layer at 512 positions, SmolLM2-135M). The caller passes the buffers only
// with the keys/values last returned (so no earlier view sees a position written twice); new
// buffers, with the old positions copied, when there are none, the keys/values are not their
// views, or they are full. nullopt (the caller runs cache.update) where the operands are not CPU
// tensors [B, H, n, D] / [B, H, L, D] of one dtype.
using KvBuffers = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
std::optional<KvBuffers> append_kv(const std::optional<at::Tensor>& kbuf,
                                   const std::optional<at::Tensor>& vbuf, const at::Tensor& keys,
                                   const at::Tensor& values, const at::Tensor& k,
                                   const at::Tensor& v) {
  for (const at::Tensor* t : {&keys, &values, &k, &v})
    if (t->dim() != 4 || !t->device().is_cpu() || t->scalar_type() != keys.scalar_type() ||
        t->is_conj() || t->is_neg() || t->requires_grad())
      return std::nullopt;
  if (values.sizes() != keys.sizes() || v.sizes() != k.sizes() || k.size(0) != keys.size(0) ||
      k.size(1) != keys.size(1) || k.size(3) != keys.size(3))
    return std::nullopt;
  const int64_t n = keys.size(2), total = n + k.size(2);
  at::Tensor kb = kbuf.value_or(at::Tensor()), vb = vbuf.value_or(at::Tensor());
  if (!(views_start_of(keys, kb) && views_start_of(values, vb) && total <= kb.size(2) &&
        total <= vb.size(2))) {
    const int64_t capacity = (total + std::max<int64_t>(256, total / 4) + 63) / 64 * 64;
    kb = at::empty({keys.size(0), keys.size(1), capacity, keys.size(3)}, keys.options());
    vb = at::empty_like(kb);
    if (n > 0) {
      copy_rows(kb.narrow(2, 0, n), keys);
      copy_rows(vb.narrow(2, 0, n), values);
    }
  }
  copy_rows(kb.narrow(2, n, k.size(2)), k);
  copy_rows(vb.narrow(2, n, v.size(2)), v);
  return KvBuffers{kb, vb, kb.narrow(2, 0, total), vb.narrow(2, 0, total)};
}

}  // namespace mlxq::composite

namespace mlxq {

void register_decoder_layer_bindings(pybind11::module& m) {
  namespace py = pybind11;
  using composite::FlatDecoderLayer;
  py::class_<FlatDecoderLayer>(m, "FlatDecoderLayer",
                               "A Llama-family decoder layer's decode step in two native calls "
                               "(csrc/composite/decoder_layer.cpp); not public API")
      .def(py::init<at::Tensor, at::Tensor, const std::vector<composite::ProjectionArgs>&,
                    const composite::ProjectionArgs&, const std::vector<composite::ProjectionArgs>&,
                    const composite::ProjectionArgs&, int64_t>(),
           py::arg("norm_in"), py::arg("norm_post"), py::arg("qkv"), py::arg("o_proj"),
           py::arg("gate_up"), py::arg("down_proj"), py::arg("head_dim"))
      .def("attention_input", &FlatDecoderLayer::attention_input, py::arg("hidden"), py::arg("eps"),
           py::arg("cos") = py::none(), py::arg("sin") = py::none(),
           py::call_guard<py::gil_scoped_release>())
      .def("output", &FlatDecoderLayer::output, py::arg("attention"), py::arg("residual"),
           py::arg("eps"), py::call_guard<py::gil_scoped_release>())
      .def("attention_output", &FlatDecoderLayer::attention_output, py::arg("q"), py::arg("k"),
           py::arg("v"), py::arg("mask"), py::arg("scale"), py::arg("residual"), py::arg("eps"),
           py::call_guard<py::gil_scoped_release>());
  m.def("append_kv", &composite::append_kv, py::arg("key_buffer"), py::arg("value_buffer"),
        py::arg("keys"), py::arg("values"), py::arg("k"), py::arg("v"),
        "DynamicLayer.update's concatenation into buffers that grow "
        "(csrc/composite/decoder_layer.cpp); not public API",
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace mlxq
