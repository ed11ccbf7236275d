// decode_attention's kernels (csrc/cuda/attention.cuh) without torch: both the current kernels
// and the first version (attention_prev.cu) checked against a float64 CPU reference on small
// shapes, then timed side by side on bench_decode_attention.py's shapes (bf16, one query), next
// to a device-to-device copy of the same cache bytes. Microseconds per call: a loop of calls
// over as many caches as fit in 2 GiB (so that they do not sit in the L2), median of 3 runs.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//     benchmarks/cuda/attention_harness.cu benchmarks/cuda/attention_prev.cu -o attention_harness
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/attention.cuh"

using namespace mlxq::cuda::attn;

cudaError_t prev_launch_attention(const AttnParams& p, const AttnPlan& a, int64_t batch_heads,
                                  cudaStream_t stream);

#define CHECK(x)                                                                           \
  do {                                                                                     \
    const cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

__global__ void fill(__nv_bfloat16* x, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32);
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    x[i] = __float2bfloat16((h & 0xffffff) / 8388608.0f - 1.0f);  // [-1, 1)
  }
}

struct Case {
  int64_t B, Hq, Hkv, D, Lk;
  bool mask;            // a static cache's: [B, 1, 1, Lk], the first quarter attended
  bool scalar = false;  // k read element by element (as for a k whose rows are not aligned)
};

struct Layer {
  __nv_bfloat16 *q, *k, *v, *out;
  float* part;
  bool* mask;
};

using Launch = cudaError_t (*)(const AttnParams&, const AttnPlan&, int64_t, cudaStream_t);

cudaError_t launch_new(const AttnParams& p, const AttnPlan& a, int64_t bh, cudaStream_t s) {
  return launch_attention<__nv_bfloat16>(p, a, bh, s);
}

int g_sms = 0;

AttnPlan plan_of(const Case& c) {
  return attention_plan(c.B, c.Hkv, c.Hq / c.Hkv, c.Lk, c.D, g_sms);
}

Layer make_layer(const Case& c, uint32_t seed) {
  Layer L{};
  const int64_t nq = c.B * c.Hq * c.D, nkv = c.B * c.Hkv * c.Lk * c.D;
  const AttnPlan a = plan_of(c);
  CHECK(cudaMalloc(&L.q, nq * 2));
  CHECK(cudaMalloc(&L.k, nkv * 2));
  CHECK(cudaMalloc(&L.v, nkv * 2));
  CHECK(cudaMalloc(&L.out, nq * 2));
  CHECK(cudaMalloc(&L.part, std::max<int64_t>(1, c.B * c.Hq * a.splits * (c.D + 2)) * 4));
  fill<<<1024, 256>>>(L.q, nq, seed);
  fill<<<1024, 256>>>(L.k, nkv, seed + 1);
  fill<<<1024, 256>>>(L.v, nkv, seed + 2);
  if (c.mask) {
    std::vector<char> m(c.B * c.Lk, 0);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t j = 0; j < c.Lk / 4; ++j) m[b * c.Lk + j] = 1;
    CHECK(cudaMalloc(&L.mask, c.B * c.Lk));
    CHECK(cudaMemcpy(L.mask, m.data(), c.B * c.Lk, cudaMemcpyHostToDevice));
  }
  CHECK(cudaGetLastError());
  return L;
}

void free_layer(Layer& L) {
  cudaFree(L.q);
  cudaFree(L.k);
  cudaFree(L.v);
  cudaFree(L.out);
  cudaFree(L.part);
  if (L.mask != nullptr) cudaFree(L.mask);
}

AttnParams params_of(const Case& c, const Layer& L) {
  AttnParams p{};
  p.q = L.q;
  p.k = L.k;
  p.v = L.v;
  p.out = L.out;
  p.part = L.part;
  p.qs[0] = c.Hq * c.D, p.qs[1] = c.D, p.qs[2] = c.D;
  p.ks[0] = c.Hkv * c.Lk * c.D, p.ks[1] = c.Lk * c.D, p.ks[2] = c.D;
  for (int i = 0; i < 3; ++i) p.vs[i] = p.ks[i];
  if (c.mask) {
    p.mask = L.mask;
    p.mask_kind = kBoolMask;
    p.ms[0] = c.Lk, p.ms[1] = 0, p.ms[2] = 0, p.ms[3] = 1;
  }
  p.Hq = c.Hq, p.Hkv = c.Hkv, p.Lq = 1, p.Lk = c.Lk, p.D = c.D;
  p.rows = c.Hq / c.Hkv;
  p.k_vec = !c.scalar;
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.D));
  const AttnPlan a = plan_of(c);
  p.splits = static_cast<int>(a.splits);
  p.split_keys = a.split_keys;
  return p;
}

std::vector<float> to_host(const __nv_bfloat16* d, int64_t n) {
  std::vector<__nv_bfloat16> h(n);
  CHECK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (int64_t i = 0; i < n; ++i) f[i] = __bfloat162float(h[i]);
  return f;
}

// Worst |got - ref| / (2^-8 |ref| + 2^-10) of one launch against float64.
double check(const Case& c, Launch launch) {
  Layer L = make_layer(c, 7);
  const AttnParams p = params_of(c, L);
  CHECK(launch(p, plan_of(c), c.B * c.Hkv, nullptr));
  CHECK(cudaDeviceSynchronize());
  const auto q = to_host(L.q, c.B * c.Hq * c.D), k = to_host(L.k, c.B * c.Hkv * c.Lk * c.D),
             v = to_host(L.v, c.B * c.Hkv * c.Lk * c.D), out = to_host(L.out, c.B * c.Hq * c.D);
  double worst = 0;
  const int64_t rep = c.Hq / c.Hkv;
  std::vector<double> s(c.Lk);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h) {
      const int64_t kv = h / rep;
      double top = -INFINITY;
      for (int64_t j = 0; j < c.Lk; ++j) {
        double x = 0;
        for (int64_t d = 0; d < c.D; ++d)
          x += double(q[(b * c.Hq + h) * c.D + d]) * k[((b * c.Hkv + kv) * c.Lk + j) * c.D + d];
        s[j] = (c.mask && j >= c.Lk / 4) ? -INFINITY : x * p.scale;
        top = std::max(top, s[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < c.Lk; ++j) sum += s[j] = std::exp(s[j] - top);
      for (int64_t d = 0; d < c.D; ++d) {
        double ref = 0;
        for (int64_t j = 0; j < c.Lk; ++j) ref += s[j] * v[((b * c.Hkv + kv) * c.Lk + j) * c.D + d];
        ref /= sum;
        const double got = out[(b * c.Hq + h) * c.D + d];
        worst = std::max(worst, std::abs(got - ref) / (std::ldexp(std::abs(ref), -8) + 0x1p-10));
      }
    }
  free_layer(L);
  return worst;
}

// Microseconds per call of `launch` over the layers (median of 3 runs of 10 passes).
double time_calls(const Case& c, const std::vector<Layer>& layers, Launch launch) {
  std::vector<AttnParams> ps;
  for (const Layer& L : layers) ps.push_back(params_of(c, L));
  const AttnPlan a = plan_of(c);
  for (const AttnParams& p : ps) CHECK(launch(p, a, c.B * c.Hkv, nullptr));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::vector<double> t;
  for (int run = 0; run < 3; ++run) {
    CHECK(cudaEventRecord(e0));
    for (int pass = 0; pass < 10; ++pass)
      for (const AttnParams& p : ps) CHECK(launch(p, a, c.B * c.Hkv, nullptr));
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms * 1e3 / (10.0 * ps.size()));
  }
  std::sort(t.begin(), t.end());
  return t[1];
}

int main() {
  CHECK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, 0));
  const std::vector<Case> checks = {
      {1, 9, 3, 64, 700, false},          {1, 9, 3, 64, 700, true},
      {2, 32, 8, 128, 3000, true},        {1, 16, 2, 128, 2000, false},
      {1, 8, 4, 80, 333, false},          {1, 4, 1, 256, 1500, false},
      {1, 2, 2, 32, 40, false},           {1, 8, 4, 80, 333, true, true},
      {2, 32, 8, 128, 3000, false, true},
  };
  int bad = 0;
  for (const Case& c : checks) {
    const double n = check(c, launch_new), o = check(c, prev_launch_attention);
    std::printf(
        "check B=%lld Hq=%lld Hkv=%lld D=%lld Lk=%lld mask=%d: worst err/tol new %.3f prev "
        "%.3f%s\n",
        (long long)c.B, (long long)c.Hq, (long long)c.Hkv, (long long)c.D, (long long)c.Lk,
        int(c.mask), n, o, n <= 1 && o <= 1 ? "" : "  FAIL");
    bad += n > 1 || o > 1;
  }
  std::printf("checks: %s\n", bad == 0 ? "all ok" : "FAILED");
  const int64_t shapes[3][4] = {{1, 9, 3, 64}, {1, 32, 8, 128}, {8, 32, 8, 128}};
  for (const auto& s : shapes)
    for (const int64_t lk : {512, 4096, 32768})
      for (const bool mask : {false, true}) {
        const Case c{s[0], s[1], s[2], s[3], lk, mask};
        const int64_t bytes = 4 * c.B * c.Hkv * c.Lk * c.D;  // k and v, bf16
        const int64_t n = std::max<int64_t>(2, std::min<int64_t>(30, (int64_t{2} << 30) / bytes));
        std::vector<Layer> layers;
        for (int64_t i = 0; i < n; ++i) layers.push_back(make_layer(c, 11 + 3 * i));
        const double t_new = time_calls(c, layers, launch_new);
        const double t_prev = time_calls(c, layers, prev_launch_attention);
        // the cache's bytes copied once (read + write) by the driver, per layer
        cudaEvent_t e0, e1;
        CHECK(cudaEventCreate(&e0));
        CHECK(cudaEventCreate(&e1));
        __nv_bfloat16* dst;
        CHECK(cudaMalloc(&dst, bytes / 2));
        CHECK(cudaEventRecord(e0));
        for (const Layer& L : layers) {
          CHECK(cudaMemcpyAsync(dst, L.k, bytes / 2, cudaMemcpyDeviceToDevice));
          CHECK(cudaMemcpyAsync(dst, L.v, bytes / 2, cudaMemcpyDeviceToDevice));
        }
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        const double t_copy = ms * 1e3 / n;
        const double read = mask ? bytes / 4.0 : bytes;  // bytes the kernel must read
        std::printf(
            "B=%lld Hq=%lld Hkv=%lld D=%lld Lk=%lld mask=%d: new %.1f us, prev %.1f us (x%.2f), "
            "copy of k+v %.1f us; new reads %.0f GB/s\n",
            (long long)c.B, (long long)c.Hq, (long long)c.Hkv, (long long)c.D, (long long)lk,
            int(mask), t_new, t_prev, t_prev / t_new, t_copy, read / t_new / 1e3);
        cudaFree(dst);
        for (Layer& L : layers) free_layer(L);
      }
  return bad == 0 ? 0 : 1;
}
