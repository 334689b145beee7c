"""The C++ extension's CPU kernels (torch.ops.ptv2_fast.prefix_attention_fwd/_bwd) against the fp64
reference, with the same cases and error rule as the Triton kernels (DESIGN.md §5), and their integration:
backend selection, torch.library checks, torch.compile, determinism and bad inputs."""

import math

import pytest
import torch
from test_prefix_attention import BASE_CASES, LARGE_CASES

import ptv2_fast
from ptv2_fast import _ext
from ptv2_fast.attention import draw_rng_key
from ptv2_fast.ops.backends import BackendUnavailable

from _util import Case, check_case, make_problem, run_op

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

pytestmark = pytest.mark.skipif(not _ext.load(), reason=f"extension unavailable: {_ext.status()['error']}")

CASES = [pytest.param(c, id=c.id()) for c in (Case(**{**b.__dict__, "dtype": dt})
                                               for dt in (F32, F16, BF16) for b in BASE_CASES)]


@pytest.mark.parametrize("case", CASES)
def test_matches_fp64_reference(case, poisoned_outputs):
    check_case(case, device="cpu", backend="cpp")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in LARGE_CASES]
                         + [pytest.param(Case(**{**LARGE_CASES[1].__dict__, "dtype": BF16}), id="large-bf16")])
def test_large_shapes_match_fp64_reference(case, poisoned_outputs):
    check_case(case, device="cpu", backend="cpp")


def test_auto_picks_the_extension_on_cpu():
    assert ptv2_fast.resolve_backend("auto", "cpu") == "cpp"
    assert ptv2_fast.resolve_backend("auto", "cpu", torch.bfloat16) == "cpp"
    assert ptv2_fast.resolve_backend("auto", "cpu", torch.float32, dropout_p=0.1) == "cpp"
    # float64 is not in the extension: the reference runs it
    assert ptv2_fast.resolve_backend("auto", "cpu", torch.float64) == "reference"


def test_auto_calls_the_extension():
    from ptv2_fast.benchmarks.host import count_device_work

    tensors, idx, kw, dout, dlse = make_problem(Case(), "cpu")
    with count_device_work() as c:
        run_op(tensors, idx, kw, dout, dlse, backend="auto")
    assert c["aten"].get("prefix_attention_fwd") == 1 and c["aten"].get("prefix_attention_bwd") == 1, c["aten"]


P_DROP = 0.3


def _cpp_mask(case: Case, torch_seed: int):
    """The keep mask [B, Hq, L, P + S] the C++ kernels use right after torch.manual_seed(torch_seed)."""
    torch.manual_seed(torch_seed)
    seed, offset = draw_rng_key().tolist()
    return torch.ops.ptv2_fast.dropout_keep_mask(case.B, case.Hq, case.L, case.S, case.P, P_DROP, seed, offset)


@pytest.mark.parametrize("case", [
    pytest.param(Case(P=7, T=3, Hkv=2, causal=True, mask="kv_lens", plens=True), id="gqa-causal-kvlens"),
    pytest.param(Case(P=64, T=1, L=1, S=33, D=64, mask="kpm", layout="blhd"), id="decode-kpm-blhd"),
    pytest.param(Case(B=3, Hq=4, Hkv=2, L=70, S=150, P=20, T=2, D=32, causal=True, mask="kpm", dtype=BF16),
                 id="several-tiles-bf16"),
])
def test_dropout_equals_reference_with_the_same_mask(case, poisoned_outputs):
    # The forward's mask, replayed by both backward phases, is the one the mask view reports.
    check_case(case, device="cpu", backend="cpp", dropout_p=P_DROP, keep=_cpp_mask(case, 5), torch_seed=5)


def test_dropout_is_reproducible_with_the_right_keep_rate():
    case = Case(P=7, T=3, Hkv=2, mask="kv_lens")
    tensors, idx, kw, _, _ = make_problem(case, "cpu")
    outs = []
    for s in (11, 11, 12):
        torch.manual_seed(s)
        outs.append(ptv2_fast.prefix_attention(*tensors, idx, dropout_p=P_DROP, backend="cpp", **kw))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    keep = _cpp_mask(Case(B=2, Hq=4, L=64, S=80, P=16), 3)
    sigma = math.sqrt(P_DROP * (1 - P_DROP) / keep.numel())
    assert abs(keep.double().mean().item() - (1 - P_DROP)) < 5 * sigma
    flat = keep.flatten(0, 1)  # every (row, head) has its own stream
    assert all(not torch.equal(flat[0], flat[i]) for i in range(1, flat.shape[0]))
    for part in (keep[..., :16], keep[..., 16:]):  # prefix and sequence columns alike
        assert abs(part.double().mean().item() - (1 - P_DROP)) < 5 * math.sqrt(P_DROP * (1 - P_DROP) / part.numel())


def test_cpp_refuses_float64():
    tensors, idx, kw, _, _ = make_problem(Case(dtype=torch.float64), "cpu")
    with pytest.raises(BackendUnavailable, match="float32, float16 and bfloat16"):
        ptv2_fast.prefix_attention(*tensors, idx, backend="cpp", **kw)


def test_cuda_backend_is_refused_for_prefix_attention():
    tensors, idx, kw, _, _ = make_problem(Case(), "cpu")
    with pytest.raises(BackendUnavailable, match="decode kernel"):
        ptv2_fast.prefix_attention(*tensors, idx, backend="cuda", **kw)


def test_deterministic_and_independent_of_thread_count():
    # The bank gradient is reduced per task in a fixed order, so results do not depend on the thread count.
    case = Case(B=6, Hq=4, Hkv=2, L=70, S=90, P=70, T=3, D=32, causal=True, mask="kv_lens", plens=True)
    tensors, idx, kw, dout, dlse = make_problem(case, "cpu")
    n = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, max(2, n), max(2, n)):
            torch.set_num_threads(threads)
            out, lse, grads = run_op(tensors, idx, kw, dout, dlse, backend="cpp")
            runs.append((out, lse, *grads))
    finally:
        torch.set_num_threads(n)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _op_args():
    (q, k, v, pk, pv), idx, kw, _, _ = make_problem(Case(P=7, T=3, mask="kv_lens", causal=True), "cpu")
    return [x.detach() for x in (q, k, v, pk, pv)], idx, kw


def test_opcheck_forward_and_backward():
    (q, k, v, pk, pv), idx, kw = _op_args()
    fwd_args = (q, k, v, pk, pv, idx, None, kw["kv_lens"], None, True, 0.2, 0.25, 7, 3)
    torch.library.opcheck(torch.ops.ptv2_fast.prefix_attention_fwd.default, fwd_args)
    out, lse = torch.ops.ptv2_fast.prefix_attention_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, pk, pv, idx, None, kw["kv_lens"], None, out,
                lse, True, 0.2, 0.25, 7, 3)
    torch.library.opcheck(torch.ops.ptv2_fast.prefix_attention_bwd.default, bwd_args)


def test_torch_compile_fullgraph_matches_eager():
    tensors, idx, kw, dout, dlse = make_problem(Case(P=7, T=3, mask="kpm"), "cpu")

    def f(q, k, v, pk, pv):
        return ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="cpp", **kw)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(*tensors)
    got = compiled(*tensors)
    assert torch.equal(got, eager)
    g_e = torch.autograd.grad((eager * dout).sum(), tensors)
    g_c = torch.autograd.grad((compiled(*tensors) * dout).sum(), tensors)
    for a, b in zip(g_e, g_c):
        assert torch.equal(a, b)


# Bad inputs straight to the C++ op: each gets a clear error naming the argument, never a wrong answer.
def _bad(name):
    (q, k, v, pk, pv), idx, kw = _op_args()
    a = {"q": q, "k": k, "v": v, "pk": pk, "pv": pv, "idx": idx, "plens": None, "kvl": kw["kv_lens"], "kpm": None,
         "causal": True, "scale": 0.2, "dropout_p": 0.0}
    B, S, T, P = q.shape[0], k.shape[2], pk.shape[0], pk.shape[2]
    if name == "q-3d":
        a["q"] = q[0]
    elif name == "dtype-mismatch":
        a["k"] = k.to(torch.bfloat16)
    elif name == "float64":
        a.update({n: a[n].double() for n in ("q", "k", "v", "pk", "pv")})
    elif name == "heads":
        a["q"] = torch.randn(B, 3, q.shape[2], q.shape[3])
        a["k"], a["v"] = torch.randn(B, 2, S, q.shape[3]), torch.randn(B, 2, S, q.shape[3])
        a["pk"], a["pv"] = torch.randn(T, 2, P, q.shape[3]), torch.randn(T, 2, P, q.shape[3])
    elif name == "head-dim":
        a.update({n: a[n][..., :8].contiguous() for n in ("q", "k", "v", "pk", "pv")})
    elif name == "index-range":
        a["idx"] = torch.full((B,), T)
    elif name == "index-dtype":
        a["idx"] = idx.float()
    elif name == "index-missing":
        a["idx"] = None
    elif name == "kv-lens-range":
        a["kvl"] = torch.full((B,), S + 1)
    elif name == "prefix-lens-range":
        a["plens"] = torch.full((T,), -1)
    elif name == "both-masks":
        a["kpm"] = torch.ones(B, S, dtype=torch.bool)
    elif name == "kpm-dtype":
        a["kvl"], a["kpm"] = None, torch.ones(B, S)
    elif name == "bank-heads":
        a["pk"] = a["pv"] = torch.randn(T, 2, P, q.shape[3])
    elif name == "scale":
        a["scale"] = -1.0
    elif name == "dropout":
        a["dropout_p"] = 1.0
    return a


@pytest.mark.parametrize("name, match", [
    ("q-3d", "q must be 4-D"), ("dtype-mismatch", "k has dtype"), ("float64", "float32, float16 or bfloat16"),
    ("heads", "not a multiple"), ("head-dim", "head dim"), ("index-range", "prefix_index has value"),
    ("index-dtype", "prefix_index must be int32 or int64"), ("index-missing", "prefix_index is None"),
    ("kv-lens-range", "kv_lens has value"), ("prefix-lens-range", "prefix_lens has value"),
    ("both-masks", "not both"), ("kpm-dtype", "key_padding_mask must be bool"), ("bank-heads", "prefix_k must be"),
    ("scale", "scale must be positive"), ("dropout", "dropout_p must be in"),
])
def test_bad_inputs_raise_clear_errors(name, match):
    a = _bad(name)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ptv2_fast.prefix_attention_fwd(a["q"], a["k"], a["v"], a["pk"], a["pv"], a["idx"], a["plens"],
                                                 a["kvl"], a["kpm"], a["causal"], a["scale"], a["dropout_p"], 0, 0)


def test_backward_bad_inputs():
    (q, k, v, pk, pv), idx, kw = _op_args()
    out, lse = torch.ops.ptv2_fast.prefix_attention_fwd(q, k, v, pk, pv, idx, None, kw["kv_lens"], None, True, 0.2)
    with pytest.raises(RuntimeError, match="dout has shape"):
        torch.ops.ptv2_fast.prefix_attention_bwd(out[:, :, :3], None, q, k, v, pk, pv, idx, None, kw["kv_lens"], None,
                                                 out, lse, True, 0.2)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.ptv2_fast.prefix_attention_bwd(out, None, q, k, v, pk, pv, idx, None, kw["kv_lens"], None, out,
                                                 lse[:, :1], True, 0.2)
