// Body of qmv_b<Bits>.cu: the decode launcher for one bit width (MLXQ_QMV_BITS), which picks
// the kernel's x-row count MT (the next power of two >= M, M <= kDecodeMaxRows) and rows per warp
// R; for 2, 3, 5 and 6 bits it takes the tensor-core kernel of qmv_lowbit.cuh where it applies
// (lowbit_applies).
#pragma once

#include <c10/cuda/CUDAException.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "cuda/launch.h"
#include "cuda/qmv_lowbit.cuh"

#ifndef MLXQ_QMV_BITS
#error "define MLXQ_QMV_BITS before including qmv_launch.cuh"
#endif

namespace mlxq::cuda {
namespace {

template <int MT, int R, int U, bool Prefetch, typename T, bool Gather = false>
void launch_shape(const QmvParams& p, cudaStream_t stream) {
  const int64_t warps = (p.N + R - 1) / R;
  const int64_t blocks = (warps + kDecodeWarps - 1) / kDecodeWarps;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(Gather ? p.pairs : 1));
  qmv_kernel<MLXQ_QMV_BITS, MT, R, U, Prefetch, T, Gather>
      <<<grid, kDecodeWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The M = 1 kernel shape: rows per warp R, chunks per row in flight U, and prefetching.
// "a": R4 U4, "b": R4 U2 prefetch, "c": R2 U4 prefetch, "d": R2 U2 (64 registers: more warps
// per SM). Measured on an H200 (28672x8192, M = 1): bf16/fp16 x is fastest with "d" (4 bits
// 0.059 ms, 8 bits 0.070 ms, "a" 0.061/0.082); fp32 x, whose loads "d" shares over fewer rows,
// with "b" (0.086 ms, "d" 0.131). MLXQ_QMV_VARIANT (read once) overrides it, for benchmarks.
template <typename T>
char qmv_variant() {
  static const char v = [] {
    const char* env = std::getenv("MLXQ_QMV_VARIANT");
    if (env != nullptr && env[0] >= 'a' && env[0] <= 'd') return env[0];
    return std::is_same_v<T, float> ? 'b' : 'd';
  }();
  return v;
}

template <int MT, typename T>
void launch_mt(const QmvParams& p, cudaStream_t stream) {
  // Chunks in flight per row: more for narrow chunks, so each thread keeps ~64 bytes loading.
  constexpr int U = MLXQ_QMV_BITS == 2 ? 8 : (MLXQ_QMV_BITS == 8 ? 2 : 4);
  if constexpr (MT == 1) {
    switch (qmv_variant<T>()) {
      case 'b':
        return launch_shape<1, 4, (U > 1 ? U / 2 : 1), true, T>(p, stream);
      case 'c':
        return launch_shape<1, 2, U, true, T>(p, stream);
      case 'd':
        return launch_shape<1, 2, (U > 1 ? U / 2 : 1), false, T>(p, stream);
      default:
        return launch_shape<1, 4, U, false, T>(p, stream);
    }
  } else {
    // Few rows of x: 4 rows of W per warp share each load of x; more rows of x: 2 keep the
    // accumulators (MT * R) in registers.
    return launch_shape<MT, (MT <= 2 ? 4 : 2), U, false, T>(p, stream);
  }
}

// The gather's kernels (p.rhs set): one shape per MT, the plain matmul's default ones (at M = 1
// 'd' for fp16/bf16 x and 'b' for fp32 x; MLXQ_QMV_VARIANT does not apply).
template <int MT, typename T>
void launch_gather_mt(const QmvParams& p, cudaStream_t stream) {
  constexpr int U = MLXQ_QMV_BITS == 2 ? 8 : (MLXQ_QMV_BITS == 8 ? 2 : 4);
  constexpr int Uh = U > 1 ? U / 2 : 1;
  if constexpr (MT == 1 && std::is_same_v<T, float>) {
    return launch_shape<1, 4, Uh, true, T, true>(p, stream);
  } else if constexpr (MT == 1) {
    return launch_shape<1, 2, Uh, false, T, true>(p, stream);
  } else {
    return launch_shape<MT, (MT <= 2 ? 4 : 2), U, false, T, true>(p, stream);
  }
}

// What the tensor-core choice reads of a device, once per process and device.
struct LowbitDevice {
  int major = 0;
  int sm_count = 0;
  int64_t smem_optin = 0;
};
const LowbitDevice& lowbit_device() {
  static std::array<std::once_flag, 64> once;
  static std::array<LowbitDevice, 64> info;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  TORCH_CHECK(dev >= 0 && dev < 64, "CUDA device index ", dev, " out of range");
  std::call_once(once[dev], [dev] {
    int major = 0, sms = 0, smem = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    info[dev] = {major, sms, smem};
  });
  return info[dev];
}

// The tensor-core kernel (qmv_lowbit.cuh) takes 2, 3 and 6 bits at M <= 2 and 5 bits at M = 2,
// with fp16/bf16 x and scales and biases of that dtype, no gather, compute capability >= 8.0 and
// x in a block's shared memory; where it measured faster than this file's CUDA-core kernel. H200,
// bf16 x, us, lowbit_harness, one run (CUDA-core / tensor-core; M = 1 unless said):
//   28672 x 8192 group 64: 2 bits 82.7 / 48.4, 3 bits 86.7 / 69.2, 5 bits 95.5 / 110.6,
//     6 bits 96.8 / 80.3; group 128: 76.5 / 48.4, 80.7 / 69.4, 84.4 / 110.4, 86.7 / 79.9;
//     group 32: 87.3 / 66.6, 91.4 / 90.6, 106.4 / 119.0, 108.5 / 92.1;
//     fp16 x, group 64: 79.0 / 48.3, 82.1 / 69.5, 92.0 / 109.5, 94.1 / 75.7;
//     M = 2, group 64: 222.9 / 53.0, 136.9 / 76.3, 216.7 / 115.4, 214.5 / 85.5;
//   4096 x 4096 group 64: 10.5 / 7.6, 10.9 / 9.1, 11.3 / 12.4, 11.7 / 10.6;
//   8192 x 28672 group 64: 90.0 / 49.1, 93.5 / 69.3, 119.1 / 113.7, 118.1 / 81.9.
// 5 bits at M = 1 stays on CUDA cores (slower everywhere but the K-split 8192 x 28672; why, not
// yet known: lowbit_harness's "probes" mode is the next run's question). The default since the
// whole of tests/test_cuda_ops.py ran with it on an H200 (through the op, 28672 x 8192 M = 1 g128:
// 2 bits 0.0771 -> 0.0486 ms, 3 bits 0.0816 -> 0.0702, 6 bits 0.0882 -> 0.0813); MLXQ_CUDA_LOWBIT=0
// or MLXQ_CUDA_DECODE=cores (read on every call) keeps the CUDA-core kernel.
bool lowbit_applies(const QmvParams& p, DType x_dtype) {
  constexpr int b = MLXQ_QMV_BITS;
  if constexpr (b == 4 || b == 8) {
    return false;
  } else {
    if (p.rhs != nullptr || p.M > 2 || (b == 5 && p.M < 2) || x_dtype == DType::kFloat) {
      return false;
    }
    const ScaleType want = x_dtype == DType::kHalf ? ScaleType::kHalf : ScaleType::kBFloat16;
    if (p.scale_type != want) return false;
    const char* opt = std::getenv("MLXQ_CUDA_LOWBIT");
    if (opt != nullptr && std::strcmp(opt, "0") == 0) return false;
    const char* env = std::getenv("MLXQ_CUDA_DECODE");
    if (env != nullptr && std::strcmp(env, "cores") == 0) return false;
    const LowbitDevice& dev = lowbit_device();
    return dev.major >= 8 && qmv_lowbit_smem(p.M, p.K, kLowbitSpans<b>) <= dev.smem_optin;
  }
}

template <typename T>
void launch_typed(const QmvParams& p, cudaStream_t stream) {
  if constexpr (MLXQ_QMV_BITS != 4 && MLXQ_QMV_BITS != 8 && !std::is_same_v<T, float>) {
    if (lowbit_applies(p, std::is_same_v<T, __half> ? DType::kHalf : DType::kBFloat16)) {
      launch_qmv_lowbit_typed<MLXQ_QMV_BITS, T>(p, lowbit_device().sm_count, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  if (p.rhs != nullptr) {
    if (p.M <= 1) return launch_gather_mt<1, T>(p, stream);
    if (p.M <= 2) return launch_gather_mt<2, T>(p, stream);
    if (p.M <= 4) return launch_gather_mt<4, T>(p, stream);
    return launch_gather_mt<8, T>(p, stream);
  }
  if (p.M <= 1) return launch_mt<1, T>(p, stream);
  if (p.M <= 2) return launch_mt<2, T>(p, stream);
  if (p.M <= 4) return launch_mt<4, T>(p, stream);
  return launch_mt<8, T>(p, stream);
}

}  // namespace

template <>
void launch_qmv<MLXQ_QMV_BITS>(const QmvParams& p, DType x_dtype, cudaStream_t stream) {
  switch (x_dtype) {
    case DType::kHalf:
      return launch_typed<__half>(p, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, stream);
    default:
      return launch_typed<float>(p, stream);
  }
}

}  // namespace mlxq::cuda
