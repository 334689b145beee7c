"""``torch.ops.ptv2_fast.prefix_attention``: the custom op, its fake (meta) implementation and its autograd.

The op takes the bank already in [T, Hkv, P, D] form and a concrete backend name; argument handling and
static validation live in the public ``ptv2_fast.prefix_attention``. Index/length values are range-checked
here, inside the op, because only here are they real tensors also under torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, checks


def _rng(rng_key: Tensor | None) -> tuple[int, int]:
    # The dropout key (seed, offset) travels as a CPU tensor so torch.compile keeps the draw in its graph.
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


@torch.library.custom_op("ptv2_fast::prefix_attention", mutates_args=())
def prefix_attention_op(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    prefix_index: Tensor | None, prefix_lens: Tensor | None, kv_lens: Tensor | None,
    key_padding_mask: Tensor | None, causal: bool, scale: float, dropout_p: float,
    rng_key: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor]:
    """out [B, Hq, L, D] (q's dtype), lse [B, Hq, L] float32. ``rng_key``: int64 [2] (seed, offset) on the CPU."""
    if not _capturing(q):  # during CUDA-graph capture the kernels' clamping is the only guard
        checks.check_values(prefix_index, prefix_lens, kv_lens, prefix_k.shape[0], prefix_k.shape[2], k.shape[2])
    return backends.FWD[backend](q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                 key_padding_mask, causal, scale, dropout_p, *_rng(rng_key))


@prefix_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, causal, scale,
      dropout_p, rng_key, backend):
    B, Hq, L, D = q.shape
    return q.new_empty((B, Hq, L, D)), q.new_empty((B, Hq, L), dtype=torch.float32)


@torch.library.custom_op("ptv2_fast::prefix_attention_backward", mutates_args=())
def prefix_attention_backward_op(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    prefix_index: Tensor | None, prefix_lens: Tensor | None, kv_lens: Tensor | None,
    key_padding_mask: Tensor | None, out: Tensor, lse: Tensor, causal: bool, scale: float,
    dropout_p: float, rng_key: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v), each shaped and typed like its input. Not differentiable again."""
    grads = backends.BWD[backend](dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens,
                                  key_padding_mask, out, lse, causal, scale, dropout_p, *_rng(rng_key))
    # A custom op's outputs may not alias each other or its inputs.
    return tuple(g.contiguous() if g._base is None else g.clone() for g in grads)


@prefix_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, out, lse,
      causal, scale, dropout_p, rng_key, backend):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, prefix_k, prefix_v))


_TENSOR_ARGS = 9  # q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask


def _setup_context(ctx, inputs, output):
    causal, scale, dropout_p, rng_key, backend = inputs[_TENSOR_ARGS:]
    ctx.save_for_backward(*inputs[:_TENSOR_ARGS], *output, rng_key)
    ctx.params = (causal, scale, dropout_p, backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, pk, pv, pidx, plens, kvl, kpm, out, lse, rng_key = ctx.saved_tensors
    causal, scale, dropout_p, backend = ctx.params
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dpk, dpv = prefix_attention_backward_op(
        dout, dlse, q, k, v, pk, pv, pidx, plens, kvl, kpm, out, lse, causal, scale, dropout_p, rng_key, backend)
    return (dq, dk, dv, dpk, dpv) + (None,) * 9


prefix_attention_op.register_autograd(_backward, setup_context=_setup_context)
