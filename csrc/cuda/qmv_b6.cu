// Decode kernels (y = x @ W.T, M <= 8) for 6-bit weights; see qmv_launch.cuh.
#define MLXQ_QMV_BITS 6
#include "cuda/qmv_launch.cuh"
