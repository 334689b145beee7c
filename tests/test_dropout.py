"""Attention dropout: reproducible for a seed, the right keep rate, and exact replay in backward."""

import math

import pytest
import torch

import ptv2_fast
from ptv2_fast.attention import draw_rng_key
from ptv2_fast.kernels import prefix_attention_dropout_mask

from _util import DEVICE, Case, check_case, make_problem, run_op, run_ref

P_DROP = 0.3


def _op_mask(case: Case, torch_seed: int):
    """The keep mask [B, Hq, L, P + S] the op uses right after torch.manual_seed(torch_seed) (test-only view)."""
    torch.manual_seed(torch_seed)
    seed, offset = draw_rng_key().tolist()
    return prefix_attention_dropout_mask(case.B, case.Hq, case.L, case.S, case.P, P_DROP, seed, offset, DEVICE)


def test_reproducible_for_a_seed_and_different_across_seeds():
    case = Case(P=7, T=3, Hkv=2, mask="kv_lens")
    tensors, idx, kw, _, _ = make_problem(case)
    outs = []
    for s in (11, 11, 12):
        torch.manual_seed(s)
        outs.append(ptv2_fast.prefix_attention(*tensors, idx, dropout_p=P_DROP, backend="triton", **kw))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_keep_rate_within_statistical_bounds():
    case = Case(B=2, Hq=4, L=64, S=80, P=16)
    keep = _op_mask(case, 3)
    n = keep.numel()
    rate = keep.double().mean().item()
    sigma = math.sqrt(P_DROP * (1 - P_DROP) / n)
    assert abs(rate - (1 - P_DROP)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - P_DROP} +- {5 * sigma:.4f}"
    # Every (row, head) gets its own stream: no two heads share a mask.
    flat = keep.flatten(0, 1)
    assert all(not torch.equal(flat[0], flat[i]) for i in range(1, flat.shape[0]))
    # The prefix and sequence columns are both dropped at the same rate.
    for part in (keep[..., : case.P], keep[..., case.P:]):
        r = part.double().mean().item()
        assert abs(r - (1 - P_DROP)) < 5 * math.sqrt(P_DROP * (1 - P_DROP) / part.numel())


@pytest.mark.parametrize("case", [
    pytest.param(Case(P=7, T=3, Hkv=2, causal=True, mask="kv_lens", plens=True), id="gqa-causal-kvlens"),
    pytest.param(Case(P=64, T=1, L=1, S=33, D=64, mask="kpm", layout="blhd"), id="decode-kpm-blhd"),
])
def test_forward_and_gradients_equal_reference_with_the_same_mask(case):
    check_case(case, backend="triton", dropout_p=P_DROP, keep=_op_mask(case, 5), torch_seed=5)


def test_reference_backend_dropout_is_reproducible_and_replayed():
    case = Case(P=7, T=3, Hkv=2, mask="kv_lens")
    tensors, idx, kw, dout, dlse = make_problem(case)
    torch.manual_seed(9)
    o1, l1, g1 = run_op(tensors, idx, kw, dout, dlse, backend="reference", dropout_p=P_DROP)
    torch.manual_seed(9)
    o2, l2, g2 = run_op(tensors, idx, kw, dout, dlse, backend="reference", dropout_p=P_DROP)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    # Its backward replays its forward mask: compare with autograd through the reference given that mask.
    from ptv2_fast.ops.backends import _ref_dropout_mask

    torch.manual_seed(9)
    seed, offset = draw_rng_key().tolist()
    keep = _ref_dropout_mask(tensors[0], case.S, case.P, P_DROP, seed, offset)
    t_out, _, t_grads = run_ref(tensors, idx, kw, dout, dlse, torch.float64, dropout_mask=keep, dropout_p=P_DROP)
    torch.testing.assert_close(o1.double(), t_out, rtol=1e-5, atol=1e-5)
    for g, tg in zip(g1, t_grads):
        torch.testing.assert_close(g.double(), tg, rtol=1e-4, atol=1e-5)
