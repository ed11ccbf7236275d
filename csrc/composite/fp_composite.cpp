// MLX's floating-point modes (mxfp4, nvfp4, mxfp8) as compositions of ATen ops (see
// composite.h): the CPU op's arithmetic (cpu/fp_cpu.cpp, cpu/fp_format.h) restated on tensors,
// step for step, so that quantize and dequantize are bit for bit the CPU op's on any device.
//
// Decoding reads bit fields, with no lookup table to copy to the device (so the matmul can be
// captured in a CUDA graph): an FP4 E2M1 or FP8 E4M3 code's magnitude bits, placed where an fp16
// keeps its low exponent and high mantissa bits, are an fp16 number 2^14 (FP4) or 2^8 (FP8) times
// smaller than the code's value, subnormal codes included; E8M0 is an fp32 exponent field.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "checks.h"
#include "composite/composite.h"
#include "composite/matmul_decoded.h"

namespace mlxq::composite {
namespace {

constexpr int kNvfp4 = 1;  // check_fp_mode's indices: 0 mxfp4, 1 nvfp4, 2 mxfp8

// Values per block of fp_quantize (the FP4 code search holds 16 fp32 differences per value).
constexpr int64_t kQuantizeBlockValues = int64_t{1} << 22;

at::Tensor shl(const at::Tensor& t, int64_t n) { return at::bitwise_left_shift(t, n); }
at::Tensor shr(const at::Tensor& t, int64_t n) { return at::bitwise_right_shift(t, n); }
at::Tensor band(const at::Tensor& t, int64_t m) { return at::bitwise_and(t, m); }

// `v` (fp32) rounded to `t` (nearest even) and back to fp32, as the CPU op's scalar c10
// conversions round: those make every bfloat16 NaN positive, where ATen's vectorized conversion
// keeps the sign (which FP8 saturation would carry into the code).
at::Tensor round_to(const at::Tensor& v, at::ScalarType t) {
  if (t == at::kFloat) return v;
  const at::Tensor r = v.to(t).to(at::kFloat);
  if (t != at::kBFloat16) return r;
  return at::where(r.isnan(), std::numeric_limits<float>::quiet_NaN(), r);
}

// A 0-dim fp32 tensor on `like`'s device: dividing by it is IEEE division on every device (CUDA
// turns division by a host scalar into multiplication by its rounded reciprocal).
at::Tensor constant(double v, const at::Tensor& like) {
  return at::full({}, v, like.options().dtype(at::kFloat));
}

// FP4 E2M1 codes (int32, 0..15; bit 3 the sign) to fp32.
at::Tensor fp4_values(const at::Tensor& codes) {
  const at::Tensor h = shl(band(codes, 7), 9).to(at::kShort).view(at::kHalf);
  const at::Tensor mag = h.to(at::kFloat) * 16384.0;
  return at::where(band(codes, 8).ne(0), -mag, mag);
}

// FP8 E4M3 bytes (int32) to fp32; 0x7F and 0xFF are NaN (no infinities).
at::Tensor e4m3_values(const at::Tensor& b) {
  const at::Tensor m = band(b, 0x7F);
  const at::Tensor mag = shl(m, 7).to(at::kShort).view(at::kHalf).to(at::kFloat) * 256.0;
  const at::Tensor v = at::where(band(b, 0x80).ne(0), -mag, mag);
  return at::where(m.eq(0x7F), std::numeric_limits<float>::quiet_NaN(), v);
}

// E8M0 scale bytes (int32) to fp32: 2^(s-127), 0 the subnormal 2^-127, 255 infinity.
at::Tensor e8m0_values(const at::Tensor& s) {
  return at::where(s.eq(0), 0x00400000, shl(s, 23)).to(at::kInt).view(at::kFloat);
}

// The scale bytes of a mode as fp32.
at::Tensor scale_values(const at::Tensor& scales, int mode) {
  const at::Tensor s = scales.to(at::kInt);
  return mode == kNvfp4 ? e4m3_values(s) : e8m0_values(s);
}

// The fp32 values of a packed weight [..., Kp] (uint32/int32): [..., K]. The bytes in memory
// order are the little-endian bit stream; an FP4 byte holds two codes, low nibble first.
at::Tensor element_values(const at::Tensor& wq, int64_t bits) {
  const at::Tensor b = wq.contiguous().view(at::kInt).view(at::kByte).to(at::kInt);
  if (bits == 8) return e4m3_values(b);
  return fp4_values(at::stack({band(b, 15), shr(b, 4)}, -1).flatten(-2));
}

// value * scale per group: values [..., K] fp32, scale [..., G] fp32.
at::Tensor apply_scales(const at::Tensor& values, const at::Tensor& scale, int64_t group_size) {
  const int64_t G = scale.size(-1);
  return (values.unflatten(-1, {G, group_size}) * scale.unsqueeze(-1)).flatten(-2);
}

// global_scale / (448*6) as fp_cpu.cpp computes it (one fp32 division), a 0-dim tensor.
at::Tensor global_factor(const at::Tensor& global_scale) {
  const at::Tensor g = global_scale.reshape({});
  return g / constant(2688.0, g);
}

// The fp32 weight fp_matmul multiplies (the CPU op's: value * (scale * factor), exact without a
// global scale): [..., N, K] for wq [..., N, Kp].
at::Tensor matmul_weight(const at::Tensor& wq, const at::Tensor& scales, int mode,
                         int64_t group_size, int64_t bits, const at::Tensor& factor) {
  at::Tensor s = scale_values(scales, mode);
  if (factor.defined()) s = s * factor;
  return apply_scales(element_values(wq, bits), s, group_size);
}

// --- quantize: fp_format.h's quantize_fp_group on tensors --------------------------------------

// FP8 E4M3 code of fp32 `f` (int64): nearest even, saturating at 448 (0x7E) from 464 on and for
// inf/NaN, sign kept; below 2^-6 rounded on the 2^-9 grid by adding 2^14 in fp32.
at::Tensor e4m3_code(const at::Tensor& f) {
  const at::Tensor bits = f.contiguous().view(at::kInt).to(at::kLong);
  const at::Tensor u = band(bits, 0x7FFFFFFF);
  const at::Tensor sub = (f.abs() + 16384.0).view(at::kInt).to(at::kLong) - (int64_t{141} << 23);
  const at::Tensor normal = shr(u - (int64_t{120} << 23) + 0x7FFFF + band(shr(u, 20), 1), 20);
  const at::Tensor mag =
      at::where(u.ge(int64_t{543} << 21), 0x7E, at::where(u.lt(int64_t{121} << 23), sub, normal));
  return at::bitwise_or(mag, at::where(bits.lt(0), 0x80, 0));
}

// ceil(log2(s)) for fp32 s >= 0 from its bit fields (int32): 0 for s = 0 and for infinity (as
// std::frexp's exponent on glibc, which the CPU op reads).
at::Tensor ceil_log2(const at::Tensor& s) {
  auto of_normal = [](const at::Tensor& u) {  // exponent, plus one if any mantissa bit is set
    return shr(u, 23) - 127 + band(u, 0x7FFFFF).ne(0).to(at::kInt);
  };
  const at::Tensor u = band(s.contiguous().view(at::kInt), 0x7FFFFFFF);
  const at::Tensor exponent = shr(u, 23);
  // a subnormal is its mantissa times 2^-149; the mantissa converts to fp32 exactly
  const at::Tensor sub = of_normal(band(u, 0x7FFFFF).to(at::kFloat).view(at::kInt)) - 149;
  const at::Tensor e = at::where(exponent.eq(0), sub, of_normal(u));
  return at::where(u.eq(0) | exponent.eq(255), 0, e).to(at::kInt);
}

// 2^e as fp32 for integer e in [-149, 128] (subnormals exact, 128 is infinity).
at::Tensor pow2(const at::Tensor& e) {
  const at::Tensor normal = shl((e + 127).clamp(0, 255), 23);
  const at::Tensor sub = at::bitwise_left_shift(at::ones_like(e), (e + 149).clamp(0, 30));
  return at::where(e.ge(-126), normal, sub).to(at::kInt).view(at::kFloat);
}

// The FP4 code of each v (int64): the first of the 16 table values with the least
// |v - value|, differences rounded to `vt` (as MLX's argmin sees them); NaN gives code 0.
at::Tensor fp4_code(const at::Tensor& v, at::ScalarType vt) {
  const at::Tensor table = fp4_values(at::arange(16, v.options().dtype(at::kInt)));
  at::Tensor d = round_to(v.unsqueeze(-1) - table, vt).abs();
  d = at::where(d.isnan(), std::numeric_limits<float>::infinity(), d);  // argmin picks NaN first
  return d.argmin(-1);
}

// Quantizes groups wg [n, G, group_size] (fp32 holding values of dtype t) into packed bytes
// [n, G * group_size * bits / 8] and scale bytes [n, G] (uint8).
std::tuple<at::Tensor, at::Tensor> quantize_groups(const at::Tensor& wg, int mode, int64_t bits,
                                                   at::ScalarType t, const at::Tensor& enc) {
  // amax over |w|, NaN ignored (std::max keeps the running maximum against a NaN)
  const at::Tensor a = wg.abs();
  const at::Tensor amax = at::where(a.isnan(), 0.0, a).amax(-1, /*keepdim=*/true);
  const at::Tensor s = round_to(amax / constant(bits == 8 ? 448.0 : 6.0, wg), t);
  at::Tensor divisor, scale_byte;
  if (mode == kNvfp4) {
    scale_byte = e4m3_code(enc.defined() ? s * enc : s);
    divisor = round_to(e4m3_values(scale_byte.to(at::kInt)), t);
  } else {
    const at::Tensor e = ceil_log2(s);
    scale_byte = band(e + 127, 0xFF);  // wraps below 2^-127 as MLX's uint8 cast does
    divisor = round_to(pow2(e), t);
  }
  at::Tensor v = round_to(wg / divisor, t);
  if (mode == kNvfp4 && enc.defined()) v = v * enc;  // promotes the elements to fp32
  const int64_t n = wg.size(0);
  at::Tensor packed;
  if (bits == 8) {
    packed = e4m3_code(v).reshape({n, -1});
  } else {
    const at::Tensor c = fp4_code(v, mode == kNvfp4 ? at::kFloat : t).reshape({n, -1, 2});
    packed = at::bitwise_or(c.select(-1, 0), shl(c.select(-1, 1), 4));
  }
  return {packed.to(at::kByte), scale_byte.reshape({n, -1}).to(at::kByte)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fp_quantize(const at::Tensor& w, c10::string_view mode,
                                               int64_t group_size, int64_t bits,
                                               const c10::optional<at::Tensor>& global_scale) {
  const int m = check_fp_mode(mode, group_size, bits);
  check_fp_quantize_input(w, group_size);
  check_fp_global_scale(global_scale, m, w.device());
  const c10::DeviceGuard device(w.device());
  const int64_t K = w.size(-1), G = K / group_size, R = w.numel() / K;
  std::vector<int64_t> qshape(w.sizes().begin(), w.sizes().end());
  std::vector<int64_t> sshape = qshape;
  qshape.back() = packed_cols(K, bits);
  sshape.back() = G;
  at::Tensor packed = at::empty({R, K * bits / 8}, w.options().dtype(at::kByte));
  at::Tensor s = at::empty({R, G}, w.options().dtype(at::kByte));
  at::Tensor enc;  // nvfp4 with a global scale: 2688 / global_scale (fp32)
  if (global_scale.has_value()) {
    const at::Tensor g = global_scale->reshape({});
    enc = constant(2688.0, g) / g;
  }
  const at::Tensor wf = w.to(at::kFloat).reshape({R, G, group_size});
  const int64_t block = std::max<int64_t>(1, kQuantizeBlockValues / K);
  for (int64_t r0 = 0; r0 < R; r0 += block) {
    const int64_t n = std::min(block, R - r0);
    auto [q, sb] = quantize_groups(wf.narrow(0, r0, n), m, bits, w.scalar_type(), enc);
    packed.narrow(0, r0, n).copy_(q);
    s.narrow(0, r0, n).copy_(sb);
  }
  return {packed.view(at::kUInt32).reshape(qshape), s.reshape(sshape)};
}

at::Tensor fp_dequantize(const at::Tensor& wq, const at::Tensor& scales, c10::string_view mode,
                         int64_t group_size, int64_t bits,
                         const c10::optional<at::Tensor>& global_scale,
                         c10::optional<at::ScalarType> dtype) {
  const int m = check_fp_mode(mode, group_size, bits);
  const PackedGeometry g = check_fp_packed(wq, scales, group_size, bits, /*min_dim=*/1);
  check_fp_global_scale(global_scale, m, wq.device());
  const at::ScalarType requested = check_fp_dequantize_dtype(dtype);
  // As mx.dequantize: the float32 global scale promotes the result to float32.
  const at::ScalarType out_dtype = global_scale.has_value() ? at::kFloat : requested;
  const c10::DeviceGuard device(wq.device());
  std::vector<int64_t> shape(wq.sizes().begin(), wq.sizes().end());
  shape.back() = g.cols;
  if (wq.numel() == 0) return at::empty(shape, wq.options().dtype(out_dtype));
  // mx.dequantize's CPU graph: the scale rounded to the output dtype (the element values are
  // exact in every float dtype), times the global factor in fp32, the product in fp32 rounded
  // once to the output dtype.
  at::Tensor s = round_to(scale_values(scales, m), requested);
  if (global_scale.has_value()) s = s * global_factor(*global_scale);
  return apply_scales(element_values(wq, bits), s, group_size).to(out_dtype).reshape(shape);
}

at::Tensor fp_matmul(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                     c10::string_view mode, int64_t group_size, int64_t bits, bool transpose,
                     const c10::optional<at::Tensor>& global_scale) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // autograd.cpp owns the gradient
  const int m = check_fp_mode(mode, group_size, bits);
  const MatmulGeometry g = check_fp_matmul(x, wq, scales, group_size, bits, transpose);
  check_fp_global_scale(global_scale, m, wq.device());
  if (x.numel() == 0 || wq.numel() == 0) return at::zeros(g.out_shape, x.options());
  const c10::DeviceGuard device(x.device());
  const at::Tensor factor = global_scale.has_value() ? global_factor(*global_scale) : at::Tensor();
  return matmul_decoded(x, g, transpose, [&](int64_t n0, int64_t n) {
    const bool all = n0 == 0 && n == g.w.rows;
    return matmul_weight(all ? wq : wq.narrow(-2, n0, n), all ? scales : scales.narrow(-2, n0, n),
                         m, group_size, bits, factor);
  });
}

}  // namespace mlxq::composite
