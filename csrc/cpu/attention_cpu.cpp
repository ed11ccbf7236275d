// CPU kernel of mlxq::decode_attention: argument checks (checks.h), the view of the operands the
// kernels read in place (AttentionArgs), and the parallel split over (batch, kv head), groups of
// query rows and, when that leaves threads idle, blocks of keys merged at the end.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <numeric>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/cpu_features.h"
#include "cpu/kernel_table.h"

namespace mlxq::cpu {
namespace {

// Query rows a task takes at most: its scratch (scores of a chunk, outputs) stays in L1/L2.
constexpr int64_t kMaxRowsPerTask = 32;
// Keys per block at least, when keys are split between threads.
constexpr int64_t kMinBlockKeys = 128;

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

MaskType mask_type_of(at::ScalarType t) {
  switch (t) {
    case at::kBool:
      return MaskType::kBool;
    case at::kHalf:
      return MaskType::kHalf;
    case at::kBFloat16:
      return MaskType::kBFloat16;
    default:
      return MaskType::kFloat;
  }
}

// Key blocks per (unit, row group): 1 when the units keep every thread busy; else enough that the
// tasks divide evenly between the threads, each block at least kMinBlockKeys long.
int64_t key_blocks(int64_t units, int64_t Lk) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || units >= 4 * threads) return 1;
  const int64_t even = threads / std::gcd(units, threads);
  return std::max<int64_t>(1, std::min(even, Lk / kMinBlockKeys));
}

// [first, last) of the keys that some row of a bool mask attends ({0, 0} when none): keys
// outside it add exp(-inf) = 0 to every row, so they need not be read. Transformers' static
// caches mask a tail of unused positions and sliding windows a head of old ones.
std::pair<int64_t, int64_t> attended_keys(const at::Tensor& m) {  // m: [B, Hq, Lq, Lk], expanded
  const int64_t Lk = m.size(3), js = m.stride(3);
  int64_t n[3];  // rows along each dimension, one where the mask is broadcast (stride 0)
  for (int i = 0; i < 3; ++i) n[i] = m.stride(i) == 0 ? 1 : m.size(i);
  const bool* p = m.const_data_ptr<bool>();
  int64_t first = Lk, last = 0;
  for (int64_t b = 0; b < n[0]; ++b)
    for (int64_t h = 0; h < n[1]; ++h)
      for (int64_t l = 0; l < n[2]; ++l) {
        const bool* row = p + b * m.stride(0) + h * m.stride(1) + l * m.stride(2);
        int64_t j = 0;
        while (j < first && !row[j * js]) ++j;
        first = std::min(first, j);
        int64_t e = Lk;
        while (e > last && !row[(e - 1) * js]) --e;
        last = std::max(last, e);
      }
  return first < last ? std::make_pair(first, last) : std::make_pair(int64_t{0}, int64_t{0});
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& mask,
                                std::optional<double> scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const AttentionGeometry g = check_decode_attention(q, k, v, mask, scale);
  at::Tensor out = at::empty({g.B, g.Hq, g.Lq, g.D}, q.options());
  if (out.numel() == 0) return out;
  AttentionArgs a;
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  a.dtype = dtype_of(q.scalar_type());
  a.B = g.B, a.Hq = g.Hq, a.Hkv = g.Hkv, a.Lq = g.Lq, a.Lk = g.Lk, a.D = g.D;
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = q.stride(i);
    a.k_stride[i] = k.stride(i);
    a.v_stride[i] = v.stride(i);
  }
  at::Tensor m;  // keeps the broadcast view alive
  if (mask.has_value()) {
    m = mask->expand({g.B, g.Hq, g.Lq, g.Lk});
    if (m.scalar_type() == at::kBool && g.Lk > 0) {
      const auto [first, last] = attended_keys(m);
      m = m.narrow(3, first, last - first);
      a.k = static_cast<const char*>(a.k) + first * k.stride(2) * k.element_size();
      a.v = static_cast<const char*>(a.v) + first * v.stride(2) * v.element_size();
      a.Lk = last - first;
    }
    a.mask = m.const_data_ptr();
    a.mask_type = mask_type_of(m.scalar_type());
    for (int i = 0; i < 4; ++i) a.mask_stride[i] = a.Lk == 0 ? 0 : m.stride(i);
  }
  a.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(g.D)));
  a.out = out.mutable_data_ptr();
  const int64_t R = a.rows();
  a.row_groups = (R + kMaxRowsPerTask - 1) / kMaxRowsPerTask;
  a.rows_per_group = (R + a.row_groups - 1) / a.row_groups;
  a.blocks = key_blocks(g.B * g.Hkv * a.row_groups, a.Lk);
  a.block_keys = a.Lk == 0 ? 1 : (a.Lk + a.blocks - 1) / a.blocks;
  a.blocks = a.Lk == 0 ? 1 : (a.Lk + a.block_keys - 1) / a.block_keys;
  const KernelTable& kt = active_kernels();
  std::vector<float> parts;
  std::unique_ptr<std::atomic<int64_t>[]> done;
  if (a.blocks > 1) {
    const int64_t slots = g.B * g.Hkv * R * a.blocks, groups = g.B * g.Hkv * a.row_groups;
    parts.resize(slots * (g.D + 2));
    a.part_m = parts.data();
    a.part_l = a.part_m + slots;
    a.part_o = a.part_l + slots;
    done.reset(new std::atomic<int64_t>[groups]);
    for (int64_t i = 0; i < groups; ++i) done[i].store(0, std::memory_order_relaxed);
    a.blocks_done = done.get();
  }
  at::parallel_for(0, a.tasks(), 1, [&](int64_t t0, int64_t t1) { kt.attention(a, t0, t1); });
  return out;
}

}  // namespace

at::Tensor vector_exp_for_tests(const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && x.device().is_cpu(),
                   "mlxq: expects a float32 CPU tensor");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  active_kernels().exp(xc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), xc.numel());
  return y;
}

}  // namespace mlxq::cpu

TORCH_LIBRARY_IMPL(mlxq, CPU, m) { m.impl("decode_attention", &mlxq::cpu::decode_attention_cpu); }
