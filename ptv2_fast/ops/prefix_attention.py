"""``torch.ops.ptv2_fast.prefix_attention`` / ``prefix_attention_backward``: the raw ops, their fakes, and the
``autograd.Function`` that makes them differentiable.

Layering for a low per-call cost (pytorch/pytorch#176592): the raw ops are defined with ``torch.library``
(define + impl per device + ``register_fake``), which dispatches in C++ and is what ``torch.compile`` and
``opcheck`` see; autograd lives in ``PrefixAttentionFunction`` outside them, far cheaper per eager call than
``custom_op`` with ``register_autograd``. The raw forward's Autograd-key kernel applies that Function too,
so a direct ``torch.ops.ptv2_fast.prefix_attention`` call is differentiable; the raw backward is first order
only. The C++ extension's op carries its own C++ autograd (csrc/prefix_attention_autograd.cpp).

The raw forward takes the bank already as [T, Hkv, P, D] and a concrete backend name. It checks what its
schema promises (shapes, dtypes, devices, ``dropout_p``; cheap, no sync) and, when ``check_values`` is
true, the index/length values (one host sync for a tensor not checked before; see ``checks.check_values``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, checks, sdpa

# backend name -> forward / backward implementation (the backends' contract: ops/backends.py)
FWD = {**backends.FWD, "sdpa": sdpa.sdpa_fwd}
BWD = {**backends.BWD, "sdpa": sdpa.sdpa_bwd}

_lib = torch.library.Library("ptv2_fast", "FRAGMENT")
_lib.define(
    "prefix_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? prefix_index, "
    "Tensor? prefix_lens, Tensor? kv_lens, Tensor? key_padding_mask, bool causal, float scale, float dropout_p, "
    "Tensor? rng_key, str backend, bool check_values=True) -> (Tensor, Tensor)")
_lib.define(
    "prefix_attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor prefix_k, "
    "Tensor prefix_v, Tensor? prefix_index, Tensor? prefix_lens, Tensor? kv_lens, Tensor? key_padding_mask, "
    "Tensor out, Tensor lse, bool causal, float scale, float dropout_p, Tensor? rng_key, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _rng(rng_key: Tensor | None) -> tuple[int, int]:
    # The dropout key (seed, offset) travels as a CPU tensor so torch.compile keeps the draw in its graph;
    # reading it is a host read, never a device sync.
    if rng_key is None:
        return 0, 0
    if rng_key.device.type != "cpu" or rng_key.dtype != torch.int64 or tuple(rng_key.shape) != (2,):
        raise ValueError(f"rng_key must be an int64 CPU tensor of shape [2] (seed, offset), got "
                         f"{rng_key.dtype} {list(rng_key.shape)} on {rng_key.device}")
    seed, offset = rng_key.tolist()
    return int(seed), int(offset)


def _capturing(q: Tensor) -> bool:
    # No host sync may happen while a CUDA graph is being captured (torch.compile mode="reduce-overhead").
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _fwd_impl(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale,
              dropout_p, rng_key, backend, check_values=True):
    """out [B, Hq, L, D] (q's dtype, q's memory layout where the backend can), lse [B, Hq, L] float32."""
    if backend not in FWD:
        raise ValueError(f"backend must be one of {tuple(FWD)} for the raw op, got {backend!r}")
    if backend == "cpp":
        # The C++ op checks shapes and (on the CPU, where it is free) index ranges itself; when it refuses,
        # the Python checks run to raise the same exception, naming the argument, as the other backends.
        try:
            return backends.cpp_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                    key_padding_mask, causal, scale, dropout_p, *_rng(rng_key))
        except RuntimeError:
            _check_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, scale,
                       dropout_p, True)
            raise
    # the reference backend indexes the bank with prefix_index unclamped: it always checks the values
    _check_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, scale, dropout_p,
               check_values or backend == "reference")
    return FWD[backend](q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                 key_padding_mask, causal, scale, dropout_p, *_rng(rng_key))


def _check_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, scale, dropout_p,
               check_values):
    checks.check_shapes(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
                        dropout_p, scale)
    if check_values and not _capturing(q):  # during CUDA-graph capture the kernels' clamping is the guard
        checks.check_values(prefix_index, prefix_lens, kv_lens, prefix_k.shape[0], prefix_k.shape[2], k.shape[2])


def _bwd_impl(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, out,
              lse, causal, scale, dropout_p, rng_key, backend):
    """(dq, dk, dv, dprefix_k, dprefix_v), each shaped and typed like its input. Not differentiable again."""
    if backend not in BWD:
        raise ValueError(f"backend must be one of {tuple(BWD)} for the raw op, got {backend!r}")
    if backend != "cpp":
        checks.check_shapes(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
                            dropout_p, scale)
        checks.check_backward(dout, dlse, out, lse, q)
    grads = BWD[backend](dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                  key_padding_mask, out, lse, causal, scale, dropout_p, *_rng(rng_key))
    if backend in ("cpp", "sdpa"):  # fresh tensors (from C++, or from the vendor kernels / _in_layout)
        return grads
    # An op's outputs may not alias each other or its inputs.
    return tuple(g if g._base is None else g.clone() for g in grads)


# Every device (CPU, CUDA, and others, where the backends that run there are chosen); fakes cover meta/fake.
_lib.impl("prefix_attention", _fwd_impl, "CompositeExplicitAutograd")
_lib.impl("prefix_attention_backward", _bwd_impl, "CompositeExplicitAutograd")


# Output layouts: out and each gradient are allocated like their input (``torch.empty_like``: a dense input's
# strides are kept, e.g. q as a [B, L, Hq, D] tensor seen as [B, Hq, L, D] gives out in that layout, which is
# what Hugging Face consumes without a copy); every backend follows this, and so do the fakes.
@torch.library.register_fake("ptv2_fast::prefix_attention")
def _(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale,
      dropout_p, rng_key, backend, check_values=True):
    B, Hq, L, D = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, L), dtype=torch.float32)


@torch.library.register_fake("ptv2_fast::prefix_attention_backward")
def _(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, out, lse,
      causal, scale, dropout_p, rng_key, backend):
    return tuple(torch.empty_like(x) for x in (q, k, v, prefix_k, prefix_v))


_fwd_op = torch.ops.ptv2_fast.prefix_attention.default
_bwd_op = torch.ops.ptv2_fast.prefix_attention_backward.default
_compiling = torch.compiler.is_compiling


_EAGER_DEVICES = ("cpu", "cuda")


def _forward(*args):
    # Eager calls on plain tensors run the implementation directly: the registered op (what torch.compile and
    # opcheck see) would only add two dispatcher round trips through Python. Traced calls, tensor subclasses
    # (fake, functional: tracing) and meta tensors (memory planning) go through the op, and so its fake.
    if _direct(args[0]):
        return _fwd_impl(*args)
    return _fwd_op(*args)


def _backward(*args):
    if _direct(args[2]):
        return _bwd_impl(*args)
    return _bwd_op(*args)


def _direct(q) -> bool:
    # a dispatch mode (selective checkpointing, FLOP counters, fake tensors over real ones) must see the op
    return (type(q) is torch.Tensor and q.device.type in _EAGER_DEVICES and not _compiling()
            and torch._C._len_torch_dispatch_stack() == 0)


class PrefixAttentionFunction(torch.autograd.Function):
    """Differentiable prefix attention over the raw ops.

    ``apply(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, rng_key,
    (causal, scale, dropout_p, backend, check_values))``: the raw forward's arguments with the non-tensor ones
    packed in one tuple (``apply`` pays per argument). Returns (out, lse); gradients flow to q, k, v, prefix_k
    and prefix_v (first order only).
    """

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, rng_key,
                params):
        causal, scale, dropout_p, backend, check_values = params
        out, lse = _forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
                            causal, scale, dropout_p, rng_key, backend, check_values)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
                              out, lse, rng_key)
        ctx.params = (causal, scale, dropout_p, backend)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():  # backward(create_graph=True): its gradients would silently lack a graph
            raise RuntimeError("ptv2_fast.prefix_attention is differentiable once: backward with create_graph=True "
                               "(double backward, gradient penalties) is not supported")
        q, k, v, pk, pv, pidx, plens, kvl, kpm, out, lse, rng_key = ctx.saved_tensors
        causal, scale, dropout_p, backend = ctx.params
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dpk, dpv = _backward(dout, dlse, q, k, v, pk, pv, pidx, plens, kvl, kpm, out, lse, causal, scale,
                                       dropout_p, rng_key, backend)
        return dq, dk, dv, dpk, dpv, None, None, None, None, None, None


def _needs_autograd(q, k, v, prefix_k, prefix_v) -> bool:
    # getattr: a non-tensor argument reaches the checks (a clear TypeError), not an AttributeError here
    return torch.is_grad_enabled() and (getattr(q, "requires_grad", False) or getattr(k, "requires_grad", False)
                                        or getattr(v, "requires_grad", False)
                                        or getattr(prefix_k, "requires_grad", False)
                                        or getattr(prefix_v, "requires_grad", False))


def _autograd_kernel(q, k, v, prefix_k, prefix_v, *rest):
    # The raw forward stays differentiable for direct ``torch.ops`` callers; below autograd it runs the impl.
    if _needs_autograd(q, k, v, prefix_k, prefix_v):
        if len(rest) == 9:  # check_values left at its schema default
            rest = (*rest, True)
        return PrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, *rest[:4], rest[7], (*rest[4:7], *rest[8:]))
    with torch._C._AutoDispatchBelowAutograd():
        return _fwd_op(q, k, v, prefix_k, prefix_v, *rest)


_lib.impl("prefix_attention", _autograd_kernel, "Autograd")
_lib.impl("prefix_attention_backward", torch.library.fallthrough_kernel, "Autograd")  # first order only


def prefix_attention_op(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal,
                        scale, dropout_p, rng_key, backend, check_values=True):
    """(out, lse), differentiable when any float input requires grad (else the raw op, no autograd node)."""
    if backend == "cpp" and _direct(q):
        # the C++ op carries its own autograd (a C++ Function): no Python node per call
        return _fwd_impl(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal,
                         scale, dropout_p, rng_key, backend, check_values)
    if _needs_autograd(q, k, v, prefix_k, prefix_v):
        return PrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                             key_padding_mask, rng_key,
                                             (causal, scale, dropout_p, backend, check_values))
    return _forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal,
                    scale, dropout_p, rng_key, backend, check_values)
