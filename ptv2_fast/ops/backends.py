"""Backends of the prefix-attention op and how ``backend="auto"`` chooses among them.

A backend provides ``fwd(...) -> (out, lse)`` and ``bwd(...) -> (dq, dk, dv, dprefix_k, dprefix_v)`` with
the argument lists of ``ptv2_fast.kernels.prefix_attention_fwd`` / ``prefix_attention_bwd``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch

from .. import reference

BACKENDS = ("auto", "triton", "sdpa", "cuda", "cpp", "reference")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not installed, not built, or wrong device)."""


def _triton_kernels():
    try:
        from .. import kernels
    except Exception as e:  # triton missing, or a triton whose API this release does not know
        raise BackendUnavailable(f"backend='triton' needs a working triton install ({type(e).__name__}: {e})") from e
    return kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_cpp_ops: dict = {}


def _cpp_op(name: str):
    """The C++ op overload ``torch.ops.ptv2_fast.<name>.default``, looked up once (the hot path asks per call)."""
    op = _cpp_ops.get(name)
    if op is None:
        _require_extension()
        op = _cpp_ops[name] = getattr(torch.ops.ptv2_fast, name).default
    return op


def _require_extension():
    from .. import _ext

    if not _ext.load():
        raise BackendUnavailable(f"the C++ extension is unavailable: {_ext.status()['error']}")


_triton_ok = False  # set once the Triton kernels imported for a CUDA request


def _set_triton_ok():
    global _triton_ok
    _triton_ok = True


def _ext_state() -> dict:
    from .. import _ext  # noqa: PLC0415  (the loader imports this package: resolve at call time)

    return _ext._state


@dataclasses.dataclass(frozen=True)
class AutoRule:
    """One row of ``backend="auto"``'s table: for ``device`` tensors ("*": any device) of one of ``dtypes``, the
    first of ``backends`` that can run here. ``evidence``: what decided the order (figures in the README's
    Performance section, files in benchmarks/results/)."""

    device: str
    dtypes: tuple
    backends: tuple
    evidence: str
    grad: bool | None = None  # True: calls that will be differentiated, False: inference, None: both


# backend="auto", decided in one place. First matching row wins; a device or dtype no row names gets the
# concatenating reference.
AUTO_RULES = (
    AutoRule("cpu", (torch.float32, torch.bfloat16), ("cpp", "reference"),
             "cpu-ext preset, 2 threads, 2026-12-01 (benchmarks/results/bench_cpu-ext.json, bench_cpu-ext_bf16.json): "
             "forward+backward, per-round median against sdpa_precat, cpp 0.99 / 0.82 vs sdpa 1.19 / 0.99 (fp32), "
             "cpp 0.30 / 0.65 vs sdpa 1.10 / 0.79 (bf16); forward cpp 1.19 / 0.86 vs sdpa 1.26 / 0.93 (fp32), a tie "
             "in bf16 (1.54 / 0.93 vs 1.53 / 0.96; an earlier, noisier run had sdpa ahead at the second shape)"),
    AutoRule("cpu", (torch.float16,), ("cpp", "reference"),
             "sdpa runs float16 on the CPU through the fused C++ kernel anyway (see ops/sdpa.py)"),
    AutoRule("cuda", EXT_DTYPES, ("triton", "reference"),
             "sdpa on CUDA has not run on a GPU yet (none lent since it was written); the one GPU run "
             "(H100, 2026-11-26) measured triton. benchmarks/gpu_check.sh runs sdpa's GPU tests and both "
             "backends in the presets; the row changes with those numbers"),
    AutoRule("*", (torch.float64,), ("reference",),
             "the fused kernels take 16- and 32-bit floats; float64 is for checks"),
)

_auto_rules: dict = {}


def auto_rule(device_type: str, dtype: torch.dtype | None, grad: bool = True) -> AutoRule:
    """The row of ``AUTO_RULES`` for tensors of this device type and dtype (None: float32), for a call that
    will be differentiated (``grad``) or not."""
    key = (device_type, dtype, grad)
    rule = _auto_rules.get(key)
    if rule is None:
        dt = torch.float32 if dtype is None else dtype
        rule = next((r for r in AUTO_RULES if r.device in (device_type, "*") and dt in r.dtypes
                     and r.grad in (None, grad)),
                    AutoRule("*", (dt,), ("reference",), "no fused backend for this device or dtype"))
        _auto_rules[key] = rule
    return rule


def _ready(name: str) -> bool:
    # already known to run here, without imports or exceptions (this runs once per layer call)
    return (name == "reference" or (name in ("cpp", "sdpa") and _ext_state()["loaded"])
            or (name == "triton" and _triton_ok))


def _auto(device: torch.device, dtype, grad: bool) -> str:
    rule = auto_rule(device.type, dtype, grad)
    if _ready(rule.backends[0]):
        return rule.backends[0]
    failure = None
    for name in rule.backends:
        try:
            chosen = resolve(name, device, dtype)
        except BackendUnavailable as e:
            failure = failure or e
            continue
        if name == "triton":
            _set_triton_ok()
        if failure is not None and device.type == "cuda":
            what = "concatenating reference" if chosen == "reference" else chosen
            warnings.warn(f"ptv2_fast: {failure}; backend='auto' falls back to the {what} backend, which is "
                          "slower and uses more memory.", stacklevel=4)
        return chosen
    raise failure


def resolve(backend: str, device: torch.device, dtype: torch.dtype | None = None, dropout_p: float = 0.0,
            grad: bool = True) -> str:
    """The concrete backend name for a request, or a clear error when it cannot run on ``device``.

    ``auto``: the table ``AUTO_RULES`` (today: Triton on CUDA tensors, the fused C++ kernel on CPU tensors, the
    concatenating reference for float64 or where neither can run). ``grad``: whether the call will be
    differentiated (a row may hold for training or inference only)."""
    if backend == "auto":
        return _auto(device, dtype, grad)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if device.type == "cpu" and not _interpreting():
            raise BackendUnavailable(
                "backend='triton' on CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 in the "
                "environment before ptv2_fast's kernels are first used, or use backend='auto'")
        if device.type not in ("cuda", "cpu"):
            raise BackendUnavailable(f"backend='triton' does not run on {device.type} tensors")
        if device.type == "cuda" and dtype == torch.float64:
            # Seen on an H100 (triton 3.6): the kernels fail to compile for float64 (LLVM lowering).
            raise BackendUnavailable("backend='triton' on CUDA supports float32, float16 and bfloat16, got "
                                     "torch.float64 (use backend='reference' or 'auto' for float64 checks)")
        _triton_kernels()
        return "triton"
    if backend == "sdpa":
        # the prefix part (and the cases the vendor kernels cannot run) needs our fused kernel of the device
        if device.type == "cpu":
            if dtype is not None and dtype not in EXT_DTYPES:
                raise BackendUnavailable(f"backend='sdpa' supports float32, float16 and bfloat16, got {dtype} "
                                         "(use backend='reference')")
            _require_extension()
            return "sdpa"
        if device.type != "cuda":
            raise BackendUnavailable(f"backend='sdpa' runs on CPU and CUDA tensors, got {device.type} tensors")
        if dtype == torch.float64:
            raise BackendUnavailable("backend='sdpa' on CUDA supports float32, float16 and bfloat16, got "
                                     "torch.float64 (use backend='reference')")
        _triton_kernels()
        return "sdpa"
    if backend == "cuda":
        raise BackendUnavailable("backend='cuda': the CUDA extension provides the decode kernel "
                                 "(ptv2_fast.prefix_decode_attention); prefix_attention on CUDA tensors runs in "
                                 "Triton (backend='triton' or 'auto')")
    if backend == "cpp":
        if device.type != "cpu":
            raise BackendUnavailable(f"backend='cpp' runs on CPU tensors, got {device.type} tensors")
        if dtype is not None and dtype not in EXT_DTYPES:
            raise BackendUnavailable(f"backend='cpp' supports float32, float16 and bfloat16, got {dtype} "
                                     "(use backend='reference')")
        _require_extension()
        return "cpp"
    return "reference"


# ---------------------------------------------------------------------------------------------------------
# reference backend: the concatenating torch path, in float32 or wider, dropout from a seeded torch generator.

def _ref_dropout_mask(q, S, P, dropout_p, seed, rng_offset):
    if dropout_p <= 0.0:
        return None
    g = torch.Generator(device=q.device)
    g.manual_seed((seed * 1_000_003 + rng_offset) % (2**63 - 1))
    B, Hq, L, _ = q.shape
    return torch.rand((B, Hq, L, P + S), generator=g, device=q.device) >= dropout_p


def _cdt(q):
    return torch.promote_types(q.dtype, torch.float32)


# The reference backend materialises [rows, Hq, L, P + S] scores (and, in backward, several such tensors):
# it runs over batch rows in chunks whose temporaries stay near this budget, so its peak memory does not grow
# with the batch. Rows are independent, so chunking changes no value (prefix gradients are summed per task).
REF_CHUNK_BYTES = int(os.environ.get("PTV2_FAST_REF_CHUNK_MB", "64")) * 2**20


def _row_chunks(q, S, P, live_tensors: int):
    B, Hq, L, _ = q.shape
    per_row = max(1, Hq * L * (P + S) * _cdt(q).itemsize * live_tensors)
    step = max(1, REF_CHUNK_BYTES // per_row)
    return [slice(b, min(B, b + step)) for b in range(0, B, step)]


def _rows(x, sl):
    return None if x is None else x[sl]


def ref_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
            causal, scale, dropout_p, seed, rng_offset):
    mask = _ref_dropout_mask(q, k.shape[2], prefix_k.shape[2], dropout_p, seed, rng_offset)
    out = torch.empty_like(q)  # the layout contract of every backend; chunks are written into it
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for sl in _row_chunks(q, k.shape[2], prefix_k.shape[2], live_tensors=3):
        o, l_ = reference.prefix_attention_ref(
            q[sl], k[sl], v[sl], prefix_k, prefix_v, _rows(prefix_index, sl), prefix_lens=prefix_lens,
            kv_lens=_rows(kv_lens, sl), key_padding_mask=_rows(key_padding_mask, sl), causal=causal, scale=scale,
            dropout_mask=_rows(mask, sl), dropout_p=dropout_p, return_lse=True, compute_dtype=_cdt(q))
        out[sl] = o
        lse[sl] = l_
    return out, lse


def ref_bwd(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
            out, lse, causal, scale, dropout_p, seed, rng_offset):
    # Closed-form gradients over the concatenated keys (the op runs below autograd, so no autograd.grad here).
    S, P = k.shape[2], prefix_k.shape[2]
    mask = _ref_dropout_mask(q, S, P, dropout_p, seed, rng_offset)
    cdt = _cdt(q)
    dpk = torch.zeros(prefix_k.shape, dtype=cdt, device=q.device)
    dpv = torch.zeros(prefix_v.shape, dtype=cdt, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for sl in _row_chunks(q, S, P, live_tensors=6):
        dq[sl], dk[sl], dv[sl] = _ref_bwd_rows(
            dout[sl], _rows(dlse, sl), q[sl], k[sl], v[sl], prefix_k, prefix_v, _rows(prefix_index, sl), prefix_lens,
            _rows(kv_lens, sl), _rows(key_padding_mask, sl), out[sl], lse[sl], causal, scale, dropout_p,
            _rows(mask, sl), dpk, dpv)
    gk, gv = torch.empty_like(prefix_k), torch.empty_like(prefix_v)
    gk.copy_(dpk)
    gv.copy_(dpv)
    return dq, dk, dv, gk, gv


def _ref_bwd_rows(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
                  out, lse, causal, scale, dropout_p, mask, dpk, dpv):
    """dq, dk, dv of these batch rows; their prefix gradients are added into dpk/dpv [T, Hkv, P, D]."""
    cdt = _cdt(q)
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[2]
    group = Hq // Hkv
    keys, values = reference.concat_prefix(k, v, prefix_k, prefix_v, prefix_index, group=group, dtype=cdt)
    qc, doc = q.to(cdt), dout.to(cdt)
    vis = reference.visible_keys(B, L, S, P, prefix_index=prefix_index, prefix_lens=prefix_lens, kv_lens=kv_lens,
                                 key_padding_mask=key_padding_mask, causal=causal, device=q.device)[:, None]
    keys, values = reference.hide_unseen(keys, values, vis)
    lse_c = lse.to(cdt)[..., None]
    empty = torch.isinf(lse_c)
    scores = torch.matmul(qc, keys.transpose(-1, -2)) * scale
    probs = torch.where(vis, torch.exp(scores - torch.where(empty, 0.0, lse_c)), 0.0)
    del scores
    dp = torch.matmul(doc, values.transpose(-1, -2))
    pd = probs
    if mask is not None:
        dp = dp * mask / (1.0 - dropout_p)
        pd = probs * mask / (1.0 - dropout_p)
    delta = (doc * out.to(cdt)).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - torch.where(empty, 0.0, dlse.to(cdt)[..., None])
    ds = probs * (dp - delta)
    del dp
    dq = torch.matmul(ds, keys) * scale
    dkeys = (torch.matmul(ds.transpose(-1, -2), qc) * scale).unflatten(1, (Hkv, group)).sum(2)
    dvalues = torch.matmul(pd.transpose(-1, -2), doc).unflatten(1, (Hkv, group)).sum(2)
    idx = prefix_index.long() if prefix_index is not None else torch.zeros(B, dtype=torch.long, device=q.device)
    dpk.index_add_(0, idx, dkeys[:, :, :P])
    dpv.index_add_(0, idx, dvalues[:, :, :P])
    return dq.to(q.dtype), dkeys[:, :, P:].to(k.dtype), dvalues[:, :, P:].to(v.dtype)


def triton_fwd(*args):
    return _triton_kernels().prefix_attention_fwd(*args)


def triton_bwd(*args):
    return _triton_kernels().prefix_attention_bwd(*args)


def cpp_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale,
            dropout_p, seed, rng_offset):
    return _cpp_op("prefix_attention_fwd")(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                                 key_padding_mask, causal, scale, dropout_p, seed, rng_offset)


def cpp_bwd(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, out, lse,
            causal, scale, dropout_p, seed, rng_offset):
    return _cpp_op("prefix_attention_bwd")(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens,
                                                 kv_lens, key_padding_mask, out, lse, causal, scale, dropout_p, seed,
                                                 rng_offset)


FWD = {"reference": ref_fwd, "triton": triton_fwd, "cpp": cpp_fwd}
BWD = {"reference": ref_bwd, "triton": triton_bwd, "cpp": cpp_bwd}
