// Compiles as plain C++ but not as MSL: a threadgroup pointer passed where a device pointer is
// expected. The emulator's strict pass must reject it (tests/test_metal_emulator.py).
#include <metal_stdlib>
using namespace metal;

inline void store_twice(device float* dst, float v, uint i) { dst[i] = 2.0f * v; }

[[kernel]] void wrong_address_space(const device float* src [[buffer(0)]],
                                    device float* dst [[buffer(1)]],
                                    uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[32];
  store_twice(buf, src[tid], tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  dst[tid] = buf[tid];
}

// Writes through a pointer to the read-only constant address space.
[[kernel]] void write_to_constant(constant float* params [[buffer(0)]],
                                  uint tid [[thread_index_in_threadgroup]]) {
  params[tid] = 1.0f;
}
