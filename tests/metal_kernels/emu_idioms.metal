// Common MSL idioms the emulator's shim must compile with Metal's meaning
// (tests/test_metal_emulator.py::test_msl_idioms). One thread writes 34 results.
#include <metal_stdlib>
using namespace metal;

constant constexpr int kScale = 3;

struct Pair {
  int a;
  float b;
};

[[kernel]] void idioms(const device float4* x [[buffer(0)]], device float* out [[buffer(1)]],
                       constant Pair& pair [[buffer(2)]]) {
  const float4 v = x[0];
  const float4 w = x[1];
  int k = 0;
  // Vector construction, swizzles, conversions (not bit casts).
  float4 s = 0;
  s.xy = v.yx;
  s.zw = float2(1.5f);
  out[k++] = s.x + 10 * s.y + 100 * s.z + 1000 * s.w;
  const uint4 u = uint4(abs(v) * 2.0f);  // converts (2, 4, 1, 6), no bit cast
  out[k++] = float(u.x + u.y + u.z + u.w);
  const half4 h = half4(v);
  out[k++] = float(h.w);
  const float3 f3 = float3(v.xy, 7.0f);
  out[k++] = f3.z + f3.x;
  const int2 neg = int2(-1);
  out[k++] = float(neg.x + neg.y);
  // Comparisons and select.
  const float4 mx = select(v, w, v < w);
  out[k++] = mx.x + mx.y + mx.z + mx.w;
  out[k++] = all(v < w + 100.0f) ? 1.0f : 0.0f;
  out[k++] = any(v > 1e9f) ? 1.0f : 0.0f;
  // Math.
  out[k++] = dot(v, w);
  out[k++] = metal::min(v.x, w.x) + max(v.y, w.y);
  out[k++] = clamp(v.z, 0.0f, 1.0f);
  out[k++] = fma(v.x, w.x, 1.0f);
  out[k++] = precise::divide(v.x, w.y);
  out[k++] = rint(2.5f) + round(2.5f) + floor(-1.5f) + ceil(-1.5f);
  out[k++] = float(abs(-7)) + fabs(-0.25f) + abs(-0.5f);
  out[k++] = as_type<float>(0x3f800000u);
  out[k++] = float(as_type<uint>(1.0f) >> 23);
  out[k++] = float(numeric_limits<half>::max());
  out[k++] = float(numeric_limits<int>::min());
  out[k++] = exp2(3.0f) + sqrt(16.0f) + rsqrt(4.0f);
  out[k++] = float(kScale * pair.a) + pair.b;
  out[k++] = float(1.5h) * 2.0f;
  const bfloat bh = bfloat(h.y);
  out[k++] = float(bh);
  out[k++] = float(popcount(0xF0F0u)) + float(clz(1u)) + float(ctz(8u));
  out[k++] = static_cast<float>(half(0.1f));
  const float2 g = static_cast<float2>(h.xy);
  out[k++] = g.x - g.y;
  out[k++] = float(uint(-1.0f * 0.0f)) + float(ushort(65535));
  uint2 p = uint2(3, 4);
  p.xy = p.yx;
  out[k++] = float(p.x * 10 + p.y);
  out[k++] = float(select(0, 5, true));
  out[k++] = mix(0.0f, 10.0f, 0.25f);
  out[k++] = float(max3(1, 9, 4));
  out[k++] = float(sizeof(half3)) + 100.0f * float(sizeof(float3));
  out[k++] = float(static_cast<bfloat>(h.x)) + float(half(bh));  // half <-> bfloat
  const uint4 cu = (uint4)(abs(v) * 2.0f);                       // C-style: converts too
  out[k++] = float(cu.x + cu.y + cu.z + cu.w) + float(((uint2)0x10u).x);
}
