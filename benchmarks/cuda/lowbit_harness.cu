// Standalone harness for the 2/3/5/6-bit decode kernels (no torch): the tensor-core kernel of
// qmv_lowbit.cuh beside the CUDA-core kernel the op took before it (qmv_kernel, shape "d" at
// M = 1, R4 at M = 2), each checked against a float64 CPU reference and timed by CUDA-graph
// replay over enough weight copies to miss the L2, with a plain read of the same packed bytes.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        benchmarks/cuda/lowbit_harness.cu -o /tmp/lowbit_harness && /tmp/lowbit_harness [mode]
// Modes: none (checks, then every timing), "quick" (checks, then 28672 x 8192 bf16 M = 1 at groups
// 64 and 128), "probes" (as none, with the kernel's probe rows: no scale loads, x not staged, the
// loads alone).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "cuda/qmv_lowbit.cuh"
#include "harness.h"
#include "qmv_problem.h"

using namespace mlxq::cuda;

static int g_sms = 132;
static uint32_t* g_sink = nullptr;

struct Problem {
  int bits;
  int64_t N, K, GS;
  int M;
  bool half;
  std::vector<uint32_t> w;
  std::vector<uint16_t> s, b, x;
  int copies = 1;
  std::vector<uint32_t*> dw;
  std::vector<uint16_t*> ds, db;
  uint16_t* dx = nullptr;
  uint16_t* dy = nullptr;
  int64_t G() const { return K / GS; }
  int64_t words() const { return N * K / 32 * bits; }
  double packed_bytes() const { return words() * 4.0 + 2.0 * N * G() * 2; }
  uint32_t code(int64_t n, int64_t k) const {  // MLX packing: value k at bit k*bits of the row
    const int64_t bit = k * bits, wi = n * (K / 32 * bits) + bit / 32;
    const int sh = static_cast<int>(bit % 32);
    uint64_t v = w[wi];
    if (sh + bits > 32) v |= static_cast<uint64_t>(w[wi + 1]) << 32;
    return static_cast<uint32_t>(v >> sh) & ((1u << bits) - 1u);
  }
};

static void make(Problem& P, int copies) {
  const int64_t G = P.G();
  P.w.resize(P.words());
  for (auto& v : P.w) v = static_cast<uint32_t>(rnd());
  P.s.resize(P.N * G);
  P.b.resize(P.N * G);
  for (int64_t i = 0; i < P.N * G; ++i) {
    float sc = (0.002f + 0.02f * urand()) * 16.f / static_cast<float>(1 << P.bits);
    if (rnd() & 1) sc = -sc;
    P.s[i] = to_h(sc, P.half);
    P.b[i] = to_h(-0.1f + 0.2f * urand(), P.half);
  }
  P.x.resize(P.M * P.K);
  for (auto& v : P.x) v = to_h(-2.f + 4.f * urand(), P.half);
  upload(P, copies);
}

// The CUDA-core kernel in the op's shapes (qmv_launch.cuh before this kernel).
template <int Bits, typename T>
Launch cores() {
  return [](const QmvParams& p, cudaStream_t s) {
    constexpr int U = Bits == 2 ? 8 : (Bits == 8 ? 2 : 4);
    const auto go = [&](auto kernel, int R) {
      const int64_t warps = (p.N + R - 1) / R;
      const int64_t blocks = (warps + kDecodeWarps - 1) / kDecodeWarps;
      kernel<<<static_cast<unsigned>(blocks), kDecodeWarps * 32, 0, s>>>(p);
    };
    if (p.M <= 1) {
      go(qmv_kernel<Bits, 1, 2, U / 2, false, T>, 2);
    } else {
      go(qmv_kernel<Bits, 2, 4, U, false, T>, 4);
    }
  };
}

template <int Bits, typename T, int U = kLowbitSpans<Bits>, int Probe = 0>
Launch lowbit() {
  return [](const QmvParams& p, cudaStream_t s) {
    switch (p.group_shift) {
      case 5:
        return launch_qmv_lowbit_gs<Bits, 32, T, U, Probe>(p, g_sms, s);
      case 6:
        return launch_qmv_lowbit_gs<Bits, 64, T, U, Probe>(p, g_sms, s);
      default:
        return launch_qmv_lowbit_gs<Bits, 128, T, U, Probe>(p, g_sms, s);
    }
  };
}

// The packed weights read once by a plain streaming kernel: the floor of a kernel reading them.
static Launch read_floor(int bits) {
  return [bits](const QmvParams& p, cudaStream_t s) {
    const int64_t n = p.N * p.K * bits / 128;  // 16-byte words
    read_kernel_f<4><<<g_sms * 8, 256, 0, s>>>(reinterpret_cast<const uint4*>(p.w), n, g_sink);
  };
}

static bool check(Problem& P, const Launch& fn, const char* name, bool full_ref) {
  const int64_t rows = full_ref ? P.N : std::min<int64_t>(P.N, 1024);
  const auto [worst, bad] =
      check_float64(P, fn, rows, [&](int64_t n, int64_t k) { return P.code(n, k); });
  std::printf(
      "  check %-22s %d-bit N=%lld K=%lld gs=%lld M=%d %s: max err/tol %.3g, %lld bad of "
      "%lld\n",
      name, P.bits, (long long)P.N, (long long)P.K, (long long)P.GS, P.M, P.half ? "fp16" : "bf16",
      worst, (long long)bad, (long long)(rows * P.M));
  return bad == 0;
}

struct Row {
  std::string name;
  Launch fn;
};

static int g_failed = 0;
static bool g_probes = false;  // "probes": the kernel's probe rows beside the timings

// Checks (and times unless check_only) each row on one problem.
static void bench(int bits, int64_t N, int64_t K, int64_t GS, int M, bool half,
                  const std::vector<Row>& rows, bool check_only) {
  Problem P{bits, N, K, GS, M, half};
  const double bytes = N * K * bits / 8.0;
  const int copies =
      check_only ? 1 : std::max(1, std::min(16, static_cast<int>(std::ceil(400e6 / bytes))));
  make(P, copies);
  std::printf("== %d-bit N=%lld K=%lld gs=%lld M=%d %s (%.1f MB packed, %d copies)\n", bits,
              (long long)N, (long long)K, (long long)GS, M, half ? "fp16" : "bf16",
              P.packed_bytes() / 1e6, copies);
  for (const Row& r : rows) {
    const bool floor = r.name == "floor" || r.name.rfind("probe", 0) == 0;
    const bool ok = floor || check(P, r.fn, r.name.c_str(), check_only);
    if (!ok) ++g_failed;
    if (check_only) continue;
    const double us = graph_us([&](int c, cudaStream_t s) { r.fn(params(P, c), s); }, P.copies, 40);
    std::printf("  %-24s %8.2f us  %6.3f TB/s %s\n", r.name.c_str(), us,
                P.packed_bytes() / us / 1e6, ok ? "" : "WRONG");
  }
  release(P);
}

template <int Bits, typename T>
std::vector<Row> rows_for(bool timing) {
  std::vector<Row> r = {{"cores", cores<Bits, T>()}, {"mma", lowbit<Bits, T>()}};
  if (timing) {
    // one other step length beside the default
    constexpr int Alt = Bits == 2 ? 8 : (Bits == 3 ? 6 : 3);
    r.push_back({"mma U" + std::to_string(Alt), lowbit<Bits, T, Alt>()});
    r.push_back({"floor", read_floor(Bits)});
    if (g_probes) {  // what each part of the kernel costs (wrong results, not checked)
      r.push_back({"probe: no scale loads", lowbit<Bits, T, kLowbitSpans<Bits>, 1>()});
      r.push_back({"probe: x not staged", lowbit<Bits, T, kLowbitSpans<Bits>, 2>()});
      r.push_back({"probe: loads alone", lowbit<Bits, T, kLowbitSpans<Bits>, 3>()});
    }
  }
  return r;
}

// Phase 0: correctness over edge shapes (full float64 reference): rows not a multiple of 16,
// chunks not a multiple of 4 (a partial span), K split (long rows), a single chunk. Phase 1:
// 28672 x 8192 bf16 M = 1 at groups 64 and 128 (first 1024 rows checked). Phase 2: fp16, group
// 32, M = 2, 4096 x 4096, 8192 x 28672.
template <int Bits>
void run_bits(int phase) {
  using bf = __nv_bfloat16;
  using hf = __half;
  if (phase == 0) {
    for (int M : {1, 2}) {
      bench(Bits, 1000, 4160, 32, M, false, rows_for<Bits, bf>(false), true);
      bench(Bits, 1000, 4160, 64, M, true, rows_for<Bits, hf>(false), true);
      bench(Bits, 1000, 4224, 128, M, false, rows_for<Bits, bf>(false), true);
      bench(Bits, 37, 4224, 128, M, true, rows_for<Bits, hf>(false), true);
      bench(Bits, 64, 28672, 64, M, false, rows_for<Bits, bf>(false), true);
      bench(Bits, 16, 32, 32, M, false, rows_for<Bits, bf>(false), true);
    }
  } else if (phase == 1) {
    for (int64_t GS : {64, 128}) {
      bench(Bits, 28672, 8192, GS, 1, false, rows_for<Bits, bf>(true), false);
    }
  } else {
    bench(Bits, 28672, 8192, 64, 1, true, rows_for<Bits, hf>(true), false);
    bench(Bits, 28672, 8192, 32, 1, false, rows_for<Bits, bf>(true), false);
    bench(Bits, 28672, 8192, 64, 2, false, rows_for<Bits, bf>(true), false);
    bench(Bits, 4096, 4096, 64, 1, false, rows_for<Bits, bf>(true), false);
    bench(Bits, 8192, 28672, 64, 1, false, rows_for<Bits, bf>(true), false);
  }
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines survive a timeout
  harness_seed(0x1234567ull);
  CK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, 0));
  CK(cudaMalloc(&g_sink, 4));
  const bool quick = argc > 1 && std::strcmp(argv[1], "quick") == 0;
  g_probes = argc > 1 && std::strcmp(argv[1], "probes") == 0;
  for (int phase = 0; phase < (quick ? 2 : 3); ++phase) {
    run_bits<2>(phase);
    run_bits<3>(phase);
    run_bits<5>(phase);
    run_bits<6>(phase);
  }
  std::printf("checks: %s (%d failed)\n", g_failed == 0 ? "all ok" : "FAILED", g_failed);
  return g_failed == 0 ? 0 : 1;
}
