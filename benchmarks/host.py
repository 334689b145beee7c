"""What a call costs on the host: time, device launches, would-be device syncs (``ptv2-fast bench --host``).

At small and medium shapes a GPU step is bound by what the host does per call, and all of it can be
measured on a CPU, where compute at tiny shapes is close to nothing:

* **host time**: per-thread CPU time of one call (``time.thread_time_ns``) over rounds of many calls, the
  providers' rounds interleaved; reported as the minimum and median per provider, and ratios as the median
  over rounds of the ratio within a round (neighbours in time see the same machine, so a machine whose speed
  drifts, as shared cores do, cancels out of each ratio), with their min-max;
* **launches**: device kernels one call would launch: Triton launches of our kernels, counted at the
  launcher, plus every aten op that would run a kernel (views, metadata and allocation are not kernels),
  counted with a dispatch mode;
* **syncs**: operations that would make the host wait for a GPU: ``.item()``/``bool()``/``int()`` on a
  tensor (``aten._local_scalar_dense``), data-dependent ops (``nonzero``, ``masked_select``, ``unique``, ...),
  and ``.tolist()``/``.cpu()``/``.numpy()``, which bypass the dispatcher on a CPU tensor and are counted at
  the Python method. Tensors that live on the host by design (the dropout key) carry ``HOST_TAG`` and are
  not counted.

Shapes: the op at B=2, Hq=Hkv=2, L=S=8, P=4, D=16, T=2 with ``prefix_index`` and ``kv_lens``; a 24-layer
tiny BERT (hidden 32, 2 heads, P=4) training step, PEFT prefix tuning vs the same model patched.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_TAG = "_ptv2_fast_host"  # a tensor that lives on the host by design: reading it is no device sync

# aten ops that run no device kernel: views, metadata, allocation without a fill
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "transpose", "t", "permute", "expand", "unsqueeze", "squeeze", "select", "slice", "as_strided", "alias",
    "detach", "unbind", "split", "split_with_sizes", "chunk", "narrow", "flatten", "unflatten", "view_as",
    "lift_fresh", "_reshape_alias", "diagonal", "movedim", "numpy_T", "unfold", "set_", "resize_",
    "_local_scalar_dense", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim",
    "size", "stride", "is_same_size", "_has_compatible_shallow_copy_type",
}
# data-dependent aten ops: each would sync a GPU (output size or value needed on the host)
_SYNC_OPS = {
    "_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
    "unique_consecutive", "unique_dim", "repeat_interleave", "argwhere", "_assert_async", "equal", "allclose",
}


def _base_name(func) -> str:
    name = func.overloadpacket.__name__
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name  # add_ -> add


class _Counter(TorchDispatchMode):
    """Counts kernel-running aten ops and sync-causing aten ops while active (ours are suspended inside our
    Triton launches, whose interpreter copies tensors around on the CPU)."""

    def __init__(self):
        super().__init__()
        self.kernels: list[str] = []
        self.syncs: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _our_ops():
            # our dispatching ops are not kernels: count what their implementation runs, with this mode active
            from ptv2_fast.ops import prefix_attention as impl

            with self:
                fn = impl._fwd_impl if func is _our_ops()[0] else impl._bwd_impl
                return fn(*args, **(kwargs or {}))
        if not self.paused:
            name = func.overloadpacket.__name__
            if name in _SYNC_OPS or _base_name(func) in _SYNC_OPS:
                self.syncs.append(name)
            if name not in _NO_KERNEL and _base_name(func) not in _NO_KERNEL and not name.startswith("sym_"):
                self.kernels.append(name)
        return func(*args, **(kwargs or {}))


def _our_ops():
    return (torch.ops.ptv2_fast.prefix_attention.default, torch.ops.ptv2_fast.prefix_attention_backward.default)


@contextlib.contextmanager
def count_device_work():
    """Yields a dict filled on exit: ``triton`` (our kernel launches, by name), ``aten`` (kernel-running aten
    ops, by name), ``launches`` (their total) and ``syncs`` (would-be device syncs, by name)."""
    from ptv2_fast.kernels import prefix_attention as launchers

    counter = _Counter()
    triton_calls: list[str] = []
    saved = {}
    for name in dir(launchers):
        if name.endswith("_kernel"):
            kernel = getattr(launchers, name)
            saved[name] = kernel
            setattr(launchers, name, _CountingKernel(kernel, name, triton_calls, counter))
    host_syncs: list[str] = []
    tagged: list = []
    patched = _patch_host_reads(host_syncs, tagged)
    result: dict = {}
    try:
        with counter:
            yield result
    finally:
        for name, kernel in saved.items():
            setattr(launchers, name, kernel)
        for owner, attr, fn in patched:
            setattr(owner, attr, fn)
        for t in tagged:
            t.__dict__.pop(HOST_TAG, None)
        result.update(triton=_tally(triton_calls), aten=_tally(counter.kernels),
                      launches=len(triton_calls) + len(counter.kernels),
                      syncs=_tally(counter.syncs + host_syncs), n_syncs=len(counter.syncs) + len(host_syncs))


def _tally(names):
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


class _CountingKernel:
    def __init__(self, kernel, name, calls, counter):
        self.kernel, self.name, self.calls, self.counter = kernel, name, calls, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append(self.name)
            self.counter.paused += 1
            try:
                return launch(*args, **kwargs)
            finally:
                self.counter.paused -= 1
        return run

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def _patch_host_reads(log: list, tagged: list):
    """Count .tolist()/.cpu()/.numpy() on tensors not tagged as host tensors (they bypass the dispatcher on a
    CPU tensor; on a GPU each is a device-to-host copy and a sync)."""
    patched = []
    for attr in ("tolist", "cpu", "numpy"):
        orig = getattr(torch.Tensor, attr)

        def wrapper(self, *a, _orig=orig, _attr=attr, **kw):
            if not getattr(self, HOST_TAG, False) and not _inside_counter_pause():
                log.append(_attr)
            out = _orig(self, *a, **kw)
            if _attr == "cpu" and not getattr(out, HOST_TAG, False):
                # the copy is on the host: reading it again syncs nothing (untagged when counting ends)
                setattr(out, HOST_TAG, True)
                tagged.append(out)
            return out

        patched.append((torch.Tensor, attr, orig))
        setattr(torch.Tensor, attr, wrapper)
    return patched


def _inside_counter_pause() -> bool:
    # Triton's interpreter reads tensors back through .cpu(); a kernel launch is not a host read of ours.
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(m, _Counter) and m.paused for m in _get_current_dispatch_mode_stack())


# ---------------------------------------------------------------------------------------------------------
# timing

def thread_time_us(fn, calls: int) -> float:
    """Per-call per-thread CPU time of ``fn`` over ``calls`` calls, in microseconds."""
    t0 = time.thread_time_ns()
    for _ in range(calls):
        fn()
    return (time.thread_time_ns() - t0) / calls / 1e3


def interleaved(fns: dict, rounds: int, calls: int, warmup: int = 20) -> dict:
    """{name: {"min", "median", "max"} µs per call}: the providers' rounds interleaved (a, b, c, a, b, c, ...)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(thread_time_us(fn, calls))
    return {name: {"min": min(s), "median": statistics.median(s), "max": max(s), "samples": s}
            for name, s in samples.items()}


def paired_ratio(stats: dict, name: str, base: str) -> dict:
    """Median (and min-max) over rounds of ``name``'s time / ``base``'s time in the same round: rounds are
    adjacent in time, so a machine whose speed drifts (shared cores, frequency) cancels out of each ratio."""
    r = [a / b for a, b in zip(stats[name]["samples"], stats[base]["samples"])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def tiny_problem(requires_grad: bool = False, seed: int = 0):
    """The tiny shape of the host table: B=2, Hq=Hkv=2, L=S=8, P=4, D=16, T=2, prefix_index and kv_lens."""
    g = torch.Generator().manual_seed(seed)
    B, H, L, S, P, D, T = 2, 2, 8, 8, 4, 16, 2
    q = torch.randn(B, H, L, D, generator=g)
    k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    pk, pv = torch.randn(T, H, P, D, generator=g), torch.randn(T, H, P, D, generator=g)
    idx, kvl = torch.tensor([0, 1]), torch.tensor([8, 5])
    if requires_grad:
        for x in (q, k, v, pk, pv):
            x.requires_grad_(True)
    return q, k, v, pk, pv, idx, kvl


def op_providers():
    """{name: (forward fn, forward+backward fn)} at the tiny shape: SDPA on pre-concatenated K/V without a mask
    (the leanest call there is: the table's yardstick), the same with the padding mask our call honours, SDPA on
    the concatenation made in the call (P-Tuning v2's path, masked), and ptv2_fast (backend auto)."""
    import torch.nn.functional as F

    import ptv2_fast

    q, k, v, pk, pv, idx, kvl = tiny_problem()
    gq, gk, gv, gpk, gpv, _, _ = tiny_problem(requires_grad=True, seed=1)
    kc, vc = torch.cat([pk[idx], k], 2), torch.cat([pv[idx], v], 2)
    gkc, gvc = kc.clone().requires_grad_(True), vc.clone().requires_grad_(True)
    S, P = k.shape[2], pk.shape[2]
    mask = torch.cat([torch.ones(2, P, dtype=torch.bool), torch.arange(S)[None] < kvl[:, None]], 1)[:, None, None]

    def _clear(*xs):
        for x in xs:
            x.grad = None

    def sdpa():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, kc, vc)

    def sdpa_fb():
        F.scaled_dot_product_attention(gq, gkc, gvc).sum().backward()
        _clear(gq, gkc, gvc)

    def sdpa_masked():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)

    def sdpa_masked_fb():
        F.scaled_dot_product_attention(gq, gkc, gvc, attn_mask=mask).sum().backward()
        _clear(gq, gkc, gvc)

    def concat():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, torch.cat([pk[idx], k], 2), torch.cat([pv[idx], v], 2), attn_mask=mask)

    def concat_fb():
        F.scaled_dot_product_attention(gq, torch.cat([gpk[idx], gk], 2), torch.cat([gpv[idx], gv], 2),
                                       attn_mask=mask).sum().backward()
        _clear(gq, gk, gv, gpk, gpv)

    def ours():
        with torch.no_grad():
            ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, kv_lens=kvl)

    def ours_fb():
        ptv2_fast.prefix_attention(gq, gk, gv, gpk, gpv, idx, kv_lens=kvl).sum().backward()
        _clear(gq, gk, gv, gpk, gpv)

    return {"sdpa_precat": (sdpa, sdpa_fb), "sdpa_precat_masked": (sdpa_masked, sdpa_masked_fb),
            "sdpa_concat": (concat, concat_fb), "ptv2_fast": (ours, ours_fb)}


def tiny_bert(layers: int = 24, prefix: int = 4, seed: int = 0):
    """A tiny BERT (hidden 32, 2 heads of 16, intermediate 64) wrapped in PEFT prefix tuning (P = ``prefix``)."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertModel(config)
    return get_peft_model(model, PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=prefix))


def bert_inputs(batch: int = 2, seq: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[batch // 2:, seq - seq // 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def bert_step_fns(layers: int = 24):
    """{"peft": step, "patched": step}: one training step (forward, loss, backward, zero grads) of each."""
    from ptv2_fast.hf import patch_model

    fns = {}
    for variant in ("peft", "patched"):
        net = tiny_bert(layers)
        if variant == "patched":
            patch_model(net)
        net.train()
        inputs = bert_inputs()
        params = [p for p in net.parameters() if p.requires_grad]

        def step(net=net, inputs=inputs, params=params):
            net(**inputs).last_hidden_state.pow(2).mean().backward()
            for p in params:
                p.grad = None

        fns[variant] = step
    return fns


def host_report(rounds: int = 15, calls: int = 200, bert_rounds: int = 7, bert_calls: int = 5,
                layers: int = 24) -> dict:
    """Everything ``ptv2-fast bench --host`` prints: op host times, BERT step host times, launches, syncs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-thread time of the calling thread is the host cost; no pool hand-offs
    try:
        providers = op_providers()
        fwd = interleaved({n: f for n, (f, _) in providers.items()}, rounds, calls)
        fb = interleaved({n: f for n, (_, f) in providers.items()}, rounds, max(1, calls // 2))
        bert = interleaved(bert_step_fns(layers), bert_rounds, bert_calls, warmup=2)
        counts = {}
        for name, (f, f_fb) in providers.items():
            with count_device_work() as c_f:
                f()
            with count_device_work() as c_fb:
                f_fb()
            counts[name] = {"forward": c_f, "forward+backward": c_fb}
        syncs = bert_inference_syncs()
    finally:
        torch.set_num_threads(threads)
    return {"op_forward_us": fwd, "op_forward_backward_us": fb, "bert_step_us": bert, "bert_layers": layers,
            "counts": counts, "bert_inference_syncs": syncs}


def bert_inference_syncs(layers: int = 4) -> dict:
    """Would-be syncs of one ``inference_mode`` forward of a ``layers``-layer tiny BERT: PEFT, the PEFT model
    patched, and a natively patched two-task bank with a ``prefix_index`` made inside ``inference_mode``."""
    from ptv2_fast.hf import patch_model

    out = {}
    inputs = bert_inputs()
    for variant in ("peft", "patched", "patched_bank"):
        net = tiny_bert(layers)
        kwargs = dict(inputs)
        if variant == "patched":
            patch_model(net)
        elif variant == "patched_bank":
            net = net.get_base_model()
            patch_model(net, prefix_len=4, num_tasks=2)
        net.eval()
        with torch.inference_mode():
            if variant == "patched_bank":
                kwargs["prefix_index"] = torch.tensor([1, 0])
            net(**kwargs)  # warm: first-call work (lazy imports, caches) is not steady state
            with count_device_work() as c:
                net(**kwargs)
        out[variant] = c["n_syncs"]
        out[variant + "_detail"] = c["syncs"]
    return out


def format_report(rep: dict) -> str:
    """The README's host table."""
    lines = []
    f, fb = rep["op_forward_us"], rep["op_forward_backward_us"]

    def ratio(stats, name, base):
        r = paired_ratio(stats, name, base)
        return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"

    lines.append("| provider | forward µs (min, median) | × sdpa_precat | fwd+bwd µs (min, median) | × sdpa_precat "
                 "| launches fwd / fwd+bwd | would-be syncs fwd+bwd |")
    lines.append("|---|---|---|---|---|---|---|")
    for name in f:
        c = rep["counts"][name]
        lines.append(f"| {name} | {f[name]['min']:.1f}, {f[name]['median']:.1f} | {ratio(f, name, 'sdpa_precat')} | "
                     f"{fb[name]['min']:.1f}, {fb[name]['median']:.1f} | {ratio(fb, name, 'sdpa_precat')} | "
                     f"{c['forward']['launches']} / {c['forward+backward']['launches']} | "
                     f"{c['forward+backward']['n_syncs']} |")
    b = rep["bert_step_us"]
    lines.append("")
    lines.append("(× columns: the median over rounds of the ratio within a round, min-max in brackets)")
    lines.append(f"{rep['bert_layers']}-layer tiny BERT training step, host µs (min, median): "
                 f"PEFT {b['peft']['min']:.0f}, {b['peft']['median']:.0f}; patched {b['patched']['min']:.0f}, "
                 f"{b['patched']['median']:.0f}; patched / PEFT = {ratio(b, 'patched', 'peft')}")
    s = rep["bert_inference_syncs"]
    lines.append(f"would-be syncs per inference_mode forward (4 layers): PEFT {s['peft']}, patched {s['patched']}, "
                 f"patched two-task bank with prefix_index {s['patched_bank']}")
    return "\n".join(lines)
