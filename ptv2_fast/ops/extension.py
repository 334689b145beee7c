"""Fake (meta) implementations of the C++ extension's ops, so ``torch.compile`` can trace them.

The schemas and the CPU/CUDA implementations are registered by the library itself (csrc/registration.cpp);
``ptv2_fast._ext`` imports this module right after loading it.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("ptv2_fast::prefix_attention_fwd")
def _fwd_fake(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale,
              dropout_p=0.0, seed=0, offset=0):
    B, Hq, L, D = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, L), dtype=torch.float32)  # out laid out like q


@torch.library.register_fake("ptv2_fast::prefix_attention_bwd")
def _bwd_fake(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, out,
              lse, causal, scale, dropout_p=0.0, seed=0, offset=0):
    return tuple(torch.empty_like(x) for x in (q, k, v, prefix_k, prefix_v))  # each gradient laid out like its input


@torch.library.register_fake("ptv2_fast::prefix_attention_merge_fwd")
def _merge_fwd_fake(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale,
                    out, seq_lse):
    B, Hq, L, D = q.shape
    return q.new_empty((B, Hq, L), dtype=torch.float32)  # out is written in place


@torch.library.register_fake("ptv2_fast::prefix_attention_merge_bwd")
def _merge_bwd_fake(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, out, lse, scale, dq):
    return torch.empty_like(prefix_k), torch.empty_like(prefix_v)  # dq is accumulated in place


@torch.library.register_fake("ptv2_fast::prefix_decode_attention")
def _decode_fake(q, k_cache, v_cache, cache_seqlens, prefix_k, prefix_v, prefix_index, prefix_lens, page_table,
                 causal, scale, num_splits):
    B, Hq, Lq, D = q.shape
    return q.new_empty((B, Hq, Lq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32)
