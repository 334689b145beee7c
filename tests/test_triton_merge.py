"""The merge launchers of the ``sdpa`` backend: the sequence part comes from elsewhere (here the fp64
reference with an empty prefix), the Triton kernels add the prefix and merge in one pass, forward and backward.

Rows that see no sequence key get NaN / 0 in the given sequence part (as vendor kernels may leave there), so
the kernel must take them as empty from the masks alone. Errors follow DESIGN.md §5 against the full fp64
reference, with the naive same-dtype path as the yardstick.
"""

import pytest
import torch

from ptv2_fast.benchmarks.host import count_device_work
from ptv2_fast.kernels import prefix_attention_dropout_mask, prefix_attention_merge_bwd, prefix_attention_merge_fwd
from ptv2_fast.reference import concat_prefix, prefix_attention_ref, visible_keys

from _util import DEVICE, Case, assert_rule, make_problem, run_ref

P_DROP = 0.3
SEED, OFFSET = 1234, 77

CASES = [
    pytest.param(Case(P=0, T=1, mask="kv_lens"), id="P0-kvlens-padded-row"),
    pytest.param(Case(P=0, T=1, mask="kpm", D=16, dtype=torch.float16), id="P0-kpm-padded-row-fp16"),
    pytest.param(Case(P=7, T=3, Hkv=2, mask="kv_lens", plens=True), id="gqa-plens-kvlens"),
    pytest.param(Case(P=7, T=3, Hkv=2, mask="kpm", D=64, layout="blhd", dtype=torch.float16), id="gqa-kpm-blhd-d64-fp16"),
    pytest.param(Case(P=5, T=2, L=17, S=9, causal=True, mask="kpm", D=80, plens=True, dtype=torch.bfloat16),
                 id="causal-L>S-kpm-d80-bf16"),
    pytest.param(Case(P=1, T=2, L=17, S=9, causal=True, mask="kv_lens", D=16), id="causal-L>S-kvlens-d16"),
    pytest.param(Case(B=2, P=16, T=2, L=1, S=33, Hkv=2, causal=True, D=64, layout="blhd", dtype=torch.bfloat16),
                 id="decode-causal-blhd-bf16"),
]
DROPOUT_CASES = [
    pytest.param(Case(P=7, T=3, Hkv=2, causal=True, mask="kv_lens", plens=True), id="gqa-causal-kvlens"),
    pytest.param(Case(P=9, T=1, L=5, S=13, D=64, mask="kpm", layout="blhd", dtype=torch.float16), id="kpm-blhd-fp16"),
]


def _args(case: Case, dropout_p: float = 0.0):
    tensors, idx, kw, dout, _ = make_problem(case)
    q, k, v, pk, pv = (x.detach() for x in tensors)
    keep = None
    if dropout_p:
        # the prefix columns get the fused kernel's mask, the sequence part none (its columns all kept)
        keep = prefix_attention_dropout_mask(case.B, case.Hq, case.L, case.S, case.P, dropout_p, SEED, OFFSET, DEVICE)
        keep[..., case.P:] = True
    return tensors, (q, k, v, pk, pv), idx, kw, dout, keep


def _in_layout(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like).copy_(x)  # like's dtype and strides (empty_like keeps a dense layout)


def _sequence_part(case: Case, q, k, v, pk, pv, idx, kw, dropout_p: float = 0.0):
    """(out, seq_lse) over the sequence keys only, as the vendor kernel would give them: out in q's dtype and
    layout, lse fp32 (laid out [B, L, H] for blhd), garbage in the rows that see no sequence key."""
    seq_kw = {n: x for n, x in kw.items() if n != "prefix_lens"}
    extra = {}
    if dropout_p:
        all_kept = torch.ones(case.B, case.Hq, case.L, case.S, dtype=torch.bool, device=q.device)
        extra = {"dropout_mask": all_kept, "dropout_p": dropout_p}  # scaled by 1 / (1 - p), as a vendor would
    o_s, lse_s = prefix_attention_ref(q, k, v, pk[..., :0, :], pv[..., :0, :], idx, return_lse=True,
                                      compute_dtype=torch.float64, **seq_kw, **extra)
    no_seq = torch.isinf(lse_s)
    o_s[no_seq], lse_s[no_seq] = float("nan"), 0.0
    out = _in_layout(o_s, q)
    if case.layout == "blhd":
        seq_lse = torch.empty(case.B, case.L, case.Hq, device=q.device).transpose(1, 2).copy_(lse_s)
    else:
        seq_lse = lse_s.float()
    return out, seq_lse, no_seq


def _dq_split(q, k, v, pk, pv, idx, kw, dout, keep=None, dropout_p=0.0):
    """Closed-form fp64 dq of loss = sum(out * dout), split into the sequence keys' and the prefix keys' shares:
    dq_i = scale sum_j ds_ij k_j with ds_ij = p_ij (dp_ij - delta_i) from the FULL softmax (both key sets)."""
    B, Hq, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], pk.shape[-2]
    scale = D ** -0.5
    keys, values = concat_prefix(k, v, pk, pv, idx, group=Hq // Hkv, dtype=torch.float64)
    vis = visible_keys(B, L, S, P, prefix_index=idx, device=q.device, **kw)[:, None]
    s = (q.double() @ keys.transpose(-1, -2) * scale).masked_fill(~vis, float("-inf"))
    probs = torch.softmax(s, -1).nan_to_num(0.0)  # a row that sees nothing: 0, not NaN
    z = keep.double() / (1.0 - dropout_p) if keep is not None else 1.0
    out = (probs * z) @ values
    delta = (dout.double() * out).sum(-1, keepdim=True)
    ds = probs * ((dout.double() @ values.transpose(-1, -2)) * z - delta)
    return scale * ds[..., P:] @ keys[..., P:, :], scale * ds[..., :P] @ keys[..., :P, :]


def _check_forward(case, dropout_p):
    tensors, (q, k, v, pk, pv), idx, kw, dout, keep = _args(case, dropout_p)
    out, seq_lse, no_seq = _sequence_part(case, q, k, v, pk, pv, idx, kw, dropout_p)
    lse = prefix_attention_merge_fwd(q, k, v, pk, pv, idx, kw.get("prefix_lens"), kw.get("kv_lens"),
                                     kw.get("key_padding_mask"), case.causal, case.D ** -0.5, dropout_p, SEED, OFFSET,
                                     out, seq_lse)
    ref_extra = {"dropout_mask": keep, "dropout_p": dropout_p} if dropout_p else {}
    zero_dlse = torch.zeros(case.B, case.Hq, case.L, device=q.device)
    t_out, t_lse, _ = run_ref(tensors, idx, kw, dout, zero_dlse, torch.float64, **ref_extra)
    n_out, n_lse, _ = run_ref(tensors, idx, kw, dout, zero_dlse, case.dtype, **ref_extra)
    assert lse.dtype == torch.float32 and lse.shape == (case.B, case.Hq, case.L) and lse.is_contiguous()
    assert out.stride() == q.stride()  # written in place
    assert_rule("out", out, t_out, n_out, case.dtype)
    assert_rule("lse", lse, t_lse, n_lse, case.dtype)
    return no_seq, t_lse


def _check_backward(case, dropout_p):
    tensors, (q, k, v, pk, pv), idx, kw, dout, keep = _args(case, dropout_p)
    ref_extra = {"dropout_mask": keep, "dropout_p": dropout_p} if dropout_p else {}
    zero_dlse = torch.zeros(case.B, case.Hq, case.L, device=q.device)
    t_out, t_lse, t_grads = run_ref(tensors, idx, kw, dout, zero_dlse, torch.float64, **ref_extra)
    _, _, n_grads = run_ref(tensors, idx, kw, dout, zero_dlse, case.dtype, **ref_extra)
    dq_seq, dq_prefix = _dq_split(q, k, v, pk, pv, idx, kw, dout, keep, dropout_p)
    # the split is right: together the two shares are autograd's dq of the full reference
    torch.testing.assert_close(dq_seq + dq_prefix, t_grads[0], rtol=1e-9, atol=1e-9)

    dq = _in_layout(dq_seq, q)
    dpk, dpv = prefix_attention_merge_bwd(dout, q, k, v, pk, pv, idx, kw.get("prefix_lens"),
                                          _in_layout(t_out, q), t_lse.float(), case.D ** -0.5, dropout_p, SEED,
                                          OFFSET, dq)
    assert dq.stride() == q.stride()
    for name, g, x in (("dprefix_k", dpk, pk), ("dprefix_v", dpv, pv)):
        assert g.shape == x.shape and g.dtype == x.dtype and g.stride() == x.stride(), name
    assert_rule("dq", dq, t_grads[0], n_grads[0], case.dtype)
    assert_rule("dprefix_k", dpk, t_grads[3], n_grads[3], case.dtype)
    assert_rule("dprefix_v", dpv, t_grads[4], n_grads[4], case.dtype)


@pytest.mark.parametrize("case", CASES)
def test_merge_forward_matches_reference(case, poisoned_outputs):
    no_seq, t_lse = _check_forward(case, 0.0)
    if case.mask != "none" or case.L > case.S:  # padded rows, early causal rows: no sequence key to see
        assert no_seq.any()
    if case.P == 0:
        assert torch.isinf(t_lse).any()  # and rows that see no key at all (out = 0, lse = -inf)


@pytest.mark.parametrize("case", CASES)
def test_merge_backward_matches_reference(case, poisoned_outputs):
    _check_backward(case, 0.0)


@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_merge_with_prefix_dropout_matches_reference(case, poisoned_outputs):
    _check_forward(case, P_DROP)
    _check_backward(case, P_DROP)


def _launch_problem():
    case = Case(B=3, Hq=4, Hkv=2, L=9, S=11, P=5, T=2, D=16, causal=True, mask="kv_lens", plens=True)
    _, (q, k, v, pk, pv), idx, kw, dout, _ = _args(case)
    out, seq_lse, _ = _sequence_part(case, q, k, v, pk, pv, idx, kw)
    fwd_args = (q, k, v, pk, pv, idx, kw["prefix_lens"], kw["kv_lens"], None, True, 0.25, 0.0, 0, 0, out, seq_lse)
    return case, q, k, v, pk, pv, idx, kw, dout, out, fwd_args


def test_merge_forward_is_one_launch_and_backward_two(monkeypatch):
    monkeypatch.delenv("PTV2_FAST_PREFIX_SPLITS", raising=False)
    _, q, k, v, pk, pv, idx, kw, dout, out, fwd_args = _launch_problem()
    with count_device_work() as c:
        lse = prefix_attention_merge_fwd(*fwd_args)
    assert c["triton"] == {"prefix_attention_fwd_kernel": 1} and c["aten"] == {} and c["launches"] == 1, c
    assert c["n_syncs"] == 0, c
    dq = torch.randn_like(q)
    with count_device_work() as c:
        prefix_attention_merge_bwd(dout, q, k, v, pk, pv, idx, kw["prefix_lens"], out, lse, 0.25, 0.0, 0, 0, dq)
    assert c["triton"] == {"prefix_attention_bwd_dq_kernel": 1, "prefix_attention_bwd_dkdv_kernel": 1}, c
    assert c["aten"] == {} and c["launches"] == 2 and c["n_syncs"] == 0, c


def test_merge_backward_with_split_prefix_reduction_is_three_launches_and_the_same(monkeypatch):
    _, q, k, v, pk, pv, idx, kw, dout, out, fwd_args = _launch_problem()
    lse = prefix_attention_merge_fwd(*fwd_args)
    dq0 = torch.randn_like(q)
    results = []
    for splits in ("1", "3"):
        monkeypatch.setenv("PTV2_FAST_PREFIX_SPLITS", splits)
        dq = dq0.clone()
        with count_device_work() as c:
            dpk, dpv = prefix_attention_merge_bwd(dout, q, k, v, pk, pv, idx, kw["prefix_lens"], out, lse, 0.25,
                                                  0.0, 0, 0, dq)
        assert c["launches"] == (3 if splits == "3" else 2) and c["aten"] == {}, c
        results.append((dq, dpk, dpv))
    assert torch.equal(results[0][0], results[1][0])  # dq does not depend on the split
    for a, b in zip(results[0][1:], results[1][1:]):  # the split sum is the unsplit one up to rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
