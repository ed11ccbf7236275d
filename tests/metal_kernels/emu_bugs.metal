// Kernels with planted bugs that the MSL emulator must report (tests/test_metal_emulator.py).
#include <metal_stdlib>
using namespace metal;

// Writes one element past the end of dst (the last thread).
[[kernel]] void oob_write(const device float* src [[buffer(0)]], device float* dst [[buffer(1)]],
                          uint gid [[thread_position_in_grid]]) {
  dst[gid + 1] = src[gid];
}

// Reads one element before the start of src (thread 0).
[[kernel]] void oob_read(const device float* src [[buffer(0)]], device float* dst [[buffer(1)]],
                         uint gid [[thread_position_in_grid]]) {
  dst[gid] = src[int(gid) - 1];
}

// Missing barrier: thread i reads the slot thread i+1 writes.
[[kernel]] void missing_barrier(const device float* src [[buffer(0)]],
                                device float* dst [[buffer(1)]],
                                threadgroup float* tg [[threadgroup(0)]],
                                uint tid [[thread_index_in_threadgroup]],
                                uint n [[threads_per_threadgroup]]) {
  tg[tid] = src[tid];
  dst[tid] = tg[(tid + 1) % n];
}

// Race: after the barrier, thread i reads slot i+1 and then overwrites its own slot, which
// thread i-1 read in the same barrier interval (write-after-read).
[[kernel]] void war_race(const device float* src [[buffer(0)]], device float* dst [[buffer(1)]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint n [[threads_per_threadgroup]]) {
  threadgroup float buf[64];
  buf[tid] = src[tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float v = buf[(tid + 1) % n];
  buf[tid] = v * 2.0f;
  dst[tid] = v;
}

// Half the simdgroup sums, the other half takes the maximum.
[[kernel]] void divergent_collective(const device float* src [[buffer(0)]],
                                     device float* dst [[buffer(1)]],
                                     uint lane [[thread_index_in_simdgroup]]) {
  float v = src[lane];
  if (lane < 16) {
    v = simd_sum(v);
  } else {
    v = simd_max(v);
  }
  dst[lane] = v;
}

// Threads of the second simdgroup leave before the barrier the others wait at.
[[kernel]] void exit_before_barrier(const device float* src [[buffer(0)]],
                                    device float* dst [[buffer(1)]],
                                    uint tid [[thread_index_in_threadgroup]]) {
  if (tid >= 32) {
    return;
  }
  threadgroup float buf[64];
  buf[tid] = src[tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  dst[tid] = buf[31 - tid];
}

// A collective in a loop whose trip count depends on the lane.
[[kernel]] void divergent_loop(const device float* src [[buffer(0)]],
                               device float* dst [[buffer(1)]],
                               uint lane [[thread_index_in_simdgroup]]) {
  float v = src[lane];
  for (uint i = 0; i < 1 + lane % 2; ++i) {
    v = simd_sum(v);
  }
  dst[lane] = v;
}

// Dereferences a pointer that is not derived from any buffer.
[[kernel]] void wild_pointer(device float* dst [[buffer(0)]], constant ulong& addr [[buffer(1)]],
                             uint gid [[thread_position_in_grid]]) {
  device float* p = (device float*)addr;
  dst[gid] = p[gid];
}

// Unbounded recursion overflows the thread's stack.
inline float deep(thread float* v, uint n) {
  float local[64];
  for (int i = 0; i < 64; ++i) {
    local[i] = v[i % 4] + float(n);
  }
  return n == 0 ? local[3] : deep(local, n + 1) + local[n % 64];
}

[[kernel]] void stack_overflow(device float* dst [[buffer(0)]],
                               uint gid [[thread_position_in_grid]]) {
  float v[4] = {1, 2, 3, 4};
  dst[gid] = deep(v, 1);
}

// Every threadgroup writes the same output element.
[[kernel]] void overlapping_tiles(device float* dst [[buffer(0)]],
                                  uint tg [[threadgroup_position_in_grid]],
                                  uint tid [[thread_index_in_threadgroup]]) {
  dst[tid] = float(tg);
}

// Threadgroup 1 reads what threadgroup 0 wrote.
[[kernel]] void cross_threadgroup_read(device float* buf [[buffer(0)]],
                                       uint tg [[threadgroup_position_in_grid]],
                                       uint tid [[thread_index_in_threadgroup]]) {
  if (tg == 0) {
    buf[tid] = 1.0f;
  } else {
    buf[32 + tid] = buf[tid];
  }
}

// reverse_tg with an execution-only barrier: mem_none does not order threadgroup memory.
[[kernel]] void mem_none_barrier(const device float* src [[buffer(0)]],
                                 device float* dst [[buffer(1)]],
                                 threadgroup float* tg [[threadgroup(0)]],
                                 uint gid [[thread_position_in_grid]],
                                 uint tid [[thread_index_in_threadgroup]],
                                 uint n [[threads_per_threadgroup]]) {
  tg[tid] = src[gid];
  threadgroup_barrier(mem_flags::mem_none);
  dst[gid] = tg[n - 1 - tid];
}

// Threadgroup memory ordered by a device-only barrier.
[[kernel]] void wrong_flags_barrier(const device float* src [[buffer(0)]],
                                    device float* dst [[buffer(1)]],
                                    uint tid [[thread_index_in_threadgroup]],
                                    uint n [[threads_per_threadgroup]]) {
  threadgroup float buf[64];
  buf[tid] = src[tid];
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_texture);
  dst[tid] = buf[n - 1 - tid];
}

// Lanes of one simdgroup exchange through threadgroup memory; `flags` selects the barrier
// (0: simdgroup_barrier(mem_none), a bug; 1: mem_threadgroup, correct).
[[kernel]] void simd_exchange(const device float* src [[buffer(0)]],
                              device float* dst [[buffer(1)]], constant uint& flags [[buffer(2)]],
                              uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float buf[32];
  buf[lane] = src[lane];
  if (flags == 1) {
    simdgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    simdgroup_barrier(mem_flags::mem_none);
  }
  dst[lane] = buf[31 - lane];
}

// Every thread of the threadgroup writes the same output element (write/write race in one
// threadgroup).
[[kernel]] void device_write_race(const device float* src [[buffer(0)]],
                                  device float* dst [[buffer(1)]],
                                  uint tid [[thread_index_in_threadgroup]]) {
  dst[0] = src[tid];
}

// Threads exchange through device memory; `flags` selects the barrier (0: mem_threadgroup, a
// bug for device memory; 1: mem_device, correct).
[[kernel]] void device_exchange(device float* buf [[buffer(0)]], device float* dst [[buffer(1)]],
                                constant uint& flags [[buffer(2)]],
                                uint tid [[thread_index_in_threadgroup]],
                                uint n [[threads_per_threadgroup]]) {
  buf[tid] = float(tid);
  if (flags == 1) {
    threadgroup_barrier(mem_flags::mem_device);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  dst[tid] = buf[(tid + 1) % n];
}

// A thread-private array one element too short: the last iteration writes xs[31].
[[kernel]] void private_overflow(const device float* src [[buffer(0)]],
                                 device float* dst [[buffer(1)]], constant uint& n [[buffer(2)]],
                                 uint gid [[thread_position_in_grid]]) {
  float xs[31];
  for (uint i = 0; i < n; ++i) {
    xs[i] = src[gid * n + i];
  }
  float acc = 0.0f;
  for (uint i = 0; i < n; ++i) {
    acc += xs[i] * float(i);
  }
  dst[gid] = acc;
}
