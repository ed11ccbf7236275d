// Interface between emulated kernels (compiled from MSL) and the emulator runtime.
// Plain C++ with no standard library, shared by the shim and runtime/runtime.cpp.
#pragma once

namespace mlxq_emu {

typedef unsigned int u32;
typedef unsigned long long u64;

// Builtin values of one GPU thread, indexed by BuiltinId.
enum BuiltinId {
  kThreadPositionInGrid = 0,
  kThreadPositionInThreadgroup,
  kThreadgroupPositionInGrid,
  kThreadsPerThreadgroup,
  kThreadgroupsPerGrid,
  kThreadIndexInThreadgroup,
  kThreadIndexInSimdgroup,
  kSimdgroupIndexInThreadgroup,
  kThreadsPerSimdgroup,
  kSimdgroupsPerThreadgroup,
  kThreadsPerGrid,
  kThreadIndexInQuadgroup,
  kQuadgroupIndexInThreadgroup,
  kNumBuiltins
};

enum ArgKind { kArgBuffer = 0, kArgThreadgroup = 1, kArgBuiltin = 2 };

struct ArgSpec {
  int kind;
  int index;  // buffer / threadgroup index, or BuiltinId
};

struct ThreadArgs {
  void* const* buffers;  // [32]
  void* const* tgmem;    // [32]
  u32 builtins[kNumBuiltins][3];
};

typedef void (*EntryFn)(const ThreadArgs*);

struct KernelEntry {
  const char* name;
  EntryFn entry;
};

// Resolves one collective for a simdgroup. in[l]/out[l] point at lane l's operands (null for
// lanes that are not active); returns null or a static error message.
typedef const char* (*ResolveFn)(void* const* in, void* const* out, u32 active_mask, int nlanes);

}  // namespace mlxq_emu

extern "C" {
// Suspends the calling GPU thread until every active lane of its simdgroup reached a collective;
// the last one to arrive runs `fn` for all of them.
void mlxq_emu_collective(mlxq_emu::ResolveFn fn, const char* op, void* in, void* out,
                         const char* file, int line);
// threadgroup_barrier (scope 0) or simdgroup_barrier (scope 1), bits 4..: the mem_flags.
void mlxq_emu_barrier(int scope, const char* file, int line);
// Instrumentation hooks inserted before every load and store of the kernel code.
void __mlxq_ld(const void* p, unsigned long long n);
void __mlxq_st(const void* p, unsigned long long n);
}
