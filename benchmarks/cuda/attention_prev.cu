// The decode_attention kernels as first committed (h35 dfb06e8: one warp reduction and rescale
// per key and row, the splits merged one after the other), kept only so that
// attention_harness.cu times them beside csrc/cuda/attention.cuh's in one process.
#include "cuda/attention.cuh"

namespace prev {
using mlxq::cuda::from_float;
using mlxq::cuda::to_float;
using mlxq::cuda::attn::AttnParams;
using mlxq::cuda::attn::kBoolMask;
using mlxq::cuda::attn::kWarps;
using mlxq::cuda::attn::mask_value;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One block: split blockIdx.x of the keys of (batch, kv head) blockIdx.y for query rows
// [R * blockIdx.z, + R) of that kv head (row r: query head kv * rep + r / Lq, query r % Lq).
// Lane `lane` holds elements lane + 32 i (i < DL) of every row's q and output. U keys per step,
// their loads issued together.
template <typename T, int R, int DL>
__global__ void __launch_bounds__(kWarps * 32) attention_kernel(const AttnParams p) {
  constexpr int U = DL <= 2 ? 4 : (DL == 4 ? 2 : 1);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.y / p.Hkv, kv = blockIdx.y % p.Hkv;
  const int64_t r0 = static_cast<int64_t>(blockIdx.z) * R;
  const int nr = static_cast<int>(min(static_cast<int64_t>(R), p.rows - r0));
  const int64_t rep = p.Hq / p.Hkv;
  const bool bool_mask = p.mask_kind == kBoolMask;

  float q[R][DL], o[R][DL], m[R], l[R];
  int64_t moff[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = r0 + (r < nr ? r : 0);
    const int64_t h = kv * rep + row / p.Lq, t = row % p.Lq;
    const T* qp = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1] + t * p.qs[2];
    moff[r] = b * p.ms[0] + h * p.ms[1] + t * p.ms[2];
#pragma unroll
    for (int i = 0; i < DL; ++i) {
      const int d = lane + 32 * i;
      q[r][i] = d < p.D ? to_float(qp[d]) : 0.0f;
      o[r][i] = 0.0f;
    }
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  const T* kb = static_cast<const T*>(p.k) + b * p.ks[0] + kv * p.ks[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.vs[0] + kv * p.vs[1];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * p.split_keys;
  const int64_t j1 = min(p.Lk, j0 + p.split_keys);

  for (int64_t jb = j0 + warp; jb < j1; jb += static_cast<int64_t>(kWarps) * U) {
    float add[U][R], kf[U][DL], vf[U][DL];
    bool live[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = jb + static_cast<int64_t>(u) * kWarps;
      // a key that no row of a bool mask attends adds 0 to every row: not read (as the CPU op)
      bool any = j < j1;
#pragma unroll
      for (int r = 0; r < R; ++r) add[u][r] = any ? mask_value(p, moff[r] + j * p.ms[3]) : 0.0f;
      if (any && bool_mask) {
        any = false;
#pragma unroll
        for (int r = 0; r < R; ++r) any |= r < nr && add[u][r] == 0.0f;
      }
      live[u] = any;
      const T* kp = kb + j * p.ks[2];
      const T* vp = vb + j * p.vs[2];
#pragma unroll
      for (int i = 0; i < DL; ++i) {
        const int d = lane + 32 * i;
        const bool in = any && d < p.D;
        kf[u][i] = in ? to_float(kp[d]) : 0.0f;
        vf[u][i] = in ? to_float(vp[d]) : 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!live[u]) continue;  // the same for every lane
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < DL; ++i) s = fmaf(q[r][i], kf[u][i], s);
        s = warp_sum(s) * p.scale;  // scale * (q . k), then the mask
        s = bool_mask ? (add[u][r] == 0.0f ? s : -INFINITY) : s + add[u][r];
        if (s == -INFINITY) continue;  // weight exp(-inf) = 0
        // online softmax: a new maximum rescales the sums so far (a NaN score never becomes
        // the maximum, but its weight exp(NaN) makes the row NaN, as the composite's)
        if (s > m[r]) {
          const float c = expf(m[r] - s);  // 0 for the first attended key
          l[r] *= c;
#pragma unroll
          for (int i = 0; i < DL; ++i) o[r][i] *= c;
          m[r] = s;
        }
        const float w = expf(s - m[r]);
        l[r] += w;
#pragma unroll
        for (int i = 0; i < DL; ++i) o[r][i] = fmaf(w, vf[u][i], o[r][i]);
      }
    }
  }

  // the warps' (max, sum, outputs) merged per row in shared memory
  __shared__ float sm[kWarps][R], sl[kWarps][R], so[kWarps][R][DL * 32];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (lane == 0) {
      sm[warp][r] = m[r];
      sl[warp][r] = l[r];
    }
#pragma unroll
    for (int i = 0; i < DL; ++i) so[warp][r][lane + 32 * i] = o[r][i];
  }
  __syncthreads();
  for (int r = warp; r < nr; r += kWarps) {
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, sm[w][r]);
    float f[kWarps], sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      f[w] = sm[w][r] == -INFINITY ? 0.0f : expf(sm[w][r] - top);
      sum = fmaf(f[w], sl[w][r], sum);
    }
    const int64_t row = r0 + r;
    if (p.splits == 1) {
      const int64_t h = kv * rep + row / p.Lq, t = row % p.Lq;
      T* out = static_cast<T*>(p.out) + ((b * p.Hq + h) * p.Lq + t) * p.D;
      for (int d = lane; d < p.D; d += 32) {
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) acc = fmaf(f[w], so[w][r][d], acc);
        out[d] = from_float<T>(sum == 0.0f ? 0.0f : acc / sum);  // no key attended: 0
      }
    } else {
      float* part = p.part + ((blockIdx.y * p.rows + row) * p.splits + blockIdx.x) * (p.D + 2);
      if (lane == 0) {
        part[0] = top;
        part[1] = sum;
      }
      for (int d = lane; d < p.D; d += 32) {
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) acc = fmaf(f[w], so[w][r][d], acc);
        part[2 + d] = acc;
      }
    }
  }
}

// The splits of one row (one warp per row, blockIdx.x * kWarps + warp of B * Hkv * rows) merged
// as the block merged its warps, the output rounded once to T.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) combine_kernel(const AttnParams p, int64_t total) {
  const int lane = threadIdx.x & 31;
  const int64_t id = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (id >= total) return;
  const int64_t bk = id / p.rows, row = id % p.rows;
  const int64_t b = bk / p.Hkv, kv = bk % p.Hkv, rep = p.Hq / p.Hkv;
  const float* part = p.part + id * p.splits * (p.D + 2);
  float top = -INFINITY;
  for (int s = 0; s < p.splits; ++s) top = fmaxf(top, part[s * (p.D + 2)]);
  float sum = 0.0f;
  for (int s = 0; s < p.splits; ++s) {
    const float ms = part[s * (p.D + 2)];
    if (ms != -INFINITY) sum = fmaf(expf(ms - top), part[s * (p.D + 2) + 1], sum);
  }
  const int64_t h = kv * rep + row / p.Lq, t = row % p.Lq;
  T* out = static_cast<T*>(p.out) + ((b * p.Hq + h) * p.Lq + t) * p.D;
  for (int d = lane; d < p.D; d += 32) {
    float acc = 0.0f;
    for (int s = 0; s < p.splits; ++s) {
      const float ms = part[s * (p.D + 2)];
      if (ms != -INFINITY) acc = fmaf(expf(ms - top), part[s * (p.D + 2) + 2 + d], acc);
    }
    out[d] = from_float<T>(sum == 0.0f ? 0.0f : acc / sum);
  }
}

template <typename T, int R>
void launch_rows(const AttnParams& p, dim3 grid, int dl, cudaStream_t stream) {
  switch (dl) {
    case 1:
      prev::attention_kernel<T, R, 1><<<grid, kWarps * 32, 0, stream>>>(p);
      break;
    case 2:
      prev::attention_kernel<T, R, 2><<<grid, kWarps * 32, 0, stream>>>(p);
      break;
    case 4:
      prev::attention_kernel<T, R, 4><<<grid, kWarps * 32, 0, stream>>>(p);
      break;
    default:
      prev::attention_kernel<T, R, 8><<<grid, kWarps * 32, 0, stream>>>(p);
      break;
  }
}

template <typename T>
void launch(const AttnParams& p, int R, int dl, dim3 grid, cudaStream_t stream) {
  switch (R) {
    case 1:
      prev::launch_rows<T, 1>(p, grid, dl, stream);
      break;
    case 2:
      prev::launch_rows<T, 2>(p, grid, dl, stream);
      break;
    case 4:
      prev::launch_rows<T, 4>(p, grid, dl, stream);
      break;
    default:
      prev::launch_rows<T, 8>(p, grid, dl, stream);
      break;
  }
  if (p.splits > 1) {
    const int64_t total = grid.y * p.rows;
    const int64_t blocks = (total + kWarps - 1) / kWarps;
    prev::combine_kernel<T><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(p, total);
  }
}

}  // namespace prev

cudaError_t prev_launch_attention(const mlxq::cuda::attn::AttnParams& p,
                                  const mlxq::cuda::attn::AttnPlan& a, int64_t batch_heads,
                                  cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(batch_heads),
                  static_cast<unsigned>(a.row_groups));
  prev::launch<__nv_bfloat16>(p, a.R, a.dl, grid, stream);
  return cudaGetLastError();
}
