"""``patch_model`` / ``unpatch_model``: switch one model instance to fused prefix attention.

What a patch does, all per instance and undone by ``unpatch_model``:
- gives the model its own copy of its config, with ``_attn_implementation = "ptv2_fast"`` (a second model
  built from the same config object keeps its attention);
- tags every attention module with its layer index;
- wraps ``forward`` (and ``generate``) to take ``prefix_index=`` and pass the layer prefixes down as a
  keyword argument, so gradient checkpointing recomputes with the same bank;
- hooks the module that consumes position ids, adding P (per row: the row's task's prefix length) as
  PEFT and P-Tuning v2 do through the cache length, unless ``shift_positions=False``;
- freezes the base model's parameters (the prefix, and a task head if asked, stay trainable).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from . import attention as hf_attention
from .models import geometry, resolve_path, spec_for
from .prefix_encoder import PrefixEncoder

_STATE_ATTR = "_ptv2_fast_patch"
HEAD_NAMES = ("classifier", "score", "qa_outputs")


@dataclass
class _Patch:
    source: nn.Module                       # callable returning the bank [layers, 2, T, Hkv, P, D]
    spec: object
    old_config: object
    config_holders: list = field(default_factory=list)
    hooks: list = field(default_factory=list)
    tagged: list = field(default_factory=list)
    frozen: list = field(default_factory=list)
    originals: dict = field(default_factory=dict)  # instance attributes forward/generate replaced (None: none)
    shift_positions: bool = True
    backend: str = "auto"
    shift: object = None                   # the current call's position shift: None, int or [B] tensor
    fixed: hf_attention.PrefixContext | None = None  # set while generate() runs: one bank for all steps


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _attention_modules(model: nn.Module):
    """(module, layer index) for every module that calls the attention interface."""
    found = []
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and "Attention" in type(module).__name__ and hasattr(module, "is_causal"):
            found.append((module, idx))
    return found


def patch_model(model: nn.Module, prefix: nn.Module | None = None, *, num_tasks: int = 1,
                prefix_len: int | None = None, shift_positions: bool = True, freeze_base: bool = True,
                train_head: bool = True, backend: str = "auto", **encoder_options) -> nn.Module:
    """Make ``model`` compute attention over a per-task prefix bank with ``ptv2_fast.prefix_attention``.

    Args:
        model: a transformers model whose ``config.model_type`` is in ``ptv2_fast.hf.MODEL_TABLE`` (bert,
            roberta, gpt2, llama, mistral, qwen2; any head), or a PEFT prefix-tuning model (its prefix is
            then served from the bank; see ``ptv2_fast.hf.peft``).
        prefix: a ``PrefixEncoder`` (or any module whose ``forward()`` returns [layers, 2, T, Hkv, P, D]).
            Default: a new ``PrefixEncoder(num_tasks=num_tasks, prefix_len=prefix_len, **encoder_options)``
            on the model's device, in fp32.
        shift_positions: start the sequence's position ids at P, as PEFT and P-Tuning v2 do (default).
        freeze_base: set ``requires_grad=False`` on the model's own parameters.
        train_head: keep a task head (``classifier``/``score``/``qa_outputs``) trainable when freezing.
        backend: the ``prefix_attention`` backend.

    Returns the same model object, with ``model.ptv2_prefix`` the prefix module. Calls then take
    ``prefix_index=`` ([B] ints, the bank row of each batch row; optional when T == 1). Idempotent:
    patching a patched model returns it unchanged (pass ``prefix`` only the first time).
    """
    from .peft import is_peft_prefix_model, patch_peft_model

    if is_peft_prefix_model(model):
        return patch_peft_model(model, backend=backend, shift_positions=shift_positions)
    if getattr(model, _STATE_ATTR, None) is not None:
        return model
    spec = spec_for(model.config)
    geo = geometry(model.config)
    if prefix is None:
        if prefix_len is None:
            raise ValueError("patch_model: give prefix=PrefixEncoder(...) or prefix_len=P")
        device = next(model.parameters()).device
        prefix = PrefixEncoder(geo.num_layers, geo.num_kv_heads, geo.head_dim, prefix_len, num_tasks,
                               device=device, **encoder_options)
    elif encoder_options or prefix_len is not None:
        raise ValueError("patch_model: encoder options are for a new PrefixEncoder; got both them and prefix=")
    _check_prefix_geometry(prefix, geo)
    attn_modules = _attention_modules(model)
    if len({i for _, i in attn_modules}) != geo.num_layers:
        raise hf_attention_error(model, len(attn_modules), geo.num_layers)

    hf_attention.register()
    state = _Patch(source=prefix, spec=spec, old_config=model.config, shift_positions=shift_positions,
                   backend=backend)
    new_config = copy.deepcopy(model.config)
    new_config._attn_implementation = hf_attention.IMPLEMENTATION
    for module in model.modules():
        if getattr(module, "config", None) is state.old_config:
            state.config_holders.append(module)
            module.config = new_config
    for module, idx in attn_modules:
        setattr(module, hf_attention.LAYER_ATTR, idx)
        state.tagged.append(module)
    if freeze_base:
        for name, param in model.named_parameters():
            head = train_head and any(part in HEAD_NAMES for part in name.split("."))
            if param.requires_grad and not head:
                param.requires_grad_(False)
                state.frozen.append(param)
    position_module = resolve_path(_backbone(model), spec.position_module)
    state.hooks.append(position_module.register_forward_pre_hook(
        functools.partial(_shift_hook, state), with_kwargs=True))

    model.add_module("ptv2_prefix", prefix)
    object.__setattr__(model, _STATE_ATTR, state)
    for name, wrap in (("forward", _patched_forward), ("generate", _patched_generate)):
        if hasattr(model, name):
            state.originals[name] = model.__dict__.get(name)
            setattr(model, name, wrap(model, getattr(model, name)))
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo ``patch_model``: original config object, attention, forward, generate and ``requires_grad``.

    The prefix module is detached from the model and returned as ``model.ptv2_prefix`` no more; keep a
    reference to it before unpatching if it is still needed. No-op on an unpatched model.
    """
    from .peft import is_peft_prefix_model, unpatch_peft_model

    if is_peft_prefix_model(model):
        return unpatch_peft_model(model)
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for module in state.config_holders:
        module.config = state.old_config
    for module in state.tagged:
        delattr(module, hf_attention.LAYER_ATTR)
    for param in state.frozen:
        param.requires_grad_(True)
    for hook in state.hooks:
        hook.remove()
    for name, orig in state.originals.items():
        if orig is None:
            model.__dict__.pop(name, None)
        else:
            setattr(model, name, orig)
    del model._modules["ptv2_prefix"]
    object.__delattr__(model, _STATE_ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` (or the PEFT model's base) is patched by ptv2_fast."""
    base = getattr(model, "base_model", None)
    return getattr(model, _STATE_ATTR, None) is not None or getattr(base, _STATE_ATTR, None) is not None


def hf_attention_error(model, found: int, layers: int) -> Exception:
    from .models import UnsupportedModelError

    return UnsupportedModelError(
        f"patch_model found {found} attention modules with a layer index in {type(model).__name__}, expected "
        f"{layers}; this model's attention layout is not supported")


def _check_prefix_geometry(prefix, geo) -> None:
    for attr, want in (("num_layers", geo.num_layers), ("num_kv_heads", geo.num_kv_heads),
                       ("head_dim", geo.head_dim)):
        have = getattr(prefix, attr, want)
        if have != want:
            raise ValueError(f"patch_model: the prefix has {attr}={have} but the model needs {want}")


def _batch_size(args, kwargs) -> int:
    for name in ("input_ids", "inputs_embeds"):
        x = kwargs.get(name)
        if x is not None:
            return x.shape[0]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    raise ValueError("patched forward: pass input_ids or inputs_embeds")


def _prefix_lens(source):
    return getattr(source, "prefix_lens", None)


def _make_context(state: _Patch, prefix_index, batch: int, device, dtype) -> hf_attention.PrefixContext:
    source = state.source
    if prefix_index is not None:
        prefix_index = torch.as_tensor(prefix_index, device=device)
        if prefix_index.dim() != 1 or prefix_index.shape[0] != batch:
            raise ValueError(f"prefix_index must be a [batch] int tensor with batch={batch}, "
                             f"got shape {list(prefix_index.shape)}")
    per_sample = getattr(source, "per_sample", lambda: False)()
    bank = source(prefix_index) if per_sample else source()
    lens = _prefix_lens(source)
    P = bank.shape[-2]
    shift = None
    if state.shift_positions:
        if lens is None:
            shift = P
        else:
            rows = prefix_index if prefix_index is not None else torch.zeros(batch, dtype=torch.long, device=device)
            shift = lens.to(device)[rows.long()]
    if per_sample:
        if lens is not None:
            lens = lens.to(device)[prefix_index.long()]
        prefix_index = torch.arange(batch, device=device)
    elif bank.shape[2] > 1 and prefix_index is None:
        raise ValueError(f"the prefix bank has {bank.shape[2]} tasks: pass prefix_index=[batch] to select "
                         "each row's task")
    state.shift = shift
    return hf_attention.PrefixContext(bank.to(dtype), prefix_index, lens, state.backend)


def _model_dtype(model):
    for p in model.parameters():
        if p.is_floating_point() and p is not None:
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _check_checkpointing(model) -> None:
    for module in model.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and getattr(fn, "keywords", {}).get("use_reentrant"):
            raise ValueError("ptv2_fast: gradient checkpointing with use_reentrant=True cannot pass the prefix "
                             "bank's gradient; enable it with the default (use_reentrant=False)")


def _patched_forward(self, orig):
    @functools.wraps(orig)
    def forward(*args, prefix_index=None, **kwargs):
        state: _Patch = getattr(self, _STATE_ATTR)
        if state.fixed is not None:
            ctx = state.fixed
        else:
            if self.training:
                _check_checkpointing(self)
            dtype, device = _model_dtype(self)
            ctx = _make_context(state, prefix_index, _batch_size(args, kwargs), device, dtype)
        kwargs[hf_attention.CONTEXT_KWARG] = ctx
        try:
            return orig(*args, **kwargs)
        finally:
            if state.fixed is None:
                state.shift = None
    return forward


def _patched_generate(self, orig):
    @functools.wraps(orig)
    def generate(*args, prefix_index=None, **kwargs):
        state: _Patch = getattr(self, _STATE_ATTR)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        dtype, device = _model_dtype(self)
        with torch.no_grad():
            state.fixed = _make_context(state, prefix_index, ids.shape[0], device, dtype)
        try:
            return orig(*args, **kwargs)
        finally:
            state.fixed, state.shift = None, None
    return generate


def _shift_hook(state: _Patch, module, args, kwargs):
    """Forward pre-hook on the position consumer: position ids += P (per row)."""
    shift = state.shift
    if shift is None:
        return None
    name = "position_ids" if "position_ids" in kwargs else None
    if name is not None:
        pos = kwargs[name]
    elif state.spec.position_kind == "rotary":
        pos = args[1]
    else:
        pos = args[0]
    if isinstance(shift, torch.Tensor):
        shift = shift.to(pos.device).view(-1, *([1] * (pos.dim() - 1)))
    if state.spec.position_kind == "roberta":
        pad = module.padding_idx
        new = torch.where(pos == pad, pos, pos + shift)
    else:
        new = pos + shift
    if name is not None:
        kwargs = dict(kwargs)
        kwargs[name] = new
        return args, kwargs
    args = list(args)
    args[1 if state.spec.position_kind == "rotary" else 0] = new
    return tuple(args), kwargs
