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

// Reverses each threadgroup's slice through host-bound threadgroup memory: thread i reads what
// thread n-1-i wrote, which only works if the barrier orders the two.
[[kernel]] void reverse_tg(const device float* src [[buffer(0)]], device float* dst [[buffer(1)]],
                           threadgroup float* tg [[threadgroup(0)]],
                           uint gid [[thread_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]],
                           uint n [[threads_per_threadgroup]]) {
  tg[tid] = src[gid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  dst[gid] = tg[n - 1 - tid];
}

// Same through a fixed-size threadgroup array, twice (the array is reused after a barrier).
[[kernel]] void reverse_static(const device float* src [[buffer(0)]],
                               device float* dst [[buffer(1)]],
                               uint2 gid [[thread_position_in_grid]],
                               uint tid [[thread_index_in_threadgroup]],
                               uint2 n [[threads_per_threadgroup]]) {
  threadgroup float buf[(128 + 128)], unused[4];
  const uint count = n.x * n.y;
  const uint g = gid.y * 1000 + gid.x;
  buf[tid] = src[tid] + float(g % 7);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float a = buf[count - 1 - tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  buf[tid] = a * 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  dst[tid + count * (gid.y / n.y)] = buf[(tid + 1) % count];
}

// Every SIMD-group and quad-group collective, 16 results per thread.
[[kernel]] void simd_ops(const device float* x [[buffer(0)]], device float* out [[buffer(1)]],
                         uint gid [[thread_position_in_grid]],
                         ushort lane [[thread_index_in_simdgroup]],
                         ushort qlane [[thread_index_in_quadgroup]]) {
  const float v = x[gid];
  device float* o = out + gid * 16;
  o[0] = simd_sum(v);
  o[1] = simd_max(v);
  o[2] = simd_min(v);
  o[3] = simd_prefix_inclusive_sum(v);
  o[4] = simd_prefix_exclusive_sum(v);
  o[5] = simd_shuffle(v, ushort((lane + 5) % 32));
  o[6] = simd_shuffle_down(v, 3);
  o[7] = simd_shuffle_up(v, 2);
  o[8] = simd_shuffle_xor(v, 7);
  o[9] = simd_broadcast(v, 9);
  o[10] = quad_sum(v);
  o[11] = quad_shuffle(v, ushort(3 - qlane));
  o[12] = quad_shuffle_xor(v, 1);
  o[13] = float(simd_sum(int(lane)));
  o[14] = float(simd_ballot(v > 0.0f).any() ? 1 : 0) + (simd_all(v > -100.0f) ? 2.0f : 0.0f);
  float4 w = float4(v, 2.0f * v, -v, 1.0f);
  o[15] = simd_sum(w).y;
}

// simd_sum over a partial simdgroup: threads past `n` return first, the rest reduce.
[[kernel]] void simd_sum_partial(const device float* x [[buffer(0)]],
                                 device float* out [[buffer(1)]], constant uint& n [[buffer(2)]],
                                 uint gid [[thread_position_in_grid]]) {
  if (gid >= n) {
    return;
  }
  out[gid] = simd_sum(x[gid]);
}

// C (M x N) = A (M x K) * B (K x N) with one simdgroup per 8x8 tile of C; B optionally stored
// transposed (N x K). Inputs of type T, accumulation and output in float.
template <typename T, bool TRANSPOSE_B>
[[kernel]] void sg_matmul(const device T* a [[buffer(0)]], const device T* b [[buffer(1)]],
                          device float* c [[buffer(2)]], constant uint3& mnk [[buffer(3)]],
                          uint2 tg [[threadgroup_position_in_grid]],
                          uint sg [[simdgroup_index_in_threadgroup]]) {
  const uint K = mnk.z, N = mnk.y;
  const uint row = tg.y * 8;
  const uint col = (tg.x * 2 + sg) * 8;
  simdgroup_matrix<float, 8, 8> acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (uint k = 0; k < K; k += 8) {
    simdgroup_matrix<T, 8, 8> ma;
    simdgroup_matrix<T, 8, 8> mb;
    simdgroup_load(ma, a, K, ulong2(k, row));
    if (TRANSPOSE_B) {
      simdgroup_load(mb, b, K, ulong2(k, col), true);
    } else {
      simdgroup_load(mb, b, N, ulong2(col, k));
    }
    simdgroup_multiply_accumulate(acc, ma, mb, acc);
  }
  simdgroup_store(acc, c, N, ulong2(col, row));
}
EMU_INSTANTIATE("sg_matmul_float", sg_matmul, float, false)
EMU_INSTANTIATE("sg_matmul_half", sg_matmul, half, false)
EMU_INSTANTIATE("sg_matmul_bfloat", sg_matmul, bfloat, false)
EMU_INSTANTIATE("sg_matmul_float_bt", sg_matmul, float, true)

// Element-wise arithmetic in T (each operation rounds to T), conversions and bit casts.
template <typename T>
[[kernel]] void arith(const device T* x [[buffer(0)]], device T* y [[buffer(1)]],
                      device float* f [[buffer(2)]], device ushort* bits [[buffer(3)]],
                      uint gid [[thread_position_in_grid]]) {
  const T a = x[gid];
  y[gid] = a * a + a;
  const vec<T, 4> v4 = vec<T, 4>(a, a * T(2), T(0.5f), -a);
  const half hl = 0.25h;  // half literal
  f[gid] = float(hl);
  const float4 f4 = float4(v4);
  f[gid] += f4.x + f4.y + f4.z + f4.w;
  bits[gid] = as_type<ushort>(a);
}
EMU_INSTANTIATE("arith_half", arith, half)
EMU_INSTANTIATE("arith_bfloat", arith, bfloat)

// Cost of collectives: `rounds` simd_sum calls per thread.
[[kernel]] void sum_rounds(device float* x [[buffer(0)]], constant uint& rounds [[buffer(1)]],
                           uint gid [[thread_position_in_grid]]) {
  float v = x[gid];
  for (uint r = 0; r < rounds; ++r) {
    v = simd_sum(v) * 0.03125f;
  }
  x[gid] = v;
}

// MSL's `kernel` keyword instead of the [[kernel]] attribute; 3-D grid builtins.
kernel void grid_ids(device uint4* out [[buffer(0)]], uint3 tpig [[thread_position_in_grid]],
                     uint3 tgpig [[threadgroup_position_in_grid]], uint3 tpg [[threads_per_grid]],
                     uint sgs [[simdgroups_per_threadgroup]],
                     uint width [[threads_per_simdgroup]]) {
  const uint i = (tpig.z * tpg.y + tpig.y) * tpg.x + tpig.x;
  out[i] = uint4(tpig.x, tgpig.y, tgpig.z, sgs * 100 + width);
}

// Which matrix elements each lane holds after simdgroup_load (plain and transposed).
[[kernel]] void sg_layout(const device float* m [[buffer(0)]], device float2* out [[buffer(1)]],
                          ushort lane [[thread_index_in_simdgroup]]) {
  simdgroup_matrix<float, 8, 8> a;
  simdgroup_load(a, m, 8);
  out[lane] = a.thread_elements();
  simdgroup_matrix<float, 8, 8> t;
  simdgroup_load(t, m, 8, ulong2(0, 0), true);
  out[32 + lane] = t.thread_elements();
}

// simdgroup_matrix through threadgroup memory: tile = 2 * I * (tile loaded from device).
[[kernel]] void sg_tg_roundtrip(const device float* src [[buffer(0)]],
                                device float* dst [[buffer(1)]],
                                ushort lane [[thread_index_in_simdgroup]]) {
  threadgroup float tile[64];
  tile[lane] = src[lane];
  tile[lane + 32] = src[lane + 32];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_matrix<float, 8, 8> m;
  simdgroup_load(m, tile, 8);
  const simdgroup_matrix<float, 8, 8> twice(2.0f);
  simdgroup_multiply(m, twice, m);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_store(m, tile, 8);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  dst[lane] = tile[lane];
  dst[lane + 32] = tile[lane + 32];
}

// Division as the runtime-compiled (fast-math) library computes it, and precise::divide.
[[kernel]] void divisions(const device float* a [[buffer(0)]], const device float* b [[buffer(1)]],
                          device float* out [[buffer(2)]], device half* hout [[buffer(3)]],
                          uint gid [[thread_position_in_grid]]) {
  out[3 * gid] = a[gid] / b[gid];
  out[3 * gid + 1] = precise::divide(a[gid], b[gid]);
  out[3 * gid + 2] = precise::divide(float2(a[gid], 1.0f), float2(b[gid], 1.0f)).x;
  hout[2 * gid] = half(a[gid]) / half(b[gid]);
  hout[2 * gid + 1] = precise::divide(half(a[gid]), half(b[gid]));
}
