// Runtime of the MSL emulator: runs every GPU thread of a threadgroup as a fiber, resolves
// barriers and simdgroup collectives, checks and counts every device/threadgroup memory access.
// Linked into each emulated kernel library; not instrumented itself.
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "mlxq_emu_runtime.h"

#define HIDDEN __attribute__((visibility("hidden")))
#define EXPORT extern "C" __attribute__((visibility("default")))

using namespace mlxq_emu;

extern "C" HIDDEN const KernelEntry mlxq_emu_kernels[];
extern "C" HIDDEN const int mlxq_emu_nkernels;
// Bounds of the section that holds the kernels' fixed-size `threadgroup` arrays (absent if none).
extern "C" char __start_mlxq_tg[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_mlxq_tg[] __attribute__((weak, visibility("hidden")));

// float -> bfloat conversions on CPUs without an instruction for them (no AVX512-BF16): clang
// then calls compiler-rt's __truncsfbf2, which zig's `cc -shared` does not link into the
// library (dlopen failed with "undefined symbol: __truncsfbf2"). Weak, so that a toolchain
// linking compiler-rt keeps its own. Round to nearest even; a NaN stays a quiet NaN.
extern "C" __attribute__((weak, visibility("hidden"))) __bf16 __truncsfbf2(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  const uint16_t h = (u & 0x7fffffffu) > 0x7f800000u
                         ? static_cast<uint16_t>((u >> 16) | 0x40u)
                         : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return __builtin_bit_cast(__bf16, h);
}

namespace {

constexpr int kMaxThreads = 1024;
constexpr int kSimdWidth = 32;
constexpr size_t kStackSize = 256 * 1024;
constexpr size_t kPage = 4096;
constexpr int kSlots = 64;      // 32 device/constant buffers, then 32 host-bound threadgroup blocks
constexpr int kSlotShift = 36;  // 64 GiB: a 64-bit offset up to 32 GiB still names its buffer
constexpr uint64_t kSlotSize = 1ull << kSlotShift;
constexpr uint16_t kMulti = 0xFFFF;

enum State { kRunnable, kDone, kWaitBarrier, kWaitCollective, kFailed };

struct Thread {
  void* sp;
  int state;
  u32 tid, lane, sg;
  ThreadArgs args;
  ResolveFn fn;
  const char* op;
  void* in;
  void* out;
  const char* file;
  int line;
  u64 seq;
  int flags;  // mem_flags of the barrier the thread waits at (collectives: kOrderAll)
};

// mem_flags bits (the shim passes Metal's values).
constexpr int kMemDevice = 1, kMemThreadgroup = 2, kOrderAll = kMemDevice | kMemThreadgroup;

// Shadow state of one byte of threadgroup memory, for unwritten-read and race detection.
struct Shadow {
  u32 w_epoch, w_sync;
  u32 r_epoch, r_sync;
  uint16_t w_tid, r_tid, r_sg, pad;
};

struct Region {
  bool active = false;
  bool threadgroup = false;
  int index = 0;
  char* base = nullptr;
  int64_t size = 0;
  size_t mapped = 0;
  Shadow* shadow = nullptr;
  size_t shadow_cap = 0;
  // Device buffers: which threadgroup (linear index mod 65535, + 1) wrote each byte in this
  // dispatch; allocated on the buffer's first write.
  uint16_t* writer = nullptr;
  size_t writer_cap = 0;
  bool writer_live = false;
};

char* g_arena = nullptr;
uint64_t g_arena_size = 0;
Region g_slots[kSlots];
Region g_static_tg;

Thread g_threads[kMaxThreads];
char* g_stacks = nullptr;
void* g_sched_sp = nullptr;
Thread* g_cur = nullptr;
EntryFn g_entry = nullptr;
int g_nthreads = 0;
u32 g_tgpos[3];

bool g_failed = false;
char g_err[4096];

u32 g_epoch = 1, g_tg_base = 1;
u32 g_sync_counter = 1;
u32 g_sg_sync[kMaxThreads / kSimdWidth];
// Device memory has its own barrier intervals: only barriers with mem_flags::mem_device end them.
u32 g_dev_epoch = 1;
u32 g_sg_dev_sync[kMaxThreads / kSimdWidth];

int64_t g_read[32], g_written[32];

void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void fail(const char* fmt, ...) {
  if (g_failed) return;
  g_failed = true;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_err, sizeof g_err, fmt, ap);
  va_end(ap);
}

// ---------------------------------------------------------------------------------------------
// Fibers.
#if defined(__x86_64__)
extern "C" void mlxq_emu_swap(void** save_sp, void* new_sp);
asm(R"(
.text
.globl mlxq_emu_swap
.hidden mlxq_emu_swap
.type mlxq_emu_swap,@function
mlxq_emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size mlxq_emu_swap, .-mlxq_emu_swap
)");
#elif defined(__aarch64__)
extern "C" void mlxq_emu_swap(void** save_sp, void* new_sp);
asm(R"(
.text
.globl mlxq_emu_swap
.hidden mlxq_emu_swap
.type mlxq_emu_swap,%function
mlxq_emu_swap:
  sub sp, sp, #176
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x9, sp
  str x9, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #176
  ret
)");
#else
#error "the MSL emulator's fibers support x86_64 and aarch64"
#endif

extern "C" __attribute__((noreturn, used)) void mlxq_emu_fiber_main() {
  Thread* t = g_cur;
  g_entry(&t->args);
  t->state = kDone;
  mlxq_emu_swap(&t->sp, g_sched_sp);
  __builtin_trap();
}

void init_fiber(Thread* t, int i) {
  char* top = g_stacks + (size_t)(i + 1) * (kStackSize + kPage);
  uintptr_t a = ((uintptr_t)top & ~(uintptr_t)15) - 16;
#if defined(__x86_64__)
  uint64_t* s = (uint64_t*)a;
  s[0] = (uint64_t)&mlxq_emu_fiber_main;   // return address of the first switch
  for (int k = 1; k <= 6; ++k) s[-k] = 0;  // rbp rbx r12-r15
  uint32_t* csr = (uint32_t*)(s - 7);
  csr[0] = 0x1F80;  // mxcsr
  csr[1] = 0x037F;  // x87 control word
  t->sp = s - 7;
#else
  uint64_t* s = (uint64_t*)(a - 176);
  memset(s, 0, 176);
  s[10] = 0;                               // x29
  s[11] = (uint64_t)&mlxq_emu_fiber_main;  // x30
  t->sp = s;
#endif
}

bool ensure_stacks() {
  if (g_stacks) return true;
  size_t total = (size_t)kMaxThreads * (kStackSize + kPage);
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  g_stacks = (char*)p;
  for (int i = 0; i < kMaxThreads; ++i)  // guard page below every stack
    mprotect(g_stacks + (size_t)i * (kStackSize + kPage), kPage, PROT_NONE);
  return true;
}

[[noreturn]] void abort_thread() {
  g_cur->state = kFailed;
  mlxq_emu_swap(&g_cur->sp, g_sched_sp);
  __builtin_trap();
}

// ---------------------------------------------------------------------------------------------
// Memory: every device buffer and host-bound threadgroup block lives in its own 64 GiB slot of a
// reserved arena, so that any address the kernel computes from it maps back to it.
bool ensure_arena() {
  if (g_arena) return true;
  g_arena_size = (uint64_t)kSlots << kSlotShift;
  void* p =
      mmap(nullptr, g_arena_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  g_arena = (char*)p;
  return true;
}

// Every loaded kernel library has its own arena (kSlots << kSlotShift bytes, 4 TiB of address
// space) and thread stacks (a guard page each: 2 * kMaxThreads memory mappings). Kept between
// dispatches, a process that ran a few dozen libraries hit the kernel's limit on mappings
// (vm.max_map_count) and every later mmap failed, so both are given back after every dispatch
// (the buffers are copied in and out each run anyway).
void release_memory() {
  if (g_arena) {
    munmap(g_arena, g_arena_size);
    g_arena = nullptr;
    for (Region& r : g_slots) r.mapped = 0;
  }
  if (g_stacks) {
    munmap(g_stacks, (size_t)kMaxThreads * (kStackSize + kPage));
    g_stacks = nullptr;
  }
}

bool map_region(Region& r, int slot, int64_t size) {
  r.base = g_arena + (uint64_t)slot * kSlotSize + kSlotSize / 2;
  size_t need = ((size_t)size + kPage - 1) & ~(kPage - 1);
  if (need > r.mapped) {
    if (mprotect(r.base, need, PROT_READ | PROT_WRITE) != 0) return false;
    r.mapped = need;
  }
  r.size = size;
  return true;
}

bool ensure_shadow(Region& r, size_t n) {
  if (n > r.shadow_cap) {
    free(r.shadow);
    r.shadow = (Shadow*)calloc(n ? n : 1, sizeof(Shadow));
    if (!r.shadow) return false;
    r.shadow_cap = n;
  }
  return true;
}

const char* thread_desc() {
  static char buf[160];
  Thread* t = g_cur;
  snprintf(buf, sizeof buf, "thread %u (lane %u of simdgroup %u) of threadgroup (%u, %u, %u)",
           t->tid, t->lane, t->sg, g_tgpos[0], g_tgpos[1], g_tgpos[2]);
  return buf;
}

void region_name(const Region& r, int64_t off, char* out, size_t n) {
  if (&r == &g_static_tg) {
    snprintf(out, n, "threadgroup array (static section offset %lld)", (long long)off);
  } else if (r.threadgroup) {
    snprintf(out, n, "threadgroup(%d) memory", r.index);
  } else {
    snprintf(out, n, "buffer(%d)", r.index);
  }
}

// Races between threads of one threadgroup, on threadgroup memory (`dev` false) or device memory
// (`dev` true): two threads touch a byte, one of them writes, and no barrier that orders that
// kind of memory (threadgroup_barrier with mem_threadgroup / mem_device; for lanes of one
// simdgroup also a simdgroup_barrier with those flags or a collective) lies in between.
void check_shadow(Region& r, int64_t off, uint64_t n, bool write, bool dev) {
  Thread* t = g_cur;
  u32 s = t->sg;
  const u32 epoch = dev ? g_dev_epoch : g_epoch;
  const u32* sync = dev ? g_sg_dev_sync : g_sg_sync;
  const char* need = dev ? "threadgroup_barrier(mem_flags::mem_device)"
                         : "threadgroup_barrier(mem_flags::mem_threadgroup)";
  for (uint64_t i = 0; i < n; ++i) {
    Shadow& sh = r.shadow[off + i];
    char name[96];
    if (!write) {
      if (!dev && sh.w_epoch < g_tg_base) {
        region_name(r, off + i, name, sizeof name);
        fail("read of never-written %s at byte offset %lld by %s", name, (long long)(off + i),
             thread_desc());
        abort_thread();
      }
      if (sh.w_epoch == epoch && sh.w_tid != t->tid &&
          !(g_threads[sh.w_tid].sg == s && sync[s] > sh.w_sync)) {
        region_name(r, off + i, name, sizeof name);
        fail(
            "race on %s at byte offset %lld: read by %s after a write by thread %u with no "
            "%s in between",
            name, (long long)(off + i), thread_desc(), sh.w_tid, need);
        abort_thread();
      }
      if (sh.r_epoch == epoch && sh.r_tid != t->tid) {
        sh.r_tid = kMulti;
        if (sh.r_sg != s) sh.r_sg = kMulti;
        sh.r_sync = sync[s];
      } else {
        sh.r_epoch = epoch;
        sh.r_tid = (uint16_t)t->tid;
        sh.r_sg = (uint16_t)s;
        sh.r_sync = sync[s];
      }
    } else {
      if (sh.w_epoch == epoch && sh.w_tid != t->tid &&
          !(g_threads[sh.w_tid].sg == s && sync[s] > sh.w_sync)) {
        region_name(r, off + i, name, sizeof name);
        fail(
            "race on %s at byte offset %lld: written by %s and by thread %u with no %s in "
            "between",
            name, (long long)(off + i), thread_desc(), sh.w_tid, need);
        abort_thread();
      }
      if (sh.r_epoch == epoch && sh.r_tid != t->tid && !(sh.r_sg == s && sync[s] > sh.r_sync)) {
        region_name(r, off + i, name, sizeof name);
        fail(
            "race on %s at byte offset %lld: written by %s after a read by %s%u with no %s in "
            "between",
            name, (long long)(off + i), thread_desc(),
            sh.r_tid == kMulti ? "several threads, e.g. thread " : "thread ",
            sh.r_tid == kMulti ? 0u : (u32)sh.r_tid, need);
        abort_thread();
      }
      sh.w_epoch = epoch;
      sh.w_tid = (uint16_t)t->tid;
      sh.w_sync = sync[s];
    }
  }
}

// Threadgroups of a dispatch are not ordered: a byte of device memory written by one threadgroup
// must not be written or read by another.
uint32_t g_tg_linear = 0;

void check_device_write(Region& r, int64_t off, uint64_t n) {
  if (!r.writer_live) {
    if ((size_t)r.size > r.writer_cap) {
      free(r.writer);
      r.writer = (uint16_t*)malloc((size_t)r.size * sizeof(uint16_t));
      if (!r.writer) {
        r.writer_cap = 0;
        return;
      }
      r.writer_cap = (size_t)r.size;
    }
    memset(r.writer, 0, (size_t)r.size * sizeof(uint16_t));
    r.writer_live = true;
  }
  const uint16_t me = (uint16_t)(g_tg_linear % 65535 + 1);
  for (uint64_t i = 0; i < n; ++i) {
    uint16_t& w = r.writer[off + i];
    if (w != 0 && w != me) {
      fail(
          "race on buffer(%d) at byte offset %lld: written by threadgroups #%u and #%u (%s); "
          "threadgroups of a dispatch are not ordered",
          r.index, (long long)(off + i), w - 1u, g_tg_linear, thread_desc());
      abort_thread();
    }
    w = me;
  }
}

void check_device_read(Region& r, int64_t off, uint64_t n) {
  const uint16_t me = (uint16_t)(g_tg_linear % 65535 + 1);
  for (uint64_t i = 0; i < n; ++i) {
    uint16_t w = r.writer[off + i];
    if (w != 0 && w != me) {
      fail(
          "race on buffer(%d) at byte offset %lld: read by %s after threadgroup #%u wrote it "
          "in the same dispatch; threadgroups of a dispatch are not ordered",
          r.index, (long long)(off + i), thread_desc(), w - 1u);
      abort_thread();
    }
  }
}

void mem_access(const void* p, uint64_t n, int kind /*0 read, 1 write, 2 atomic*/) {
  uintptr_t a = (uintptr_t)p;
  if (a - (uintptr_t)g_arena < g_arena_size) {
    int slot = (int)((a - (uintptr_t)g_arena) >> kSlotShift);
    Region& r = g_slots[slot];
    int64_t off = (int64_t)(a - (uintptr_t)r.base);
    if (!r.active) {
      fail("%s of %llu bytes through an unbound %s(%d) by %s", kind == 1 ? "write" : "read",
           (unsigned long long)n, slot >= 32 ? "threadgroup" : "buffer", slot % 32, thread_desc());
      abort_thread();
    }
    if (off < 0 || off + (int64_t)n > r.size) {
      char name[96];
      region_name(r, off, name, sizeof name);
      fail("out-of-bounds %s of %llu bytes at byte offset %lld of %s (size %lld bytes) by %s",
           kind == 1 ? "write" : "read", (unsigned long long)n, (long long)off, name,
           (long long)r.size, thread_desc());
      abort_thread();
    }
    if (r.threadgroup) {
      if (kind != 2) check_shadow(r, off, n, kind == 1, false);
    } else if (kind == 1) {
      g_written[r.index] += n;
      check_device_write(r, off, n);
      if (r.shadow) check_shadow(r, off, n, true, true);
    } else {
      if (kind == 0 && r.shadow) check_shadow(r, off, n, false, true);
      if (kind == 0 && r.writer_live) check_device_read(r, off, n);
      g_read[r.index] += n;
      if (kind == 2) g_written[r.index] += n;
    }
  } else if (g_static_tg.size && a - (uintptr_t)g_static_tg.base < (uint64_t)g_static_tg.size) {
    if (kind != 2)
      check_shadow(g_static_tg, (int64_t)(a - (uintptr_t)g_static_tg.base), n, kind == 1, false);
  }
}

// ---------------------------------------------------------------------------------------------
// Scheduling.
void describe_lanes(char* out, size_t n, int first, int count) {
  size_t len = 0;
  out[0] = 0;
  for (int i = first; i < first + count && len + 120 < n; ++i) {
    Thread& t = g_threads[i];
    const char* what = t.state == kDone             ? "exited"
                       : t.state == kWaitBarrier    ? "threadgroup_barrier"
                       : t.state == kWaitCollective ? t.op
                                                    : "running";
    // Collapse runs of threads that are at the same place.
    int j = i;
    while (j + 1 < first + count && g_threads[j + 1].state == t.state &&
           g_threads[j + 1].op == t.op && g_threads[j + 1].line == t.line &&
           g_threads[j + 1].file == t.file && g_threads[j + 1].seq == t.seq)
      ++j;
    char who[32];
    if (i == j)
      snprintf(who, sizeof who, "thread %d", i);
    else
      snprintf(who, sizeof who, "threads %d-%d", i, j);
    if (t.state == kDone)
      len += snprintf(out + len, n - len, "%s%s exited after %llu collectives", len ? "; " : "",
                      who, (unsigned long long)t.seq);
    else
      len += snprintf(out + len, n - len, "%s%s at %s (%s:%d)", len ? "; " : "", who, what,
                      t.file ? t.file : "?", t.line);
    i = j;
  }
}

// Faults inside kernel code (a wild pointer outside every buffer, a fiber stack overflow,
// integer division by zero) end the dispatch with an error instead of killing the process.
volatile bool g_in_kernel = false;
char g_altstack_mem[64 * 1024];
struct sigaction g_old_act[3];
stack_t g_old_altstack;
const int kFaultSignals[3] = {SIGSEGV, SIGBUS, SIGFPE};

void on_fault(int sig, siginfo_t* si, void*) {
  if (!g_in_kernel || !g_cur) {
    for (int i = 0; i < 3; ++i)
      if (kFaultSignals[i] == sig) sigaction(sig, &g_old_act[i], nullptr);
    return;  // the faulting instruction runs again under the previous handler
  }
  uintptr_t a = (uintptr_t)si->si_addr;
  uintptr_t rel = a - (uintptr_t)g_stacks;
  bool overflow =
      rel < (uintptr_t)kMaxThreads * (kStackSize + kPage) && rel % (kStackSize + kPage) < kPage;
  if (sig == SIGFPE)
    fail("arithmetic fault (integer division by zero?) in %s", thread_desc());
  else if (overflow)
    fail("stack overflow (%zu KiB per thread) in %s", kStackSize / 1024, thread_desc());
  else
    fail("invalid memory access at %p (outside every buffer) by %s", si->si_addr, thread_desc());
  g_in_kernel = false;
  g_cur->state = kFailed;
  mlxq_emu_swap(&g_cur->sp, g_sched_sp);
  __builtin_trap();
}

void install_fault_handlers() {
  stack_t ss = {};
  ss.ss_sp = g_altstack_mem;
  ss.ss_size = sizeof g_altstack_mem;
  sigaltstack(&ss, &g_old_altstack);
  struct sigaction act = {};
  act.sa_sigaction = on_fault;
  act.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&act.sa_mask);
  for (int i = 0; i < 3; ++i) sigaction(kFaultSignals[i], &act, &g_old_act[i]);
}

void remove_fault_handlers() {
  for (int i = 0; i < 3; ++i) sigaction(kFaultSignals[i], &g_old_act[i], nullptr);
  sigaltstack(&g_old_altstack, nullptr);
}

bool run_simdgroup(int s) {
  int first = s * kSimdWidth;
  int count = g_nthreads - first < kSimdWidth ? g_nthreads - first : kSimdWidth;
  for (;;) {
    for (int l = 0; l < count; ++l) {
      Thread* t = &g_threads[first + l];
      if (t->state != kRunnable) continue;
      g_cur = t;
      g_in_kernel = true;
      mlxq_emu_swap(&g_sched_sp, t->sp);
      g_in_kernel = false;
      if (g_failed) return false;
    }
    int ncoll = 0, nbar = 0;
    Thread* ref = nullptr;
    bool same = true;
    for (int l = 0; l < count; ++l) {
      Thread* t = &g_threads[first + l];
      // A lane may leave before the simdgroup's first collective (`if (gid >= n) return;`);
      // leaving after taking part in one while others go on is divergent control flow.
      if (t->state == kDone && t->seq > 0) same = false;
      if (t->state == kWaitCollective) {
        ++ncoll;
        if (!ref)
          ref = t;
        else if (t->fn != ref->fn || t->line != ref->line || t->file != ref->file ||
                 t->seq != ref->seq)
          same = false;
      } else if (t->state == kWaitBarrier) {
        ++nbar;
      }
    }
    if (ncoll == 0) return true;
    if (nbar || !same) {
      char lanes[2048];
      describe_lanes(lanes, sizeof lanes, first, count);
      fail("divergent collective in simdgroup %d of threadgroup (%u, %u, %u): %s", s, g_tgpos[0],
           g_tgpos[1], g_tgpos[2], lanes);
      return false;
    }
    void* in[kSimdWidth] = {};
    void* out[kSimdWidth] = {};
    u32 mask = 0;
    for (int l = 0; l < count; ++l) {
      Thread* t = &g_threads[first + l];
      if (t->state != kWaitCollective) continue;
      in[l] = t->in;
      out[l] = t->out;
      mask |= 1u << l;
    }
    if (ref->fn) {
      const char* err = ref->fn(in, out, mask, count);
      if (err) {
        fail("%s (%s:%d) in simdgroup %d of threadgroup (%u, %u, %u): %s", ref->op, ref->file,
             ref->line, s, g_tgpos[0], g_tgpos[1], g_tgpos[2], err);
        return false;
      }
    }
    if (ref->flags & kMemThreadgroup) g_sg_sync[s] = ++g_sync_counter;
    if (ref->flags & kMemDevice) g_sg_dev_sync[s] = ++g_sync_counter;
    for (int l = 0; l < count; ++l)
      if (g_threads[first + l].state == kWaitCollective) g_threads[first + l].state = kRunnable;
  }
}

bool run_threadgroup(const u32 grid[3], const u32 tptg[3], void* const* bufs, void* const* tgs) {
  ++g_epoch;
  g_tg_base = g_epoch;
  ++g_dev_epoch;
  int nsg = (g_nthreads + kSimdWidth - 1) / kSimdWidth;
  for (int i = 0; i < g_nthreads; ++i) {
    Thread& t = g_threads[i];
    t.state = kRunnable;
    t.tid = i;
    t.lane = i % kSimdWidth;
    t.sg = i / kSimdWidth;
    t.fn = nullptr;
    t.op = nullptr;
    t.file = nullptr;
    t.line = 0;
    t.seq = 0;
    t.flags = 0;
    t.args.buffers = bufs;
    t.args.tgmem = tgs;
    u32 pos[3] = {i % tptg[0], (i / tptg[0]) % tptg[1], i / (tptg[0] * tptg[1])};
    u32(*b)[3] = t.args.builtins;
    for (int d = 0; d < 3; ++d) {
      b[kThreadPositionInGrid][d] = g_tgpos[d] * tptg[d] + pos[d];
      b[kThreadPositionInThreadgroup][d] = pos[d];
      b[kThreadgroupPositionInGrid][d] = g_tgpos[d];
      b[kThreadsPerThreadgroup][d] = tptg[d];
      b[kThreadgroupsPerGrid][d] = grid[d];
      b[kThreadsPerGrid][d] = grid[d] * tptg[d];
      b[kThreadIndexInThreadgroup][d] = d ? 0 : i;
      b[kThreadIndexInSimdgroup][d] = d ? 0 : t.lane;
      b[kSimdgroupIndexInThreadgroup][d] = d ? 0 : t.sg;
      b[kThreadsPerSimdgroup][d] = d ? 0 : kSimdWidth;
      b[kSimdgroupsPerThreadgroup][d] = d ? 0 : nsg;
      b[kThreadIndexInQuadgroup][d] = d ? 0 : i % 4;
      b[kQuadgroupIndexInThreadgroup][d] = d ? 0 : i / 4;
    }
    init_fiber(&t, i);
  }
  for (;;) {
    for (int s = 0; s < nsg; ++s)
      if (!run_simdgroup(s)) return false;
    int ndone = 0, nbar = 0;
    const Thread* ref = nullptr;
    bool same = true;
    for (int i = 0; i < g_nthreads; ++i) {
      const Thread& t = g_threads[i];
      if (t.state == kDone) {
        ++ndone;
      } else {
        ++nbar;
        if (!ref)
          ref = &t;
        else if (t.line != ref->line || t.file != ref->file || t.flags != ref->flags)
          same = false;
      }
    }
    if (nbar == 0) return true;
    if (ndone || !same) {
      char lanes[2048];
      describe_lanes(lanes, sizeof lanes, 0, g_nthreads);
      fail("threadgroup_barrier not reached by every thread of threadgroup (%u, %u, %u): %s",
           g_tgpos[0], g_tgpos[1], g_tgpos[2], lanes);
      return false;
    }
    // mem_none (or mem_texture) is an execution barrier only: it ends no barrier interval.
    if (ref->flags & kMemThreadgroup) ++g_epoch;
    if (ref->flags & kMemDevice) ++g_dev_epoch;
    for (int i = 0; i < g_nthreads; ++i) g_threads[i].state = kRunnable;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Hooks called by the kernel code.
extern "C" HIDDEN void __mlxq_ld(const void* p, unsigned long long n) { mem_access(p, n, 0); }
extern "C" HIDDEN void __mlxq_st(const void* p, unsigned long long n) { mem_access(p, n, 1); }
extern "C" HIDDEN void __mlxq_at(const void* p, unsigned long long n) { mem_access(p, n, 2); }

namespace {
void collective(ResolveFn fn, const char* op, void* in, void* out, const char* file, int line,
                int flags) {
  Thread* t = g_cur;
  t->flags = flags;
  t->state = kWaitCollective;
  t->fn = fn;
  t->op = op;
  t->in = in;
  t->out = out;
  t->file = file;
  t->line = line;
  ++t->seq;
  mlxq_emu_swap(&t->sp, g_sched_sp);
}
}  // namespace

extern "C" HIDDEN void mlxq_emu_collective(ResolveFn fn, const char* op, void* in, void* out,
                                           const char* file, int line) {
  collective(fn, op, in, out, file, line, kOrderAll);
}

extern "C" HIDDEN void mlxq_emu_barrier(int scope, const char* file, int line) {
  const int flags = scope >> 4;
  if ((scope & 15) == 1) {
    collective(nullptr, "simdgroup_barrier", nullptr, nullptr, file, line, flags);
    return;
  }
  Thread* t = g_cur;
  t->flags = flags;
  t->state = kWaitBarrier;
  t->op = "threadgroup_barrier";
  t->file = file;
  t->line = line;
  mlxq_emu_swap(&t->sp, g_sched_sp);
}

extern "C" HIDDEN unsigned mlxq_emu_lane() { return g_cur->lane; }
// precise::divide: correctly rounded (kernel code's own divisions are rewritten to fast math).
extern "C" HIDDEN float mlxq_emu_precise_fdiv(float a, float b) { return a / b; }

// Bounds of fixed-size arrays (thread-private arrays above all, which live on the fiber stacks and
// are invisible to the memory hooks): kernels are compiled with -fsanitize=array-bounds, whose
// checks call these handlers (the layouts are clang's UBSan ABI).
namespace {
struct UbsanLoc {
  const char* file;
  u32 line, column;
};
struct UbsanType {
  uint16_t kind, info;  // kind 0: integer; info: log2(bit width) << 1 | signed
  char name[1];
};
struct UbsanOutOfBounds {
  UbsanLoc loc;
  const UbsanType* array;
  const UbsanType* index;
};

[[noreturn]] void out_of_bounds_index(const UbsanOutOfBounds* d, uintptr_t v) {
  long long idx = (long long)v;
  const UbsanType* it = d->index;
  if (it->kind == 0) {
    const int bits = 1 << (it->info >> 1);
    if (bits < 64) {
      const uint64_t m = (1ull << bits) - 1;
      uint64_t u = (uint64_t)v & m;
      if ((it->info & 1) && (u >> (bits - 1))) u |= ~m;
      idx = (long long)u;
    }
  }
  fail(
      "out-of-bounds index %lld into fixed-size array of type %s (a thread-private or "
      "threadgroup array) at %s:%u by %s",
      idx, d->array->name, d->loc.file, d->loc.line, thread_desc());
  abort_thread();
}
}  // namespace

// -fsanitize=object-size: an access through a pointer past the end of the object the optimiser
// traced it to (after inlining: a thread-private array passed as `thread float*`).
struct UbsanTypeMismatch {
  UbsanLoc loc;
  const UbsanType* type;
  unsigned char log_alignment, kind;
};

extern "C" HIDDEN void __ubsan_handle_type_mismatch_v1(const UbsanTypeMismatch* d, uintptr_t p) {
  fail("out-of-bounds access to %s at %p past the end of its thread-private object at %s:%u by %s",
       d->type->name, (void*)p, d->loc.file, d->loc.line, thread_desc());
  abort_thread();
}
extern "C" HIDDEN void __ubsan_handle_type_mismatch_v1_abort(const UbsanTypeMismatch* d,
                                                             uintptr_t p) {
  __ubsan_handle_type_mismatch_v1(d, p);
}

// -fsanitize=signed-integer-overflow: 32-bit index arithmetic that passes 2^31 (Metal wraps it
// silently; the address is then wrong).
struct UbsanOverflow {
  UbsanLoc loc;
  const UbsanType* type;
};

[[noreturn]] void integer_overflow(const UbsanOverflow* d, const char* op) {
  fail(
      "signed integer overflow (%s of %s) at %s:%u by %s: 32-bit index arithmetic passed 2^31; "
      "compute it in 64 bits (long)",
      op, d->type->name, d->loc.file, d->loc.line, thread_desc());
  abort_thread();
}
#define MLXQ_OVERFLOW_HANDLER(name, op)                                                        \
  extern "C" HIDDEN void __ubsan_handle_##name(const UbsanOverflow* d, uintptr_t, uintptr_t) { \
    integer_overflow(d, op);                                                                   \
  }                                                                                            \
  extern "C" HIDDEN void __ubsan_handle_##name##_abort(const UbsanOverflow* d, uintptr_t,      \
                                                       uintptr_t) {                            \
    integer_overflow(d, op);                                                                   \
  }
MLXQ_OVERFLOW_HANDLER(add_overflow, "addition")
MLXQ_OVERFLOW_HANDLER(sub_overflow, "subtraction")
MLXQ_OVERFLOW_HANDLER(mul_overflow, "multiplication")
MLXQ_OVERFLOW_HANDLER(divrem_overflow, "division")
extern "C" HIDDEN void __ubsan_handle_negate_overflow(const UbsanOverflow* d, uintptr_t) {
  integer_overflow(d, "negation");
}
extern "C" HIDDEN void __ubsan_handle_negate_overflow_abort(const UbsanOverflow* d, uintptr_t) {
  integer_overflow(d, "negation");
}

extern "C" HIDDEN void __ubsan_handle_out_of_bounds(const UbsanOutOfBounds* d, uintptr_t v) {
  out_of_bounds_index(d, v);
}
extern "C" HIDDEN void __ubsan_handle_out_of_bounds_abort(const UbsanOutOfBounds* d, uintptr_t v) {
  out_of_bounds_index(d, v);
}

// ---------------------------------------------------------------------------------------------
// Host API (called through ctypes).
EXPORT int mlxq_emu_num_kernels() { return mlxq_emu_nkernels; }
EXPORT const char* mlxq_emu_kernel_name(int i) { return mlxq_emu_kernels[i].name; }

// buf_size[i] < 0 marks an absent buffer; tg_size likewise. Returns 0 on success, else 1 with the
// message in err.
// Threadgroup memory the first threadgroup used: host-bound blocks plus the bytes of fixed-size
// `threadgroup` arrays it wrote.
int64_t threadgroup_bytes(const int64_t* tg_size) {
  int64_t n = 0;
  for (int i = 0; i < 32; ++i)
    if (tg_size[i] > 0) n += tg_size[i];
  for (int64_t i = 0; i < g_static_tg.size; ++i)
    if (g_static_tg.shadow[i].w_epoch >= g_tg_base) ++n;
  return n;
}

constexpr int64_t kMaxThreadgroupMemory = 32768;

EXPORT int mlxq_emu_run(int kernel, const u32* grid, const u32* tptg, void* const* buf_ptr,
                        const int64_t* buf_size, const int* buf_writable, const int64_t* tg_size,
                        int64_t* bytes_read, int64_t* bytes_written, int64_t* tg_bytes, char* err,
                        int errlen, const u32* only) {
  *tg_bytes = 0;
  g_failed = false;
  g_err[0] = 0;
  int ok = 0;
  u64 nthreads = (u64)tptg[0] * tptg[1] * tptg[2];
  if (kernel < 0 || kernel >= mlxq_emu_nkernels) {
    fail("no kernel #%d", kernel);
  } else if (nthreads == 0 || nthreads > kMaxThreads) {
    fail("threads_per_threadgroup (%u, %u, %u) must hold 1..%d threads", tptg[0], tptg[1], tptg[2],
         kMaxThreads);
  } else if (!ensure_arena() || !ensure_stacks()) {
    fail("cannot reserve emulator memory");
  }
  void* bufs[32] = {};
  void* tgs[32] = {};
  if (!g_failed) {
    for (int i = 0; i < kSlots; ++i) g_slots[i].active = false;
    for (int i = 0; i < 32 && !g_failed; ++i) {
      g_read[i] = g_written[i] = 0;
      if (buf_size[i] >= 0) {
        Region& r = g_slots[i];
        if (!map_region(r, i, buf_size[i])) {
          fail("cannot map buffer(%d) of %lld bytes", i, (long long)buf_size[i]);
          break;
        }
        r.active = true;
        r.threadgroup = false;
        r.writer_live = false;
        r.index = i;
        if (!ensure_shadow(r, (size_t)buf_size[i])) {
          fail("cannot allocate the shadow of buffer(%d) (%lld bytes)", i, (long long)buf_size[i]);
          break;
        }
        if (buf_size[i]) memcpy(r.base, buf_ptr[i], (size_t)buf_size[i]);
        bufs[i] = r.base;
      }
      if (tg_size[i] >= 0) {
        Region& r = g_slots[32 + i];
        if (!map_region(r, 32 + i, tg_size[i]) || !ensure_shadow(r, (size_t)tg_size[i])) {
          fail("cannot map threadgroup(%d) of %lld bytes", i, (long long)tg_size[i]);
          break;
        }
        r.active = true;
        r.threadgroup = true;
        r.index = i;
        tgs[i] = r.base;
      }
    }
  }
  if (!g_failed && __start_mlxq_tg && !g_static_tg.base) {
    g_static_tg.base = __start_mlxq_tg;
    g_static_tg.threadgroup = true;
    if (ensure_shadow(g_static_tg, (size_t)(__stop_mlxq_tg - __start_mlxq_tg)))
      g_static_tg.size = __stop_mlxq_tg - __start_mlxq_tg;
  }
  if (!g_failed) {
    g_entry = mlxq_emu_kernels[kernel].entry;
    g_nthreads = (int)nthreads;
    install_fault_handlers();
    for (u32 z = 0; z < grid[2] && !g_failed; ++z)
      for (u32 y = 0; y < grid[1] && !g_failed; ++y)
        for (u32 x = 0; x < grid[0] && !g_failed; ++x) {
          // `only`: run just that threadgroup (index-width runs over huge grids).
          if (only && (x != only[0] || y != only[1] || z != only[2])) continue;
          g_tgpos[0] = x;
          g_tgpos[1] = y;
          g_tgpos[2] = z;
          g_tg_linear = (z * grid[1] + y) * grid[0] + x;
          run_threadgroup(grid, tptg, bufs, tgs);
          if (((x == 0 && y == 0 && z == 0) || only) && !g_failed) {
            *tg_bytes = threadgroup_bytes(tg_size);
            if (*tg_bytes > kMaxThreadgroupMemory)
              fail("threadgroup memory of %lld bytes exceeds Metal's limit of %lld bytes",
                   (long long)*tg_bytes, (long long)kMaxThreadgroupMemory);
          }
        }
    remove_fault_handlers();
  }
  if (!g_failed) {
    for (int i = 0; i < 32; ++i)
      if (buf_size[i] > 0 && buf_writable[i]) memcpy(buf_ptr[i], bufs[i], (size_t)buf_size[i]);
  }
  for (int i = 0; i < 32; ++i) {
    bytes_read[i] = g_read[i];
    bytes_written[i] = g_written[i];
  }
  if (g_failed) {
    snprintf(err, errlen, "%s", g_err);
    ok = 1;
  }
  release_memory();
  return ok;
}
