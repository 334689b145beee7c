"""torch.library integration: opcheck, torch.compile (inductor, CPU) forward and backward, fp64 gradcheck."""

import pytest
import torch

import ptv2_fast

from _util import Case, make_problem


def _sample(dtype=torch.float32, backend="triton"):
    (q, k, v, pk, pv), idx, kw, _, _ = make_problem(Case(B=2, Hq=4, Hkv=2, L=5, S=7, P=3, T=3, D=16, dtype=dtype,
                                                         causal=True, mask="kv_lens", plens=True))
    return (q, k, v, pk, pv, idx, kw["prefix_lens"], kw["kv_lens"], None, True, 0.25, 0.0, None, backend)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend):
    torch.library.opcheck(torch.ops.ptv2_fast.prefix_attention.default, _sample(backend=backend))


def test_opcheck_with_dropout_and_key_padding_mask():
    args = list(_sample())
    args[7] = None
    args[8] = torch.rand(2, 7, generator=torch.Generator().manual_seed(1)) > 0.4
    args[11], args[12] = 0.2, torch.tensor([1234, 5])
    torch.library.opcheck(torch.ops.ptv2_fast.prefix_attention.default, tuple(args))


def test_torch_compile_forward_and_backward():
    case = Case(B=2, Hq=4, Hkv=2, L=9, S=11, P=4, T=3, D=16, causal=True, mask="kv_lens", plens=True)
    tensors, idx, kw, dout, _ = make_problem(case)

    def layer(q, k, v, pk, pv):
        out = ptv2_fast.prefix_attention(torch.tanh(q), k, v, pk * 2.0, pv, idx, backend="triton", **kw)
        return (out * dout).sum()

    eager = torch.autograd.grad(layer(*tensors), tensors)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    got = torch.autograd.grad(compiled(*tensors), tensors)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck_fp64_through_the_public_op():
    # fast_mode checks random projections of the Jacobian (a few evaluations instead of one per element).
    # Only `out` is checked here: lse is float32 by contract, too coarse for finite differences; its
    # gradient is checked against the fp64 reference in test_prefix_attention.
    case = Case(B=2, Hq=2, Hkv=1, L=3, S=4, P=2, T=2, D=16, dtype=torch.float64, causal=True, mask="kpm")
    tensors, idx, kw, _, _ = make_problem(case)

    def f(q, k, v, pk, pv):
        return ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="triton", **kw)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
