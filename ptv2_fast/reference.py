"""The plain-torch concatenating reference of prefix attention: the op's specification in code.

It does exactly what P-Tuning v2 and PEFT do — gather the prefix to B rows, concatenate it with the
sequence keys/values, widen the mask, softmax — so every fused path is checked against it (in float64).
"""

from __future__ import annotations

import torch


def as_bank(prefix: torch.Tensor) -> torch.Tensor:
    """A bank [T, Hkv, P, D] from either form of the prefix argument ([Hkv, P, D] becomes T = 1). A view."""
    return prefix.unsqueeze(0) if isinstance(prefix, torch.Tensor) and prefix.dim() == 3 else prefix


def concat_prefix(k, v, prefix_k, prefix_v, prefix_index=None, *, group: int = 1, dtype=None):
    """The naive path's keys/values [B, Hkv * group, P + S, D]: each row's prefix copied in front of its
    sequence, optionally cast to ``dtype`` and with each kv head repeated ``group`` times (GQA, as HF does)."""
    pk, pv = as_bank(prefix_k), as_bank(prefix_v)
    B = k.shape[0]
    if prefix_index is None:
        rows_k, rows_v = pk.expand(B, *pk.shape[1:]), pv.expand(B, *pv.shape[1:])
    else:
        rows_k, rows_v = pk[prefix_index.long()], pv[prefix_index.long()]
    keys, values = torch.cat([rows_k, k], dim=2), torch.cat([rows_v, v], dim=2)
    if dtype is not None:
        keys, values = keys.to(dtype), values.to(dtype)
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    return keys, values


def visible_keys(B: int, L: int, S: int, P: int, *, prefix_index=None, prefix_lens=None, kv_lens=None,
                 key_padding_mask=None, causal=False, device=None) -> torch.Tensor:
    """Bool [B, L, P + S]: which entry of the concatenated key axis query i of row b may attend to."""
    idx = prefix_index.long() if prefix_index is not None else torch.zeros(B, dtype=torch.long, device=device)
    j = torch.arange(P + S, device=device)
    if prefix_lens is not None:
        plen = prefix_lens.long()[idx]
    else:
        plen = torch.full((B,), P, dtype=torch.long, device=device)
    vis_prefix = j[None, :P] < plen[:, None]  # [B, P]
    vis_seq = torch.ones(B, S, dtype=torch.bool, device=device)
    if kv_lens is not None:
        vis_seq &= j[None, :S] < kv_lens.long()[:, None]
    if key_padding_mask is not None:
        vis_seq &= key_padding_mask.bool()
    vis = torch.cat([vis_prefix, vis_seq], dim=1)[:, None, :].expand(B, L, P + S).clone()
    if causal:
        i = torch.arange(L, device=device)
        allowed = j[None, :S] <= i[:, None] + (S - L)  # bottom-right aligned, sequence part only
        vis[:, :, P:] &= allowed[None]
    return vis


def prefix_attention_ref(q, k, v, prefix_k, prefix_v, prefix_index=None, *, prefix_lens=None, kv_lens=None,
                         key_padding_mask=None, causal=False, scale=None, dropout_mask=None, dropout_p=0.0,
                         return_lse=False, compute_dtype=None):
    """Concatenating prefix attention.

    Shapes as ``ptv2_fast.prefix_attention``: q [B, Hq, L, D]; k, v [B, Hkv, S, D]; prefix_k, prefix_v
    [T, Hkv, P, D] or [Hkv, P, D]. ``dropout_mask`` (bool [B, Hq, L, P + S], True = keep) applies
    attention dropout with probability ``dropout_p``. Matmuls run in ``compute_dtype`` (default: q's dtype),
    the softmax in at least float32. Returns out [B, Hq, L, D] in q's dtype (and lse [B, Hq, L] in the
    softmax dtype when ``return_lse``); a query with no visible key gives out = 0, lse = -inf.
    """
    dt = compute_dtype or q.dtype
    B, Hq, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], as_bank(prefix_k).shape[2]
    group = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale

    # The naive path: one copy of the prefix per batch row, concatenated in front of the sequence.
    keys, values = concat_prefix(k, v, prefix_k, prefix_v, prefix_index, group=group, dtype=dt)
    vis = visible_keys(B, L, S, P, prefix_index=prefix_index, prefix_lens=prefix_lens, kv_lens=kv_lens,
                       key_padding_mask=key_padding_mask, causal=causal, device=q.device)[:, None]

    keys, values = hide_unseen(keys, values, vis)
    scores = torch.matmul(q.to(dt), keys.transpose(-1, -2)) * scale
    return _attend(scores, vis, values, q.dtype, dt, dropout_mask, dropout_p, return_lse)


def hide_unseen(keys, values, vis):
    """keys/values [B, H, N, D] with the slots no query of the row sees (padding, columns past a task's prefix
    length) set to 0: a hidden slot's probability is 0, but 0 * NaN is NaN, so its contents must not reach the
    result or the gradients. ``vis``: bool [B, 1, L, N]."""
    seen = vis.any(dim=2)[..., None]  # [B, 1, N, 1]
    return keys.masked_fill(~seen, 0.0), values.masked_fill(~seen, 0.0)


def _attend(scores, vis, values, out_dtype, dt, dropout_mask=None, dropout_p=0.0, return_lse=False):
    """Masked softmax of ``scores`` [B, H, L, N] over the visible keys ``vis`` (broadcastable bool), times
    ``values`` [B, H, N, D]; rows that see nothing give out = 0 and lse = -inf."""
    sdt = torch.promote_types(dt, torch.float32)
    if scores.shape[-1] == 0:  # no key at all (P = S = 0): every row is empty
        out = torch.zeros((*scores.shape[:-1], values.shape[-1]), dtype=out_dtype, device=scores.device)
        lse = torch.full(scores.shape[:-1], float("-inf"), dtype=sdt, device=scores.device)
        return (out, lse) if return_lse else out
    scores = scores.to(sdt).masked_fill(~vis, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
    e = torch.exp(scores - m)
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0
    probs = e / torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, torch.full_like(denom, float("-inf")),
                      m + torch.log(torch.where(empty, torch.ones_like(denom), denom))).squeeze(-1)
    if dropout_mask is not None and dropout_p > 0.0:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.matmul(probs.to(dt), values).to(out_dtype)
    if return_lse:
        return out, lse  # float32, or float64 when computing in float64
    return out


def merge_attention_states_ref(o_a, lse_a, o_b, lse_b):
    """Merge by explicit re-weighting in float64 (for checks)."""
    lse = torch.logaddexp(lse_a.double(), lse_b.double())
    w_a = torch.nan_to_num(torch.exp(lse_a.double() - lse))
    w_b = torch.nan_to_num(torch.exp(lse_b.double() - lse))
    o = w_a[..., None] * o_a.double() + w_b[..., None] * o_b.double()
    return o, lse


def gather_pages(cache: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """A paged cache [num_pages, Hkv, page_size, D] laid out per row: [B, Hkv, max_pages * page_size, D]."""
    rows = cache[page_table.long()]  # [B, max_pages, Hkv, page_size, D]
    B, n, H, ps, D = rows.shape
    return rows.permute(0, 2, 1, 3, 4).reshape(B, H, n * ps, D)


def prefix_decode_attention_ref(q, k_cache, v_cache, cache_seqlens, prefix_k, prefix_v, prefix_index=None, *,
                                prefix_lens=None, page_table=None, causal=True, scale=None, return_lse=False,
                                compute_dtype=None):
    """Concatenating decode attention: the specification of ``ptv2_fast.prefix_decode_attention``.

    q [B, Hq, Lq, D] holds the Lq newest tokens of each row, which are already the last of the
    ``cache_seqlens[b]`` valid entries of its cache (k_cache/v_cache [B, Hkv, S_max, D], or paged
    [num_pages, Hkv, page_size, D] with ``page_table`` [B, max_pages]). Query i of row b sees its task's
    prefix and cache entries c < cache_seqlens[b], and, when ``causal``, only c <= cache_seqlens[b] - Lq + i.
    Returns out [B, Hq, Lq, D] in q's dtype (and lse [B, Hq, Lq] with ``return_lse``).
    """
    dt = compute_dtype or q.dtype
    k, v = (k_cache, v_cache) if page_table is None else (gather_pages(k_cache, page_table),
                                                          gather_pages(v_cache, page_table))
    B, Hq, Lq, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], as_bank(prefix_k).shape[2]
    scale = D ** -0.5 if scale is None else scale
    keys, values = concat_prefix(k, v, prefix_k, prefix_v, prefix_index, group=Hq // Hkv, dtype=dt)
    seqlens = cache_seqlens.long()
    vis = visible_keys(B, Lq, S, P, prefix_index=prefix_index, prefix_lens=prefix_lens, kv_lens=seqlens,
                       device=q.device)
    if causal:
        limit = seqlens[:, None] - Lq + torch.arange(Lq, device=q.device)[None]  # [B, Lq]
        vis[:, :, P:] &= torch.arange(S, device=q.device)[None, None] <= limit[:, :, None]
    keys, values = hide_unseen(keys, values, vis[:, None])
    scores = torch.matmul(q.to(dt), keys.transpose(-1, -2)) * scale
    return _attend(scores, vis[:, None], values, q.dtype, dt, return_lse=return_lse)
