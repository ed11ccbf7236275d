// Software prefetch for the decode kernels' one pass over the rows of W.
//
// A decode step reads each packed weight once, cold, as one contiguous stream per thread (rows
// [n0, n1)) plus the matching scales and biases. The hardware prefetcher alone kept one core at
// 6-12 GB/s of the ~35 GB/s it can read (measured, 2-core AVX-512 machine, SmolLM2's shapes),
// so the kernels request the bytes kPrefetchBytes ahead of the rows they compute: 4 KiB gave
// 12-22 GB/s; 2 KiB was slower, 8 KiB no better. Prefetches are hints: no bounds are at risk,
// but they stay inside the thread's own rows so as not to pull another core's share.
// Included by kernels.h, inside each ISA's namespace like vec.h (no inline code shared between
// instruction sets).
#ifndef MLXQ_ISA
#error "include stream_prefetch.h through kernels.h"
#endif

#include <algorithm>
#include <cstdint>

#include "cpu/kernel_table.h"

namespace mlxq::cpu::MLXQ_ISA {

constexpr int64_t kPrefetchBytes = 4096;

// An asm statement, not __builtin_prefetch: GCC's vectorizer deletes prefetch builtins from the
// loops it vectorizes, which left a loop of nothing (measured: no prefetch instruction survived
// in the kernels). On x86 a non-temporal prefetch: the weights are read once per token, and
// through L2 they evicted what the rest of the step reads again (the cache, the Python objects
// of each call): decode ran 3% faster than with prefetcht0 (SmolLM2-135M, 2 threads, the two
// interleaved in one process, 6 rounds), the Python checks of a flat layer step about 40%.
inline void prefetch_line(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetchnta %0" : : "m"(*static_cast<const char*>(p)));
#elif defined(__aarch64__)
  asm volatile("prfm pldl1keep, %0" : : "Q"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

inline void prefetch_range(const uint8_t* begin, const uint8_t* end) {
  const uintptr_t line0 = reinterpret_cast<uintptr_t>(begin) & ~uintptr_t{63};
  for (uintptr_t p = line0; p < reinterpret_cast<uintptr_t>(end); p += 64)
    prefetch_line(reinterpret_cast<const void*>(p));
}

// Rows [n0, n1) of W, walked in tiles of `rows` rows, each tile in `steps` steps. Serves the
// affine weights (scales and biases) and the floating-point modes (one scale byte per group).
class RowStreamPrefetch {
 public:
  RowStreamPrefetch(const QuantWeight& W, int64_t n0, int64_t n1, int64_t rows, int64_t steps)
      : RowStreamPrefetch(W.w, W.K * W.bits / 8, static_cast<const uint8_t*>(W.scales),
                          static_cast<const uint8_t*>(W.biases),
                          W.G * (W.scale_type == ScaleType::kFloat ? 4 : 2), n0, n1, rows, steps) {}
  RowStreamPrefetch(const FpWeight& W, int64_t n0, int64_t n1, int64_t rows, int64_t steps)
      : RowStreamPrefetch(W.w, W.K * W.bits / 8, W.scales, nullptr, W.G, n0, n1, rows, steps) {}

  // Tile starting at row n: its scales and biases ahead; `step(i)` then asks for part i of the
  // weight bytes ahead, `finish()` for whatever the steps did not cover.
  void start_tile(int64_t n) {
    ahead_ = n * row_bytes_ + kPrefetchBytes;
    scale_rows(ahead_, std::min(end_, ahead_ + tile_bytes_));
  }
  void step(int64_t i) const { span(i * step_bytes_, (i + 1) * step_bytes_); }
  void finish(int64_t steps_done) const { span(steps_done * step_bytes_, tile_bytes_); }

 private:
  RowStreamPrefetch(const uint8_t* w, int64_t row_bytes, const uint8_t* scales,
                    const uint8_t* biases, int64_t scale_row_bytes, int64_t n0, int64_t n1,
                    int64_t rows, int64_t steps)
      : row_bytes_(row_bytes),
        scale_row_bytes_(scale_row_bytes),
        tile_bytes_(rows * row_bytes_),
        step_bytes_((tile_bytes_ + steps - 1) / steps),
        w_(w),
        scales_(scales),
        biases_(biases),
        end_(n1 * row_bytes_) {
    // the first kPrefetchBytes are not ahead of any tile: ask for them at once
    const int64_t first = n0 * row_bytes_, last = std::min(end_, first + kPrefetchBytes);
    prefetch_range(w_ + first, w_ + last);
    scale_rows(first, last);
  }

  void span(int64_t from, int64_t to) const {
    const int64_t begin = ahead_ + from, end = std::min({end_, ahead_ + to, ahead_ + tile_bytes_});
    if (begin < end) prefetch_range(w_ + begin, w_ + end);
  }
  // scales and biases of the rows holding weight bytes [from, to)
  void scale_rows(int64_t from, int64_t to) const {
    if (from >= to) return;
    const int64_t r0 = from / row_bytes_, r1 = (to - 1) / row_bytes_ + 1;
    prefetch_range(scales_ + r0 * scale_row_bytes_, scales_ + r1 * scale_row_bytes_);
    if (biases_ != nullptr)
      prefetch_range(biases_ + r0 * scale_row_bytes_, biases_ + r1 * scale_row_bytes_);
  }

  int64_t row_bytes_, scale_row_bytes_, tile_bytes_, step_bytes_;
  const uint8_t *w_, *scales_, *biases_;
  int64_t end_;
  int64_t ahead_ = 0;
};

}  // namespace mlxq::cpu::MLXQ_ISA
