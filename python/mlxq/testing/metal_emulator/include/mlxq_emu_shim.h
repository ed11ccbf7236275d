// MSL vocabulary mapped onto clang C++ for the MSL emulator (`<metal_stdlib>` resolves here).
//
// Modes: MLXQ_EMU_PREPROCESS (the `clang -E` pass whose output the emulator parses: MSL address
// spaces and attributes are kept as tokens), MLXQ_EMU_STRICT (syntax-only pass: device, constant
// and threadgroup become distinct clang address spaces), otherwise the executable mode.
#pragma once

#ifndef __METAL_VERSION__
#define __METAL_VERSION__ 310
#endif
#define __HAVE_BFLOAT__ 1
#define __HAVE_SIMDGROUP_MATRIX__ 1
#define METAL_FUNC inline __attribute__((always_inline))
#define METAL_CONST constexpr constant
#define MLXQ_EMULATOR 1

#ifndef MLXQ_EMU_PREPROCESS

#include "mlxq_emu_runtime.h"

#ifdef MLXQ_EMU_STRICT
#define device __attribute__((address_space(1)))
// `constant` memory is read-only in MSL.
#define constant const __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define MLXQ_TG_VAR static __attribute__((address_space(3)))
#else
#define device
#define constant
#define threadgroup
// `threadgroup T buf[N];` inside a kernel: one instance shared by the threadgroup's fibers, in a
// section the runtime watches for unwritten reads and races.
#define MLXQ_TG_VAR static __attribute__((section("mlxq_tg")))
#endif
#define thread
#define threadgroup_imageblock
#define ray_data
#define object_data

// ---------------------------------------------------------------------------------------------
// Scalar and vector types.
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __bf16 bfloat;
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
typedef __UINTPTR_TYPE__ uintptr_t;
typedef __INTPTR_TYPE__ intptr_t;

#define MLXQ_VEC(T, name)                                \
  typedef T name##2 __attribute__((ext_vector_type(2))); \
  typedef T name##3 __attribute__((ext_vector_type(3))); \
  typedef T name##4 __attribute__((ext_vector_type(4))); \
  typedef T name##8 __attribute__((ext_vector_type(8))); \
  typedef T name##16 __attribute__((ext_vector_type(16)));
MLXQ_VEC(float, float)
MLXQ_VEC(half, half)
MLXQ_VEC(bfloat, bfloat)
MLXQ_VEC(int, int)
MLXQ_VEC(uint, uint)
MLXQ_VEC(short, short)
MLXQ_VEC(ushort, ushort)
MLXQ_VEC(char, char)
MLXQ_VEC(uchar, uchar)
MLXQ_VEC(long, long)
MLXQ_VEC(ulong, ulong)
MLXQ_VEC(bool, bool)
#undef MLXQ_VEC

namespace mlxq_emu {

template <class T>
struct vt {
  static constexpr int n = 0;  // 0: scalar
  using elem = T;
};
template <class T, int N>
struct vt<T __attribute__((ext_vector_type(N)))> {
  static constexpr int n = N;
  using elem = T;
};
template <class T>
struct vt<const T> : vt<T> {};

template <class T, int N>
using vec = T __attribute__((ext_vector_type(N)));

// half <-> bfloat has no direct conversion in clang; MSL allows it (exact through float).
template <class E, class S>
inline E cvt(S x) {
  constexpr bool f16 = __is_same(S, _Float16) || __is_same(S, __bf16);
  constexpr bool t16 = __is_same(E, _Float16) || __is_same(E, __bf16);
  if constexpr (f16 && t16 && !__is_same(E, S))
    return (E)(float)x;
  else
    return (E)x;
}

template <class E, class A>
inline void put(E* out, int& k, A a) {
  if constexpr (vt<A>::n == 0) {
    out[k++] = cvt<E>(a);
  } else {
    for (int i = 0; i < vt<A>::n; ++i) out[k++] = cvt<E>(a[i]);
  }
}

// MSL vector constructors: `float4(x)` splats, `float4(h4)` converts element-wise,
// `float4(a.xy, b, c)` concatenates (the emulator rewrites such constructor calls to make_vec).
template <class V, class... A>
inline V make_vec(A... a) {
  using E = typename vt<V>::elem;
  constexpr int N = vt<V>::n;
  if constexpr (N == 0) {
    static_assert(sizeof...(A) == 1, "scalar constructor takes one value");
    return cvt<V>(a...);
  } else if constexpr (sizeof...(A) == 1 && ((vt<A>::n == 0) && ...)) {
    return (V)cvt<E>(a...);
  } else if constexpr (sizeof...(A) == 0) {
    return (V)(E)0;
  } else {
    static_assert(((vt<A>::n == 0 ? 1 : vt<A>::n) + ...) == N,
                  "vector constructor: component count does not match");
    E tmp[N];
    int k = 0;
    (put(tmp, k, a), ...);
    V r;
    for (int i = 0; i < N; ++i) r[i] = tmp[i];
    return r;
  }
}

template <class T, T... I>
struct iseq {};

template <class T>
struct remove_ref {
  using type = T;
};
template <class T>
struct remove_ref<T&> {
  using type = T;
};

template <class P>
inline P arg_cast(const ThreadArgs* t, const ArgSpec& s) {
  if constexpr (__is_pointer(P)) {
    return (P)(s.kind == kArgBuffer ? t->buffers[s.index] : t->tgmem[s.index]);
  } else if constexpr (__is_reference(P)) {
    return *(typename remove_ref<P>::type*)t->buffers[s.index];
  } else {
    const u32* b = t->builtins[s.index];
    if constexpr (vt<P>::n == 0) {
      return (P)b[0];
    } else {
      P r;
      for (int i = 0; i < vt<P>::n; ++i) r[i] = (typename vt<P>::elem)b[i];
      return r;
    }
  }
}

template <class... P, int... I>
inline void invoke_seq(void (*f)(P...), const ThreadArgs* t, const ArgSpec* s, iseq<int, I...>) {
  f(arg_cast<P>(t, s[I])...);
}

// Calls the kernel entry `f` with its arguments bound as described by `s`.
template <class... P>
inline void invoke(void (*f)(P...), const ThreadArgs* t, const ArgSpec* s) {
  invoke_seq(f, t, s, __make_integer_seq<iseq, int, sizeof...(P)>{});
}

}  // namespace mlxq_emu

extern "C" unsigned mlxq_emu_lane() __attribute__((visibility("hidden")));
extern "C" float mlxq_emu_precise_fdiv(float, float) __attribute__((visibility("hidden")));

namespace metal {

using mlxq_emu::vec;

// ---------------------------------------------------------------------------------------------
// Type traits and limits.
template <class A, class B>
struct is_same {
  static constexpr bool value = false;
};
template <class A>
struct is_same<A, A> {
  static constexpr bool value = true;
};
template <class A, class B>
constexpr bool is_same_v = is_same<A, B>::value;
template <bool C, class T = void>
struct enable_if {};
template <class T>
struct enable_if<true, T> {
  using type = T;
};
template <bool C, class T = void>
using enable_if_t = typename enable_if<C, T>::type;
template <bool C, class A, class B>
struct conditional {
  using type = A;
};
template <class A, class B>
struct conditional<false, A, B> {
  using type = B;
};
template <bool C, class A, class B>
using conditional_t = typename conditional<C, A, B>::type;
template <class T>
struct is_floating_point {
  static constexpr bool value =
      is_same_v<T, float> || is_same_v<T, half> || is_same_v<T, bfloat> || is_same_v<T, double>;
};
template <class T>
constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T>
struct is_integral {
  static constexpr bool value = __is_integral(T);
};
template <class T>
constexpr bool is_integral_v = is_integral<T>::value;
template <class T>
constexpr bool is_signed_v = __is_signed(T);
template <class T>
constexpr bool is_unsigned_v = __is_unsigned(T);
template <class T>
struct remove_cv {
  using type = __remove_cv(T);
};
template <class T>
using remove_cv_t = __remove_cv(T);
template <class T>
using remove_reference_t = typename mlxq_emu::remove_ref<T>::type;
template <class T>
using make_unsigned_t = __make_unsigned(T);
template <class T>
using make_signed_t = __make_signed(T);

template <class T>
struct numeric_limits;
#define MLXQ_LIMITS(T, lo, hi, lowest_, eps, inf, nan) \
  template <>                                          \
  struct numeric_limits<T> {                           \
    static constexpr bool is_specialized = true;       \
    static constexpr T min() { return lo; }            \
    static constexpr T max() { return hi; }            \
    static constexpr T lowest() { return lowest_; }    \
    static constexpr T epsilon() { return eps; }       \
    static constexpr T infinity() { return inf; }      \
    static constexpr T quiet_NaN() { return nan; }     \
  };
#define MLXQ_FLIMITS(T, lo, hi, eps) \
  MLXQ_LIMITS(T, lo, hi, -(hi), eps, (T)__builtin_inff(), (T)__builtin_nanf(""))
#define MLXQ_ILIMITS(T, lo, hi) MLXQ_LIMITS(T, lo, hi, lo, 0, 0, 0)
MLXQ_FLIMITS(float, __FLT_MIN__, __FLT_MAX__, __FLT_EPSILON__)
MLXQ_FLIMITS(half, (half)6.103515625e-05f, (half)65504.0f, (half)0.0009765625f)
MLXQ_FLIMITS(bfloat, (bfloat)1.17549435e-38f, (bfloat)3.38953139e38f, (bfloat)0.0078125f)
MLXQ_ILIMITS(char, -128, 127)
MLXQ_ILIMITS(signed char, -128, 127)
MLXQ_ILIMITS(uchar, 0, 255)
MLXQ_ILIMITS(short, -32768, 32767)
MLXQ_ILIMITS(ushort, 0, 65535)
MLXQ_ILIMITS(int, -2147483647 - 1, 2147483647)
MLXQ_ILIMITS(uint, 0u, 4294967295u)
MLXQ_ILIMITS(long, -9223372036854775807L - 1, 9223372036854775807L)
MLXQ_ILIMITS(ulong, 0ul, 18446744073709551615ul)
#undef MLXQ_FLIMITS
#undef MLXQ_ILIMITS
#undef MLXQ_LIMITS

// ---------------------------------------------------------------------------------------------
// Reinterpretation and math.
template <class To, class From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  return __builtin_bit_cast(To, x);
}

#define MLXQ_MAP1(name, fexpr)                                        \
  template <class T>                                                  \
  inline T name(T x) {                                                \
    if constexpr (mlxq_emu::vt<T>::n == 0) {                          \
      float v = (float)x;                                             \
      return (T)(fexpr);                                              \
    } else {                                                          \
      T r;                                                            \
      for (int i = 0; i < mlxq_emu::vt<T>::n; ++i) r[i] = name(x[i]); \
      return r;                                                       \
    }                                                                 \
  }
MLXQ_MAP1(floor, __builtin_floorf(v))
MLXQ_MAP1(ceil, __builtin_ceilf(v))
MLXQ_MAP1(trunc, __builtin_truncf(v))
MLXQ_MAP1(round, __builtin_roundf(v))
MLXQ_MAP1(rint, __builtin_rintf(v))
MLXQ_MAP1(fabs, __builtin_fabsf(v))
MLXQ_MAP1(sqrt, __builtin_sqrtf(v))
MLXQ_MAP1(rsqrt, 1.0f / __builtin_sqrtf(v))
MLXQ_MAP1(exp, __builtin_expf(v))
MLXQ_MAP1(exp2, __builtin_exp2f(v))
MLXQ_MAP1(log, __builtin_logf(v))
MLXQ_MAP1(log2, __builtin_log2f(v))
MLXQ_MAP1(sin, __builtin_sinf(v))
MLXQ_MAP1(cos, __builtin_cosf(v))
MLXQ_MAP1(tanh, __builtin_tanhf(v))
MLXQ_MAP1(fract, v - __builtin_floorf(v))
MLXQ_MAP1(saturate, v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v))
MLXQ_MAP1(sign, v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f))
MLXQ_MAP1(erf, __builtin_erff(v))
#undef MLXQ_MAP1

#define MLXQ_MAP2(name, sexpr)                                              \
  template <class T>                                                        \
  inline T name(T a, T b) {                                                 \
    if constexpr (mlxq_emu::vt<T>::n == 0) {                                \
      return (T)(sexpr);                                                    \
    } else {                                                                \
      T r;                                                                  \
      for (int i = 0; i < mlxq_emu::vt<T>::n; ++i) r[i] = name(a[i], b[i]); \
      return r;                                                             \
    }                                                                       \
  }
MLXQ_MAP2(min, b < a ? b : a)
MLXQ_MAP2(max, a < b ? b : a)
MLXQ_MAP2(fmin, b < a ? b : a)
MLXQ_MAP2(fmax, a < b ? b : a)
MLXQ_MAP2(pow, __builtin_powf((float)a, (float)b))
MLXQ_MAP2(powr, __builtin_powf((float)a, (float)b))
MLXQ_MAP2(copysign, __builtin_copysignf((float)a, (float)b))
MLXQ_MAP2(fmod, __builtin_fmodf((float)a, (float)b))
#undef MLXQ_MAP2

template <class T>
inline T abs(T x) {
  if constexpr (mlxq_emu::vt<T>::n == 0) {
    if constexpr (__is_integral(T))
      return x < 0 ? (T)-x : x;
    else
      return (T)__builtin_fabsf((float)x);
  } else {
    T r;
    for (int i = 0; i < mlxq_emu::vt<T>::n; ++i) r[i] = abs(x[i]);
    return r;
  }
}
template <class T>
inline T fma(T a, T b, T c) {
  if constexpr (mlxq_emu::vt<T>::n == 0) {
    return (T)__builtin_fmaf((float)a, (float)b, (float)c);
  } else {
    T r;
    for (int i = 0; i < mlxq_emu::vt<T>::n; ++i) r[i] = fma(a[i], b[i], c[i]);
    return r;
  }
}
template <class T>
inline T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
template <class T>
inline T mix(T x, T y, T a) {
  return x + (y - x) * a;
}
template <class T, class C>
inline T select(T a, T b, C c) {
  if constexpr (mlxq_emu::vt<T>::n == 0) {
    return c ? b : a;
  } else {
    T r;
    for (int i = 0; i < mlxq_emu::vt<T>::n; ++i) r[i] = c[i] ? b[i] : a[i];
    return r;
  }
}
template <class T>
inline T max3(T a, T b, T c) {
  return max(max(a, b), c);
}
template <class T>
inline T min3(T a, T b, T c) {
  return min(min(a, b), c);
}
template <class T>
inline bool isnan(T x) {
  return __builtin_isnan((float)x);
}
template <class T>
inline bool isinf(T x) {
  return __builtin_isinf((float)x);
}
template <class T>
inline bool isfinite(T x) {
  return __builtin_isfinite((float)x);
}
template <class T>
inline typename mlxq_emu::vt<T>::elem dot(T a, T b) {
  typename mlxq_emu::vt<T>::elem s = 0;
  for (int i = 0; i < mlxq_emu::vt<T>::n; ++i) s += a[i] * b[i];
  return s;
}
template <class T>
inline bool all(T x) {
  if constexpr (mlxq_emu::vt<T>::n == 0) {
    return (bool)x;
  } else {
    for (int i = 0; i < mlxq_emu::vt<T>::n; ++i)
      if (!x[i]) return false;
    return true;
  }
}
template <class T>
inline bool any(T x) {
  if constexpr (mlxq_emu::vt<T>::n == 0) {
    return (bool)x;
  } else {
    for (int i = 0; i < mlxq_emu::vt<T>::n; ++i)
      if (x[i]) return true;
    return false;
  }
}
template <class T>
inline T popcount(T x) {
  return (T)__builtin_popcountll((unsigned long long)x);
}
template <class T>
inline T clz(T x) {
  return x == 0 ? (T)(8 * sizeof(T))
                : (T)(__builtin_clzll((unsigned long long)x) - 64 + 8 * sizeof(T));
}
template <class T>
inline T ctz(T x) {
  return x == 0 ? (T)(8 * sizeof(T)) : (T)__builtin_ctzll((unsigned long long)x);
}
template <class T>
inline T divide(T a, T b) {
  return a / b;
}
template <class T>
inline T mulhi(T a, T b) {
  return (T)(((__int128)a * (__int128)b) >> (8 * sizeof(T)));
}

namespace precise {
using metal::cos;
// Kernel code's plain float/half divisions become fast-math divisions (see _ir.py); this one
// stays correctly rounded: the runtime divides, out of the optimiser's and the rewriter's reach.
inline float divide(float a, float b) { return mlxq_emu_precise_fdiv(a, b); }
inline half divide(half a, half b) { return (half)mlxq_emu_precise_fdiv((float)a, (float)b); }
template <class T>
inline T divide(T a, T b) {
  T r = a;
  for (int i = 0; i < (int)__builtin_vectorelements(T); ++i) r[i] = divide(a[i], b[i]);
  return r;
}
using metal::exp;
using metal::exp2;
using metal::log;
using metal::log2;
using metal::pow;
using metal::rsqrt;
using metal::sin;
using metal::sqrt;
using metal::tanh;
}  // namespace precise
namespace fast {
using metal::cos;
using metal::divide;
using metal::exp;
using metal::exp2;
using metal::log;
using metal::log2;
using metal::pow;
using metal::rsqrt;
using metal::sin;
using metal::sqrt;
using metal::tanh;
}  // namespace fast

// ---------------------------------------------------------------------------------------------
// Barriers.
enum class mem_flags : unsigned {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return (mem_flags)((unsigned)a | (unsigned)b);
}

#define MLXQ_SRC const char *mlxq_file = __builtin_FILE(), int mlxq_line = __builtin_LINE()

// The flags say which memory the barrier orders (mem_none: execution only); the runtime's race
// checks follow them.
inline void threadgroup_barrier(mem_flags f, MLXQ_SRC) {
  mlxq_emu_barrier(0 | ((int)f << 4), mlxq_file, mlxq_line);
}
inline void simdgroup_barrier(mem_flags f, MLXQ_SRC) {
  mlxq_emu_barrier(1 | ((int)f << 4), mlxq_file, mlxq_line);
}

enum memory_order { memory_order_relaxed = 0 };

}  // namespace metal

// ---------------------------------------------------------------------------------------------
// SIMD-group and quad-group collectives.
namespace mlxq_emu {

enum Op { kSum, kProduct, kMin, kMax, kAnd, kOr, kXor };

template <class T, int OP>
inline T combine(T a, T b) {
  if constexpr (OP == kSum) return a + b;
  if constexpr (OP == kProduct) return a * b;
  if constexpr (OP == kMin) return metal::min(a, b);
  if constexpr (OP == kMax) return metal::max(a, b);
  if constexpr (OP == kAnd) return a & b;
  if constexpr (OP == kOr) return a | b;
  if constexpr (OP == kXor) return a ^ b;
}

template <class T, int OP>
inline T identity() {
  if constexpr (OP == kProduct) return (T)1;
  return (T)0;
}

// Reduction (GROUP 32: simdgroup, 4: quadgroup) over the active lanes, in lane order.
template <class T, int OP, int GROUP>
const char* reduce_resolve(void* const* in, void* const* out, u32 mask, int) {
  for (int g = 0; g < 32; g += GROUP) {
    bool first = true;
    T acc{};
    for (int l = g; l < g + GROUP; ++l) {
      if (!(mask >> l & 1)) continue;
      T v = *(const T*)in[l];
      acc = first ? v : combine<T, OP>(acc, v);
      first = false;
    }
    for (int l = g; l < g + GROUP; ++l)
      if (mask >> l & 1) *(T*)out[l] = acc;
  }
  return nullptr;
}

template <class T, int OP, int GROUP, bool INCLUSIVE>
const char* prefix_resolve(void* const* in, void* const* out, u32 mask, int) {
  for (int g = 0; g < 32; g += GROUP) {
    T acc = identity<T, OP>();
    for (int l = g; l < g + GROUP; ++l) {
      if (!(mask >> l & 1)) continue;
      T v = *(const T*)in[l];
      T next = combine<T, OP>(acc, v);
      *(T*)out[l] = INCLUSIVE ? next : acc;
      acc = next;
    }
  }
  return nullptr;
}

template <class T>
struct LaneArg {
  T x;
  int arg;
};

enum Shuffle { kIndex, kDown, kUp, kXorLane, kBroadcast, kBroadcastFirst, kRotateDown, kRotateUp };

template <class T, int KIND, int GROUP>
const char* shuffle_resolve(void* const* in, void* const* out, u32 mask, int) {
  T result[32];
  int first = -1;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    const LaneArg<T>* a = (const LaneArg<T>*)in[l];
    int base = l / GROUP * GROUP, pos = l - base, src;
    switch (KIND) {
      case kIndex:
      case kBroadcast:
        src = base + a->arg;
        if (a->arg < 0 || a->arg >= GROUP) return "lane index out of range";
        break;
      case kDown:
        src = pos + a->arg < GROUP ? l + a->arg : l;
        break;
      case kUp:
        src = pos - a->arg >= 0 ? l - a->arg : l;
        break;
      case kXorLane:
        src = base + ((pos ^ a->arg) & (GROUP - 1));
        break;
      case kRotateDown:
        src = base + (pos + a->arg) % GROUP;
        break;
      case kRotateUp:
        src = base + ((pos - a->arg) % GROUP + GROUP) % GROUP;
        break;
      default:  // kBroadcastFirst
        src = base;
        while (src < base + GROUP && !(mask >> src & 1)) ++src;
        break;
    }
    if (KIND == kBroadcast) {
      if (first < 0) first = a->arg;
      if (a->arg != first) return "broadcast lane is not uniform across the simdgroup";
    }
    if (!(mask >> src & 1)) return "reads a lane that is not active";
    result[l] = ((const LaneArg<T>*)in[src])->x;
  }
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) *(T*)out[l] = result[l];
  return nullptr;
}

inline const char* vote_resolve(void* const* in, void* const* out, u32 mask, int) {
  unsigned long long bits = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1) && *(const bool*)in[l]) bits |= 1ull << l;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) *(unsigned long long*)out[l] = bits;
  return nullptr;
}

inline const char* mask_resolve(void* const*, void* const* out, u32 mask, int) {
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) *(unsigned long long*)out[l] = mask;
  return nullptr;
}

template <class T, int OP, int GROUP>
inline T reduce(T x, const char* name, const char* f, int line) {
  T r;
  mlxq_emu_collective(&reduce_resolve<T, OP, GROUP>, name, &x, &r, f, line);
  return r;
}
template <class T, int OP, int GROUP, bool INCLUSIVE>
inline T prefix(T x, const char* name, const char* f, int line) {
  T r;
  mlxq_emu_collective(&prefix_resolve<T, OP, GROUP, INCLUSIVE>, name, &x, &r, f, line);
  return r;
}
template <class T, int KIND, int GROUP>
inline T shuffle(T x, int arg, const char* name, const char* f, int line) {
  LaneArg<T> a{x, arg};
  T r;
  mlxq_emu_collective(&shuffle_resolve<T, KIND, GROUP>, name, &a, &r, f, line);
  return r;
}

}  // namespace mlxq_emu

namespace metal {

struct simd_vote {
  typedef unsigned long long vote_t;
  vote_t v;
  explicit constexpr simd_vote(vote_t x = 0) : v(x) {}
  explicit operator vote_t() const { return v; }
  bool all() const { return v == 0xFFFFFFFFull; }
  bool any() const { return v != 0; }
};
typedef simd_vote quad_vote;

#define MLXQ_REDUCE(name, OP, GROUP)                                                 \
  template <class T>                                                                 \
  inline T name(T x, MLXQ_SRC) {                                                     \
    return mlxq_emu::reduce<T, mlxq_emu::OP, GROUP>(x, #name, mlxq_file, mlxq_line); \
  }
MLXQ_REDUCE(simd_sum, kSum, 32)
MLXQ_REDUCE(simd_product, kProduct, 32)
MLXQ_REDUCE(simd_min, kMin, 32)
MLXQ_REDUCE(simd_max, kMax, 32)
MLXQ_REDUCE(simd_and, kAnd, 32)
MLXQ_REDUCE(simd_or, kOr, 32)
MLXQ_REDUCE(simd_xor, kXor, 32)
MLXQ_REDUCE(quad_sum, kSum, 4)
MLXQ_REDUCE(quad_product, kProduct, 4)
MLXQ_REDUCE(quad_min, kMin, 4)
MLXQ_REDUCE(quad_max, kMax, 4)
MLXQ_REDUCE(quad_and, kAnd, 4)
MLXQ_REDUCE(quad_or, kOr, 4)
MLXQ_REDUCE(quad_xor, kXor, 4)
#undef MLXQ_REDUCE

#define MLXQ_PREFIX(name, OP, GROUP, INCL)                                                 \
  template <class T>                                                                       \
  inline T name(T x, MLXQ_SRC) {                                                           \
    return mlxq_emu::prefix<T, mlxq_emu::OP, GROUP, INCL>(x, #name, mlxq_file, mlxq_line); \
  }
MLXQ_PREFIX(simd_prefix_inclusive_sum, kSum, 32, true)
MLXQ_PREFIX(simd_prefix_exclusive_sum, kSum, 32, false)
MLXQ_PREFIX(simd_prefix_inclusive_product, kProduct, 32, true)
MLXQ_PREFIX(simd_prefix_exclusive_product, kProduct, 32, false)
MLXQ_PREFIX(quad_prefix_inclusive_sum, kSum, 4, true)
MLXQ_PREFIX(quad_prefix_exclusive_sum, kSum, 4, false)
MLXQ_PREFIX(quad_prefix_inclusive_product, kProduct, 4, true)
MLXQ_PREFIX(quad_prefix_exclusive_product, kProduct, 4, false)
#undef MLXQ_PREFIX

#define MLXQ_SHUFFLE(name, KIND, GROUP)                                                      \
  template <class T>                                                                         \
  inline T name(T x, ushort arg, MLXQ_SRC) {                                                 \
    return mlxq_emu::shuffle<T, mlxq_emu::KIND, GROUP>(x, arg, #name, mlxq_file, mlxq_line); \
  }
MLXQ_SHUFFLE(simd_shuffle, kIndex, 32)
MLXQ_SHUFFLE(simd_shuffle_down, kDown, 32)
MLXQ_SHUFFLE(simd_shuffle_up, kUp, 32)
MLXQ_SHUFFLE(simd_shuffle_xor, kXorLane, 32)
MLXQ_SHUFFLE(simd_shuffle_rotate_down, kRotateDown, 32)
MLXQ_SHUFFLE(simd_shuffle_rotate_up, kRotateUp, 32)
MLXQ_SHUFFLE(simd_broadcast, kBroadcast, 32)
MLXQ_SHUFFLE(quad_shuffle, kIndex, 4)
MLXQ_SHUFFLE(quad_shuffle_down, kDown, 4)
MLXQ_SHUFFLE(quad_shuffle_up, kUp, 4)
MLXQ_SHUFFLE(quad_shuffle_xor, kXorLane, 4)
MLXQ_SHUFFLE(quad_shuffle_rotate_down, kRotateDown, 4)
MLXQ_SHUFFLE(quad_shuffle_rotate_up, kRotateUp, 4)
MLXQ_SHUFFLE(quad_broadcast, kBroadcast, 4)
#undef MLXQ_SHUFFLE

template <class T>
inline T simd_broadcast_first(T x, MLXQ_SRC) {
  return mlxq_emu::shuffle<T, mlxq_emu::kBroadcastFirst, 32>(x, 0, "simd_broadcast_first",
                                                             mlxq_file, mlxq_line);
}
template <class T>
inline T quad_broadcast_first(T x, MLXQ_SRC) {
  return mlxq_emu::shuffle<T, mlxq_emu::kBroadcastFirst, 4>(x, 0, "quad_broadcast_first", mlxq_file,
                                                            mlxq_line);
}
inline simd_vote simd_ballot(bool b, MLXQ_SRC) {
  unsigned long long r;
  mlxq_emu_collective(&mlxq_emu::vote_resolve, "simd_ballot", &b, &r, mlxq_file, mlxq_line);
  return simd_vote(r);
}
inline bool simd_all(bool b, MLXQ_SRC) {
  unsigned long long r;
  unsigned long long active;
  mlxq_emu_collective(&mlxq_emu::vote_resolve, "simd_all", &b, &r, mlxq_file, mlxq_line);
  mlxq_emu_collective(&mlxq_emu::mask_resolve, "simd_all", nullptr, &active, mlxq_file, mlxq_line);
  return r == active;
}
inline bool simd_any(bool b, MLXQ_SRC) {
  unsigned long long r;
  mlxq_emu_collective(&mlxq_emu::vote_resolve, "simd_any", &b, &r, mlxq_file, mlxq_line);
  return r != 0;
}
inline simd_vote simd_active_threads_mask(MLXQ_SRC) {
  unsigned long long r;
  mlxq_emu_collective(&mlxq_emu::mask_resolve, "simd_active_threads_mask", nullptr, &r, mlxq_file,
                      mlxq_line);
  return simd_vote(r);
}
inline bool simd_is_first(MLXQ_SRC) {
  unsigned long long r;
  mlxq_emu_collective(&mlxq_emu::mask_resolve, "simd_is_first", nullptr, &r, mlxq_file, mlxq_line);
  return (unsigned)__builtin_ctzll(r) == mlxq_emu_lane();
}

// ---------------------------------------------------------------------------------------------
// simdgroup_matrix: lane l holds elements (row, col) and (row, col + 1) of each 8x8 matrix, with
// the same distribution over lanes as Apple GPUs (what thread_elements() exposes).
}  // namespace metal

namespace mlxq_emu {
inline int sgm_row(unsigned lane) {
  return (int)(((lane >> 4) & 1) * 4 + ((lane >> 2) & 1) * 2 + ((lane >> 1) & 1));
}
inline int sgm_col(unsigned lane) { return (int)(((lane >> 3) & 1) * 4 + (lane & 1) * 2); }
}  // namespace mlxq_emu

namespace metal {

template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "the emulator supports 8x8 simdgroup matrices");
  vec<T, 2> mlxq_elems;
  simdgroup_matrix() = default;
  // Metal: a diagonal matrix with `d` on the diagonal.
  explicit simdgroup_matrix(T d) {
    unsigned lane = mlxq_emu_lane();
    int r = mlxq_emu::sgm_row(lane), c = mlxq_emu::sgm_col(lane);
    mlxq_elems[0] = r == c ? d : (T)0;
    mlxq_elems[1] = r == c + 1 ? d : (T)0;
  }
  thread vec<T, 2>& thread_elements() { return mlxq_elems; }
  const thread vec<T, 2>& thread_elements() const { return mlxq_elems; }
};

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int C, int R>
inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, C, R> m;
  m.mlxq_elems = (vec<T, 2>)v;
  return m;
}

template <class T, class P>
inline void simdgroup_load(thread simdgroup_matrix<T, 8, 8>& d, P* src, ulong elements_per_row = 8,
                           ulong2 matrix_origin = 0, bool transpose_matrix = false) {
  unsigned lane = mlxq_emu_lane();
  long r = mlxq_emu::sgm_row(lane), c = mlxq_emu::sgm_col(lane);
  long ox = (long)matrix_origin.x, oy = (long)matrix_origin.y, ld = (long)elements_per_row;
  for (int j = 0; j < 2; ++j) {
    long i = transpose_matrix ? (oy + c + j) * ld + ox + r : (oy + r) * ld + ox + c + j;
    d.mlxq_elems[j] = (T)src[i];
  }
}

template <class T, class P>
inline void simdgroup_store(thread const simdgroup_matrix<T, 8, 8>& s, P* dst,
                            ulong elements_per_row = 8, ulong2 matrix_origin = 0,
                            bool transpose_matrix = false) {
  unsigned lane = mlxq_emu_lane();
  long r = mlxq_emu::sgm_row(lane), c = mlxq_emu::sgm_col(lane);
  long ox = (long)matrix_origin.x, oy = (long)matrix_origin.y, ld = (long)elements_per_row;
  for (int j = 0; j < 2; ++j) {
    long i = transpose_matrix ? (oy + c + j) * ld + ox + r : (oy + r) * ld + ox + c + j;
    dst[i] = s.mlxq_elems[j];
  }
}

}  // namespace metal

namespace mlxq_emu {

template <class TD, class TA, class TB, class TC>
struct MmaArgs {
  const metal::simdgroup_matrix<TA, 8, 8>* a;
  const metal::simdgroup_matrix<TB, 8, 8>* b;
  const metal::simdgroup_matrix<TC, 8, 8>* c;  // null: no accumulator
};

// D = A * B (+ C), accumulated in float and rounded once to D's type.
template <class TD, class TA, class TB, class TC>
const char* mma_resolve(void* const* in, void* const* out, u32 mask, int) {
  if (mask != 0xFFFFFFFFu) return "simdgroup_matrix operations need all 32 lanes active";
  float A[8][8], B[8][8], C[8][8];
  for (int l = 0; l < 32; ++l) {
    const MmaArgs<TD, TA, TB, TC>* m = (const MmaArgs<TD, TA, TB, TC>*)in[l];
    int r = sgm_row(l), c = sgm_col(l);
    for (int j = 0; j < 2; ++j) {
      A[r][c + j] = (float)m->a->mlxq_elems[j];
      B[r][c + j] = (float)m->b->mlxq_elems[j];
      C[r][c + j] = m->c ? (float)m->c->mlxq_elems[j] : 0.0f;
    }
  }
  for (int l = 0; l < 32; ++l) {
    metal::simdgroup_matrix<TD, 8, 8>* d = (metal::simdgroup_matrix<TD, 8, 8>*)out[l];
    int r = sgm_row(l), c = sgm_col(l);
    for (int j = 0; j < 2; ++j) {
      float acc = C[r][c + j];
      for (int k = 0; k < 8; ++k) acc += A[r][k] * B[k][c + j];
      d->mlxq_elems[j] = (TD)acc;
    }
  }
  return nullptr;
}

}  // namespace mlxq_emu

namespace metal {

template <class TD, class TA, class TB, class TC>
inline void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, 8, 8>& d,
                                          thread const simdgroup_matrix<TA, 8, 8>& a,
                                          thread const simdgroup_matrix<TB, 8, 8>& b,
                                          thread const simdgroup_matrix<TC, 8, 8>& c, MLXQ_SRC) {
  mlxq_emu::MmaArgs<TD, TA, TB, TC> args{&a, &b, &c};
  simdgroup_matrix<TD, 8, 8> r;
  mlxq_emu_collective(&mlxq_emu::mma_resolve<TD, TA, TB, TC>, "simdgroup_multiply_accumulate",
                      &args, &r, mlxq_file, mlxq_line);
  d = r;
}

template <class TD, class TA, class TB>
inline void simdgroup_multiply(thread simdgroup_matrix<TD, 8, 8>& d,
                               thread const simdgroup_matrix<TA, 8, 8>& a,
                               thread const simdgroup_matrix<TB, 8, 8>& b, MLXQ_SRC) {
  mlxq_emu::MmaArgs<TD, TA, TB, TD> args{&a, &b, nullptr};
  simdgroup_matrix<TD, 8, 8> r;
  mlxq_emu_collective(&mlxq_emu::mma_resolve<TD, TA, TB, TD>, "simdgroup_multiply", &args, &r,
                      mlxq_file, mlxq_line);
  d = r;
}

// ---------------------------------------------------------------------------------------------
// Atomics (threads run one at a time, so plain read-modify-write is exact).
template <class T>
struct mlxq_atomic {
  T v;
};
typedef mlxq_atomic<int> atomic_int;
typedef mlxq_atomic<uint> atomic_uint;
typedef mlxq_atomic<float> atomic_float;
template <class A, class T>
inline T atomic_fetch_add_explicit(A* a, T x, memory_order) {
  return __atomic_fetch_add(&a->v, x, __ATOMIC_RELAXED);
}
template <class A, class T>
inline T atomic_fetch_sub_explicit(A* a, T x, memory_order) {
  return __atomic_fetch_sub(&a->v, x, __ATOMIC_RELAXED);
}
template <class A, class T>
inline T atomic_fetch_max_explicit(A* a, T x, memory_order) {
  return __atomic_fetch_max(&a->v, x, __ATOMIC_RELAXED);
}
template <class A, class T>
inline T atomic_fetch_min_explicit(A* a, T x, memory_order) {
  return __atomic_fetch_min(&a->v, x, __ATOMIC_RELAXED);
}
template <class A, class T>
inline T atomic_fetch_or_explicit(A* a, T x, memory_order) {
  return __atomic_fetch_or(&a->v, x, __ATOMIC_RELAXED);
}
template <class A, class T>
inline T atomic_fetch_and_explicit(A* a, T x, memory_order) {
  return __atomic_fetch_and(&a->v, x, __ATOMIC_RELAXED);
}
template <class A, class T>
inline void atomic_store_explicit(A* a, T x, memory_order) {
  __atomic_store_n(&a->v, x, __ATOMIC_RELAXED);
}
template <class A>
inline auto atomic_load_explicit(A* a, memory_order) {
  return __atomic_load_n(&a->v, __ATOMIC_RELAXED);
}

}  // namespace metal

#endif  // MLXQ_EMU_PREPROCESS
