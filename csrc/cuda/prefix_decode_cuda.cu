// Mixed-task decode on CUDA (flash-decoding with a prefix bank).
//
// Grid (split, kv head x row chunk, batch row). One block serves the rows (query head g of the kv head's
// group, new token i) of one kv head, up to 16 of them (4 warps x 4 rows), so every K/V tile is read from
// global memory once for all query heads of a GQA group. The block walks its split of the virtual key axis
// [prefix_k[t] ; cache[b]] (prefix_decode_params.h) in tiles of 32 keys staged in shared memory as fp32;
// each lane scores one key, the warp keeps an online softmax per row (base 2) and each lane owns D / 32
// output columns. With one split the block writes out/lse; otherwise it writes fp32 partials and
// combine_kernel merges them exactly: o = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M).

#include "../prefix_decode_params.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ptv2_fast {
namespace cuda {
namespace {

constexpr int WARPS = 4;
constexpr int ROWS_PER_WARP = 4;
constexpr int ROWS_PER_BLOCK = WARPS * ROWS_PER_WARP;
constexpr int TILE = 32;  // keys per shared-memory tile: one per lane
static_assert(WARPS * 32 >= TILE, "the first TILE threads set up the tile's row pointers");
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T, int D>
__global__ void __launch_bounds__(WARPS * 32) decode_kernel(const PrefixDecodeParams p, int64_t n_row_chunks) {
  constexpr int PER_LANE = D / 32;
  __shared__ float q_s[ROWS_PER_BLOCK][D];
  __shared__ float k_s[TILE][D + 1];  // +1: lanes read different keys at the same column without bank conflicts
  __shared__ float v_s[TILE][D];
  // Per key of the tile: where its K and V rows start and their column stride (bank or cache, paged or not),
  // worked out once per key instead of once per element.
  __shared__ const T* krow_s[TILE];
  __shared__ const T* vrow_s[TILE];
  __shared__ int64_t kcol_s[TILE], vcol_s[TILE];

  const int split = blockIdx.x;
  const int64_t hk = blockIdx.y / n_row_chunks, rc = blockIdx.y % n_row_chunks, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t G = p.Hq / p.Hkv, R = G * p.Lq, row_base = rc * ROWS_PER_BLOCK;
  const int64_t t = dec_task(p, b), plen = dec_plen(p, t), seqlen = dec_seqlen(p, b);
  int64_t x0, x1;
  dec_split_range(plen + seqlen, p.num_splits, split, &x0, &x1);
  const T* q = static_cast<const T*>(p.q);
  const T* pk = static_cast<const T*>(p.pk);
  const T* pv = static_cast<const T*>(p.pv);
  const T* kc = static_cast<const T*>(p.kc);
  const T* vc = static_cast<const T*>(p.vc);

  const float qk_scale = p.scale * LOG2E;  // scores in base 2
  for (int idx = threadIdx.x; idx < ROWS_PER_BLOCK * D; idx += WARPS * 32) {
    const int r = idx / D, c = idx % D;
    const int64_t row = row_base + r;
    float val = 0.0f;
    if (row < R) {
      const int64_t h = hk * G + row / p.Lq, i = row % p.Lq;
      val = to_float(q[b * p.q_s[0] + h * p.q_s[1] + i * p.q_s[2] + c * p.q_s[3]]) * qk_scale;
    }
    q_s[r][c] = val;
  }

  float m[ROWS_PER_WARP], l[ROWS_PER_WARP], acc[ROWS_PER_WARP][PER_LANE];
#pragma unroll
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) acc[rr][e] = 0.0f;
  }

  for (int64_t tile0 = x0; tile0 < x1; tile0 += TILE) {
    __syncthreads();  // the previous tile is consumed (and q_s is written, the first time)
    if (threadIdx.x < TILE) {
      const int64_t x = tile0 + threadIdx.x;
      const T *kr = nullptr, *vr = nullptr;
      int64_t kcs = 0, vcs = 0;
      if (x < x1) {
        if (x < plen) {
          kr = pk + t * p.pk_s[0] + hk * p.pk_s[1] + x * p.pk_s[2];
          vr = pv + t * p.pv_s[0] + hk * p.pv_s[1] + x * p.pv_s[2];
          kcs = p.pk_s[3];
          vcs = p.pv_s[3];
        } else {
          kr = kc + dec_cache_offset(p, p.kc_s, b, hk, x - plen);
          vr = vc + dec_cache_offset(p, p.vc_s, b, hk, x - plen);
          kcs = p.kc_s[3];
          vcs = p.vc_s[3];
        }
      }
      krow_s[threadIdx.x] = kr;
      vrow_s[threadIdx.x] = vr;
      kcol_s[threadIdx.x] = kcs;
      vcol_s[threadIdx.x] = vcs;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < TILE * D; idx += WARPS * 32) {
      const int j = idx / D, c = idx % D;
      const T* kr = krow_s[j];
      const T* vr = vrow_s[j];
      // read-only global loads (the pointers come from shared memory, so say where they point)
      k_s[j][c] = kr != nullptr ? to_float(__ldg(kr + c * kcol_s[j])) : 0.0f;  // keys past the split: zeros
      v_s[j][c] = vr != nullptr ? to_float(__ldg(vr + c * vcol_s[j])) : 0.0f;
    }
    __syncthreads();

    const int64_t x = tile0 + lane;
    // The scores of the warp's rows against this lane's key, in one pass over its K row (q_s reads are
    // broadcasts: every lane reads the same address). Rows past R hold zeros and are never used.
    float dots[ROWS_PER_WARP];
#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) dots[rr] = 0.0f;
#pragma unroll 8
    for (int c = 0; c < D; ++c) {
      const float kval = k_s[lane][c];
#pragma unroll
      for (int rr = 0; rr < ROWS_PER_WARP; ++rr) dots[rr] += q_s[warp * ROWS_PER_WARP + rr][c] * kval;
    }
#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
      const int64_t row = row_base + warp * ROWS_PER_WARP + rr;
      if (row >= R) break;  // uniform over the warp
      const float s = x < x1 && dec_visible(x, plen, seqlen, p.Lq, row % p.Lq, p.causal) ? dots[rr] : -INFINITY;
      const float m_new = fmaxf(m[rr], warp_max(s));
      if (m_new == -INFINITY) continue;  // nothing visible to this row yet (uniform over the warp)
      const float pw = exp2f(s - m_new);
      const float alpha = exp2f(m[rr] - m_new);
      l[rr] = l[rr] * alpha + warp_sum(pw);
      m[rr] = m_new;
#pragma unroll
      for (int e = 0; e < PER_LANE; ++e) acc[rr][e] *= alpha;
#pragma unroll 4
      for (int j = 0; j < TILE; ++j) {
        const float pj = __shfl_sync(0xffffffffu, pw, j);
#pragma unroll
        for (int e = 0; e < PER_LANE; ++e) acc[rr][e] += pj * v_s[j][lane + 32 * e];
      }
    }
  }

  const int64_t n_rows = p.B * p.Hq * p.Lq;
#pragma unroll
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
    const int64_t row = row_base + warp * ROWS_PER_WARP + rr;
    if (row >= R) break;
    const int64_t h = hk * G + row / p.Lq, i = row % p.Lq;
    const int64_t out_row = (b * p.Hq + h) * p.Lq + i;
    const bool empty = l[rr] == 0.0f;
    const float inv = empty ? 0.0f : 1.0f / l[rr];
    const float lse = empty ? -INFINITY : (m[rr] + log2f(l[rr])) * LN2;
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + out_row * D;
#pragma unroll
      for (int e = 0; e < PER_LANE; ++e) out[lane + 32 * e] = from_float<T>(acc[rr][e] * inv);
      if (lane == 0) p.lse[out_row] = lse;
    } else {
      float* o = p.o_part + (split * n_rows + out_row) * D;
#pragma unroll
      for (int e = 0; e < PER_LANE; ++e) o[lane + 32 * e] = acc[rr][e] * inv;
      if (lane == 0) p.lse_part[split * n_rows + out_row] = lse;
    }
  }
}

// One block per output row (b, h, i), one thread per column.
template <typename T, int D>
__global__ void __launch_bounds__(D) combine_kernel(const PrefixDecodeParams p) {
  const int64_t row = blockIdx.x, n_rows = p.B * p.Hq * p.Lq;
  const int d = threadIdx.x;
  float mx = -INFINITY;
  for (int64_t s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_part[s * n_rows + row]);
  T* out = static_cast<T*>(p.out) + row * D;
  if (mx == -INFINITY) {
    out[d] = from_float<T>(0.0f);
    if (d == 0) p.lse[row] = -INFINITY;
    return;
  }
  float total = 0.0f, acc = 0.0f;
  for (int64_t s = 0; s < p.num_splits; ++s) {
    const float w = __expf(p.lse_part[s * n_rows + row] - mx);  // an empty split has lse -inf: weight 0
    total += w;
    acc += w * p.o_part[(s * n_rows + row) * D + d];
  }
  out[d] = from_float<T>(acc / total);
  if (d == 0) p.lse[row] = mx + logf(total);
}

template <typename T, int D>
cudaError_t launch(const PrefixDecodeParams& p, cudaStream_t stream) {
  const int64_t R = (p.Hq / p.Hkv) * p.Lq;
  const int64_t n_row_chunks = (R + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.Hkv * n_row_chunks),
                  static_cast<unsigned>(p.B));
  decode_kernel<T, D><<<grid, WARPS * 32, 0, stream>>>(p, n_row_chunks);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  combine_kernel<T, D><<<static_cast<unsigned>(p.B * p.Hq * p.Lq), D, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dim(const PrefixDecodeParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16. The caller has checked every shape and D in {64, 128}.
cudaError_t prefix_decode_cuda(const PrefixDecodeParams& p, int dtype, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_dim<float>(p, stream);
    case 1: return launch_dim<__half>(p, stream);
    case 2: return launch_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace ptv2_fast
