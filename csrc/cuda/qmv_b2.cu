// Decode kernels (y = x @ W.T, M <= 8) for 2-bit weights; see qmv_launch.cuh.
#define MLXQ_QMV_BITS 2
#include "cuda/qmv_launch.cuh"
