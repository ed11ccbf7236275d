// CUDA kernels for the mlxq ops: argument checks (checks.h, shared with every backend), layout
// preparation, and the choice between the streaming decode kernel (M <= 8) and dequantized
// tiles multiplied by cuBLAS (larger M); 1-bit weights go to the composite ops (composite.h).
// affine_gather_matmul runs the decode kernel over its pairs for decode sizes and the composite
// (pairs grouped by expert over affine_matmul) otherwise.
// Every launch goes to the current CUDA stream of the operands' device, so the ops can be
// captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "composite/composite.h"
#include "cuda/dtype.h"
#include "cuda/kernels.cuh"
#include "cuda/launch.h"
#include "mlx_rounding.h"

namespace mlxq::cuda {

void launch_dequantize(int bits, const DequantParams& p, DType out_dtype, cudaStream_t stream) {
  const int64_t threads = p.R * (p.K / 8);
  if (threads == 0) return;
  const int64_t blocks = (threads + 255) / 256;
#define MLXQ_DEQ_LAUNCH(B, O) \
  dequantize_kernel<B, O><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p)
#define MLXQ_DEQ_BITS(O)     \
  switch (bits) {            \
    case 2:                  \
      MLXQ_DEQ_LAUNCH(2, O); \
      break;                 \
    case 3:                  \
      MLXQ_DEQ_LAUNCH(3, O); \
      break;                 \
    case 4:                  \
      MLXQ_DEQ_LAUNCH(4, O); \
      break;                 \
    case 5:                  \
      MLXQ_DEQ_LAUNCH(5, O); \
      break;                 \
    case 6:                  \
      MLXQ_DEQ_LAUNCH(6, O); \
      break;                 \
    default:                 \
      MLXQ_DEQ_LAUNCH(8, O); \
      break;                 \
  }
  switch (out_dtype) {
    case DType::kHalf:
      MLXQ_DEQ_BITS(__half)
      break;
    case DType::kBFloat16:
      MLXQ_DEQ_BITS(__nv_bfloat16)
      break;
    default:
      MLXQ_DEQ_BITS(float)
      break;
  }
#undef MLXQ_DEQ_BITS
#undef MLXQ_DEQ_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

ScaleType scale_type_of(at::ScalarType t) { return static_cast<ScaleType>(dtype_of(t)); }

int log2_of(int64_t group_size) { return group_size == 32 ? 5 : (group_size == 64 ? 6 : 7); }

// Contiguous and 16-byte aligned (the kernels use 16-byte vector accesses): a view that starts
// off alignment is copied.
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// A 2-D packed weight [N, K*bits/32] with its [N, G] scales and biases (all contiguous).
struct Weight {
  at::Tensor w, s, b;
  int64_t N = 0, K = 0, G = 0;
  int64_t group_size = 0, bits = 0;
};

Weight make_weight(const at::Tensor& w, const at::Tensor& s, const at::Tensor& b,
                   int64_t group_size, int64_t bits) {
  Weight W{aligned(w), s.contiguous(), b.contiguous()};
  W.N = w.size(0);
  W.G = s.size(1);
  W.K = W.G * group_size;
  W.group_size = group_size;
  W.bits = bits;
  return W;
}

// Dequantizes rows [n0, n1) of W into `out` [n1 - n0, K] (contiguous, 16-byte aligned).
void dequantize_rows(const Weight& W, int64_t n0, int64_t n1, at::Tensor& out) {
  DequantParams p;
  const int64_t row_words = W.K * W.bits / 32;
  p.w = static_cast<const uint32_t*>(W.w.const_data_ptr()) + n0 * row_words;
  p.scales = static_cast<const char*>(W.s.const_data_ptr()) + n0 * W.G * W.s.element_size();
  p.biases = static_cast<const char*>(W.b.const_data_ptr()) + n0 * W.G * W.b.element_size();
  p.out = out.mutable_data_ptr();
  p.R = n1 - n0;
  p.K = W.K;
  p.G = W.G;
  p.group_shift = log2_of(W.group_size);
  p.scale_type = scale_type_of(W.s.scalar_type());
  launch_dequantize(static_cast<int>(W.bits), p, dtype_of(out.scalar_type()),
                    c10::cuda::getCurrentCUDAStream());
}

// Which decode kernel runs. CUDA cores take any bits and dtype. For 4-bit W with fp16/bf16 x on
// compute capability >= 8.0 there are tensor-core kernels: the streaming one (qmv_stream.cuh)
// for M <= 2 with scales in the dtype of x, and qmv_mma4_kernel, whose time hardly grows with M
// but whose cost per group is higher than the CUDA-core kernel's, once M * group_size >= 256.
// Measured on an H200 (28672 x 8192, bf16, ms, cores / mma): group 128: M=1 0.059/0.076,
// M=4 0.139/0.078; group 64, M=1: 0.061/0.107; group 32, M=1: 0.062/0.174; the streaming kernel
// (benchmarks/cuda/qmv_harness.cu, M=1) 0.042 at group 128, 0.043 at 64, 0.047 at 32 (torch's
// int4 tinygemm: 0.062, 0.066, 0.076). MLXQ_CUDA_DECODE=cores|mma|stream forces one where it
// applies (read on every call, so that a benchmark can compare them in one process).
// For 4-bit M = 3 .. 8 the streaming kernel can also run once a pair of rows of x ("pairs",
// reading W (M + 1) / 2 times). MLXQ_CUDA_DECODE=stream forces pairs for every M.
enum class Decode { kCores, kMma, kStream, kStreamPairs };

// Whether M > 2 rows run as pairs of the streaming kernel rather than qmv_mma4: at M = 3, 4 on
// every layer of 2^25 weights or more. Measured on an H200 (bf16, ms, pairs / mma4, group 128 and
// 64): 28672 x 8192 M=3 0.071/0.096, 0.078/0.136, M=4 0.072/0.097, 0.081/0.136; 4096 x 14336
// M=4 0.027/0.030, 0.030/0.041; 14336 x 4096 M=4 0.025/0.030, 0.028/0.040; 8192 x 28672 M=3
// 0.099/0.106, 0.105/0.164, M=4 0.115/0.107, 0.123/0.166; smaller layers go to mma4 (4096 x 4096
// M=4 0.012/0.010), and so does M >= 5 (pairs win only at group 64 on 28672 x 8192: 0.118 /
// 0.142). MLXQ_CUDA_DECODE_PAIRS_MAX=m (read on every call) runs pairs for M <= m instead.
bool stream_pairs(const Weight& W, int64_t M) {
  const char* env = std::getenv("MLXQ_CUDA_DECODE_PAIRS_MAX");
  if (env != nullptr) return M <= std::atoll(env);
  return M <= 4 && W.N * W.K >= (int64_t{1} << 25);
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// What the kernel choices read of a device, from the driver once per process (the attributes
// never change): a decode call asks the driver nothing (it made eight cudaDeviceGetAttribute
// calls before, four for the choice and four again for the launch).
struct DeviceInfo {
  int major = 0;
  StreamDevice stream{};
};

const DeviceInfo& device_info(int device) {
  static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> once;
  static std::array<DeviceInfo, C10_COMPILE_TIME_MAX_GPUS> info;
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "CUDA device index ", device,
              " out of range");
  std::call_once(once[device], [device] {
    int major = 0, minor = 0, sms = 0, block = 0, sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
#ifdef MLXQ_CUDA_SM90A
    const bool bulk = major == 9 && minor == 0;  // sm_90a machine code runs on 9.0 alone
#else
    const bool bulk = false;
#endif
    info[device] = {major, {sms, block, sm, bulk}};
  });
  return info[device];
}

int sm_count(int device) { return device_info(device).stream.sm_count; }

Decode decode_kernel(const Weight& W, int64_t M, at::ScalarType dt, const DeviceInfo& dev) {
  const char* env = std::getenv("MLXQ_CUDA_DECODE");
  const std::string v(env == nullptr ? "" : env);
  if (W.bits != 4 || (dt != at::kHalf && dt != at::kBFloat16) || v == "cores" || W.G > INT32_MAX) {
    return Decode::kCores;
  }
  if (dev.major < 8) return Decode::kCores;
  if (v == "mma") return Decode::kMma;
  const bool stream_ok = W.s.scalar_type() == dt && W.b.scalar_type() == dt && aligned16(W.s) &&
                         aligned16(W.b) &&
                         qmv_stream4_fits(std::min<int64_t>(M, 2), W.K, dev.stream);
  if (stream_ok && M <= 2) return Decode::kStream;
  if (stream_ok && (v == "stream" || stream_pairs(W, M))) return Decode::kStreamPairs;
  return M * W.group_size >= 256 ? Decode::kMma : Decode::kCores;
}

// Whether the fused Hopper prefill runs y = x @ W.T (gemm_sm90.cu): 4-bit W, fp16/bf16 x with
// scales and biases of the same dtype, K a multiple of its 64-value stages, an sm_90a build on a
// compute capability 9.0 device. Otherwise tiles of W are dequantized for cuBLAS.
// It needs blocks (128 or 256 rows of W by 64 to 256 rows of x, or parts of their K) for most
// multiprocessors, and loses to cuBLAS's own tiles once M is large enough to amortize one
// dequantization of W.
// Measured on an H200 (bf16, ms, fused / tiles + cuBLAS): 28672 x 8192 (N x K): M=32 0.11/0.30,
// M=128 0.13/0.31, M=512 0.42-0.45/0.49, M=768 0.64-0.66/0.66 (the previous fused kernel:
// M=1024 0.87/0.87, M=2048 1.67/1.56); 8192 x 28672 (128 blocks at M=512) 0.35-0.39/0.52;
// 4096 x 4096 (64 blocks at M=512): M=32 0.049/0.024, M=512 0.058/0.039 (previous kernel).
bool use_sm90_gemm(const Weight& W, int64_t M, at::ScalarType dt, int device) {
  if (W.bits != 4 || (dt != at::kHalf && dt != at::kBFloat16) || W.s.scalar_type() != dt ||
      W.b.scalar_type() != dt || W.K % 64 != 0 || !gemm_w4_sm90_available(device)) {
    return false;
  }
  const char* env = std::getenv("MLXQ_CUDA_GEMM");  // "2": wherever it can run (tests)
  if (env != nullptr && std::string(env) == "2") return true;
  if (M > 768) return false;
  const int sms = sm_count(device);
  return 4 * gemm_w4_sm90_workspace(M, W.N, W.K, sms).blocks >= 3 * sms;
}

// The fused prefill's (scale, bias) pairs (launch_gemm_w4_sm90 packs them into a workspace on
// every call, 4.7-4.9 us at 28672 x 8192 group 128 on an H200) kept per weight from one call to
// the next where MLXQ_CUDA_GEMM_SB_CACHE (read on every call) asks: 0 (the default) never; 1 for
// calls outside a CUDA graph capture; 2 also for calls being captured, where the graph then
// reads the pairs as they were packed: a later in-place change of the scales or biases reaches
// eager calls (repacked) but not that graph's replays, so re-capture after one. An entry is keyed
// by the storages of the scales and biases (held weakly, so that a freed storage's address
// cannot come back as another's while its entry exists) and their offsets, and is repacked when
// their data pointers or version counters (bumped by every in-place write through torch: copy_,
// load_state_dict, ...) differ from the packed ones. Inference tensors have no version counter:
// they are never cached. An entry that a captured graph reads stays for the process; the others
// are evicted least recently used beyond MLXQ_CUDA_GEMM_SB_CACHE_MB (read once, default 1024).
// Measured on an H200 (benchmarks/cuda/graph_probe.py, bf16, group 128, M = 512, profiler over
// CUDA-graph replays, us a call): 28672 x 8192 the kernel alone 399.5 + 0.9 idle against the
// packing's 4.7 + 1.2 idle + 399.2 + 0.4; 8192 x 28672 367.9 + 1.0 against 4.8 + 1.1 + 380.2 +
// 0.5 (eagerly 367.7 against 4.7 + 369.4): the kernel reads the pairs from memory rather than
// from the L2 the packing left them in at no measured cost, so a call saves the packing and one
// gap, 1.3-1.5%. 4096 x 4096 as half tiles (MLXQ_CUDA_GEMM=2 MLXQ_CUDA_GEMM_WS=2): 0.0430-0.0431
// ms against 0.0453-0.0458. Off by default: it keeps a second copy of the scales and biases
// (N * G * 4 bytes a weight), and mode 2 changes what a graph reads after an in-place update.
// Where the launch reads no pairs (the warp-specialized kernel's default ring, 43lt, TMAs the
// scales and biases from their arrays: gemm_w4_sm90_reads_pairs) nothing is packed or cached;
// the pairs remain for the register-A kernel, the other rings and arrays 43lt cannot TMA.
int sb_cache_mode() {
  const char* env = std::getenv("MLXQ_CUDA_GEMM_SB_CACHE");
  return env == nullptr || *env == '\0' ? 0 : std::atoi(env);
}

struct SbEntry {
  SbEntry(const at::Tensor& s, const at::Tensor& b)
      : s_ref(s.storage().getWeakStorageImpl()), b_ref(b.storage().getWeakStorageImpl()) {}
  c10::weak_intrusive_ptr<c10::StorageImpl> s_ref, b_ref;
  const void *s_ptr = nullptr, *b_ptr = nullptr;
  uint32_t s_ver = 0, b_ver = 0;
  int64_t N = 0, G = 0;
  at::Tensor sb;
  cudaStream_t stream = nullptr;  // the stream sb was allocated on
  bool pinned = false;            // read by a captured graph
  uint64_t used = 0;              // last use (LRU clock)
  int64_t bytes() const { return sb.defined() ? sb.numel() * 4 : 0; }
};
using SbKey = std::tuple<const c10::StorageImpl*, int64_t, const c10::StorageImpl*, int64_t>;

struct SbCache {
  std::mutex mu;
  std::map<SbKey, SbEntry> entries;
  std::vector<at::Tensor> retired;  // pinned pairs replaced by a repack: a graph may read them
  uint64_t clock = 0;
  int64_t bytes = 0;  // of the unpinned entries
};
SbCache& sb_cache() {
  static SbCache* cache = new SbCache();  // never destroyed: freeing at exit races the allocator
  return *cache;
}
int64_t sb_cache_limit() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("MLXQ_CUDA_GEMM_SB_CACHE_MB");
    return (env != nullptr ? std::max<int64_t>(0, std::atoll(env)) : 1024) << 20;
  }();
  return bytes;
}

uint32_t version_of(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->version_counter().current_version();
}

// The pairs of W from the cache, packed on `stream` when missing or stale; undefined where the
// cache does not apply (then the launch packs them into a workspace, as without the cache).
at::Tensor cached_pairs(const Weight& W, cudaStream_t stream) {
  const int mode = sb_cache_mode();
  if (mode <= 0 || W.s.is_inference() || W.b.is_inference()) return {};
  const bool capturing = stream_capturing();
  if (capturing && mode < 2) return {};
  c10::StorageImpl* si = W.s.storage().unsafeGetStorageImpl();
  c10::StorageImpl* bi = W.b.storage().unsafeGetStorageImpl();
  const SbKey key{si, W.s.storage_offset(), bi, W.b.storage_offset()};
  const void *sp = W.s.const_data_ptr(), *bp = W.b.const_data_ptr();
  const uint32_t sv = version_of(W.s), bv = version_of(W.b);
  SbCache& c = sb_cache();
  const std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.entries.find(key);
  const bool fresh = it != c.entries.end() && !it->second.s_ref.expired() &&
                     !it->second.b_ref.expired() && it->second.s_ptr == sp &&
                     it->second.b_ptr == bp && it->second.s_ver == sv && it->second.b_ver == bv &&
                     it->second.N == W.N && it->second.G == W.G;
  if (capturing && !fresh) return {};  // packed inside the graph, as without the cache
  if (!fresh) {
    if (it != c.entries.end()) {  // stale: a new buffer (a kernel may still read the old one)
      if (it->second.pinned) {
        c.retired.push_back(it->second.sb);
      } else {
        c.bytes -= it->second.bytes();
      }
      c.entries.erase(it);
    }
    // drop the entries of freed storages, then the least recently used beyond the limit
    const int64_t need = W.N * gemm_w4_sm90_sb_cols(W.G) * 4;
    for (auto e = c.entries.begin(); e != c.entries.end();) {
      if (!e->second.pinned && (e->second.s_ref.expired() || e->second.b_ref.expired())) {
        c.bytes -= e->second.bytes();
        e = c.entries.erase(e);
      } else {
        ++e;
      }
    }
    while (c.bytes + need > sb_cache_limit()) {
      auto lru = c.entries.end();
      for (auto e = c.entries.begin(); e != c.entries.end(); ++e) {
        if (!e->second.pinned && (lru == c.entries.end() || e->second.used < lru->second.used)) {
          lru = e;
        }
      }
      if (lru == c.entries.end()) break;
      c.bytes -= lru->second.bytes();
      c.entries.erase(lru);
    }
    if (need > sb_cache_limit()) return {};
    SbEntry e(W.s, W.b);
    e.s_ptr = sp, e.b_ptr = bp, e.s_ver = sv, e.b_ver = bv, e.N = W.N, e.G = W.G;
    e.sb = at::empty({W.N, gemm_w4_sm90_sb_cols(W.G)}, W.s.options().dtype(at::kInt));
    e.stream = stream;
    launch_gemm_pack_sb(sp, bp, static_cast<uint32_t*>(e.sb.mutable_data_ptr()),
                        W.N * gemm_w4_sm90_sb_cols(W.G), stream);
    c.bytes += e.bytes();
    it = c.entries.emplace(key, std::move(e)).first;
  }
  SbEntry& e = it->second;
  e.used = ++c.clock;
  if (stream != e.stream) {  // the allocator may not reuse the pairs before this stream is done
    c10::cuda::CUDACachingAllocator::recordStream(
        e.sb.storage().data_ptr(), c10::cuda::getStreamFromExternal(stream, W.s.get_device()));
  }
  if (capturing && !e.pinned) {
    e.pinned = true;
    c.bytes -= e.bytes();
  }
  return e.sb;
}

// Bytes of dequantized weight per tile on the prefill path; MLXQ_CUDA_TILE_MB overrides it.
// Large enough that most layers are one tile (one cuBLAS call at full efficiency), bounded so
// that huge layers do not double their memory.
int64_t tile_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("MLXQ_CUDA_TILE_MB");
    const int64_t mb = env != nullptr ? std::max<int64_t>(1, std::atoll(env)) : 512;
    return mb << 20;
  }();
  return bytes;
}

// x [M, in_features] (contiguous, 16-byte aligned, any float dtype) -> y [M, out_features] in
// the dtype of x.
at::Tensor matmul_2d(const at::Tensor& x, const Weight& W, bool transpose) {
  const int64_t M = x.size(0);
  const at::ScalarType dt = x.scalar_type();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (!transpose) {
    // y = x @ W sums over the rows of W: dequantize all of W once. Decode sizes multiply in
    // fp32 (the numerics contract); larger M in the dtype of x with cuBLAS's fp32 accumulation.
    const at::ScalarType wt = M <= kDecodeMaxRows ? at::kFloat : dt;
    at::Tensor wd = at::empty({W.N, W.K}, x.options().dtype(wt));
    dequantize_rows(W, 0, W.N, wd);
    return at::matmul(x.to(wt), wd).to(dt);
  }
  if (M <= kDecodeMaxRows) {
    at::Tensor y = at::empty({M, W.N}, x.options());
    QmvParams p;
    p.w = static_cast<const uint32_t*>(W.w.const_data_ptr());
    p.scales = W.s.const_data_ptr();
    p.biases = W.b.const_data_ptr();
    p.x = x.const_data_ptr();
    p.y = y.mutable_data_ptr();
    p.N = W.N;
    p.K = W.K;
    p.G = W.G;
    p.M = static_cast<int>(M);
    p.group_shift = log2_of(W.group_size);
    p.scale_type = scale_type_of(W.s.scalar_type());
    const DeviceInfo& dev = device_info(x.get_device());  // for the choice and the launch
    switch (decode_kernel(W, M, dt, dev)) {
      case Decode::kStream:
        launch_qmv_stream4(p, dtype_of(dt), dev.stream, stream);
        break;
      case Decode::kStreamPairs:
        for (int64_t r = 0; r < M; r += 2) {  // rows r, r + 1 of x and y
          QmvParams q = p;
          q.x = static_cast<const char*>(p.x) + r * W.K * x.element_size();
          q.y = static_cast<char*>(p.y) + r * W.N * y.element_size();
          q.M = static_cast<int>(std::min<int64_t>(2, M - r));
          launch_qmv_stream4(q, dtype_of(dt), dev.stream, stream);
        }
        break;
      case Decode::kMma:
        launch_qmv_mma4(p, dtype_of(dt), stream);
        break;
      default:
        launch_qmv(static_cast<int>(W.bits), p, dtype_of(dt), stream);
        break;
    }
    return y;
  }
  if (use_sm90_gemm(W, M, dt, x.get_device())) {
    at::Tensor y = at::empty({M, W.N}, x.options());
    const int sms = sm_count(x.get_device());
    GemmArgs a;
    a.scales = W.s.const_data_ptr();
    a.biases = W.b.const_data_ptr();
    a.N = W.N;
    a.M = M;
    a.K = W.K;
    a.G = W.G;
    a.sm_count = sms;
    // the kernel may read the scales and biases themselves: then no pairs, cached or packed
    const bool pairs = gemm_w4_sm90_reads_pairs(a);
    at::Tensor sb = pairs ? cached_pairs(W, stream) : at::Tensor();
    const bool sb_ready = sb.defined();
    if (!sb_ready) {
      sb = at::empty({pairs ? W.N : 0, gemm_w4_sm90_sb_cols(W.G)}, x.options().dtype(at::kInt));
    }
    const GemmWorkspace wsz = gemm_w4_sm90_workspace(M, W.N, W.K, sms);
    at::Tensor ws, counters;  // the K split's scratch, where it splits
    if (wsz.counters > 0) {
      ws = at::empty({wsz.floats}, x.options().dtype(at::kFloat));
      counters = at::zeros({wsz.counters}, x.options().dtype(at::kInt));
    }
    a.w = static_cast<const uint32_t*>(W.w.const_data_ptr());
    a.sb = static_cast<uint32_t*>(sb.mutable_data_ptr());
    a.x = x.const_data_ptr();
    a.y = y.mutable_data_ptr();
    a.group_shift = log2_of(W.group_size);
    a.ws = ws.defined() ? ws.mutable_data_ptr<float>() : nullptr;
    a.counters = counters.defined() ? counters.mutable_data_ptr<int>() : nullptr;
    a.sb_ready = sb_ready;
    launch_gemm_w4_sm90(a, dtype_of(dt), stream);
    return y;
  }
  // Prefill: tiles of W dequantized to the dtype of x (as MLX's GEMM does in threadgroup
  // memory), multiplied by cuBLAS with fp32 accumulation into their columns of y.
  const int64_t elem = x.element_size();
  const int64_t rows = std::min(W.N, std::max<int64_t>(64, tile_bytes() / (W.K * elem)));
  at::Tensor tile = at::empty({rows, W.K}, x.options());
  at::Tensor y = at::empty({M, W.N}, x.options());
  for (int64_t n0 = 0; n0 < W.N; n0 += rows) {
    const int64_t n1 = std::min(W.N, n0 + rows);
    at::Tensor t = tile.narrow(0, 0, n1 - n0);
    dequantize_rows(W, n0, n1, t);
    at::Tensor out = rows == W.N ? y : y.narrow(1, n0, n1 - n0);
    at::mm_out(out, x, t.t());
  }
  return y;
}

// Row-major index into a batch of shape `from` (right-aligned against `to`, size-1 dimensions
// broadcast) of entry `i` of the broadcast batch shape `to`.
int64_t broadcast_index(int64_t i, const std::vector<int64_t>& to, at::IntArrayRef from) {
  int64_t idx = 0, stride = 1;
  const int64_t offset = static_cast<int64_t>(to.size()) - static_cast<int64_t>(from.size());
  for (int64_t d = static_cast<int64_t>(to.size()) - 1; d >= 0; --d) {
    const int64_t coord = i % to[d];
    i /= to[d];
    const int64_t fd = d - offset;
    if (fd < 0) continue;
    if (from[fd] != 1) idx += coord * stride;
    stride *= from[fd];
  }
  return idx;
}

at::Tensor affine_matmul_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales,
                              const at::Tensor& biases, int64_t group_size, int64_t bits,
                              bool transpose) {
  // Reached below autograd (python/mlxq/ops.py owns the gradient).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const MatmulGeometry g = check_matmul(x, wq, scales, biases, group_size, bits, transpose);
  if (bits == 1) {  // no kernel of its own: composed of ATen ops (csrc/composite/)
    return composite::affine_matmul_1bit(x, wq, scales, biases, group_size, bits, transpose);
  }
  const c10::cuda::CUDAGuard device(x.device());
  if (x.numel() == 0 || wq.numel() == 0) return at::zeros(g.out_shape, x.options());
  const at::Tensor xc = aligned(x);
  if (g.batch.empty()) {
    const Weight W = make_weight(wq, scales, biases, group_size, bits);
    return matmul_2d(xc.view({g.M, g.in_features}), W, transpose).view(g.out_shape);
  }
  // Batched weights: each broadcast batch entry multiplies its own x and w entries (views, so
  // broadcasting never copies a weight).
  const int64_t Kp = wq.size(-1), G = scales.size(-1), rows = g.w.rows;
  const at::Tensor x3 = xc.reshape({-1, g.M, g.in_features});
  const at::Tensor w3 = wq.contiguous().reshape({-1, rows, Kp});
  const at::Tensor s3 = scales.contiguous().reshape({-1, rows, G});
  const at::Tensor b3 = biases.contiguous().reshape({-1, rows, G});
  const auto xb = x.sizes().slice(0, x.dim() - 2);
  const int64_t B = c10::multiply_integers(g.batch);
  at::Tensor y = at::empty({B, g.M, g.out_features}, x.options());
  for (int64_t i = 0; i < B; ++i) {
    const int64_t xi = broadcast_index(i, g.batch, xb);
    const int64_t wi = broadcast_index(i, g.batch, g.w.batch);
    const Weight W = make_weight(w3[wi], s3[wi], b3[wi], group_size, bits);
    y[i].copy_(matmul_2d(aligned(x3[xi]), W, transpose));
  }
  return y.view(g.out_shape);
}

// MLXQ_CUDA_GATHER=composite sends every gather to the composite op (benchmarks compare the two
// in one process: read on every call, so a CUDA graph keeps the path chosen at capture).
bool gather_kernel_enabled() {
  const char* env = std::getenv("MLXQ_CUDA_GATHER");
  return env == nullptr || std::string(env) != "composite";
}

// The most pairs the gather's decode launch takes: each pair streams its expert's weight, so from
// a few dozen pairs on the composite's grouping by expert (each selected expert read once) wins
// (the float modes' rule, fp_cuda.cu).
constexpr int64_t kGatherMaxPairs = 64;

at::Tensor affine_gather_matmul_cuda(const at::Tensor& x, const at::Tensor& wq,
                                     const at::Tensor& scales, const at::Tensor& biases,
                                     const std::optional<at::Tensor>& lhs_indices,
                                     const std::optional<at::Tensor>& rhs_indices,
                                     int64_t group_size, int64_t bits, bool transpose,
                                     bool sorted_indices) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // ops.py owns the gradient
  const GatherGeometry g = check_gather_matmul(x, wq, scales, biases, lhs_indices, rhs_indices,
                                               group_size, bits, transpose);
  const int64_t N = g.w.rows, K = g.w.cols;
  const int64_t P = c10::multiply_integers(g.index_shape);
  const c10::cuda::CUDAGuard device(x.device());
  const bool capturing = stream_capturing();
  // Decode sizes of x @ W.T with few pairs: one launch of the CUDA-core decode kernel, each pair
  // streaming its own expert (no sort, no device-to-host copy of the experts); 1 bit, larger M
  // and many pairs group the pairs by expert (composite/gather_composite.cpp). While a graph is
  // captured the grouping cannot read the experts back, so every decode size takes the kernel
  // (up to the grid's 65535 pairs) and the rest the composite pair by pair. R >= 2 rows of W
  // per warp, so N / kDecodeWarps bounds the grid's x dimension.
  const bool decode = bits != 1 && transpose && g.M >= 1 && g.M <= kDecodeMaxRows && N > 0 &&
                      K > 0 && P >= 1 && P <= (capturing ? 65535 : kGatherMaxPairs) &&
                      (N + kDecodeWarps - 1) / kDecodeWarps <= INT32_MAX && gather_kernel_enabled();
  if (!decode) {
    return composite::affine_gather_matmul(x, wq, scales, biases, lhs_indices, rhs_indices,
                                           group_size, bits, transpose, sorted_indices, capturing);
  }
  // checked: every index lies in its batch (one device-to-host read of their range; while
  // capturing, by the kernel on the device)
  const auto [lhs, rhs] = gather_pair_indices(
      g, x, lhs_indices, rhs_indices, capturing ? IndexCheck::kInKernel : IndexCheck::kHost);
  const at::Tensor xc = aligned(x);  // [x_batch, M, K]: each matrix's rows 16-byte aligned
  const at::Tensor wc = aligned(wq);
  const at::Tensor sc = scales.contiguous(), bc = biases.contiguous();
  at::Tensor y = at::empty({P, g.M, N}, x.options());
  QmvParams p;
  p.w = static_cast<const uint32_t*>(wc.const_data_ptr());
  p.scales = sc.const_data_ptr();
  p.biases = bc.const_data_ptr();
  p.x = xc.const_data_ptr();
  p.y = y.mutable_data_ptr();
  p.N = N;
  p.K = K;
  p.G = g.w.groups;
  p.M = static_cast<int>(g.M);
  p.group_shift = log2_of(group_size);
  p.scale_type = scale_type_of(scales.scalar_type());
  p.lhs = lhs.const_data_ptr<int64_t>();
  p.rhs = rhs.const_data_ptr<int64_t>();
  p.pairs = P;
  p.x_batch = g.x_batch;
  p.w_batch = g.w_batch;
  p.w_matrix = N * packed_cols(K, bits);
  p.s_matrix = N * g.w.groups;
  launch_qmv(static_cast<int>(bits), p, dtype_of(x.scalar_type()),
             c10::cuda::getCurrentCUDAStream());
  return y.view(g.out_shape);
}

at::Tensor affine_dequantize_cuda(const at::Tensor& wq, const at::Tensor& scales,
                                  const at::Tensor& biases, int64_t group_size, int64_t bits) {
  const PackedGeometry g = check_dequantize(wq, scales, biases, group_size, bits);
  if (bits == 1) return composite::affine_dequantize_1bit(wq, scales, biases, group_size, bits);
  const c10::cuda::CUDAGuard device(wq.device());
  std::vector<int64_t> shape(wq.sizes().begin(), wq.sizes().end());
  shape.back() = g.cols;
  const int64_t R = c10::multiply_integers(wq.sizes().slice(0, wq.dim() - 1));  // no division
  // q unpacked exactly (unit scales, zero biases), then mx.dequantize's two roundings
  at::Tensor q = at::empty({R, g.cols}, scales.options().dtype(at::kFloat));
  if (R > 0) {
    const at::Tensor ones = at::ones({R, g.groups}, q.options());
    const Weight W =
        make_weight(wq.reshape({R, wq.size(-1)}), ones, at::zeros_like(ones), group_size, bits);
    dequantize_rows(W, 0, R, q);
  }
  return mlx_affine_map(q, scales, biases, R, g.groups, group_size).view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_quantize_cuda(const at::Tensor& w,
                                                                    int64_t group_size,
                                                                    int64_t bits) {
  check_quantize_input(w, group_size, bits);
  if (bits == 1) return composite::affine_quantize_1bit(w, group_size, bits);
  const c10::cuda::CUDAGuard device(w.device());
  const int64_t K = w.size(-1), G = K / group_size;
  const int64_t R = w.numel() / K;
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  std::vector<int64_t> qshape(w.sizes().begin(), w.sizes().end());
  std::vector<int64_t> sshape = qshape;
  qshape.back() = packed_cols(K, bits);
  sshape.back() = G;
  at::Tensor wq = at::empty(qshape, w.options().dtype(at::kUInt32));
  at::Tensor s = at::empty(sshape, w.options().dtype(at::kFloat));
  at::Tensor b = at::empty(sshape, w.options().dtype(at::kFloat));
  const int64_t groups = R * G;
  if (groups > 0) {
    const int64_t blocks = (groups + 255) / 256;
    quantize_kernel<><<<static_cast<unsigned>(blocks), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        wf.const_data_ptr<float>(), groups, static_cast<int>(group_size), static_cast<int>(bits),
        static_cast<uint8_t*>(wq.mutable_data_ptr()), s.mutable_data_ptr<float>(),
        b.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {wq, s.to(w.scalar_type()), b.to(w.scalar_type())};
}

}  // namespace
}  // namespace mlxq::cuda

TORCH_LIBRARY_IMPL(mlxq, CUDA, m) {
  m.impl("affine_quantize", &mlxq::cuda::affine_quantize_cuda);
  m.impl("affine_dequantize", &mlxq::cuda::affine_dequantize_cuda);
  m.impl("affine_matmul", &mlxq::cuda::affine_matmul_cuda);
  m.impl("affine_gather_matmul", &mlxq::cuda::affine_gather_matmul_cuda);
}
