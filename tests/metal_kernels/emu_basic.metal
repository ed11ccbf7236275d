// Small kernels that exercise the MSL emulator's semantics (tests/test_metal_emulator.py).
#include <metal_stdlib>
using namespace metal;

#define EMU_INSTANTIATE(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

template <typename T>
[[kernel]] void copy(const device T* src [[buffer(0)]], device T* dst [[buffer(1)]],
                     constant uint& n [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  if (gid < n) {
    dst[gid] = src[gid];
  }
}
EMU_INSTANTIATE("copy_float", copy, float)
EMU_INSTANTIATE("copy_half", copy, half)
