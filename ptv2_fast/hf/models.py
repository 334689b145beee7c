"""The table of supported model families, keyed by ``config.model_type``.

To add a family: add a ``ModelSpec`` naming where its position ids are consumed (the module whose input
gets the P-Tuning v2 position shift), how its positions treat padding, and which config settings select an
attention feature the fused op does not implement (those are refused, never computed wrong).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


class UnsupportedModelError(ValueError):
    """The model family, or an attention feature it uses, is not supported by ptv2_fast."""


@dataclass(frozen=True)
class ModelSpec:
    position_module: str      # attribute path, from the backbone (``model.base_model``), of the position consumer
    position_kind: str        # "absolute" (ids into an embedding), "roberta" (pads keep padding_idx), "rotary"
    refuse: Callable[[object], str | None] = lambda config: None  # a reason to refuse this config, or None


def _refuse_bert(config) -> str | None:
    kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        return f"position_embedding_type={kind!r} (relative position bias)"
    if getattr(config, "add_cross_attention", False):
        return "cross-attention (add_cross_attention=True)"
    return None


def _refuse_gpt2(config) -> str | None:
    if getattr(config, "add_cross_attention", False):
        return "cross-attention (add_cross_attention=True)"
    return None


def _refuse_llama_family(config) -> str | None:
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    return None


MODEL_TABLE: dict[str, ModelSpec] = {
    "bert": ModelSpec("embeddings.position_embeddings", "absolute", _refuse_bert),
    "roberta": ModelSpec("embeddings.position_embeddings", "roberta", _refuse_bert),
    "gpt2": ModelSpec("wpe", "absolute", _refuse_gpt2),
    "llama": ModelSpec("rotary_emb", "rotary", _refuse_llama_family),
    "mistral": ModelSpec("rotary_emb", "rotary", _refuse_llama_family),
    "qwen2": ModelSpec("rotary_emb", "rotary", _refuse_llama_family),
}


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def spec_for(config) -> ModelSpec:
    """The table entry for ``config.model_type``; raises ``UnsupportedModelError`` with the reason."""
    model_type = getattr(config, "model_type", None)
    spec = MODEL_TABLE.get(model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"ptv2_fast.hf does not support model_type={model_type!r}; supported: {sorted(MODEL_TABLE)}")
    reason = spec.refuse(config)
    if reason is not None:
        raise UnsupportedModelError(f"ptv2_fast.hf cannot patch this {model_type} model: it uses {reason}, "
                                    "which the fused prefix attention does not implement")
    return spec


def geometry(config) -> Geometry:
    """Layers, query heads, key/value heads and head dim of a supported model's attention."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Geometry(layers, heads, kv_heads, head_dim)


def resolve_path(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module
