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
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops import checks
from . import attention as hf_attention
from .models import UnsupportedModelError, geometry, resolve_path, spec_for
from .prefix_encoder import PrefixEncoder

_STATE_ATTR = "_ptv2_fast_patch"
HEAD_NAMES = ("classifier", "score", "qa_outputs")


@dataclass
class _Patch:
    source: nn.Module                       # callable returning the bank [layers, 2, T, Hkv, P, D]
    spec: object
    old_config: object
    shift_positions: bool = True
    backend: str = "auto"
    config_holders: list = field(default_factory=list)
    hooks: list = field(default_factory=list)       # (module, hook id): removed by id, so deepcopies stay apart
    tagged: list = field(default_factory=list)
    frozen: list = field(default_factory=list)
    originals: dict = field(default_factory=dict)   # instance attributes forward/generate replaced (None: none)
    shift: object = None      # the position shift the pre-hook adds in the current call: None, int or [B] tensor
    fixed: tuple | None = None  # (context, shift) while generate() runs: one bank for every step
    # the modules that can checkpoint (transformers enables it only on modules whose class defines the flag),
    # found once at patch time: walking every module in every training forward cost more than a layer
    ckpt_modules: list = field(default_factory=list)


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
            then served from the bank; see ``ptv2_fast.hf.peft``; only ``shift_positions`` and ``backend``
            apply).
        prefix: a ``PrefixEncoder`` (or any module whose ``forward()`` returns [layers, 2, T, Hkv, P, D]).
            Default: a new ``PrefixEncoder(num_tasks=num_tasks, prefix_len=prefix_len, **encoder_options)``
            on the model's device, in fp32.
        shift_positions: start the sequence's position ids at P, as PEFT and P-Tuning v2 do (default).
        freeze_base: set ``requires_grad=False`` on the model's own parameters.
        train_head: keep a task head (``classifier``/``score``/``qa_outputs``) trainable when freezing.
        backend: the ``prefix_attention`` backend.

    Returns the same model object, with ``model.ptv2_prefix`` the prefix module. Calls then take
    ``prefix_index=`` ([B] ints, the bank row of each batch row; optional when T == 1). Idempotent:
    patching a patched model returns it unchanged. If patching fails, the model is left as it was.
    """
    from .peft import is_peft_model, is_peft_prefix_model, patch_peft_model

    if is_peft_model(model):
        if not is_peft_prefix_model(model):
            raise UnsupportedModelError(
                f"patch_model takes PEFT prefix-tuning models; this one's active adapter is "
                f"{model.active_peft_config.peft_type}")
        if prefix is not None or prefix_len is not None or num_tasks != 1 or encoder_options or not freeze_base:
            raise ValueError("patch_model(peft_model) serves the PEFT model's own prefix: prefix, prefix_len, "
                             "num_tasks, freeze_base and encoder options do not apply")
        return patch_peft_model(model, backend=backend, shift_positions=shift_positions)
    if getattr(model, _STATE_ATTR, None) is not None:
        return model
    # Validate everything before changing anything.
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
        raise UnsupportedModelError(
            f"patch_model found {len(attn_modules)} attention modules with a layer index in "
            f"{type(model).__name__}, expected {geo.num_layers}; this model's attention layout is not supported")
    try:
        position_module = resolve_path(_backbone(model), spec.position_module)
    except AttributeError:
        raise UnsupportedModelError(f"{type(model).__name__} has no {spec.position_module!r} module where a "
                                    f"{model.config.model_type} model consumes its position ids") from None

    hf_attention.register()
    state = _Patch(source=prefix, spec=spec, old_config=model.config, shift_positions=shift_positions,
                   backend=backend)
    try:
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
        state.ckpt_modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        handle = position_module.register_forward_pre_hook(functools.partial(_shift_hook, state), with_kwargs=True)
        state.hooks.append((position_module, handle.id))
        model.add_module("ptv2_prefix", prefix)
        object.__setattr__(model, _STATE_ATTR, state)
        for name, impl in (("forward", _forward), ("generate", _generate)):
            if hasattr(model, name):
                state.originals[name] = model.__dict__.get(name)
                install_method(model, name, impl)
    except BaseException:
        _undo(model, state)
        raise
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo ``patch_model``: original config object, attention, forward, generate and ``requires_grad``.

    The prefix module is detached from the model (``model.ptv2_prefix`` no longer exists); keep a reference
    to it before unpatching if it is still needed. No-op on an unpatched model.
    """
    from .peft import is_peft_prefix_model, unpatch_peft_model

    if is_peft_prefix_model(model):
        return unpatch_peft_model(model)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        _undo(model, state)
    return model


def install_method(obj, name: str, impl) -> None:
    """Set ``obj.name`` to a method calling ``impl(obj, ...)``: a bound method (``copy.deepcopy`` rebinds it
    to the copy) that shows the class method's signature (transformers inspects ``forward``'s)."""
    def method(self, *args, **kwargs):
        return impl(self, *args, **kwargs)

    functools.update_wrapper(method, getattr(type(obj), name))
    setattr(obj, name, types.MethodType(method, obj))


def _undo(model, state: _Patch) -> None:
    for module in state.config_holders:
        module.config = state.old_config
    for module in state.tagged:
        module.__dict__.pop(hf_attention.LAYER_ATTR, None)
    for param in state.frozen:
        param.requires_grad_(True)
    for module, hook_id in state.hooks:
        module._forward_pre_hooks.pop(hook_id, None)
        module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    for name, orig in state.originals.items():
        if orig is None:
            model.__dict__.pop(name, None)
        else:
            setattr(model, name, orig)
    model._modules.pop("ptv2_prefix", None)
    model.__dict__.pop(_STATE_ATTR, None)


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` (or the PEFT model's base) is patched by ptv2_fast."""
    base = getattr(model, "base_model", None)
    return getattr(model, _STATE_ATTR, None) is not None or getattr(base, _STATE_ATTR, None) is not None


def _check_prefix_geometry(prefix, geo) -> None:
    for attr, want in (("num_layers", geo.num_layers), ("num_kv_heads", geo.num_kv_heads),
                       ("head_dim", geo.head_dim)):
        have = getattr(prefix, attr, want)
        if have != want:
            raise ValueError(f"patch_model: the prefix has {attr}={have} but the model needs {want}")


def _batch_size(args, kwargs) -> int:
    for name in ("input_ids", "inputs_embeds", "inputs"):
        x = kwargs.get(name)
        if x is not None:
            return x.shape[0]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    raise ValueError("patched model: pass input_ids or inputs_embeds")


def _make_context(state: _Patch, prefix_index, batch: int, device):
    """(PrefixContext, position shift) for one forward (or one generate call) over ``batch`` rows."""
    source = state.source
    T = getattr(source, "num_tasks", None)
    lens = getattr(source, "prefix_lens", None)
    per_sample = getattr(source, "per_sample", lambda: False)()
    if prefix_index is not None:
        prefix_index = torch.as_tensor(prefix_index, device=device)
        if prefix_index.dim() != 1 or prefix_index.shape[0] != batch or prefix_index.is_floating_point():
            raise ValueError(f"prefix_index must be a [batch] int tensor with batch={batch}, "
                             f"got {prefix_index.dtype} of shape {list(prefix_index.shape)}")
        if prefix_index.dtype not in (torch.int32, torch.int64):
            prefix_index = prefix_index.long()
    elif per_sample or (lens is not None and state.shift_positions):
        if T is not None and T > 1:
            raise ValueError(f"the prefix bank has {T} tasks: pass prefix_index=[batch] to select each row's task")
        prefix_index = torch.zeros(batch, dtype=torch.long, device=device)
    # The one range check of this forward (at most one host sync; none for an index tensor checked before and
    # unchanged): the layers then skip theirs. prefix_lens were checked when the encoder was built.
    # Under torch.compile the values are unknown while tracing: the layers' ops check them at run time instead.
    checked = not torch.compiler.is_compiling()
    if prefix_index is not None and T is not None and checked:
        checks.check_values(prefix_index, None, None, T, 0, 0)
    bank = source(prefix_index) if per_sample else source()
    if prefix_index is not None and T is None and checked:
        checks.check_values(prefix_index, None, None, bank.shape[2], 0, 0)
    if bank.shape[2] > 1 and prefix_index is None:
        raise ValueError(f"the prefix bank has {bank.shape[2]} tasks: pass prefix_index=[batch] to select "
                         "each row's task")
    shift = None
    if state.shift_positions:
        shift = bank.shape[-2] if lens is None else lens.to(device)[prefix_index.long()]
    if per_sample:
        lens = None if lens is None else lens.to(device)[prefix_index.long()]
        prefix_index = torch.arange(batch, device=device)
    # the bank stays in its own dtype: each layer casts its slice (no whole-bank copy per forward)
    return hf_attention.PrefixContext(bank, prefix_index, lens, state.backend, checked), shift


def _fit_batch(ctx, shift, batch: int):
    """Repeat a generate() call's context for expanded rows (beams, num_return_sequences)."""
    n = None if ctx.prefix_index is None else ctx.prefix_index.shape[0]
    if n is None or n == batch:
        return ctx, shift
    if batch % n:
        raise ValueError(f"generate() expanded {n} rows to {batch}, not a multiple")
    rep = batch // n
    ctx = hf_attention.PrefixContext(ctx.bank, ctx.prefix_index.repeat_interleave(rep), ctx.prefix_lens, ctx.backend,
                                     ctx.values_checked)
    if isinstance(shift, torch.Tensor):
        shift = shift.repeat_interleave(rep)
    return ctx, shift


def _model_device(model):
    for p in model.parameters():
        if p.is_floating_point():
            return p.device
    return torch.device("cpu")


def _check_checkpointing(state: _Patch) -> None:
    for module in state.ckpt_modules:
        if not getattr(module, "gradient_checkpointing", False):
            continue
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is not None and getattr(fn, "keywords", {}).get("use_reentrant", True):
            raise ValueError("ptv2_fast: gradient checkpointing with use_reentrant=True (torch's default when "
                             "unset) cannot pass the prefix bank's gradient; enable it with transformers' "
                             "default, gradient_checkpointing_enable(), or use_reentrant=False")


def _hook_shift(state: _Patch, shift, args, kwargs):
    """Apply ``shift`` to caller-given position ids (as PEFT does); else return what the pre-hook adds."""
    if shift is None:
        return None
    pos = kwargs.get("position_ids")
    if pos is not None:
        kwargs["position_ids"] = pos + (shift.view(-1, 1) if isinstance(shift, torch.Tensor) else shift)
        return None
    has_ids = kwargs.get("input_ids") is not None or (args and isinstance(args[0], torch.Tensor)
                                                       and not args[0].is_floating_point())
    if state.spec.position_kind == "roberta" and not has_ids:
        return None  # RoBERTa numbers inputs_embeds positions without the cache length: PEFT has no shift there
    return shift


def _call_original(self, state: _Patch, name: str, args, kwargs):
    orig = state.originals.get(name)
    return orig(*args, **kwargs) if orig is not None else getattr(type(self), name)(self, *args, **kwargs)


def _forward(self, *args, prefix_index=None, **kwargs):
    state: _Patch = getattr(self, _STATE_ATTR)
    batch = _batch_size(args, kwargs)
    if state.fixed is not None:
        ctx, shift = _fit_batch(*state.fixed, batch)
    else:
        if self.training:
            _check_checkpointing(state)
        ctx, shift = _make_context(state, prefix_index, batch, _model_device(self))
    kwargs[hf_attention.CONTEXT_KWARG] = ctx
    state.shift = _hook_shift(state, shift, args, kwargs)
    try:
        return _call_original(self, state, "forward", args, kwargs)
    finally:
        state.shift = None


def _generate(self, *args, prefix_index=None, **kwargs):
    state: _Patch = getattr(self, _STATE_ATTR)
    with torch.no_grad():
        state.fixed = _make_context(state, prefix_index, _batch_size(args, kwargs), _model_device(self))
    try:
        return _call_original(self, state, "generate", args, kwargs)
    finally:
        state.fixed, state.shift = None, None


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
        new = torch.where(pos == module.padding_idx, pos, pos + shift)
    else:
        new = pos + shift
    if name is not None:
        kwargs = dict(kwargs)
        kwargs[name] = new
        return args, kwargs
    args = list(args)
    args[1 if state.spec.position_kind == "rotary" else 0] = new
    return tuple(args), kwargs
