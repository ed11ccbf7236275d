// Hopper shared-memory mbarrier operations (PTX), shared by the TMA prefill kernels
// (gemm_sm90.cuh) and the bulk-copy decode (qmv_bulk.cuh). `bar` is a shared-memory address.
#pragma once

#include <stdint.h>

namespace mlxq::cuda {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
namespace mbarrier_ptx {
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t phase) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(phase)
      : "memory");
}
}  // namespace mbarrier_ptx
#endif

}  // namespace mlxq::cuda
