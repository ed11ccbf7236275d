// The kernels of decode_attention on CUDA (attention_cuda.cu holds the op): plain CUDA C++, no
// torch header, so that benchmarks/cuda/attention_harness.cu builds them on its own.
// Flash-decoding: the keys of each (batch, kv head) are split between blocks so that a single
// query still fills the GPU; each warp of a block runs an online softmax over its keys for up to
// R query rows (the query heads that share the kv head, times the queries), the block's warps
// are merged in shared memory, and the splits by a second kernel. Query heads that share a kv
// head read each key once. fp32 scores, softmax and sums; the output rounded once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <stdint.h>

#include <algorithm>

#include "cuda/float_convert.cuh"

namespace mlxq::cuda::attn {

constexpr int kWarps = 4;           // warps per block, each its own keys
constexpr int kMaxD = 256;          // head dims the kernel takes (8 values per lane)
constexpr int64_t kMinSplit = 256;  // keys per split at least (two tiles per warp)
constexpr int kMaxGrid = 65535;     // the grid's y and z dimensions
constexpr int kMaxSplits = 1024;    // key ranges per (batch, kv head) at most

enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kF32Mask = 2, kF16Mask = 3, kBF16Mask = 4 };

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const void* mask;  // expanded to [B, Hq, Lq, Lk] (broadcast dimensions: stride 0)
  void* out;         // [B, Hq, Lq, D], contiguous
  float* part;       // [B * Hkv, rows, splits, D + 2]: (max, sum, outputs) of each split
  int64_t qs[3], ks[3], vs[3], ms[4];
  int64_t Hq, Hkv, Lq, Lk, D;
  int64_t rows;        // query rows per kv head: (Hq / Hkv) * Lq
  int64_t split_keys;  // keys per split
  int splits;
  int mask_kind;
  bool k_vec;  // every row of k starts 16-byte aligned and holds whole 16-byte chunks
  float scale;
};

// The mask's value at `off`: a float mask's addition, or for a bool mask 0 (attends) or -inf.
__device__ __forceinline__ float mask_value(const AttnParams& p, int64_t off) {
  switch (p.mask_kind) {
    case kBoolMask:
      return static_cast<const bool*>(p.mask)[off] ? 0.0f : -INFINITY;
    case kF32Mask:
      return static_cast<const float*>(p.mask)[off];
    case kF16Mask:
      return __half2float(static_cast<const __half*>(p.mask)[off]);
    case kBF16Mask:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p.mask)[off]);
    default:
      return 0.0f;
  }
}

// One block: split blockIdx.x of the keys of (batch, kv head) blockIdx.y for query rows
// [R * blockIdx.z, + R) of that kv head (row r: query head kv * rep + r / Lq, query r % Lq).
// Each warp takes tiles of 32 keys. Scores: lane l its tile's key l against every row (the rows'
// q in shared memory, read by all lanes at once), so that each key's exp is computed once per
// row; the warp's maximum once per tile and row. Weighted sum: lane l holds elements l + 32 i
// (i < DL) of every row's output, each attended key's weight broadcast from its lane.
template <typename T, int R, int DL>
__global__ void __launch_bounds__(kWarps * 32) attention_kernel(const AttnParams p) {
  constexpr int E = 16 / sizeof(T);   // elements of one 16-byte load of k
  constexpr int G = DL <= 4 ? 8 : 4;  // keys whose v loads are in flight together
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.y / p.Hkv, kv = blockIdx.y % p.Hkv;
  const int64_t r0 = static_cast<int64_t>(blockIdx.z) * R;
  const int nr = static_cast<int>(min(static_cast<int64_t>(R), p.rows - r0));
  const int64_t rep = p.Hq / p.Hkv;
  const bool bool_mask = p.mask_kind == kBoolMask;

  __shared__ __align__(16) float sq[R][kMaxD];
  int64_t moff[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = r0 + (r < nr ? r : 0);
    const int64_t h = kv * rep + row / p.Lq, t = row % p.Lq;
    const T* qp = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1] + t * p.qs[2];
    moff[r] = b * p.ms[0] + h * p.ms[1] + t * p.ms[2];
    for (int d = threadIdx.x; d < p.D; d += blockDim.x) sq[r][d] = to_float(qp[d]);
  }
  __syncthreads();

  float o[R][DL], m[R], lsum[R];  // lsum: the weights of this lane's keys (warp-summed at the end)
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int i = 0; i < DL; ++i) o[r][i] = 0.0f;
    m[r] = -INFINITY;
    lsum[r] = 0.0f;
  }
  const T* kb = static_cast<const T*>(p.k) + b * p.ks[0] + kv * p.ks[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.vs[0] + kv * p.vs[1];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * p.split_keys;
  const int64_t j1 = min(p.Lk, j0 + p.split_keys);

  for (int64_t jt = j0 + 32 * warp; jt < j1; jt += 32 * kWarps) {
    const int64_t j = jt + lane;
    bool live = j < j1;
    float add[R];
#pragma unroll
    for (int r = 0; r < R; ++r) add[r] = live ? mask_value(p, moff[r] + j * p.ms[3]) : 0.0f;
    if (live && bool_mask) {  // a key that no row attends is not read (as the CPU op)
      bool any = false;
#pragma unroll
      for (int r = 0; r < R; ++r) any |= r < nr && add[r] == 0.0f;
      live = any;
    }
    const unsigned keys = __ballot_sync(0xffffffffu, live);
    if (keys == 0) continue;  // the same for every lane
    float s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = 0.0f;
    if (live) {
      const T* kp = kb + j * p.ks[2];
      if (p.k_vec) {  // 16-byte loads of the key's row, all in flight
#pragma unroll 4
        for (int d0 = 0; d0 < p.D; d0 += E) {
          union {
            uint4 u;
            T t[E];
          } raw;
          raw.u = *reinterpret_cast<const uint4*>(kp + d0);
#pragma unroll
          for (int e = 0; e < E; e += 4) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
              const float4 qv = *reinterpret_cast<const float4*>(&sq[r][d0 + e]);
              s[r] = fmaf(qv.x, to_float(raw.t[e]), s[r]);
              s[r] = fmaf(qv.y, to_float(raw.t[e + 1]), s[r]);
              s[r] = fmaf(qv.z, to_float(raw.t[e + 2]), s[r]);
              s[r] = fmaf(qv.w, to_float(raw.t[e + 3]), s[r]);
            }
          }
        }
      } else {
        for (int d = 0; d < p.D; ++d) {
          const float kf = to_float(kp[d]);
#pragma unroll
          for (int r = 0; r < R; ++r) s[r] = fmaf(sq[r][d], kf, s[r]);
        }
      }
    }
    // the tile's online softmax per row: scale * (q . k), then the mask; the running maximum
    // moves once per tile (exp(m - top) is 0 before the first attended key, exactly 1 when the
    // maximum stays), each lane's weight exp(score - maximum)
    float w[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float x = s[r] * p.scale;
      x = bool_mask ? (add[r] == 0.0f ? x : -INFINITY) : x + add[r];
      x = live ? x : -INFINITY;
      float top = x;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1)
        top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, off));
      // fmaxf skips NaN: a tile of NaN scores only keeps NaN (its rows then give NaN)
      top = top != top ? top : fmaxf(m[r], top);
      w[r] = 0.0f;
      if (top == -INFINITY) continue;  // nothing attended yet (the same for every lane)
      const float c = expf(m[r] - top);
      w[r] = expf(x - top);  // 0 for a key not attended
      lsum[r] = fmaf(lsum[r], c, w[r]);
#pragma unroll
      for (int i = 0; i < DL; ++i) o[r][i] *= c;
      m[r] = top;
    }
    // the weighted sum: G keys' rows of v loaded together, each key's weights from its lane
#pragma unroll 1
    for (int k0 = 0; k0 < 32; k0 += G) {
      if (((keys >> k0) & ((1u << G) - 1u)) == 0) continue;
      float vf[G][DL];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const bool in = (keys >> (k0 + g)) & 1u;
        const T* vp = vb + (jt + k0 + g) * p.vs[2];
#pragma unroll
        for (int i = 0; i < DL; ++i) {
          const int d = lane + 32 * i;
          vf[g][i] = in && d < p.D ? to_float(vp[d]) : 0.0f;
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float wr = __shfl_sync(0xffffffffu, w[r], k0 + g);
#pragma unroll
          for (int i = 0; i < DL; ++i) o[r][i] = fmaf(wr, vf[g][i], o[r][i]);
        }
      }
    }
  }
  float l[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    l[r] = lsum[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) l[r] += __shfl_xor_sync(0xffffffffu, l[r], off);
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

// A block-wide max (is_max) or sum of x, returned to every thread; `red` holds kWarps floats.
__device__ __forceinline__ float block_reduce(float x, bool is_max, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = is_max ? fmaxf(x, y) : x + y;
  }
  __syncthreads();  // `red` is reused
  if (lane == 0) red[warp] = x;
  __syncthreads();
  x = red[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) x = is_max ? fmaxf(x, red[w]) : x + red[w];
  return x;
}

// The splits of one row (block blockIdx.x of B * Hkv * rows) merged as the block merged its
// warps, the output rounded once to T: the splits' maxima and sums reduced over the block's
// threads, their factors in shared memory, then each thread one output element's sum over the
// splits (independent loads: the merge does not wait on them one after the other).
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) combine_kernel(const AttnParams p) {
  __shared__ float f[kMaxSplits], red[kWarps];
  const int64_t id = blockIdx.x;
  const int64_t bk = id / p.rows, row = id % p.rows;
  const int64_t b = bk / p.Hkv, kv = bk % p.Hkv, rep = p.Hq / p.Hkv;
  const int64_t stride = p.D + 2;
  const float* part = p.part + id * p.splits * stride;
  float top = -INFINITY;
  for (int s = threadIdx.x; s < p.splits; s += blockDim.x) top = fmaxf(top, part[s * stride]);
  top = block_reduce(top, true, red);
  float sum = 0.0f;
  for (int s = threadIdx.x; s < p.splits; s += blockDim.x) {
    const float ms = part[s * stride];
    const float fs = ms == -INFINITY ? 0.0f : expf(ms - top);
    f[s] = fs;
    sum = fmaf(fs, part[s * stride + 1], sum);
  }
  sum = block_reduce(sum, false, red);  // its barriers also publish f
  const int64_t h = kv * rep + row / p.Lq, t = row % p.Lq;
  T* out = static_cast<T*>(p.out) + ((b * p.Hq + h) * p.Lq + t) * p.D;
  for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
    float acc = 0.0f;
#pragma unroll 8
    for (int s = 0; s < p.splits; ++s) acc = fmaf(f[s], part[s * stride + 2 + d], acc);
    out[d] = from_float<T>(sum == 0.0f ? 0.0f : acc / sum);  // no key attended: 0
  }
}

template <typename T, int R>
void launch_rows(const AttnParams& p, dim3 grid, int dl, cudaStream_t stream) {
  switch (dl) {
    case 1:
      attention_kernel<T, R, 1><<<grid, kWarps * 32, 0, stream>>>(p);
      break;
    case 2:
      attention_kernel<T, R, 2><<<grid, kWarps * 32, 0, stream>>>(p);
      break;
    case 4:
      attention_kernel<T, R, 4><<<grid, kWarps * 32, 0, stream>>>(p);
      break;
    default:
      attention_kernel<T, R, 8><<<grid, kWarps * 32, 0, stream>>>(p);
      break;
  }
}

// How a call is split: R query rows per block (row_groups blocks of them per kv head), dl values
// of the head dim per lane, the keys in `splits` ranges of split_keys.
struct AttnPlan {
  int R = 1, dl = 1;
  int64_t row_groups = 0, splits = 1, split_keys = 1;
};

// Splits: enough blocks for eight per multiprocessor (whole waves matter less), each split at
// least kMinSplit keys.
inline AttnPlan attention_plan(int64_t B, int64_t Hkv, int64_t rows, int64_t Lk, int64_t D,
                               int sms) {
  AttnPlan a;
  a.R = rows <= 1 ? 1 : (rows <= 2 ? 2 : (rows <= 4 ? 4 : 8));
  a.row_groups = (rows + a.R - 1) / a.R;
  a.dl = D <= 32 ? 1 : (D <= 64 ? 2 : (D <= 128 ? 4 : 8));
  if (Lk <= 0) return a;
  const int64_t blocks = std::max<int64_t>(1, B * Hkv * a.row_groups);
  const int64_t want = std::max<int64_t>(1, (8 * static_cast<int64_t>(sms) + blocks - 1) / blocks);
  const int64_t most = std::max<int64_t>(1, (Lk + kMinSplit - 1) / kMinSplit);
  const int64_t splits = std::min<int64_t>({want, most, int64_t{kMaxSplits}});
  a.split_keys = (Lk + splits - 1) / splits;
  a.splits = (Lk + a.split_keys - 1) / a.split_keys;
  return a;
}

// The launches of a call whose p (with p.splits and p.split_keys from `a`, and p.part when
// a.splits > 1) is filled; returns the launch error, if any.
template <typename T>
cudaError_t launch_attention(const AttnParams& p, const AttnPlan& a, int64_t batch_heads,
                             cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(batch_heads),
                  static_cast<unsigned>(a.row_groups));
  switch (a.R) {
    case 1:
      launch_rows<T, 1>(p, grid, a.dl, stream);
      break;
    case 2:
      launch_rows<T, 2>(p, grid, a.dl, stream);
      break;
    case 4:
      launch_rows<T, 4>(p, grid, a.dl, stream);
      break;
    default:
      launch_rows<T, 8>(p, grid, a.dl, stream);
      break;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || a.splits <= 1) return err;
  combine_kernel<T><<<static_cast<unsigned>(batch_heads * p.rows), kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace mlxq::cuda::attn
