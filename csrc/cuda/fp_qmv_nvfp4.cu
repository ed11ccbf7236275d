// The float-mode decode kernels (fp_qmv.cuh) for nvfp4.
#define MLXQ_FP_MODE kFpNvfp4
#include "cuda/fp_qmv.cuh"
