"""Public prefix-attention functions: ``prefix_attention`` and ``merge_attention_states``."""

from __future__ import annotations

import torch

from .ops import backends, checks
from .ops.prefix_attention import _needs_autograd, prefix_attention_op


def draw_rng_key() -> torch.Tensor:
    """The dropout key (seed, offset), int64 [2] on the CPU, drawn from torch's default CPU generator:
    ``torch.manual_seed`` makes dropout reproducible, and no GPU sync is needed."""
    key = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64)
    key._ptv2_fast_host = True  # read on the host by design: host-cost counters do not call it a device sync
    return key


def resolve_backend(backend: str, device, dtype=None, dropout_p: float = 0.0, grad: bool = True) -> str:
    """The backend ``prefix_attention(..., backend=backend)`` would use for tensors on ``device`` (``grad``:
    for a call that will be differentiated; "auto" may pick another backend for inference)."""
    return backends.resolve(backend, torch.device(device), dtype, float(dropout_p), grad)


def prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index=None, *, prefix_lens=None, kv_lens=None,
                     key_padding_mask=None, causal=False, scale=None, dropout_p=0.0, return_lse=False,
                     backend="auto", check_values=True):
    """Attention over ``[prefix ; sequence]`` keys/values without materialising the concatenation.

    Args:
        q: [B, Hq, L, D] queries (any strides, e.g. a [B, L, Hq, D] tensor transposed).
        k, v: [B, Hkv, S, D] sequence keys/values; ``Hq % Hkv == 0`` (GQA/MQA, K/V never repeated).
        prefix_k, prefix_v: [T, Hkv, P, D], a bank of T task prefixes, or [Hkv, P, D] for one shared prefix.
        prefix_index: [B] int32/int64, the bank row of each batch row; None means row 0 (requires T == 1).
        prefix_lens: [T] int, valid prefix length per task (default P); columns past it are invisible.
        kv_lens: [B] int, valid sequence keys per row, keys [0, kv_lens[b]) (right padding).
        key_padding_mask: [B, S] bool, True = attend; any pattern. Exclusive with ``kv_lens``.
        causal: causal over the sequence part, bottom-right aligned: query i sees sequence key
            j <= i + S - L. The prefix is always visible.
        scale: softmax scale, default D ** -0.5.
        dropout_p: attention dropout probability in [0, 1); the mask is drawn from torch's default
            generator (``torch.manual_seed`` makes it reproducible) and replayed exactly in backward.
        return_lse: also return lse [B, Hq, L] float32 (natural log; -inf for a row that sees no key).
        backend: "auto" (one rule table, ``ptv2_fast.ops.backends.AUTO_RULES``, from measurements: Triton on
            CUDA tensors; on CPU tensors the fused C++ extension, built on first use; the reference for
            float64 or when nothing else can run),
            "triton", "sdpa" (the sequence through PyTorch's fused attention kernels, the prefix through
            ours, merged exactly: ``ptv2_fast.ops.sdpa``), "cpp" (CPU) or "reference". "cuda" is refused:
            CUDA's native kernel is the decode op. Each backend draws its own dropout stream (reproducible
            per seed, replayed in its backward).
        check_values: range-check the values of ``prefix_index``, ``prefix_lens`` and ``kv_lens`` (default).
            On a GPU this reads them back once per new (or modified) tensor: one host sync. Pass False when
            they were validated already (a patched Hugging Face model validates once per forward, not per
            layer); the kernels clamp every index anyway, so bad values then select wrong rows but never
            read outside a tensor.

    Returns:
        out [B, Hq, L, D] in q's dtype, or (out, lse) with ``return_lse``. ``out`` has q's memory layout
        when q is dense (``torch.empty_like(q)``): for q = x.view(B, L, Hq, D).transpose(1, 2),
        ``out.transpose(1, 2)`` is contiguous, so Hugging Face's reshape after attention copies nothing.
        A query that sees no key at all gets out = 0 and lse = -inf, never NaN. Gradients flow to q, k, v,
        prefix_k and prefix_v (each gradient in its input's layout); the bank's gradient sums the rows that
        share a task and is 0 for unused rows. Deterministic; first-order only (a second backward raises).
    """
    pk = prefix_k if getattr(prefix_k, "ndim", 0) != 3 else prefix_k.unsqueeze(0)
    pv = prefix_v if getattr(prefix_v, "ndim", 0) != 3 else prefix_v.unsqueeze(0)
    if type(dropout_p) is not float:
        dropout_p = float(dropout_p) if isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool) \
            else dropout_p
    if not isinstance(q, torch.Tensor) or type(dropout_p) is not float or not 0.0 <= dropout_p < 1.0 or \
            (scale is not None and type(scale) is not float):  # raises naming the argument (or accepts an int scale)
        checks.check_shapes(q, k, v, pk, pv, prefix_index, prefix_lens, kv_lens, key_padding_mask, dropout_p, scale)
    # Shapes, dtypes and devices are checked once, by the backend's raw op (in C++ for the C++ extension;
    # the same messages either way), not here as well.
    name = backends.resolve(backend, q.device, q.dtype, dropout_p,
                            backend != "auto" or _needs_autograd(q, k, v, pk, pv))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    rng_key = draw_rng_key() if dropout_p > 0.0 else None
    out, lse = prefix_attention_op(q, k, v, pk, pv, prefix_index, prefix_lens, kv_lens, key_padding_mask,
                                   bool(causal), scale, dropout_p, rng_key, name, bool(check_values))
    return (out, lse) if return_lse else out


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    """Exactly combine two attention results over disjoint key sets.

    Args:
        o_a, o_b: [..., L, D] attention outputs, each normalised over its own keys.
        lse_a, lse_b: [..., L] their log-sum-exps (natural log; -inf where a part saw no key).

    Returns:
        (o [..., L, D] in o_a's dtype, lse [..., L] float32, or float64 for float64 inputs): the attention
        over the union of the key sets.
        Differentiable in both outputs; rows where both parts are empty give o = 0, lse = -inf, and
        finite gradients.
    """
    wdt = torch.promote_types(o_a.dtype, torch.float32)
    la, lb = lse_a.to(wdt), lse_b.to(wdt)
    m = torch.maximum(la, lb).detach()  # cancels exactly; detached so autograd never sees -inf - -inf
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    empty = total == 0
    safe = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), m + torch.log(safe))
    o = (wa / safe)[..., None] * o_a.to(wdt) + (wb / safe)[..., None] * o_b.to(wdt)
    return o.to(o_a.dtype), lse
