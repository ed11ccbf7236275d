// MLX's gather_qmm (affine_gather_matmul, fp_gather_matmul) as compositions of ATen ops and the
// dense matmul ops (see composite.h): the pairs are sorted by expert (stable), the runs of equal
// experts found with unique_consecutive, and each selected expert multiplies the stacked x rows
// of all its pairs with one call of the dense op of the tensors' device, whose result rows are
// scattered back to their pairs. The loop runs over the selected experts, never over rows.
// That grouping reads the experts back to the host; a call made while its CUDA stream is being
// captured in a graph (`capturable`) multiplies pair by pair instead, its indices checked on the
// device: every tensor op is then stream-ordered and sizes never depend on index values.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>

#include <vector>

#include "checks.h"
#include "composite/composite.h"

namespace mlxq::composite {
namespace {

using AffineMatmulFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, int64_t, int64_t, bool);
using FpMatmulFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              c10::string_view, int64_t, int64_t, bool,
                              const c10::optional<at::Tensor>&);

const c10::TypedOperatorHandle<AffineMatmulFn>& affine_matmul_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlxq::affine_matmul", "")
                             .typed<AffineMatmulFn>();
  return op;
}

const c10::TypedOperatorHandle<FpMatmulFn>& fp_matmul_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mlxq::fp_matmul", "").typed<FpMatmulFn>();
  return op;
}

// The pairs (lhs[p], rhs[p]) of the checked indices (absent: the batch positions) grouped by
// expert; dense(rows [c*M, in], expert) -> [c*M, out] in the dtype of x, the expert an Expert.
// Returns [*index_shape, M, out].
// An expert: its index on the host (then its matrices are views), or only on the device (-1 on
// the host: its matrices are index_select copies, so that the host never reads the index).
struct Expert {
  at::Tensor device;  // one int64
  int64_t host = -1;

  at::Tensor of(const at::Tensor& t3) const {
    return host >= 0 ? t3[host] : t3.index_select(0, device)[0];
  }
};

template <class Dense>
at::Tensor gather_by_expert(const GatherGeometry& g, const at::Tensor& x,
                            const std::optional<at::Tensor>& lhs_indices,
                            const std::optional<at::Tensor>& rhs_indices, bool capturable,
                            const Dense& dense) {
  const c10::DeviceGuard device(x.device());
  const auto [lhs, rhs] = gather_pair_indices(g, x, lhs_indices, rhs_indices,
                                              capturable ? IndexCheck::kAsync : IndexCheck::kHost);
  const int64_t P = lhs.numel(), M = g.M, in = g.in_features, out = g.out_features;
  if (P == 0 || M == 0 || out == 0 || in == 0) return at::zeros(g.out_shape, x.options());
  const at::Tensor x3 = x.reshape({g.x_batch, M, in});
  at::Tensor y = at::empty({P, M, out}, x.options());
  if (capturable) {  // P dense products, each reading its pair's matrices through the indices
    for (int64_t i = 0; i < P; ++i) {
      const at::Tensor rows = x3.index_select(0, lhs.narrow(0, i, 1)).reshape({M, in});
      y[i].copy_(dense(rows, Expert{rhs.narrow(0, i, 1)}).reshape({M, out}));
    }
    return y.view(g.out_shape);
  }
  const auto [experts_sorted, order] =
      at::sort(rhs, /*stable=*/std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  const auto [experts, inverse, counts] =
      at::unique_consecutive(experts_sorted, /*return_inverse=*/false, /*return_counts=*/true);
  // one device-to-host copy: which experts run, and on how many pairs
  const at::Tensor e_host = experts.to(at::kCPU), c_host = counts.to(at::kCPU);
  const int64_t* ep = e_host.const_data_ptr<int64_t>();
  const int64_t* cp = c_host.const_data_ptr<int64_t>();
  const at::Tensor lhs_sorted = lhs.index_select(0, order);
  int64_t begin = 0;
  for (int64_t i = 0; i < e_host.numel(); ++i) {
    const int64_t c = cp[i];
    const at::Tensor rows = x3.index_select(0, lhs_sorted.narrow(0, begin, c)).reshape({c * M, in});
    y.index_copy_(0, order.narrow(0, begin, c),
                  dense(rows, Expert{experts.narrow(0, i, 1), ep[i]}).reshape({c, M, out}));
    begin += c;
  }
  return y.view(g.out_shape);
}

}  // namespace

at::Tensor affine_gather_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                                const at::Tensor& biases,
                                const std::optional<at::Tensor>& lhs_indices,
                                const std::optional<at::Tensor>& rhs_indices, int64_t group_size,
                                int64_t bits, bool transpose, bool /*sorted_indices*/,
                                bool capturable) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // ops.py owns the gradient
  const GatherGeometry g = check_gather_matmul(x, wq, scales, biases, lhs_indices, rhs_indices,
                                               group_size, bits, transpose);
  const int64_t N = g.w.rows;
  const at::Tensor w3 = wq.reshape({g.w_batch, N, wq.size(-1)});
  const at::Tensor s3 = scales.reshape({g.w_batch, N, scales.size(-1)});
  const at::Tensor b3 = biases.reshape({g.w_batch, N, biases.size(-1)});
  return gather_by_expert(g, x, lhs_indices, rhs_indices, capturable,
                          [&](const at::Tensor& rows, const Expert& e) {
                            return affine_matmul_op().call(rows, e.of(w3), e.of(s3), e.of(b3),
                                                           group_size, bits, transpose);
                          });
}

at::Tensor fp_gather_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                            c10::string_view mode, int64_t group_size, int64_t bits,
                            const std::optional<at::Tensor>& lhs_indices,
                            const std::optional<at::Tensor>& rhs_indices, bool transpose,
                            const c10::optional<at::Tensor>& global_scale, bool /*sorted_indices*/,
                            bool capturable) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // ops.py owns the gradient
  const int m = check_fp_mode(mode, group_size, bits);
  const GatherGeometry g = check_fp_gather_matmul(x, wq, scales, m, group_size, bits, lhs_indices,
                                                  rhs_indices, transpose, global_scale);
  const int64_t N = g.w.rows;
  const at::Tensor w3 = wq.reshape({g.w_batch, N, wq.size(-1)});
  const at::Tensor s3 = scales.reshape({g.w_batch, N, scales.size(-1)});
  // mx.gather_qmm's global scale: one value per matrix, fp_matmul's one-element tensor
  const at::Tensor gs = global_scale.has_value() ? global_scale->reshape({-1}) : at::Tensor();
  return gather_by_expert(
      g, x, lhs_indices, rhs_indices, capturable, [&](const at::Tensor& rows, const Expert& e) {
        const c10::optional<at::Tensor> ge =
            gs.defined() ? c10::optional<at::Tensor>(e.of(gs.view({-1, 1}))) : c10::nullopt;
        return fp_matmul_op().call(rows, e.of(w3), e.of(s3), mode, group_size, bits, transpose, ge);
      });
}

}  // namespace mlxq::composite
