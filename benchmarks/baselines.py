"""The baselines of DESIGN.md §6, defined once. Each takes the arguments of ``ptv2_fast.prefix_attention``.

* ``naive_eager``: the P-Tuning v2 / PEFT path: gather the prefix to B rows, ``torch.cat`` with K/V,
  repeat K/V heads for GQA (as HF eager attention does), matmul, additive-masked softmax in fp32, matmul.
* ``sdpa_concat``: the same concatenation, then ``F.scaled_dot_product_attention`` with the widened mask
  (GQA: K/V heads repeated when there is a mask, as transformers does).
* ``sdpa_precat``: SDPA on K/V concatenated *before* timing (``precat`` builds them): a lower bound that
  pays no concatenation. Its gradients go to the pre-concatenated K/V, not to the bank.

DESIGN.md's ``cascade`` (two attention calls merged by lse) is measured in its fair, fused form: the provider
``ptv2_fast[sdpa]`` of ``op_bench`` (the sequence through PyTorch's fused kernels, the prefix read from the bank
by our kernel, merged in its epilogue). The unfused version it replaced gathered the bank to B rows, repeated K/V
heads for GQA and merged in a dozen elementwise ops, so it measured that overhead, not the idea.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptv2_fast.reference import as_bank, concat_prefix, visible_keys


def widened_mask(q, k, prefix_k, prefix_index=None, prefix_lens=None, kv_lens=None, key_padding_mask=None,
                 causal=False):
    """The widened bool mask [B, 1, L, P + S] (True = attend) of the concatenating paths, or None when
    every key is visible (which keeps SDPA on its fast path)."""
    if prefix_lens is None and kv_lens is None and key_padding_mask is None and not causal:
        return None
    B, _, L, _ = q.shape
    return visible_keys(B, L, k.shape[2], as_bank(prefix_k).shape[2], prefix_index=prefix_index,
                        prefix_lens=prefix_lens, kv_lens=kv_lens, key_padding_mask=key_padding_mask,
                        causal=causal, device=q.device)[:, None]


def naive_eager(q, k, v, prefix_k, prefix_v, prefix_index=None, *, prefix_lens=None, kv_lens=None,
                key_padding_mask=None, causal=False, scale=None):
    keys, values = concat_prefix(k, v, prefix_k, prefix_v, prefix_index, group=q.shape[1] // k.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    mask = widened_mask(q, k, prefix_k, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal)
    if mask is not None:
        scores = scores + torch.zeros_like(mask, dtype=scores.dtype).masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values)


def _sdpa(q, keys, values, mask, scale):
    """SDPA as transformers calls it: GQA through ``enable_gqa`` only without a mask (its fused kernels take
    no GQA with a mask); with a mask, K/V heads are repeated first."""
    group = q.shape[1] // keys.shape[1]
    if group > 1 and mask is not None:
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != keys.shape[1])


def sdpa_concat(q, k, v, prefix_k, prefix_v, prefix_index=None, *, prefix_lens=None, kv_lens=None,
                key_padding_mask=None, causal=False, scale=None):
    keys, values = concat_prefix(k, v, prefix_k, prefix_v, prefix_index)
    mask = widened_mask(q, k, prefix_k, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal)
    return _sdpa(q, keys, values, mask, scale)


def precat(k, v, prefix_k, prefix_v, prefix_index=None):
    """Inputs for ``sdpa_precat``: K/V concatenated ahead of time, as leaves that take gradients."""
    keys, values = concat_prefix(k.detach(), v.detach(), prefix_k.detach(), prefix_v.detach(), prefix_index)
    return keys.contiguous().requires_grad_(k.requires_grad), values.contiguous().requires_grad_(v.requires_grad)


def sdpa_precat(q, keys, values, mask=None, scale=None):
    """SDPA on pre-concatenated keys/values [B, Hkv, P + S, D] with an optional prebuilt mask."""
    return _sdpa(q, keys, values, mask, scale)


def flash_attn_provider(shape, tensors, prefix_index, kw):
    """``flash_attn_with_kvcache`` on a per-row cache holding [prefix ; sequence] (built ahead of time), with
    ``cache_batch_idx`` and per-row ``cache_seqlens``; None unless flash-attn is installed and the tensors
    are fp16/bf16 on CUDA. Forward only. Not run on any machine of this project so far (none had flash-attn)."""
    q, k, v, pk, pv = tensors
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or kw.get("prefix_lens") is not None:
        return None
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    keys, values = concat_prefix(k.detach(), v.detach(), pk.detach(), pv.detach(), prefix_index)
    k_cache, v_cache = keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()  # [B, P+S, Hkv, D]
    P, S = pk.shape[-2], k.shape[2]
    kv_lens = kw.get("kv_lens")
    seqlens = (torch.full((q.shape[0],), S, device=q.device) if kv_lens is None else kv_lens).to(torch.int32) + P
    rows = torch.arange(q.shape[0], device=q.device, dtype=torch.int32)
    qt = q.detach().transpose(1, 2)
    causal = bool(kw.get("causal"))
    return lambda: flash_attn_with_kvcache(qt, k_cache, v_cache, cache_seqlens=seqlens, cache_batch_idx=rows,
                                           causal=causal).transpose(1, 2)
