// CPU kernel of mlxq::rotary_embedding (ops.cpp): transformers' rotate-half rotary embedding,
// `x * cos + rotate_half(x) * sin` for q and k, in one call. A decode step applies it once a
// layer, and transformers spends about 14 tensor ops on it (slices, cat, neg, mul, add), 20 us
// for a few hundred values. Each value is computed as those ops do: both products rounded to the
// dtype of x, then their sum rounded. The products must not be contracted into an FMA (fp32 x
// would then differ from torch in the last bit), hence the attributes below.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "checks.h"

#if defined(__GNUC__) && !defined(__clang__)
#define MLXQ_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define MLXQ_NO_FP_CONTRACT
#endif

namespace mlxq::cpu {
namespace {

// x [B, H, L, D] (any strides) rotated into out (same sizes, any strides) with cos and sin
// [Bc, L, D] (Bc 1 or B, any strides).
template <typename T>
MLXQ_NO_FP_CONTRACT void rotate_rows(const at::Tensor& x, const at::Tensor& cos,
                                     const at::Tensor& sin, at::Tensor& out) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const int64_t H = x.size(1), L = x.size(2), D = x.size(3), half = D / 2;
  const int64_t rows = x.size(0) * H * L;
  const T* xp = x.const_data_ptr<T>();
  const T* cp = cos.const_data_ptr<T>();
  const T* sp = sin.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0),
                sb = sin.size(0) == 1 ? 0 : sin.stride(0);
  at::parallel_for(
      0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / (H * L), h = (r / L) % H, l = r % L;
          const T* xr = xp + b * x.stride(0) + h * x.stride(1) + l * x.stride(2);
          const T* cr = cp + b * cb + l * cos.stride(1);
          const T* sr = sp + b * sb + l * sin.stride(1);
          T* orow = op + b * out.stride(0) + h * out.stride(1) + l * out.stride(2);
          const int64_t xs = x.stride(3), cs = cos.stride(2), ss = sin.stride(2);
          for (int64_t i = 0; i < D; ++i) {
            const float v = static_cast<float>(xr[i * xs]);
            const float rot = i < half ? -static_cast<float>(xr[(i + half) * xs])
                                       : static_cast<float>(xr[(i - half) * xs]);
            const T a = static_cast<T>(v * static_cast<float>(cr[i * cs]));
            const T c = static_cast<T>(rot * static_cast<float>(sr[i * ss]));
            orow[i * out.stride(3)] = static_cast<T>(static_cast<float>(a) + static_cast<float>(c));
          }
        }
      });
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& cos,
                                                        const at::Tensor& sin) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_rotary_embedding(q, k, cos, sin);
  // empty_like keeps the layout of q and k (transformers' ops keep it too: q is usually a
  // transposed view of the projection's output).
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_embedding",
                                  [&] {
                                    rotate_rows<scalar_t>(q, cos, sin, q_out);
                                    rotate_rows<scalar_t>(k, cos, sin, k_out);
                                  });
  return {q_out, k_out};
}

}  // namespace
}  // namespace mlxq::cpu

TORCH_LIBRARY_IMPL(mlxq, CPU, m) { m.impl("rotary_embedding", &mlxq::cpu::rotary_embedding_cpu); }
