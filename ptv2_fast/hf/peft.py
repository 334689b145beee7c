"""PEFT interop: serve a PEFT prefix-tuning model's prefix from the bank, and PEFT's adapter format.

A PEFT prefix-tuning model builds, every forward, a per-sample copy of its prefix inside a cache and widens
the mask. ``patch_model(peft_model)`` instead patches the wrapped transformers model with a source that
evaluates PEFT's own prompt encoder once per forward (so its parameters keep training), and routes the PEFT
model's ``forward``/``generate`` to the patched model, which applies PEFT's semantics (positions shifted by
P, prefix always visible) without the copies.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from torch import nn

from .prefix_encoder import PrefixEncoder, bank_from_embeddings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_ATTR = "_ptv2_fast_peft"
_KEEP_TOKEN_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")  # PEFT drops token_type_ids for the other types


def is_peft_model(model) -> bool:
    return getattr(model, "active_peft_config", None) is not None and hasattr(model, "get_base_model")


def is_peft_prefix_model(model) -> bool:
    """True for a PEFT model whose active adapter is prefix tuning."""
    config = getattr(model, "active_peft_config", None)
    return config is not None and str(getattr(config, "peft_type", "")).endswith("PREFIX_TUNING")


class PeftPrefixSource(nn.Module):
    """The bank [layers, 2, 1, Hkv, P, D] of a PEFT model's active prefix-tuning adapter.

    Evaluates PEFT's prompt encoder once (not once per sample), as PEFT's ``get_prompt`` would for one row,
    including its cast to the base model's dtype. The adapter, encoder and dtype are looked up at every
    call, so ``set_adapter`` and ``.to(dtype)`` on the PEFT model are followed.
    """

    def __init__(self, peft_model):
        super().__init__()
        # Not a submodule: the PEFT model owns the prompt encoder (and its state dict keeps it).
        object.__setattr__(self, "_peft", peft_model)
        self.num_tasks = 1
        self.prefix_lens = None
        config = self._config()
        self.num_layers = config.num_layers
        self.num_kv_heads = config.num_attention_heads
        self.head_dim = config.token_dim // config.num_attention_heads

    def _config(self):
        config = self._peft.active_peft_config
        if not str(config.peft_type).endswith("PREFIX_TUNING"):
            raise ValueError(f"the active PEFT adapter is {config.peft_type}, not prefix tuning")
        if getattr(config, "num_transformer_submodules", 1) != 1:
            raise NotImplementedError("ptv2_fast serves decoder-only and encoder-only PEFT prefix models "
                                      "(num_transformer_submodules=1)")
        return config

    @property
    def prefix_len(self) -> int:
        return self._peft.active_peft_config.num_virtual_tokens

    def forward(self, prefix_index=None) -> torch.Tensor:
        peft_model, config = self._peft, self._config()
        encoder = peft_model.prompt_encoder[peft_model.active_adapter]
        if config.inference_mode:
            emb = encoder.embedding.weight
        else:
            tokens = peft_model.prompt_tokens[peft_model.active_adapter][: config.num_virtual_tokens]
            emb = encoder(tokens.to(encoder.embedding.weight.device))
        dtype = getattr(peft_model, "base_model_torch_dtype", None)
        if dtype is not None:
            emb = emb.to(dtype)
        return bank_from_embeddings(emb.unsqueeze(0), config.num_layers, config.num_attention_heads,
                                    config.token_dim // config.num_attention_heads)


def patch_peft_model(peft_model, *, backend="auto", shift_positions=True):
    """Patch the transformers model inside a PEFT prefix-tuning model; route PEFT's forward/generate to it."""
    from .patch import install_method, patch_model

    if getattr(peft_model, _PEFT_ATTR, None) is not None:
        return peft_model
    base = peft_model.get_base_model()
    # PEFT froze the base already and decides what trains (modules_to_save heads); keep that.
    patch_model(base, prefix=PeftPrefixSource(peft_model), shift_positions=shift_positions, freeze_base=False,
                backend=backend)
    originals = {name: peft_model.__dict__.get(name) for name in ("forward", "generate")}
    object.__setattr__(peft_model, _PEFT_ATTR, originals)
    install_method(peft_model, "forward", _peft_forward)
    install_method(peft_model, "generate", _peft_generate)
    return peft_model


def _peft_forward(peft_model, *args, **kwargs):
    kwargs.pop("task_ids", None)
    task_type = str(peft_model.active_peft_config.task_type).split(".")[-1]
    if task_type not in _KEEP_TOKEN_TYPES and kwargs.get("token_type_ids") is not None:
        # as PEFT's own forward does for these task types, so outputs stay equal to the unpatched model's
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids",
                      stacklevel=3)
        kwargs["token_type_ids"] = None
    return peft_model.get_base_model()(*args, **kwargs)


def _peft_generate(peft_model, *args, **kwargs):
    kwargs.pop("task_ids", None)
    return peft_model.get_base_model().generate(*args, **kwargs)


def unpatch_peft_model(peft_model):
    from .patch import unpatch_model

    originals = getattr(peft_model, _PEFT_ATTR, None)
    if originals is None:
        return peft_model
    for name, orig in originals.items():
        if orig is None:
            peft_model.__dict__.pop(name, None)
        else:
            setattr(peft_model, name, orig)
    peft_model.__dict__.pop(_PEFT_ATTR, None)
    unpatch_model(peft_model.get_base_model())
    return peft_model


def save_peft_adapter(prefix: PrefixEncoder, task: int, save_directory: str, model_config, *,
                      task_type: str = "FEATURE_EXTRACTION", base_model_name_or_path: str | None = None) -> str:
    """Write task row ``task`` of a ``PrefixEncoder`` as a PEFT prefix-tuning adapter folder.

    PEFT stores a prefix adapter as ``prompt_embeddings`` [P, layers*2*Hkv*D] (the reparameterisation
    folded in) with ``inference_mode=True``; ``PeftModel.from_pretrained(base, save_directory)`` loads it.
    Only the first ``prefix_lens[task]`` positions are written when the task is shorter than P.
    Returns ``save_directory``.
    """
    from safetensors.torch import save_file

    from .models import geometry

    geo = geometry(model_config)
    have = (prefix.num_layers, prefix.num_kv_heads, prefix.head_dim)
    if have != (geo.num_layers, geo.num_kv_heads, geo.head_dim):
        raise ValueError(f"the prefix (layers, kv heads, head dim) {have} does not fit this model "
                         f"{(geo.num_layers, geo.num_kv_heads, geo.head_dim)}")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model_config, "_name_or_path", None) or None
    if not 0 <= task < prefix.num_tasks:
        raise ValueError(f"task must be in [0, {prefix.num_tasks}), got {task}")
    with torch.no_grad():
        emb = prefix.task_embeddings()[task]
    P = prefix.prefix_len if prefix.prefix_lens is None else int(prefix.prefix_lens[task])
    emb = emb[:P].detach().contiguous().cpu()
    os.makedirs(save_directory, exist_ok=True)
    save_file({"prompt_embeddings": emb}, os.path.join(save_directory, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": task_type, "num_virtual_tokens": P,
        "token_dim": prefix.num_kv_heads * prefix.head_dim, "num_layers": prefix.num_layers,
        "num_attention_heads": prefix.num_kv_heads, "num_transformer_submodules": 1,
        "encoder_hidden_size": prefix.num_kv_heads * prefix.head_dim, "prefix_projection": False,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "modules_to_save": None, "auto_mapping": None,
    }
    with open(os.path.join(save_directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return save_directory


def load_peft_adapters(directories, *, dtype=None, device=None) -> PrefixEncoder:
    """A direct (non-projected) ``PrefixEncoder`` whose task rows are the given PEFT prefix adapters.

    Each folder holds a PEFT prefix-tuning adapter (``adapter_config.json`` + safetensors or .bin weights).
    All must share layers, heads and head dim; shorter prefixes are padded and recorded in ``prefix_lens``.
    """
    if isinstance(directories, (str, os.PathLike)):
        directories = [directories]
    configs, embs = [], []
    for folder in directories:
        with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
            config = json.load(f)
        if config.get("peft_type") != "PREFIX_TUNING":
            raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter, not PREFIX_TUNING")
        embs.append(_load_prompt_embeddings(folder))
        configs.append(config)
    geo = {(c["num_layers"], c["num_attention_heads"], c["token_dim"]) for c in configs}
    if len(geo) != 1:
        raise ValueError(f"the adapters have different geometries (layers, kv heads, token_dim): {sorted(geo)}")
    layers, kv_heads, token_dim = geo.pop()
    lens = [e.shape[0] for e in embs]
    P = max(lens)
    enc = PrefixEncoder(layers, kv_heads, token_dim // kv_heads, P, len(embs),
                        prefix_lens=lens if len(set(lens)) > 1 else None, dtype=dtype, device=device)
    with torch.no_grad():
        enc.embedding.zero_()
        for t, e in enumerate(embs):
            enc.embedding[t, : e.shape[0]] = e.to(enc.embedding)
    return enc


def _load_prompt_embeddings(folder) -> torch.Tensor:
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if os.path.exists(path):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(os.path.join(folder, "adapter_model.bin"), map_location="cpu", weights_only=True)
    key = next((k for k in state if k.endswith("prompt_embeddings")), None)
    if key is None:
        raise ValueError(f"{folder}: no prompt_embeddings in the adapter weights (keys: {sorted(state)[:5]})")
    return state[key]
