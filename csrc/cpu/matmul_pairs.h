// Which x matrix multiplies which weight matrix, for the CPU matmuls with a stack of weights
// (affine_cpu.cpp, fp_cpu.cpp). The gather ops: output pair p multiplies x matrix lhs[p]
// ([M, in]) with matrix rhs[p] of the quantized stack (an expert). Pairs that share an expert
// form one group whose x rows are stacked, so each selected expert's packed rows are read once
// per call however many tokens chose it, and experts nobody chose are never touched. The plain
// matmuls with a batched weight: broadcast_batch_matmul, entry by entry.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"

namespace mlxq::cpu {

struct ExpertGroup {
  int64_t expert;  // index into the batch of wq
  int64_t begin;   // first position of the group in `order`
  int64_t count;   // pairs in the group
};

// Pairs grouped by expert: `order` lists pair indices group after group. With sorted_indices
// the runs of equal indices are taken as they come (still correct if the hint is wrong: a run
// that reappears is only a second group); otherwise a stable sort by expert.
inline std::vector<ExpertGroup> group_pairs(const int64_t* rhs, int64_t P, bool sorted,
                                            std::vector<int64_t>& order) {
  order.resize(P);
  for (int64_t p = 0; p < P; ++p) order[p] = p;
  if (!sorted)
    std::stable_sort(order.begin(), order.end(),
                     [rhs](int64_t a, int64_t b) { return rhs[a] < rhs[b]; });
  std::vector<ExpertGroup> groups;
  for (int64_t j = 0; j < P; ++j) {
    if (j == 0 || rhs[order[j]] != rhs[order[j - 1]]) groups.push_back({rhs[order[j]], j, 0});
    groups.back().count += 1;
  }
  return groups;
}

// The rows of the stacked x ([x_batch * M, in]) that group `e` multiplies, pair after pair.
inline std::vector<int64_t> group_rows(const ExpertGroup& e, const std::vector<int64_t>& order,
                                       const int64_t* lhs, int64_t M) {
  std::vector<int64_t> rows;
  rows.reserve(e.count * M);
  for (int64_t j = e.begin; j < e.begin + e.count; ++j)
    for (int64_t m = 0; m < M; ++m) rows.push_back(lhs[order[j]] * M + m);
  return rows;
}

// Rows `rows` of the 2-D contiguous `src`, stacked into a new tensor (plain copies).
inline at::Tensor take_rows(const at::Tensor& src, const std::vector<int64_t>& rows) {
  const int64_t width = src.size(1);
  at::Tensor out = at::empty({static_cast<int64_t>(rows.size()), width}, src.options());
  const auto* sp = static_cast<const uint8_t*>(src.const_data_ptr());
  auto* op = static_cast<uint8_t*>(out.mutable_data_ptr());
  const int64_t row_bytes = width * src.element_size();
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(op + static_cast<int64_t>(i) * row_bytes, sp + rows[i] * row_bytes, row_bytes);
  return out;
}

// y [P * M, out] (pairs in `order`, M rows each) as [P, M, out] in pair order.
inline at::Tensor in_pair_order(const at::Tensor& y, const std::vector<int64_t>& order, int64_t M) {
  const int64_t P = static_cast<int64_t>(order.size());
  at::Tensor result = y.view({P, M, y.size(1)});
  bool identity = true;
  for (int64_t j = 0; j < P && identity; ++j) identity = order[j] == j;
  if (identity) return result;
  at::Tensor inverse = at::empty({P}, y.options().dtype(at::kLong));
  int64_t* ip = inverse.mutable_data_ptr<int64_t>();
  for (int64_t j = 0; j < P; ++j) ip[order[j]] = j;
  return result.index_select(0, inverse);
}

// A matmul with a batched weight (affine_matmul, fp_matmul): output entry i of the broadcast
// batch is product(x entry [M, in], index of the weight entry) -> [M, out]. Each entry is
// mapped to its x and w entries with tiny index tensors, so that broadcasting never copies a
// weight. `xf`: x in fp32, contiguous; the result is fp32 [batch entries, M, out].
template <typename Product>
at::Tensor broadcast_batch_matmul(const at::Tensor& xf, const MatmulGeometry& g, Product product) {
  auto batch_index = [&](at::IntArrayRef shape) {
    const int64_t n = c10::multiply_integers(shape);
    return at::arange(n, at::kLong).reshape(shape).expand(g.batch).reshape({-1}).contiguous();
  };
  const at::Tensor xi = batch_index(xf.sizes().slice(0, xf.dim() - 2));
  const at::Tensor wi = batch_index(g.w.batch);
  const at::Tensor x3 = xf.reshape({-1, g.M, g.in_features});
  const int64_t B = xi.size(0);
  at::Tensor y = at::empty({B, g.M, g.out_features}, xf.options());
  const int64_t* xip = xi.const_data_ptr<int64_t>();
  const int64_t* wip = wi.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) y[i].copy_(product(x3[xip[i]], wip[i]));
  return y;
}

}  // namespace mlxq::cpu
