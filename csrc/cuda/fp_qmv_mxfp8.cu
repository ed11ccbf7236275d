// The float-mode decode kernels (fp_qmv.cuh) for mxfp8.
#define MLXQ_FP_MODE kFpMxfp8
#include "cuda/fp_qmv.cuh"
