// x as the bf16 pieces that the bf16 decode kernels read (QmvBf16Args, FpQmvBf16Args), shared
// by the affine and floating-point ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "cpu/kernel_table.h"

namespace mlxq::cpu {

// bf16 pieces whose sum holds a value of dtype `src` exactly (fp32: to fp32 precision).
inline int bf16_piece_count(at::ScalarType src) {
  return src == at::kBFloat16 ? 1 : (src == at::kHalf ? 2 : 3);
}

// The 16-bit values of rows [M, K] in the bf16 kernels' lane order (value l * P + j of a block
// of L * P goes to j * L + l, P = bf16_lane_values): a decode step's bf16 x as its one piece.
inline void bf16_lane_order(const uint16_t* x, int64_t M, int64_t K, int bits, uint16_t* out) {
  const int64_t L = kBf16Lanes;
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = x + m * K;
    uint16_t* orow = out + m * K;
    for (int64_t k0 = 0, P = 0; k0 < K; k0 += L * P) {
      P = bf16_lane_values(k0, K, bits);
      for (int64_t j = 0; j < P; ++j)
        for (int64_t l = 0; l < L; ++l) orow[k0 + j * L + l] = xr[k0 + l * P + j];
    }
  }
}

// x [M, K] (contiguous fp32, bf16 or fp16, holding values of dtype `src`) as the bf16 pieces of
// QmvBf16Args (and FpQmvBf16Args), in the bf16 kernels' order: [pieces * M, K]. One pass in plain
// C++: decode calls are small, and a chain of tensor ops would cost more than the kernel for small
// layers.
template <typename T>
inline void fill_bf16_pieces(const T* xp, int64_t M, int64_t K, int pieces, int bits,
                             c10::BFloat16* op) {
  const int64_t L = kBf16Lanes;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (pieces == 1) {  // bf16 x is its own piece: only the lanes' order changes
      bf16_lane_order(reinterpret_cast<const uint16_t*>(xp), M, K, bits,
                      reinterpret_cast<uint16_t*>(op));
      return;
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k0 = 0, P = 0; k0 < K; k0 += L * P) {
      P = bf16_lane_values(k0, K, bits);
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t j = 0; j < P; ++j) {
          float rest = static_cast<float>(xp[m * K + k0 + l * P + j]);
          for (int p = 0; p < pieces; ++p) {
            const c10::BFloat16 h(rest);  // round to nearest even
            op[(p * M + m) * K + k0 + j * L + l] = h;
            rest -= static_cast<float>(h);  // exact in fp32
          }
        }
      }
    }
  }
}

inline at::Tensor bf16_pieces(const at::Tensor& x, at::ScalarType src, int bits) {
  const int pieces = bf16_piece_count(src);
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({pieces * M, K}, x.options().dtype(at::kBFloat16));
  auto* op = out.mutable_data_ptr<c10::BFloat16>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bf16_pieces", [&] {
    fill_bf16_pieces(x.const_data_ptr<scalar_t>(), M, K, pieces, bits, op);
  });
  return out;
}

}  // namespace mlxq::cpu
