// Plain parameter blocks of the prefix-attention kernels: raw pointers, sizes and element strides.
// Kernels see only these structs (no ATen tensors, no Python); the API layer fills them after checking.
#pragma once

#include <cstdint>

namespace ptv2_fast {

// Strides are in elements, in the order of the logical shape named beside each pointer.
struct PrefixAttentionFwdParams {
  int64_t B, Hq, Hkv, L, S, P, T, D;
  const void* q;  int64_t q_s[4];    // [B, Hq, L, D]
  const void* k;  int64_t k_s[4];    // [B, Hkv, S, D]
  const void* v;  int64_t v_s[4];    // [B, Hkv, S, D]
  const void* pk; int64_t pk_s[4];   // [T, Hkv, P, D]
  const void* pv; int64_t pv_s[4];   // [T, Hkv, P, D]
  const int64_t* prefix_index;       // [B] or nullptr (row 0 for all); clamped to [0, T)
  const int64_t* prefix_lens;        // [T] or nullptr (P for all); clamped to [0, P]
  const int64_t* kv_lens;            // [B] or nullptr (S for all); clamped to [0, S]
  const bool* kpm; int64_t kpm_s[2]; // [B, S] key padding mask, true = attend, or nullptr
  bool causal;                       // bottom-right over the sequence part: key j visible to query i iff j <= i + S - L
  float scale;
  float dropout_p;                   // attention dropout in [0, 1); 0 = none
  uint64_t seed, offset;             // its counter-based stream (see DropoutStream in the CPU kernel)
  void* out; int64_t out_s[4];       // [B, Hq, L, D], dtype of q, any strides (allocated like q)
  float* lse;                        // [B, Hq, L] contiguous, natural log, -inf for a row that sees no key
  // Merge mode (the `sdpa` backend: the sequence part came from PyTorch's attention kernels). The sequence
  // stage is skipped; the sequence arguments above still define which keys a row may see. Forward starts each
  // row's online softmax from the sequence part's (out, seq_lse), read from `out` in place (a row that sees no
  // sequence key starts empty, whatever those hold); backward adds its dq into `dq` instead of storing it.
  bool merge;
  const float* seq_lse; int64_t seq_lse_s[3];  // [B, Hq, L], any strides (forward, merge mode only)
};

struct PrefixAttentionBwdParams : PrefixAttentionFwdParams {
  const void* dout; int64_t dout_s[4];  // [B, Hq, L, D], dtype of q
  const float* dlse;                    // [B, Hq, L] contiguous, or nullptr
  // out / lse (inherited) are inputs here. Each gradient is laid out like its input (any strides).
  void* dq;  int64_t dq_s[4];   // [B, Hq, L, D]
  void* dk;  int64_t dk_s[4];   // [B, Hkv, S, D]
  void* dv;  int64_t dv_s[4];   // [B, Hkv, S, D]
  void* dpk; int64_t dpk_s[4];  // [T, Hkv, P, D]: the gradient summed over the rows of each task, 0 for unused rows
  void* dpv; int64_t dpv_s[4];  // [T, Hkv, P, D]
};

}  // namespace ptv2_fast
