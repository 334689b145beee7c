"""prefix_attention vs the fp64 concatenating reference: out, lse and all five gradients (DESIGN.md §5).

The matrix covers every value the core issue names — P in {0, 1, 7, 64}, L in {1, 17, 128}, S != L,
T in {1, 3} with repeated and unused bank rows, prefix_lens < P, GQA 4:1 and 1:1, causal on/off, kv_lens
and key_padding_mask with fully padded rows, D in {32, 64, 80, 128}, fp32/fp16/bf16 and [B, L, H, D]
views — as a covering set of combinations rather than the full product (the interpreter is slow).
"""

import pytest
import torch

from _util import DEVICE, Case, check_case

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

BASE_CASES = [
    # prefix lengths, incl. P=0 with a fully padded row (rows that see nothing at all)
    Case(P=0, T=1, mask="kv_lens"),
    Case(P=1, T=3, Hkv=4, causal=True),
    Case(P=7, T=3, plens=True, mask="kpm"),
    Case(P=64, T=3, L=17, S=40, D=64, plens=True),
    # query lengths: decode-like L=1, L < S, and a long L
    Case(L=1, S=33, P=7, T=3, causal=True, mask="kv_lens"),
    Case(L=1, S=5, P=64, T=1, Hkv=4, D=128),
    Case(L=128, S=130, P=7, T=3, B=2, causal=True, mask="kpm"),
    Case(L=128, S=128, P=64, T=1, B=2, D=64, causal=True),
    # head dims incl. a non power of two and both ends of the supported range
    Case(D=80, P=7, T=3, mask="kv_lens", plens=True),
    Case(D=16, P=7, T=3, Hkv=2, causal=True, mask="kpm"),
    Case(D=256, L=9, S=13, P=7, T=3, Hkv=2, causal=True, mask="kv_lens"),
    Case(D=128, Hq=4, Hkv=1, L=17, S=21, P=1, T=3, causal=True),
    # layouts and the shared-prefix form
    Case(layout="blhd", P=7, T=3, Hkv=2, causal=True, mask="kv_lens"),
    Case(layout="blhd", T=1, bank3d=True, D=64, mask="kpm"),
    Case(T=1, bank3d=True, P=64, L=17, S=17, causal=True),
    # L > S with causal: early queries see no sequence key, only the prefix
    Case(L=29, S=17, P=7, T=3, causal=True, Hkv=2),
    Case(L=29, S=17, P=0, T=1, causal=True, mask="kpm"),
    # a P-Tuning v2 NLU-like shape (padded, non-causal) and a GQA decoder-like one, scaled down
    Case(B=4, Hq=4, Hkv=4, L=97, S=97, P=64, T=3, D=64, mask="kpm", plens=True),
    Case(B=2, Hq=8, Hkv=2, L=64, S=80, P=7, T=3, D=128, causal=True, mask="kv_lens", layout="blhd"),
    # one sequence key only, and many tasks with one row each
    Case(B=3, L=1, S=1, P=1, T=3, Hkv=4, D=64),
    Case(B=6, L=5, S=9, P=7, T=3, Hkv=2, mask="kpm", plens=True),
]

CASES = [pytest.param(c, id=c.id()) for c in (Case(**{**b.__dict__, "dtype": dt})
                                               for dt in (F32, F16, BF16) for b in BASE_CASES)]


@pytest.mark.parametrize("case", CASES)
def test_matches_fp64_reference(case, poisoned_outputs):
    # On a machine without a GPU this runs Triton's interpreter on the CPU; with one, the real kernels.
    check_case(case, backend="triton")


@pytest.mark.parametrize("case", [pytest.param(Case(P=7, T=3, Hkv=2, mask="kv_lens", causal=True), id="gqa2-causal")])
def test_reference_backend_matches_too(case):
    # backend="reference" goes through the same custom op and its recomputing backward.
    check_case(case, backend="reference")


# Larger shapes: several blocks along every axis, and the extreme head dims. fp32 in the interpreter;
# all dtypes on a GPU.
LARGE_CASES = [
    Case(B=4, Hq=16, Hkv=16, L=256, S=256, P=64, T=3, D=64, mask="kpm", plens=True),
    Case(B=2, Hq=8, Hkv=2, L=300, S=1000, P=128, T=3, D=128, causal=True, mask="kv_lens", layout="blhd"),
    Case(B=2, Hq=4, Hkv=1, L=129, S=190, P=33, T=2, D=256, causal=True),
    Case(B=3, Hq=4, Hkv=2, L=1, S=700, P=128, T=3, D=128, mask="kv_lens"),
    Case(B=3, Hq=2, Hkv=2, L=70, S=70, P=224, T=3, D=16, mask="kpm"),
    Case(B=2, Hq=6, Hkv=3, L=200, S=200, P=7, T=1, D=80, causal=True, bank3d=True),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in LARGE_CASES])
def test_large_shapes_match_fp64_reference(case, poisoned_outputs):
    check_case(case, backend="triton")


# The GPU block configurations (small blocks, many programs, loops over many key/query blocks), checked in
# the interpreter: without this switch the interpreter uses one large block per axis.
GPU_BLOCK_CASES = [
    Case(B=2, Hq=4, Hkv=2, L=150, S=170, P=40, T=3, D=64, causal=True, mask="kv_lens", plens=True),
    Case(B=2, Hq=2, Hkv=1, L=70, S=90, P=33, T=2, D=128, mask="kpm", dtype=BF16),
    Case(B=2, Hq=2, Hkv=2, L=40, S=50, P=20, T=2, D=256, causal=True, dtype=F16),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in GPU_BLOCK_CASES])
def test_gpu_block_configs_match_fp64_reference(case, monkeypatch, poisoned_outputs):
    from ptv2_fast.kernels import prefix_attention as launch

    big = launch._config("fwd", case.L, max(case.S, case.P), case.D)
    monkeypatch.setenv("PTV2_FAST_INTERPRET_GPU_BLOCKS", "1")
    small = launch._config("fwd", case.L, max(case.S, case.P), case.D)
    assert small != big or not launch._interpreting(), "the switch did not select the GPU block configuration"
    check_case(case, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("base", [pytest.param(c, id=c.id()) for c in BASE_CASES + LARGE_CASES])
def test_gpu_matches_fp64_reference(base, dtype, poisoned_outputs):
    check_case(Case(**{**base.__dict__, "dtype": dtype}), device="cuda", backend="triton")


def test_prefix_gradient_sums_rows_of_a_task_and_zeroes_unused_rows():
    # Direct statement of the bank semantics: rows 0 and 2 share task 1; task 0 and 2 are unused.
    from ptv2_fast import prefix_attention

    g = torch.Generator().manual_seed(7)
    B, H, L, S, P, T, D = 3, 2, 5, 6, 4, 3, 16
    q = torch.randn(B, H, L, D, generator=g).to(DEVICE)
    k, v = torch.randn(B, H, S, D, generator=g).to(DEVICE), torch.randn(B, H, S, D, generator=g).to(DEVICE)
    pk = torch.randn(T, H, P, D, generator=g).to(DEVICE).requires_grad_()
    pv = torch.randn(T, H, P, D, generator=g).to(DEVICE).requires_grad_()
    idx = torch.tensor([1, 2, 1], device=DEVICE)
    out = prefix_attention(q, k, v, pk, pv, idx, backend="triton")
    gk, gv = torch.autograd.grad(out.square().sum(), (pk, pv))
    assert torch.all(gk[0] == 0) and torch.all(gv[0] == 0)
    assert gk[1].abs().sum() > 0 and gk[2].abs().sum() > 0
    # Task 1's gradient equals the sum of per-row gradients computed one row at a time.
    per_row = []
    for b in (0, 2):
        pk1 = pk.detach()[1:2].clone().requires_grad_()
        o = prefix_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pk1, pv.detach()[1:2], backend="triton")
        per_row.append(torch.autograd.grad(o.square().sum(), pk1)[0])
    torch.testing.assert_close(gk[1], (per_row[0] + per_row[1])[0], rtol=1e-5, atol=1e-5)


def test_deterministic_bitwise_including_row_splits(monkeypatch):
    # Many rows per task, and the split-over-rows path of the prefix gradient forced on.
    from _util import make_problem, run_op

    monkeypatch.setenv("PTV2_FAST_PREFIX_SPLITS", "3")
    case = Case(B=32, Hq=2, Hkv=1, L=9, S=11, P=7, T=2, D=16, mask="kpm")
    runs = []
    for _ in range(2):
        tensors, idx, kw, dout, dlse = make_problem(case)
        runs.append(run_op(tensors, idx, kw, dout, dlse))
    (o1, l1, g1), (o2, l2, g2) = runs
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_strided_index_vectors_masks_and_grads_and_int32():
    # Views with strides for every vector argument, an expanded dout, int32 indices: same result as
    # contiguous int64 inputs.
    from _util import make_problem

    case = Case(B=4, P=7, T=3, Hkv=2, causal=True, plens=True, mask="kv_lens")
    tensors, idx, kw, dout, _ = make_problem(case)
    base = ptv2_fast_call(tensors, idx, kw, dout)
    strided = {
        "prefix_lens": torch.stack([kw["prefix_lens"], kw["prefix_lens"]], 1)[:, 0],
        "kv_lens": torch.stack([kw["kv_lens"].int(), kw["kv_lens"].int()], 1)[:, 1],
        "causal": True,
    }
    sidx = torch.stack([idx.int(), idx.int()], 1)[:, 1]
    assert not any(x.is_contiguous() for x in (strided["prefix_lens"], strided["kv_lens"], sidx))
    got = ptv2_fast_call(tensors, sidx, strided, dout)
    for a, b in zip(got, base):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A strided key_padding_mask and a stride-0 (expanded) dout.
    kpm = torch.rand(case.B, 2 * case.S, generator=torch.Generator().manual_seed(0)) > 0.3
    kpm_view, kpm_dense = kpm.to(DEVICE)[:, ::2], kpm.to(DEVICE)[:, ::2].contiguous()
    dexp = dout[:, :1].expand_as(dout)
    a = ptv2_fast_call(tensors, idx, {"key_padding_mask": kpm_view}, dexp)
    b = ptv2_fast_call(tensors, idx, {"key_padding_mask": kpm_dense}, dexp.contiguous())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def ptv2_fast_call(tensors, idx, kw, dout):
    from ptv2_fast import prefix_attention

    out = prefix_attention(*tensors, idx, backend="triton", **kw)
    return (out,) + torch.autograd.grad(out, tensors, dout)


def test_prefix_row_splits_match(monkeypatch):
    # The split-over-rows path of the prefix-gradient kernel (used on GPUs) equals the single-split path.
    from _util import make_problem, run_op

    case = Case(B=5, P=7, T=2, Hkv=2, mask="kv_lens")
    tensors, idx, kw, dout, dlse = make_problem(case)
    _, _, g1 = run_op(tensors, idx, kw, dout, dlse)
    monkeypatch.setenv("PTV2_FAST_PREFIX_SPLITS", "3")
    _, _, g3 = run_op(tensors, idx, kw, dout, dlse)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


class _Allocations:
    """Records the shape of every tensor produced by an aten op called (directly) inside the block."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        shapes = self.shapes = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        shapes.append(tuple(t.shape))
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _expanded_buffers(shapes, case):
    B, Hkv, P, S, D = case.B, case.Hkv, case.P, case.S, case.D
    bad = []
    for shape in shapes:
        if len(shape) == 4 and shape[-1] == D and shape[2] in (P, P + S) and shape[0] == B:
            bad.append(shape)  # concatenated K/V, or a per-row copy of the prefix or of its gradient
        elif len(shape) >= 4 and P in shape and torch.Size(shape).numel() >= B * Hkv * P * D:
            bad.append(shape)  # a prefix buffer as large as a B-fold copy
    return bad


@pytest.mark.parametrize("with_dropout", [False, True])
def test_no_concatenation_and_no_batch_expanded_prefix_buffer(with_dropout):
    # Every tensor the Triton launchers allocate in forward and backward, recorded: none may hold the
    # concatenated keys/values or a per-row (B-fold) copy of the prefix or of its gradient. The same
    # recorder run on the reference backend, which does concatenate, shows the check can fail.
    from ptv2_fast.kernels import prefix_attention_bwd, prefix_attention_fwd
    from ptv2_fast.ops.backends import ref_fwd

    from _util import make_problem

    case = Case(B=6, Hq=4, Hkv=2, L=13, S=19, P=11, T=3, D=32, causal=True, mask="kv_lens")
    (q, k, v, pk, pv), idx, kw, dout, dlse = make_problem(case)
    q, k, v, pk, pv = (x.detach() for x in (q, k, v, pk, pv))
    args = (idx, None, kw["kv_lens"], None, True, case.D ** -0.5, 0.1 if with_dropout else 0.0, 3, 4)
    with _Allocations() as rec:
        out, lse = prefix_attention_fwd(q, k, v, pk, pv, *args[:-5], *args[-5:])
        prefix_attention_bwd(dout, dlse, q, k, v, pk, pv, *args[:4], out, lse, *args[4:])
    assert len(rec.shapes) >= 6, rec.shapes
    assert _expanded_buffers(rec.shapes, case) == []
    with _Allocations() as ref:
        ref_fwd(q, k, v, pk, pv, *args)
    assert _expanded_buffers(ref.shapes, case), "the recorder failed to see the reference's concatenation"
