// Gather variants of the matmul kernels (mx.gather_qmm): grid z runs over the pairs of the
// broadcast indices, and pair z multiplies x's matrix lhs_indices[z] with the weight's matrix
// rhs_indices[z] into output z. The body is the dense kernel's, given the pair's operands
// (the plan sets batch_ndim = 0, so the dense kernel adds no batch offset of its own); each
// selected matrix is read by the pairs that select it, the others never.
#pragma once

#include "mlxq_utils.h"

namespace mlxq {

// Offsets of pair z's operands: x entry lhs[z] ([M, in_features]), weight matrix rhs[z]
// ([N, K*BITS/32] words, [N, groups] scales/biases), output entry z ([M, out_features]).
struct GatherOffsets {
  long x, w, s, y;
};

template <int BITS>
inline GatherOffsets gather_offsets(constant AffineMatmulParams& p, const device uint* lhs,
                                    const device uint* rhs, uint z) {
  const long row0 = long(rhs[z]) * long(p.N);  // first weight row of the selected matrix
  GatherOffsets o;
  o.x = long(lhs[z]) * long(p.M) * long(p.in_features);
  o.w = row0 * (long(p.K) * BITS / 32);
  o.s = row0 * long(p.groups);
  o.y = long(z) * long(p.M) * long(p.out_features);
  return o;
}

}  // namespace mlxq
