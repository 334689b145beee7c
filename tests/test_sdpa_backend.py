"""backend="sdpa": the sequence part through PyTorch's fused attention kernels, the prefix through ours, merged
exactly. The fp64-reference matrix of DESIGN.md §5 (out, lse, all five gradients) on the CPU, with the loss
through out only (the vendor backward runs) and through lse too (the fused backward runs), the merge step's own
contract, what a call launches, opcheck and torch.compile; GPU-marked: the same matrix on CUDA."""

import os

import pytest
import torch
from test_cpp_extension import P_DROP, _cpp_mask
from test_prefix_attention import BASE_CASES, LARGE_CASES

import ptv2_fast
from ptv2_fast import _ext
from ptv2_fast.ops import sdpa
from ptv2_fast.ops.backends import BackendUnavailable
from ptv2_fast.reference import prefix_attention_ref

from _util import Case, check_case, make_problem, run_op

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# the CPU tests need the C++ extension (the prefix part on the CPU); the GPU tests need only Triton
needs_ext = pytest.mark.skipif(not _ext.load(), reason=f"extension unavailable: {_ext.status()['error']}")

CASES = [pytest.param(c, id=c.id()) for c in (Case(**{**b.__dict__, "dtype": dt})
                                               for dt in (F32, F16, BF16) for b in BASE_CASES)]


@needs_ext
@pytest.mark.parametrize("case", CASES)
def test_matches_fp64_reference_through_the_vendor_backward(case, poisoned_outputs):
    # loss through out only: the vendor backward runs with the merged statistics
    check_case(case, device="cpu", backend="sdpa", lse_grad=False)


@needs_ext
@pytest.mark.parametrize("case", CASES)
def test_matches_fp64_reference_with_a_gradient_through_lse(case, poisoned_outputs):
    # no vendor backward takes dlse: the fused backward runs, with the same merged statistics
    check_case(case, device="cpu", backend="sdpa")


@needs_ext
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in LARGE_CASES]
                         + [pytest.param(Case(**{**LARGE_CASES[1].__dict__, "dtype": BF16}), id="large-bf16")])
def test_large_shapes_match_fp64_reference(case, poisoned_outputs):
    check_case(case, device="cpu", backend="sdpa", lse_grad=False)


@needs_ext
@pytest.mark.parametrize("case", [
    pytest.param(Case(P=7, T=3, Hkv=2, causal=True, mask="kv_lens", plens=True), id="gqa-causal-kvlens"),
    pytest.param(Case(B=3, Hq=4, Hkv=2, L=70, S=150, P=20, T=2, D=32, causal=True, mask="kpm", dtype=BF16),
                 id="several-tiles-bf16"),
])
def test_dropout_runs_the_fused_kernel_with_its_mask(case, poisoned_outputs):
    # PyTorch's CPU flash kernel has no dropout: with dropout the op runs on the C++ kernel, and its mask
    # (replayed in backward) is the one the C++ mask view reports.
    q = make_problem(case, "cpu")[0][0]
    assert sdpa.sequence_kernel(q, q, dropout_p=P_DROP) == "fused:cpp"
    check_case(case, device="cpu", backend="sdpa", dropout_p=P_DROP, keep=_cpp_mask(case, 5), torch_seed=5,
               lse_grad=False)


@needs_ext
def test_sequence_kernel_names_what_runs():
    q = torch.randn(2, 4, 5, 32)
    k = torch.randn(2, 2, 7, 32)
    assert sdpa.sequence_kernel(q, k) == "cpu_flash"
    assert sdpa.sequence_kernel(q.bfloat16(), k.bfloat16(), kv_lens=torch.tensor([3, 7]), causal=True) == "cpu_flash"
    assert sdpa.sequence_kernel(q.half(), k.half()) == "fused:cpp"  # see the module docstring
    assert sdpa.sequence_kernel(q, k, dropout_p=0.1) == "fused:cpp"
    assert sdpa.sequence_kernel(q, k[:, :, :0]) == "fused:cpp"  # the CPU kernel dies (SIGFPE) on S = 0
    assert sdpa.sequence_kernel(q[:, :, :0], k) == "fused:cpp"


@needs_ext
@pytest.mark.parametrize("S, L", [(0, 5), (7, 0)])
def test_empty_sequence_or_queries(S, L):
    # the vendor CPU kernel kills the process on an empty axis: these must never reach it
    case = Case(B=2, Hq=4, Hkv=2, L=max(L, 1), S=max(S, 1), P=3, T=2, D=16)
    (q, k, v, pk, pv), idx, kw, _, _ = make_problem(case, "cpu")
    q, k, v = q.detach()[:, :, :L], k.detach()[:, :, :S], v.detach()[:, :, :S]
    out, lse = ptv2_fast.prefix_attention(q, k, v, pk.detach(), pv.detach(), idx, backend="sdpa", return_lse=True)
    ref, ref_lse = prefix_attention_ref(q, k, v, pk.detach(), pv.detach(), idx, return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@needs_ext
def test_float64_is_refused_with_a_pointer_to_the_reference():
    tensors, idx, kw, _, _ = make_problem(Case(dtype=torch.float64), "cpu")
    with pytest.raises(BackendUnavailable, match="backend='reference'"):
        ptv2_fast.prefix_attention(*tensors, idx, backend="sdpa", **kw)


# --- the merge step alone: the C++ op started from a sequence part's (out, lse) -------------------------------

@needs_ext
@pytest.mark.parametrize("case", [
    pytest.param(Case(P=7, T=3, Hkv=2, L=29, S=17, causal=True, mask="kv_lens", plens=True), id="causal-L>S-kvlens"),
    pytest.param(Case(P=0, T=1, mask="kpm"), id="P0-kpm"),
    pytest.param(Case(P=5, T=3, mask="kpm", layout="blhd", dtype=BF16), id="kpm-blhd-bf16"),
])
def test_merge_ignores_whatever_a_vendor_wrote_in_rows_without_sequence_keys(case):
    (q, k, v, pk, pv), idx, kw, _, _ = make_problem(case, "cpu")
    q, k, v, pk, pv = (x.detach() for x in (q, k, v, pk, pv))
    scale = case.D ** -0.5
    kvl, kpm = kw.get("kv_lens"), kw.get("key_padding_mask")
    empty_bank = pk[:, :, :0]
    o_s, lse_s = prefix_attention_ref(q, k, v, empty_bank, empty_bank, idx, kv_lens=kvl, key_padding_mask=kpm,
                                      causal=case.causal, return_lse=True, compute_dtype=torch.float64)
    blind = torch.isinf(lse_s)
    assert blind.any()  # the case has rows that see no sequence key
    out = torch.empty_like(q)
    out.copy_(torch.where(blind[..., None], float("nan"), o_s))
    seq_lse = torch.where(blind, 0.0, lse_s).float().transpose(1, 2).contiguous().transpose(1, 2)  # any strides
    lse = torch.ops.ptv2_fast.prefix_attention_merge_fwd(q, k, v, pk, pv, idx, kw.get("prefix_lens"), kvl, kpm,
                                                         case.causal, scale, out, seq_lse)
    ref, ref_lse = prefix_attention_ref(q, k, v, pk, pv, idx, prefix_lens=kw.get("prefix_lens"), kv_lens=kvl,
                                        key_padding_mask=kpm, causal=case.causal, return_lse=True,
                                        compute_dtype=torch.float64)
    tol = {F32: 1e-5, BF16: 2e-2}[case.dtype]
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-5)


@needs_ext
def test_merge_backward_adds_into_dq():
    case = Case(P=7, T=3, Hkv=2, mask="kv_lens")
    (q, k, v, pk, pv), idx, kw, dout, _ = make_problem(case, "cpu")
    q, k, v, pk, pv = (x.detach() for x in (q, k, v, pk, pv))
    out, lse = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="cpp", return_lse=True, **kw)
    scale = case.D ** -0.5
    dq0 = torch.randn_like(q)
    dq = dq0.clone()
    dpk, dpv = torch.ops.ptv2_fast.prefix_attention_merge_bwd(dout, q, k, v, pk, pv, idx, None, out, lse, scale, dq)
    # the prefix part alone: the fused backward with no visible sequence key gives the prefix's dq and dbank
    none = torch.zeros_like(kw["kv_lens"])
    dq_p, _, _, dpk_t, dpv_t = torch.ops.ptv2_fast.prefix_attention_bwd(dout, None, q, k, v, pk, pv, idx, None, none,
                                                                         None, out, lse, False, scale)
    torch.testing.assert_close(dq, dq0 + dq_p)
    torch.testing.assert_close(dpk, dpk_t)
    torch.testing.assert_close(dpv, dpv_t)


# --- what a call costs ---------------------------------------------------------------------------------------

def _counts(fn):
    from ptv2_fast.benchmarks.host import count_device_work

    with count_device_work() as c:
        fn()
    return dict(c["aten"])


@needs_ext
def test_one_vendor_call_and_one_merge_each_way():
    # Hugging Face's layout ([B, L, H, D] memory), which the CPU kernel's outputs and gradients have: no copies
    case = Case(B=2, Hq=4, Hkv=2, L=17, S=29, P=7, T=3, D=32, causal=True, mask="kv_lens", layout="blhd")
    tensors, idx, kw, dout, _ = make_problem(case, "cpu")
    ptv2_fast.prefix_attention(*tensors, idx, backend="sdpa", **kw)  # builds (and caches) the padding bias
    fwd = _counts(lambda: ptv2_fast.prefix_attention(*tensors, idx, backend="sdpa", **kw))
    assert fwd == {"_scaled_dot_product_flash_attention_for_cpu": 1, "prefix_attention_merge_fwd": 1}, fwd
    out = ptv2_fast.prefix_attention(*tensors, idx, backend="sdpa", **kw)
    bwd = _counts(lambda: torch.autograd.grad(out, tensors, dout))
    assert bwd == {"nan_to_num": 1, "_scaled_dot_product_flash_attention_for_cpu_backward": 1,
                   "prefix_attention_merge_bwd": 1}, bwd


@needs_ext
def test_padding_bias_is_built_once_per_padding_tensor():
    case = Case(B=2, Hq=4, L=9, S=11, P=3, T=1, D=16, mask="kpm", causal=True)
    (q, k, v, pk, pv), idx, kw, _, _ = make_problem(case, "cpu")
    kpm = kw["key_padding_mask"]
    first = sdpa._bias(q, 11, None, kpm, True)[0]
    assert sdpa._bias(q, 11, None, kpm, True)[0] is first
    kpm[1, 0] = not kpm[1, 0]  # an in-place change is seen (the tensor's version moves)
    assert sdpa._bias(q, 11, None, kpm, True)[0] is not first


# --- torch.library / torch.compile ---------------------------------------------------------------------------

def _sample():
    (q, k, v, pk, pv), idx, kw, _, _ = make_problem(Case(B=2, Hq=4, Hkv=2, L=5, S=7, P=3, T=3, D=16, causal=True,
                                                         mask="kv_lens", plens=True), "cpu")
    return (q, k, v, pk, pv, idx, kw["prefix_lens"], kw["kv_lens"], None, True, 0.25, 0.0, None, "sdpa")


@needs_ext
def test_opcheck():
    torch.library.opcheck(torch.ops.ptv2_fast.prefix_attention.default, _sample())


@needs_ext
def test_opcheck_backward_op():
    q, k, v, pk, pv, idx, plens, kvl, kpm, causal, scale, p, key, backend = _sample()
    out, lse = torch.ops.ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, plens, kvl, kpm, causal, scale, p, key,
                                                    backend)
    for dlse in (None, torch.randn_like(lse)):
        args = (torch.randn_like(out), dlse, q.detach(), k.detach(), v.detach(), pk.detach(), pv.detach(), idx,
                plens, kvl, kpm, out.detach(), lse.detach(), causal, scale, p, key, backend)
        torch.library.opcheck(torch.ops.ptv2_fast.prefix_attention_backward.default, args)


@needs_ext
def test_torch_compile_fullgraph_matches_eager():
    tensors, idx, kw, dout, _ = make_problem(Case(P=7, T=3, Hkv=2, mask="kpm", causal=True), "cpu")

    def f(q, k, v, pk, pv):
        return ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="sdpa", **kw)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    eager = f(*tensors)
    torch.testing.assert_close(compiled(*tensors), eager, rtol=0, atol=0)
    g_e = torch.autograd.grad((eager * dout).sum(), tensors)
    g_c = torch.autograd.grad((compiled(*tensors) * dout).sum(), tensors)
    for a, b in zip(g_e, g_c):  # the compiled graph hands the vendor backward dout in its own layout
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- the CUDA vendor calls: argument plumbing checked on meta tensors here, numbers on a GPU --------------------

@needs_ext
@pytest.mark.parametrize("kernel, dtype, pad", [("flash", BF16, None), ("efficient", F32, "kv_lens"),
                                                ("efficient", F16, "kpm")])
def test_cuda_vendor_calls_have_the_right_arguments(kernel, dtype, pad):
    B, H, L, S, D = 2, 4, 5, 37, 64
    q = torch.empty(B, L, H, D, device="meta", dtype=dtype).transpose(1, 2)  # Hugging Face's layout
    k = torch.empty(B, S, H, D, device="meta", dtype=dtype).transpose(1, 2)
    kvl = torch.tensor([3, 37], device="meta") if pad == "kv_lens" else None
    kpm = torch.ones(B, S, dtype=torch.bool, device="meta") if pad == "kpm" else None
    out, lse = sdpa._cuda_sequence_fwd(kernel, q, k, k, kvl, kpm, True, 0.125)
    assert out.shape == q.shape and lse.shape == (B, H, L) and lse.dtype == F32
    dq, dk, dv = sdpa._cuda_sequence_bwd(kernel, torch.empty_like(q), q, k, k, kvl, kpm, out, lse.contiguous(), True,
                                         0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_gpu_matches_fp64_reference(case, poisoned_outputs):
    check_case(case, device="cuda", backend="sdpa", lse_grad=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_gpu_vendor_kernel_choice(dtype):
    case = Case(B=2, Hq=4, Hkv=4, L=64, S=80, P=7, T=3, D=64, causal=True, dtype=dtype)
    tensors, idx, kw, dout, _ = make_problem(case, "cuda")
    expected = "flash" if dtype != F32 else "efficient"
    assert sdpa.sequence_kernel(tensors[0], tensors[1], causal=True) == expected
    out, lse, grads = run_op(tensors, idx, kw, dout, None, backend="sdpa")
    assert not out.isnan().any() and all(not g.isnan().any() for g in grads)


@needs_ext
def test_auto_follows_the_one_rule_table():
    from ptv2_fast.ops import backends

    for rule in backends.AUTO_RULES:
        assert set(rule.backends) <= set(backends.BACKENDS) - {"auto"} and rule.evidence
    for dt in (F32, BF16, F16):
        assert ptv2_fast.resolve_backend("auto", "cpu", dt) == backends.auto_rule("cpu", dt).backends[0] == "cpp"
    assert ptv2_fast.resolve_backend("auto", "cpu", BF16, grad=False) == "cpp"
    assert ptv2_fast.resolve_backend("auto", "cpu", torch.float64) == "reference"
    assert backends.auto_rule("cuda", BF16).backends[0] == "triton"  # until a GPU run has measured sdpa
    assert backends.auto_rule("mps", F32).backends == ("reference",)


@needs_ext
def test_a_rule_can_hold_for_inference_only(monkeypatch):
    from ptv2_fast.benchmarks.host import count_device_work
    from ptv2_fast.ops import backends

    rows = (backends.AutoRule("cpu", (BF16,), ("sdpa", "cpp"), "test row", grad=False), *backends.AUTO_RULES)
    monkeypatch.setattr(backends, "AUTO_RULES", rows)
    monkeypatch.setattr(backends, "_auto_rules", {})
    tensors, idx, kw, dout, _ = make_problem(Case(P=7, T=3, Hkv=2, mask="kv_lens", dtype=BF16), "cpu")
    with torch.no_grad(), count_device_work() as c:
        ptv2_fast.prefix_attention(*tensors, idx, **kw)  # inference: the sdpa row
    assert c["aten"].get("_scaled_dot_product_flash_attention_for_cpu") == 1, c["aten"]
    with count_device_work() as c:
        ptv2_fast.prefix_attention(*tensors, idx, **kw)  # differentiable: the next row, the fused C++ kernel
    assert c["aten"].get("prefix_attention_fwd") == 1, c["aten"]


@needs_ext
@pytest.mark.parametrize("case", [
    pytest.param(Case(P=7, T=3, Hkv=4, Hq=4, L=29, S=17, causal=True, mask="kv_lens", plens=True),
                 id="causal-L>S-kvlens"),
    pytest.param(Case(P=5, T=3, Hkv=4, Hq=4, mask="kpm", layout="blhd"), id="kpm-blhd"),
])
def test_cuda_path_through_the_triton_merge_kernels(case, monkeypatch, poisoned_outputs):
    # The CUDA branch of the backend (vendor sequence part, then the Triton merge kernels), on the CPU: the
    # vendor calls are stood in by the CPU flash kernel, Triton runs in its interpreter (GPU: the real thing).
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs Triton's interpreter on CPU tensors (machines without a GPU); a GPU runs the real path")

    def seq_fwd(kernel, q, k, v, kv_lens, kpm, causal, scale):
        bias, is_causal = sdpa._bias(q, k.shape[2], kv_lens, kpm, causal)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=bias,
                                                                         scale=scale)

    def seq_bwd(kernel, dout, q, k, v, kv_lens, kpm, out, lse, causal, scale):
        bias, is_causal = sdpa._bias(q, k.shape[2], kv_lens, kpm, causal)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=bias, scale=scale)

    monkeypatch.setattr(sdpa, "sequence_kernel", lambda *a, **k: "efficient")
    monkeypatch.setattr(sdpa, "_cuda_sequence_fwd", seq_fwd)
    monkeypatch.setattr(sdpa, "_cuda_sequence_bwd", seq_bwd)
    check_case(case, device="cpu", backend="sdpa", lse_grad=False)
