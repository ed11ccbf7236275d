// Parameter structs shared by the host (csrc/metal_host, the emulator) and the Metal kernels.
// This header compiles as MSL and as plain C++: fixed-width 32-bit ints only, no pointers, no
// Metal types, so the host can memcpy a struct into `setBytes` and the kernel reads the same
// bytes through `constant T& p [[buffer(i)]]`.
#pragma once

#define MLXQ_MAX_BATCH_DIMS 6

// Launch geometry constants shared by the plan and the kernels.
#define MLXQ_QMV_MAX_M 8         // qmv/qvm keep every row of x in registers: M <= this
#define MLXQ_QMV_SIMDGROUPS 2    // simdgroups per qmv threadgroup
#define MLXQ_QMV_ROWS 4          // weight rows per qmv simdgroup
#define MLXQ_QMV_LANE_VALUES 32  // weight values per lane per step (= `bits` uint32 words)
#define MLXQ_QVM_SIMDGROUPS 2    // simdgroups per qvm threadgroup (they split the rows)
#define MLXQ_QVM_COLS 128        // output columns per qvm threadgroup (16 packs of 8)
#define MLXQ_QVM_PHASES 4        // qvm threads per column pack, splitting the rows (64 / 16)
#define MLXQ_QVM_ROW_CHUNK 64    // rows of x/scales staged in threadgroup memory at a time
// qvm threadgroup memory in floats: staged x, staged scales and biases, per-phase partial sums.
#define MLXQ_QVM_TG_FLOATS(gs)                                                             \
  (MLXQ_QMV_MAX_M * MLXQ_QVM_ROW_CHUNK + 2 * MLXQ_QVM_ROW_CHUNK * (MLXQ_QVM_COLS / (gs)) + \
   MLXQ_QVM_PHASES * MLXQ_QMV_MAX_M * MLXQ_QVM_COLS)
#define MLXQ_QMM_BM 32         // qmm tile: rows of x
#define MLXQ_QMM_BN 32         // qmm tile: output columns
#define MLXQ_QMM_BK 32         // qmm tile: reduction step (one quantization group or less)
#define MLXQ_QMM_LD 36         // row pitch (floats) of the threadgroup tiles (padded)
#define MLXQ_QMM_THREADS 128   // 4 simdgroups, 2x2 over the 32x32 output tile
#define MLXQ_QUANT_THREADS 64  // affine_quantize / affine_dequantize: one thread per group
// qmm threadgroup memory in floats: the x tile (reused for the output) and the weight tile
#define MLXQ_QMM_TG_FLOATS (2 * MLXQ_QMM_BM * MLXQ_QMM_LD)

// affine_matmul: y[b] = x[b] @ W[b]^T (transpose) or x[b] @ W[b], W = scales * q + biases.
// The grid's z index is the flat index into the broadcast batch shape; the strides turn it into
// a batch entry of x and of the weight (stride 0 along broadcast dimensions).
struct AffineMatmulParams {
  int M;             // rows of x per batch entry
  int N;             // rows of the packed weight
  int K;             // logical columns of the weight (multiple of group_size)
  int groups;        // K / group_size
  int in_features;   // x.size(-1): K for transpose, N otherwise
  int out_features;  // N for transpose, K otherwise
  int batch;         // number of batch entries (product of batch_shape, 1 for a 2-D weight)
  int batch_ndim;    // dimensions used in the arrays below (0 for a 2-D weight)
  int batch_shape[MLXQ_MAX_BATCH_DIMS];
  int x_batch_strides[MLXQ_MAX_BATCH_DIMS];  // in batch entries of x ([M, in_features] each)
  int w_batch_strides[MLXQ_MAX_BATCH_DIMS];  // in batch entries of the weight ([N, ...] each)
};

// affine_quantize / affine_dequantize over all rows of a (flattened) [rows, K] weight.
struct AffineQuantParams {
  int rows;    // product of the leading dimensions
  int K;       // logical columns
  int groups;  // K / group_size, groups per row (rows * groups < 2^31, checked by the plan)
};
