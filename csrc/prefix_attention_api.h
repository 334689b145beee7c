// The tensor-level entry points of the extension: input checks, device guard, stream, output allocation.
// Registered as torch.ops.ptv2_fast.* in registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace ptv2_fast {

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double dropout_p, int64_t seed,
    int64_t offset);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& prefix_lens,
    const std::optional<at::Tensor>& kv_lens, const std::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, double dropout_p, int64_t seed,
    int64_t offset);

// Merge mode for the sdpa backend: `out` [B, Hq, L, D] holds the sequence part's output and `seq_lse` its lse;
// adds the prefix keys, overwrites `out` with the merged output and returns the merged lse [B, Hq, L].
at::Tensor prefix_attention_merge_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, at::Tensor& out,
    const at::Tensor& seq_lse);

// Its backward over the prefix keys, given the merged out / lse: adds the prefix keys' part of dq into `dq` (the
// sequence part's dq) and returns (dprefix_k, dprefix_v), reduced per bank row.
std::tuple<at::Tensor, at::Tensor> prefix_attention_merge_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const at::Tensor& out, const at::Tensor& lse, double scale,
    at::Tensor& dq);

// The Autograd-key kernel of prefix_attention_fwd: a C++ autograd Function over the forward and backward ops.
std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale, double dropout_p, int64_t seed,
    int64_t offset);

// The CPU kernels' dropout keep mask, bool [B, Hq, L, P + S] (True = kept): a view for tests.
at::Tensor dropout_keep_mask_cpu(int64_t B, int64_t Hq, int64_t L, int64_t S, int64_t P, double dropout_p,
                                 int64_t seed, int64_t offset);

// Same schema on both devices; CUDA needs head dim 64 or 128.
std::tuple<at::Tensor, at::Tensor> prefix_decode_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& page_table, bool causal,
    double scale, int64_t num_splits);

// "cpu" or "cpu+cuda sm_80,sm_90": what this build of the extension contains.
std::string build_info();

}  // namespace ptv2_fast
