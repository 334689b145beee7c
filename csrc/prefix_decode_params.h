// Parameters and index maths of the mixed-task decode op, shared by its CPU and CUDA kernels.
//
// Row b with kv head hk and task t = prefix_index[b] attends, for each of its Lq new queries, to the virtual
// key axis [prefix_k[t, hk, :plen_t] ; cache[b, hk, :seqlen_b]]: virtual key x < plen_t is prefix key x,
// x >= plen_t is cache key x - plen_t. The Lq new tokens are the last Lq cache entries, so query i sees
// cache keys c <= seqlen_b - Lq + i when causal. Split-KV: the virtual axis of each row is cut into
// num_splits equal chunks, each reduced to (o, lse) and merged exactly afterwards.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PTV2_HD __host__ __device__ __forceinline__
#else
#define PTV2_HD inline
#endif

namespace ptv2_fast {

struct PrefixDecodeParams {
  int64_t B, Hq, Hkv, Lq, D, T, P;
  int64_t num_splits;
  const void* q; int64_t q_s[4];         // [B, Hq, Lq, D]
  const void* kc; int64_t kc_s[4];       // [B, Hkv, S_max, D], or paged [num_pages, Hkv, page_size, D]
  const void* vc; int64_t vc_s[4];
  int64_t s_max;                         // cache capacity per row (max_pages * page_size when paged)
  const int32_t* page_table;             // [B, max_pages] or nullptr
  int64_t page_table_stride, page_size, num_pages;
  const int64_t* cache_seqlens;          // [B]: valid cache entries of each row, the Lq new ones included
  const void* pk; int64_t pk_s[4];       // [T, Hkv, P, D]
  const void* pv; int64_t pv_s[4];
  const int64_t* prefix_index;           // [B] or nullptr
  const int64_t* prefix_lens;            // [T] or nullptr
  bool causal;
  float scale;
  void* out;                             // [B, Hq, Lq, D] contiguous, dtype of q
  float* lse;                            // [B, Hq, Lq] contiguous
  float* o_part;                         // [num_splits, B, Hq, Lq, D] fp32 (num_splits > 1)
  float* lse_part;                       // [num_splits, B, Hq, Lq]
};

PTV2_HD int64_t dec_clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

PTV2_HD int64_t dec_task(const PrefixDecodeParams& p, int64_t b) {
  return p.prefix_index ? dec_clamp(p.prefix_index[b], 0, p.T - 1) : 0;
}
PTV2_HD int64_t dec_plen(const PrefixDecodeParams& p, int64_t t) {
  return p.prefix_lens ? dec_clamp(p.prefix_lens[t], 0, p.P) : p.P;
}
PTV2_HD int64_t dec_seqlen(const PrefixDecodeParams& p, int64_t b) {
  return dec_clamp(p.cache_seqlens[b], 0, p.s_max);
}

// Element offset of cache entry c (0 <= c < s_max) of row b, kv head hk, in k (strides ks) or v.
PTV2_HD int64_t dec_cache_offset(const PrefixDecodeParams& p, const int64_t* s, int64_t b, int64_t hk, int64_t c) {
  if (p.page_table == nullptr) return b * s[0] + hk * s[1] + c * s[2];
  const int64_t page = dec_clamp(p.page_table[b * p.page_table_stride + c / p.page_size], 0, p.num_pages - 1);
  return page * s[0] + hk * s[1] + (c % p.page_size) * s[2];
}

// [begin, end) of split `split` over a row's n virtual keys.
PTV2_HD void dec_split_range(int64_t n, int64_t num_splits, int64_t split, int64_t* begin, int64_t* end) {
  const int64_t chunk = (n + num_splits - 1) / num_splits;
  const int64_t b0 = split * chunk;
  *begin = b0 < n ? b0 : n;
  *end = b0 + chunk < n ? b0 + chunk : n;
}

// Whether query i (of Lq) of a row sees virtual key x, given plen and seqlen.
PTV2_HD bool dec_visible(int64_t x, int64_t plen, int64_t seqlen, int64_t Lq, int64_t i, bool causal) {
  if (x < plen) return true;
  const int64_t c = x - plen;
  return c < seqlen && (!causal || c <= seqlen - Lq + i);
}

}  // namespace ptv2_fast
