"""merge_attention_states: exact, differentiable in both outputs, and safe on rows that saw nothing."""

import torch

import ptv2_fast
from ptv2_fast.reference import merge_attention_states_ref

from _util import Case, make_problem


def test_split_prefix_and_sequence_then_merge_equals_full_attention():
    case = Case(P=7, T=3, Hkv=2, mask="kv_lens", causal=True, dtype=torch.float64)
    (q, k, v, pk, pv), idx, kw, dout, dlse = make_problem(case)
    full_o, full_lse = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, return_lse=True, backend="reference", **kw)
    g_full = torch.autograd.grad((full_o * dout).sum() + (full_lse.nan_to_num(neginf=0) * dlse).sum(),
                                 (q, k, v, pk, pv))
    # Part a: the prefix only (every sequence key padded). Part b: the sequence only (an empty bank).
    none = torch.zeros(case.B, dtype=torch.long, device=q.device)
    o_a, l_a = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, kv_lens=none, return_lse=True, backend="reference")
    empty = pk[:, :, :0]
    o_b, l_b = ptv2_fast.prefix_attention(q, k, v, empty, empty, idx, return_lse=True, backend="reference", **kw)
    o, lse = ptv2_fast.merge_attention_states(o_a, l_a, o_b, l_b)
    # The op's lse is float32 by contract, so the merge is exact up to float32 rounding of the weights.
    torch.testing.assert_close(o, full_o, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), full_lse.double(), rtol=1e-6, atol=1e-6)
    g = torch.autograd.grad((o * dout).sum() + (lse.double().nan_to_num(neginf=0) * dlse).sum(), (q, k, v, pk, pv))
    for a, b in zip(g, g_full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_matches_float64_reweighting_and_handles_empty_rows():
    g = torch.Generator().manual_seed(3)
    o_a, o_b = torch.randn(2, 3, 5, 16, generator=g), torch.randn(2, 3, 5, 16, generator=g)
    l_a, l_b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    l_a[0, 0, 0] = float("-inf")  # one side empty
    l_a[1, 2, 3] = l_b[1, 2, 3] = float("-inf")  # both sides empty
    o_a[1, 2, 3] = o_b[1, 2, 3] = 0
    for x in (o_a, o_b, l_a, l_b):
        x.requires_grad_()
    o, lse = ptv2_fast.merge_attention_states(o_a, l_a, o_b, l_b)
    ro, rl = merge_attention_states_ref(o_a.detach(), l_a.detach(), o_b.detach(), l_b.detach())
    torch.testing.assert_close(o.double(), ro, rtol=1e-5, atol=1e-6)
    assert lse[1, 2, 3] == float("-inf") and torch.all(o[1, 2, 3] == 0)
    torch.testing.assert_close(o[0, 0, 0], o_b[0, 0, 0])
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse.double()[fin], rl[fin], rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(o.sum() + lse.nan_to_num(neginf=0).sum(), (o_a, l_a, o_b, l_b))
    assert all(torch.isfinite(x).all() for x in grads)


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(4)
    args = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)]
    merge64 = lambda *a: tuple(x.double() for x in ptv2_fast.merge_attention_states(*a))
    assert torch.autograd.gradcheck(merge64, args)
