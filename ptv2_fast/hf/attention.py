"""The attention and mask functions that patched models use, registered with transformers by name.

transformers looks both up by ``config._attn_implementation``: the attention function replaces
eager/SDPA attention in every layer, and the mask function makes the model hand that attention the 2D
padding mask (as a bool ``key_padding_mask``) instead of building a 4D mask. Registering only the attention
function would make transformers skip mask creation and silently drop padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import attention as _api

IMPLEMENTATION = "ptv2_fast"
CONTEXT_KWARG = "ptv2_fast_prefix"
LAYER_ATTR = "_ptv2_fast_layer"


@dataclass
class PrefixContext:
    """What one forward of a patched model passes to its attention layers (as a keyword argument).

    bank: [layers, 2, T, Hkv, P, D], any float dtype; prefix_index: [B] or None (T == 1), its values already
    validated (layers do not check them again: no per-layer sync); prefix_lens: [T] or None, validated too;
    backend: the ``prefix_attention`` backend.
    """

    bank: torch.Tensor
    prefix_index: torch.Tensor | None
    prefix_lens: torch.Tensor | None
    backend: str = "auto"
    values_checked: bool = False  # True once the forward validated them (not under torch.compile): layers skip
    _views: dict = field(default_factory=dict, repr=False)

    def layer(self, idx: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix_k, prefix_v) [T, Hkv, P, D] of layer ``idx`` in ``dtype``.

        The bank is cast once per forward and dtype (not once per layer) and split into per-layer views by
        one ``unbind``, whose backward stacks the layers' gradients in one copy; slicing the bank per layer
        instead would zero-fill a bank-sized gradient in every layer's backward.
        """
        views = self._views.get(dtype)
        if views is None:
            bank = self.bank
            views = self._views[dtype] = bank.to(dtype).flatten(0, 1).unbind(0)
        return views[2 * idx], views[2 * idx + 1]


def prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [B, Hq, L, D], key/value [B, Hkv, S, D] -> ([B, L, Hq, D], None)."""
    ctx = kwargs.get(CONTEXT_KWARG)
    layer = getattr(module, LAYER_ATTR, None)
    if ctx is None or layer is None:
        raise RuntimeError("ptv2_fast attention was called without a prefix: the model's config selects "
                           f"attn_implementation={IMPLEMENTATION!r}, but the model was not patched with "
                           "ptv2_fast.hf.patch_model (or the call bypassed the patched forward)")
    for feature in ("softcap", "s_aux", "sinks"):
        if kwargs.get(feature) is not None:
            raise NotImplementedError(f"ptv2_fast attention does not implement {feature!r}")
    pk, pv = ctx.layer(layer, query.dtype)
    window = kwargs.get("sliding_window")
    if window is not None and pk.shape[2] + key.shape[2] > window:
        raise NotImplementedError(
            f"prefix ({pk.shape[2]}) + keys ({key.shape[2]}) exceed the sliding window ({window}); "
            "ptv2_fast implements full attention only, which equals sliding-window attention below the window")
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise NotImplementedError(
            f"ptv2_fast attention got a {attention_mask.dim()}D {attention_mask.dtype} attention mask; pass a "
            "2D padding mask [batch, keys] (custom 4D masks are not supported)")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", False) if causal is None else causal
    # index values were validated once for the whole forward (_make_context): no per-layer host sync.
    # out comes laid out like query, which HF made from [B, L, Hq, D]: the transpose is contiguous, no copy.
    out = _api.prefix_attention(
        query, key, value, pk, pv, ctx.prefix_index, prefix_lens=ctx.prefix_lens, key_padding_mask=attention_mask,
        causal=bool(causal), scale=scaling, dropout_p=dropout, backend=ctx.backend,
        check_values=not ctx.values_checked)
    return out.transpose(1, 2), None


def prefix_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, **kwargs):
    """transformers mask interface: returns the bool padding mask [B, kv_length] (True = attend) or None.

    Causal structure is not encoded here: the attention function applies it from ``module.is_causal``.
    Mask overlays the op cannot express (packed sequences, chunked or custom masks) are refused.
    """
    name = getattr(mask_function, "__qualname__", repr(mask_function))
    if not all(_expressible(part) for part in _mask_parts(mask_function)):
        raise NotImplementedError(
            "ptv2_fast attention supports plain causal or bidirectional masks with padding; this call builds "
            f"a different mask ({name}: packed sequences, chunked attention or a custom overlay). Pass an "
            "attention_mask instead of packed position_ids, or unpatch the model.")
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_length, torch.Tensor) or \
            q_offset + q_length != kv_offset + kv_length:
        # The op aligns queries bottom-right (they are the last keys), which is what a dynamic cache gives.
        raise NotImplementedError(
            "ptv2_fast attention needs the queries to be the last of the keys (the default dynamic cache); "
            f"this cache gives {kv_length} key slots for queries at [{q_offset}, {q_offset}+{q_length}) "
            "(a static, pre-allocated or sliding-window cache). Use the default cache (no cache_implementation).")
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise NotImplementedError("ptv2_fast attention takes a 2D padding mask [batch, keys], got "
                                  f"a {attention_mask.dim()}D mask")
    mask = attention_mask.to(torch.bool)
    need = kv_length + kv_offset
    if mask.shape[-1] < need:
        mask = torch.nn.functional.pad(mask, (0, need - mask.shape[-1]), value=False)  # as transformers pads
    return mask[:, kv_offset:need]


def _mask_parts(fn) -> list:
    """The mask functions that transformers' and_masks/or_masks combined into ``fn`` (fn itself otherwise)."""
    if fn is None:
        return []
    inner = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())
             if isinstance(c.cell_contents, tuple) and all(callable(f) for f in c.cell_contents)]
    if "and_mask" in getattr(fn, "__qualname__", "") and len(inner) == 1:
        return [part for f in inner[0] for part in _mask_parts(f)]
    return [fn]


def _expressible(fn) -> bool:
    from transformers import masking_utils as mu

    # sliding windows are accepted here and bounded in the attention function (prefix + keys <= window)
    return fn in (mu.causal_mask_function, mu.bidirectional_mask_function) or "sliding_window" in fn.__qualname__


def register() -> None:
    """Register both functions with transformers under ``IMPLEMENTATION`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, prefix_attention_mask)
