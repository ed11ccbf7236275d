// How the GEMM paths split W between threads: each thread dequantizes its own row tiles and
// multiplies each with a single-threaded GEMM into its columns of y, so a tile is read by the
// core that wrote it and no barrier separates dequantization from the GEMM.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace mlxq::cpu {

struct ThreadTiles {
  int64_t rows = 1;   // rows of W per tile
  int64_t count = 0;  // tiles
};

// Tiles of about `tile_bytes` (`value_bytes` per dequantized value), at least one per thread.
inline ThreadTiles thread_tiles(int64_t N, int64_t K, int64_t value_bytes, int64_t tile_bytes) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = std::max<int64_t>(1, N * K * value_bytes / (threads * tile_bytes));
  const int64_t rows = (N + threads * per_thread - 1) / (threads * per_thread);
  return {rows, (N + rows - 1) / rows};
}

}  // namespace mlxq::cpu
