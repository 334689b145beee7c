"""The baselines of DESIGN.md §6, defined once. Each takes the arguments of ``ptv2_fast.prefix_attention``.

* ``naive_eager``: the P-Tuning v2 / PEFT path: gather the prefix to B rows, ``torch.cat`` with K/V,
  repeat K/V heads for GQA (as HF eager attention does), matmul, additive-masked softmax in fp32, matmul.
* ``sdpa_concat``: the same concatenation, then ``F.scaled_dot_product_attention`` with the widened mask
  (GQA: K/V heads repeated when there is a mask, as transformers does).
* ``sdpa_precat``: SDPA on K/V concatenated *before* timing (``precat`` builds them): a lower bound that
  pays no concatenation. Its gradients go to the pre-concatenated K/V, not to the bank.
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


def _attention_with_lse(q, k, v, mask, scale, causal=False):
    """SDPA that also returns the log-sum-exp (natural log), through the fused kernels torch ships:
    flash attention on CPU, memory-efficient attention on CUDA. Forward only: torch exposes no gradient
    for their lse, so ``cascade`` is timed without backward. k/v must have q's head count."""
    B, H, L, _ = q.shape
    N = k.shape[2]
    bias = None
    if mask is not None:
        # an additive bias whose last-dim stride is 16-byte aligned (the CUDA kernel requires it): allocate
        # padded, use the first N columns; broadcast over heads
        pad = -N % 16
        full = torch.zeros((B, 1, L, N + pad), dtype=q.dtype, device=q.device)
        bias = full[..., :N].masked_fill(~mask.expand(B, 1, L, N), float("-inf")).expand(B, H, L, N)
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                         scale=scale)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal,
                                                                      scale=scale)[:2]
    return out, lse[..., :L]  # the kernel pads lse's query axis to a multiple of 32


def cascade(q, k, v, prefix_k, prefix_v, prefix_index=None, *, prefix_lens=None, kv_lens=None,
            key_padding_mask=None, causal=False, scale=None):
    """Two attention calls, the prefix (each row's bank row, gathered) and the sequence, combined exactly
    with ``merge_attention_states``: the cascade path of DESIGN.md section 6 (forward only)."""
    from ptv2_fast import merge_attention_states

    pk, pv = as_bank(prefix_k), as_bank(prefix_v)
    B, Hq, L, D = q.shape
    group = Hq // k.shape[1]
    P = pk.shape[2]
    rows = torch.zeros(B, dtype=torch.long, device=q.device) if prefix_index is None else prefix_index.long()
    scale = D ** -0.5 if scale is None else scale
    vis = visible_keys(B, L, k.shape[2], P, prefix_index=prefix_index, prefix_lens=prefix_lens, kv_lens=kv_lens,
                       key_padding_mask=key_padding_mask, causal=causal, device=q.device)[:, None]
    o_p, l_p = _attention_with_lse(q, pk[rows].repeat_interleave(group, 1), pv[rows].repeat_interleave(group, 1),
                                   None if prefix_lens is None else vis[..., :P], scale)
    plain_causal = causal and L == k.shape[2] and kv_lens is None and key_padding_mask is None
    o_s, l_s = _attention_with_lse(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                   None if plain_causal else vis[..., P:], scale, causal=plain_causal)
    return merge_attention_states(o_p, l_p, o_s, l_s)[0]


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
