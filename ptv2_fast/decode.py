"""``prefix_decode_attention``: mixed-task decode over a prefix bank and a per-row KV cache."""

from __future__ import annotations

import torch

from . import reference
from .ops import backends, checks

DECODE_BACKENDS = ("auto", "cuda", "cpp", "reference")
MAX_DECODE_QUERIES = 16
CUDA_HEAD_DIMS = (64, 128)


def _need(cond, msg, exc=ValueError):
    if not cond:
        raise exc(msg)


def _check(q, k_cache, v_cache, cache_seqlens, pk, pv, prefix_index, prefix_lens, page_table, num_splits):
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("prefix_k", pk), ("prefix_v", pv)):
        _need(isinstance(x, torch.Tensor), f"{name} must be a torch.Tensor, got {type(x).__name__}", TypeError)
        _need(x.dim() == 4, f"{name} must be 4-D, got shape {list(x.shape)}")
        _need(x.dtype == q.dtype, f"{name} has dtype {x.dtype} but q has {q.dtype}", TypeError)
        _need(x.device == q.device, f"{name} is on {x.device} but q is on {q.device}")
    _need(q.dtype in checks.SUPPORTED_DTYPES, f"q has unsupported dtype {q.dtype}; use float16, bfloat16 or "
          "float32 (float64 for checks)", TypeError)
    B, Hq, Lq, D = q.shape
    Hkv = k_cache.shape[1]
    _need(1 <= Lq <= MAX_DECODE_QUERIES, f"q must hold 1 to {MAX_DECODE_QUERIES} new tokens per row (q.shape[2]), "
          f"got {Lq}; run longer prompts through prefix_attention")
    _need(checks.MIN_HEAD_DIM <= D <= checks.MAX_HEAD_DIM, f"head dim D={D} must be in "
          f"[{checks.MIN_HEAD_DIM}, {checks.MAX_HEAD_DIM}]")
    _need(tuple(v_cache.shape) == tuple(k_cache.shape),
          f"v_cache has shape {list(v_cache.shape)} but k_cache has {list(k_cache.shape)}")
    _need(k_cache.shape[3] == D, f"k_cache has head dim {k_cache.shape[3]} but q has {D}")
    _need(Hkv > 0 and Hq % Hkv == 0, f"q has {Hq} heads, not a multiple of the {Hkv} heads of k_cache")
    _need(pk.shape[1] == Hkv and pk.shape[3] == D and pk.shape[0] >= 1,
          f"prefix_k must be [T, Hkv, P, D] = [T, {Hkv}, P, {D}], got {list(pk.shape)}")
    _need(tuple(pv.shape) == tuple(pk.shape), f"prefix_v has shape {list(pv.shape)} but prefix_k has {list(pk.shape)}")
    if page_table is None:
        _need(k_cache.shape[0] == B, f"k_cache must be [B, Hkv, S_max, D] with B={B} (or pass page_table for a "
              f"paged cache [num_pages, Hkv, page_size, D]), got {list(k_cache.shape)}")
    else:
        _need(isinstance(page_table, torch.Tensor) and page_table.dtype == torch.int32,
              "page_table must be an int32 tensor [B, max_pages]", TypeError)
        _need(page_table.dim() == 2 and page_table.shape[0] == B,
              f"page_table must be [B, max_pages] with B={B}, got {list(page_table.shape)}")
        _need(page_table.device == q.device, f"page_table is on {page_table.device} but q is on {q.device}")
    T = pk.shape[0]
    checks._check_int_vector("cache_seqlens", cache_seqlens, B, "B", q.device)
    _need(cache_seqlens is not None, "cache_seqlens [B] is required")
    if prefix_index is None:
        _need(T == 1, f"prefix_index is None but the bank has T={T} task rows; pass prefix_index [B]")
    checks._check_int_vector("prefix_index", prefix_index, B, "B", q.device)
    checks._check_int_vector("prefix_lens", prefix_lens, T, "T", q.device)
    _need(isinstance(num_splits, int) and 0 <= num_splits <= 256, f"num_splits must be an int in [0, 256], got "
          f"{num_splits!r}")


def resolve_decode_backend(backend: str, q: torch.Tensor) -> str:
    """``auto``: the CUDA kernel for CUDA tensors (head dim 64/128), the C++ CPU kernel for CPU tensors,
    else the concatenating reference."""
    _need(backend in DECODE_BACKENDS, f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    from . import _ext

    if backend == "reference":
        return backend
    if q.is_cuda:
        ok = q.dtype in backends.EXT_DTYPES and q.shape[-1] in CUDA_HEAD_DIMS and _ext.has_cuda_kernels()
        if backend in ("cuda", "auto") and ok:
            return "cuda"
        if backend == "auto":
            return "reference"
        raise backends.BackendUnavailable(
            f"backend={backend!r} for CUDA tensors needs the extension built with CUDA (build: "
            f"{_ext.status()['error'] or 'cpu only'}), dtype float16/bfloat16/float32 and head dim in {CUDA_HEAD_DIMS}")
    if q.device.type == "cpu" and q.dtype in backends.EXT_DTYPES and backend in ("cpp", "auto") and _ext.load():
        return "cpp"
    if backend == "auto":
        return "reference"
    raise backends.BackendUnavailable(f"backend={backend!r} cannot run {q.dtype} tensors on {q.device} here "
                                      f"(extension: {_ext.status()['error'] or 'loaded'})")


def prefix_decode_attention(q, k_cache, v_cache, cache_seqlens, prefix_k, prefix_v, prefix_index=None, *,
                            prefix_lens=None, page_table=None, causal=True, scale=None, num_splits=0,
                            return_lse=False, backend="auto"):
    """Decode attention for a batch of rows of different tasks, reading each row's prefix from the bank.

    Row b with task ``t = prefix_index[b]`` attends to ``[prefix_k[t, :, :prefix_lens[t]] ; its cache]``; the
    prefix is never copied into the cache, so a cache holds sequence tokens only.

    Args:
        q: [B, Hq, Lq, D] the 1..16 newest tokens of each row (speculative/multi-token decode: Lq > 1).
        k_cache, v_cache: [B, Hkv, S_max, D] per-row caches, or paged [num_pages, Hkv, page_size, D] with
            ``page_table``. The Lq new tokens must already be written: they are the last entries of each row.
        cache_seqlens: [B] int32/int64, valid cache entries of each row (the Lq new ones included).
        prefix_k, prefix_v: [T, Hkv, P, D] the bank (or [Hkv, P, D] for one shared prefix).
        prefix_index: [B] int bank row of each batch row (None: row 0 for all, T must be 1).
        prefix_lens: [T] int valid prefix length per task.
        page_table: [B, max_pages] int32 page ids of each row (paged cache), or None.
        causal: query i of a row sees cache entries c <= cache_seqlens[b] - Lq + i (the prefix always).
        scale: softmax scale, default D ** -0.5.
        num_splits: split-KV factor of the CUDA kernel (0: chosen from the shape and the GPU's SM count).
        return_lse: also return lse [B, Hq, Lq] float32.
        backend: "auto" (CUDA kernel on CUDA tensors with D in {64, 128}; C++ kernel on CPU tensors; else
            the reference), "cuda", "cpp" or "reference".

    Returns:
        out [B, Hq, Lq, D] in q's dtype (and lse with ``return_lse``). Inference only: no gradients.
    """
    pk, pv = reference.as_bank(prefix_k), reference.as_bank(prefix_v)
    _check(q, k_cache, v_cache, cache_seqlens, pk, pv, prefix_index, prefix_lens, page_table, num_splits)
    if scale is not None:
        _need(isinstance(scale, (int, float)) and 0.0 < float(scale) < float("inf"),
              f"scale must be a positive finite float or None, got {scale!r}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    S_max = k_cache.shape[2] * (page_table.shape[1] if page_table is not None else 1)
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        checks.check_values(prefix_index, prefix_lens, cache_seqlens, pk.shape[0], pk.shape[2], S_max,
                            kv_name="cache_seqlens")
        if page_table is not None and page_table.numel():
            _need(bool(((page_table >= 0) & (page_table < k_cache.shape[0])).all()),
                  f"page_table has values outside [0, num_pages) = [0, {k_cache.shape[0]})")
    name = resolve_decode_backend(backend, q)
    if name == "reference":
        with torch.no_grad():
            out, lse = reference.prefix_decode_attention_ref(
                q, k_cache, v_cache, cache_seqlens, pk, pv, prefix_index, prefix_lens=prefix_lens,
                page_table=page_table, causal=causal, scale=scale, return_lse=True,
                compute_dtype=torch.promote_types(q.dtype, torch.float32))
        out, lse = out.to(q.dtype), lse.float()
    else:
        out, lse = torch.ops.ptv2_fast.prefix_decode_attention(
            q, k_cache, v_cache, cache_seqlens, pk, pv, prefix_index, prefix_lens, page_table, bool(causal), scale,
            int(num_splits))
    return (out, lse) if return_lse else out
