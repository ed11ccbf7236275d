// The kernels compiled for AVX2+FMA; chosen at run time only on CPUs that have both.
#if defined(__x86_64__) || defined(_M_X64)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/kernel_table.h"

// Everything defined below this point (the vector helpers and the kernels) targets AVX2+FMA.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define MLXQ_ISA avx2
#define MLXQ_X86_AVX2 1
#include "cpu/kernels.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mlxq::cpu {
const KernelTable& avx2_kernels() { return avx2::table("avx2"); }
}  // namespace mlxq::cpu
#endif
