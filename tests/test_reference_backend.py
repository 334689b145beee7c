"""The reference (CPU) backend runs over batch rows in chunks: same values, bounded temporaries."""

import pytest
import torch

import ptv2_fast
from ptv2_fast.ops import backends

from _util import Case, make_problem


def _run(case, dropout_p):
    tensors, idx, kw, _, _ = make_problem(case)
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    torch.manual_seed(5)
    out, lse = ptv2_fast.prefix_attention(*tensors, idx, dropout_p=dropout_p, backend="reference", return_lse=True,
                                          **kw)
    torch.manual_seed(6)
    (out * torch.randn_like(out)).sum().add(lse.nan_to_num(0, 0, 0).sum()).backward()
    return [out.detach(), lse.detach()] + [t.grad for t in tensors]


@pytest.mark.parametrize("case", [
    pytest.param(Case(P=7, T=3, Hkv=2, causal=True, mask="kv_lens", plens=True), id="gqa-causal-kvlens-plens"),
    pytest.param(Case(P=5, T=2, Hkv=4, mask="kpm"), id="kpm"),
    pytest.param(Case(P=0, T=1, Hkv=1, mask="kv_lens"), id="no-prefix"),
])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_row_chunks_change_no_value(case, dropout_p, monkeypatch):
    whole = _run(case, dropout_p)
    monkeypatch.setattr(backends, "REF_CHUNK_BYTES", 1)  # one batch row per chunk
    assert len(backends._row_chunks(torch.empty(3, 2, 4, 8), 5, 2, 3)) == 3
    chunked = _run(case, dropout_p)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_chunks_bound_the_temporaries(monkeypatch):
    from ptv2_fast.benchmarks.op_bench import cpu_peak_bytes

    B, H, L, P, D = 16, 4, 128, 32, 32
    q = torch.randn(B, H, L, D, requires_grad=True)
    k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    pk, pv = torch.randn(1, H, P, D), torch.randn(1, H, P, D)

    def step():
        ptv2_fast.prefix_attention(q, k, v, pk, pv, backend="reference").sum().backward()

    whole = cpu_peak_bytes(step)
    monkeypatch.setattr(backends, "REF_CHUNK_BYTES", 2**20)
    chunked = cpu_peak_bytes(step)
    scores = B * H * L * (P + L) * 4
    assert whole > scores and chunked < whole / 3, (whole, chunked, scores)
