// The float-mode decode kernels (fp_qmv.cuh) for mxfp4.
#define MLXQ_FP_MODE kFpMxfp4
#include "cuda/fp_qmv.cuh"
