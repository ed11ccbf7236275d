// decode_attention on CUDA: a few queries against a KV cache read in place, in its own dtype
// and strides, with fp32 math (the CPU op's contract, ops.cpp), by the kernels of attention.cuh.
// No host synchronization and no size that depends on data: a CUDA graph can capture it.
// Head dims above kMaxD (and grids past CUDA's limits) take the ATen composite.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>

#include "checks.h"
#include "composite/composite.h"
#include "cuda/attention.cuh"

namespace mlxq::cuda {
namespace {

// Multiprocessors of `device`, from the driver once per device.
int sm_count(int device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> cache{};
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "CUDA device index ", device,
              " out of range");
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

using namespace attn;

int mask_kind_of(at::ScalarType t) {
  switch (t) {
    case at::kBool:
      return kBoolMask;
    case at::kHalf:
      return kF16Mask;
    case at::kBFloat16:
      return kBF16Mask;
    default:
      return kF32Mask;
  }
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask,
                                 std::optional<double> scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const AttentionGeometry g = check_decode_attention(q, k, v, mask, scale);
  const int64_t rows = g.Hq / std::max<int64_t>(g.Hkv, 1) * g.Lq;
  if (g.D > kMaxD || g.B * g.Hkv > kMaxGrid || (rows + 7) / 8 > kMaxGrid ||
      g.B * g.Hkv * rows > INT32_MAX) {
    return composite::decode_attention(q, k, v, mask, scale);
  }
  const c10::cuda::CUDAGuard device(q.device());
  at::Tensor out = at::empty({g.B, g.Hq, g.Lq, g.D}, q.options());
  if (out.numel() == 0) return out;
  if (g.Lk == 0) return out.zero_();  // no key attended
  AttnParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.out = out.mutable_data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = q.stride(i);
    p.ks[i] = k.stride(i);
    p.vs[i] = v.stride(i);
  }
  at::Tensor m;  // keeps the broadcast view alive
  if (mask.has_value()) {
    m = mask->expand({g.B, g.Hq, g.Lq, g.Lk});
    p.mask = m.const_data_ptr();
    p.mask_kind = mask_kind_of(m.scalar_type());
    for (int i = 0; i < 4; ++i) p.ms[i] = m.stride(i);
  }
  const int64_t es = k.element_size();
  p.k_vec = reinterpret_cast<uintptr_t>(k.const_data_ptr()) % 16 == 0 && g.D * es % 16 == 0 &&
            k.stride(0) * es % 16 == 0 && k.stride(1) * es % 16 == 0 && k.stride(2) * es % 16 == 0;
  p.Hq = g.Hq;
  p.Hkv = g.Hkv;
  p.Lq = g.Lq;
  p.Lk = g.Lk;
  p.D = g.D;
  p.rows = rows;
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(g.D)));
  const AttnPlan a = attention_plan(g.B, g.Hkv, rows, g.Lk, g.D, sm_count(q.get_device()));
  p.splits = static_cast<int>(a.splits);
  p.split_keys = a.split_keys;
  at::Tensor part;
  if (a.splits > 1) {
    part = at::empty({g.B * g.Hkv * rows * a.splits * (g.D + 2)}, q.options().dtype(at::kFloat));
    p.part = part.mutable_data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch_heads = g.B * g.Hkv;
  switch (q.scalar_type()) {
    case at::kHalf:
      C10_CUDA_CHECK(launch_attention<__half>(p, a, batch_heads, stream));
      break;
    case at::kBFloat16:
      C10_CUDA_CHECK(launch_attention<__nv_bfloat16>(p, a, batch_heads, stream));
      break;
    default:
      C10_CUDA_CHECK(launch_attention<float>(p, a, batch_heads, stream));
      break;
  }
  return out;
}

}  // namespace
}  // namespace mlxq::cuda

TORCH_LIBRARY_IMPL(mlxq, CUDA, m) {
  m.impl("decode_attention", &mlxq::cuda::decode_attention_cuda);
}
