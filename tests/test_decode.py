"""``prefix_decode_attention``: the mixed-task decode op (C++ CPU kernel here, the CUDA kernel on a GPU)
against its fp64 concatenating reference, with the error rule of DESIGN.md §5; paged caches, split-KV,
GQA, per-task prefix lengths, and bad inputs."""

import dataclasses
import zlib

import pytest
import torch

import ptv2_fast
from ptv2_fast import _ext
from ptv2_fast.reference import prefix_decode_attention_ref

from _util import FLOOR, assert_rule

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
HAS_EXT = _ext.load()


@dataclasses.dataclass(frozen=True)
class DCase:
    B: int = 5
    Hq: int = 8
    Hkv: int = 2
    Lq: int = 1
    S: int = 70  # cache capacity per row
    P: int = 7
    T: int = 3
    D: int = 64
    page: int = 0  # page size (0: contiguous cache)
    splits: int = 1
    causal: bool = True
    plens: bool = False
    dtype: torch.dtype = F32

    def id(self):
        return (f"B{self.B}-H{self.Hq}x{self.Hkv}-Lq{self.Lq}-S{self.S}-P{self.P}-T{self.T}-D{self.D}-pg{self.page}"
                f"-sp{self.splits}{'-causal' if self.causal else ''}{'-plens' if self.plens else ''}-"
                f"{str(self.dtype).replace('torch.', '')}")


def make_decode(c: DCase, device):
    g = torch.Generator().manual_seed(zlib.crc32(c.id().encode()))
    rnd = lambda *s: torch.randn(*s, generator=g).to(c.dtype)  # noqa: E731
    q = rnd(c.B, c.Hq, c.Lq, c.D)
    k, v = rnd(c.B, c.Hkv, c.S, c.D), rnd(c.B, c.Hkv, c.S, c.D)
    pk, pv = rnd(c.T, c.Hkv, c.P, c.D), rnd(c.T, c.Hkv, c.P, c.D)
    seqlens = torch.randint(c.Lq, c.S + 1, (c.B,), generator=g)
    seqlens[0] = c.S
    if c.B > 2:
        seqlens[1] = 0  # an empty cache: the row sees its prefix only (or nothing with P = 0)
    idx = torch.randint(0, c.T, (c.B,), generator=g)
    plens = torch.randint(0, c.P + 1, (c.T,), generator=g) if c.plens else None
    page_table = None
    if c.page:
        n = c.S // c.page
        # scatter the rows' pages over a shuffled pool (plus spare pages nobody uses)
        perm = torch.randperm(c.B * n + 3, generator=g)
        page_table = perm[: c.B * n].view(c.B, n).int()
        kp = rnd(c.B * n + 3, c.Hkv, c.page, c.D)
        vp = rnd(c.B * n + 3, c.Hkv, c.page, c.D)
        for b in range(c.B):
            for i in range(n):
                kp[page_table[b, i]] = k[b, :, i * c.page:(i + 1) * c.page]
                vp[page_table[b, i]] = v[b, :, i * c.page:(i + 1) * c.page]
        k, v = kp, vp
        page_table = page_table.to(device)
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return (to(q), to(k), to(v), to(seqlens), to(pk), to(pv), to(idx)), {"prefix_lens": to(plens),
                                                                          "page_table": page_table}


def check_decode(c: DCase, device, backend):
    args, kw = make_decode(c, device)
    out, lse = ptv2_fast.prefix_decode_attention(*args, **kw, causal=c.causal, num_splits=c.splits,
                                                 return_lse=True, backend=backend)
    t_out, t_lse = prefix_decode_attention_ref(*[a.double() if a.is_floating_point() else a for a in args], **kw,
                                               causal=c.causal, return_lse=True)
    n_out, n_lse = prefix_decode_attention_ref(*args, **kw, causal=c.causal, return_lse=True)
    assert out.dtype == c.dtype and out.shape == (c.B, c.Hq, c.Lq, c.D)
    assert lse.dtype == torch.float32
    assert_rule("out", out, t_out, n_out, c.dtype)
    assert_rule("lse", lse, t_lse, n_lse.float(), c.dtype)


BASE = [
    DCase(),
    DCase(Lq=4, T=3, plens=True, splits=3),
    DCase(Lq=16, Hq=4, Hkv=4, S=40, P=1, splits=2),
    DCase(Hq=32, Hkv=8, D=128, S=96, P=33, T=8, B=9, splits=5),  # the serving shape, scaled down
    DCase(Hq=6, Hkv=1, D=80, P=0, T=1, causal=False),             # MQA, no prefix, odd head dim
    DCase(page=16, S=64, splits=4, plens=True),
    DCase(page=7, S=63, Lq=3, Hq=9, Hkv=3, D=64, splits=1),
    DCase(B=3, Lq=2, S=130, P=64, T=2, splits=16),                # more splits than some rows have keys
]
CASES = [pytest.param(dataclasses.replace(b, dtype=dt), id=dataclasses.replace(b, dtype=dt).id())
         for dt in (F32, F16, BF16) for b in BASE]


@pytest.mark.skipif(not HAS_EXT, reason="extension unavailable")
@pytest.mark.parametrize("case", CASES)
def test_cpu_kernel_matches_fp64_reference(case, poisoned_outputs):
    check_decode(case, "cpu", "cpp")


@pytest.mark.parametrize("case", CASES[:3])
def test_reference_backend(case):
    check_decode(case, "cpu", "reference")


@pytest.mark.skipif(not HAS_EXT, reason="extension unavailable")
def test_split_count_does_not_change_the_result():
    c = DCase(Lq=3, S=200, P=40, plens=True)
    args, kw = make_decode(c, "cpu")
    outs = [ptv2_fast.prefix_decode_attention(*args, **kw, num_splits=s, return_lse=True) for s in (1, 2, 7, 64)]
    for o, lse in outs[1:]:
        torch.testing.assert_close(o, outs[0][0], atol=FLOOR[F32] * 10, rtol=1e-5)
        torch.testing.assert_close(lse, outs[0][1], atol=FLOOR[F32] * 10, rtol=1e-5)


def test_decode_equals_prefix_attention_on_the_last_tokens():
    # Decode of the last Lq tokens = prefix_attention over the full (unpadded) rows, restricted to those rows.
    c = DCase(B=2, Lq=4, S=30, causal=True)
    (q, k, v, seqlens, pk, pv, idx), kw = make_decode(c, "cpu")
    seqlens = torch.full_like(seqlens, c.S)
    out = ptv2_fast.prefix_decode_attention(q, k, v, seqlens, pk, pv, idx)
    full = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, causal=True, backend="reference")
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if c.values[0].D in (64, 128)])
def test_cuda_kernel_matches_fp64_reference(case):
    check_decode(case, "cuda", "cuda")


def _call(**over):
    c = DCase()
    (q, k, v, seqlens, pk, pv, idx), kw = make_decode(c, "cpu")
    a = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=seqlens, prefix_k=pk, prefix_v=pv, prefix_index=idx, **kw)
    a.update(over)
    return ptv2_fast.prefix_decode_attention(**a)


@pytest.mark.parametrize("over, exc, match", [
    (dict(q=torch.randn(5, 8, 17, 64)), ValueError, "1 to 16 new tokens"),
    (dict(q=torch.randn(5, 8, 1, 64, dtype=torch.float64)), TypeError, "has dtype"),
    (dict(q=torch.randn(5, 7, 1, 64)), ValueError, "not a multiple"),
    (dict(cache_seqlens=torch.full((5,), 71)), ValueError, "cache_seqlens has values outside"),
    (dict(cache_seqlens=torch.zeros(4, dtype=torch.long)), ValueError, "cache_seqlens must have shape"),
    (dict(prefix_index=torch.full((5,), 3)), ValueError, "prefix_index has values outside"),
    (dict(prefix_index=None), ValueError, "prefix_index is None"),
    (dict(page_table=torch.zeros(5, 2, dtype=torch.int64)), TypeError, "page_table must be an int32"),
    (dict(k_cache=torch.randn(4, 2, 70, 64), v_cache=torch.randn(4, 2, 70, 64)), ValueError, "k_cache must be"),
    (dict(num_splits=-1), ValueError, "num_splits"),
    (dict(backend="triton"), ValueError, "backend must be one of"),
    (dict(scale=0.0), ValueError, "scale must be"),
])
def test_bad_inputs_raise_clear_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


@pytest.mark.skipif(not HAS_EXT, reason="extension unavailable")
def test_cpp_op_checks_its_inputs_too():
    c = DCase()
    (q, k, v, seqlens, pk, pv, idx), kw = make_decode(c, "cpu")
    op = torch.ops.ptv2_fast.prefix_decode_attention
    with pytest.raises(RuntimeError, match="cache_seqlens has value"):
        op(q, k, v, torch.full_like(seqlens, 99), pk, pv, idx, None, None, True, 0.1, 1)
    with pytest.raises(RuntimeError, match="page_table has value"):
        op(q, k, v, seqlens, pk, pv, idx, None, torch.full((5, 2), 99, dtype=torch.int32), True, 0.1, 1)
    with pytest.raises(RuntimeError, match="new tokens"):
        op(torch.randn(5, 8, 17, 64), k, v, seqlens, pk, pv, idx, None, None, True, 0.1, 1)
    torch.library.opcheck(op.default, (q, k, v, seqlens, pk, pv, idx, None, None, True, 0.1, 3))


@pytest.mark.skipif(not HAS_EXT, reason="extension unavailable")
def test_empty_batch_returns_empty_outputs():
    c = DCase()
    (q, k, v, seqlens, pk, pv, idx), kw = make_decode(c, "cpu")
    out, lse = ptv2_fast.prefix_decode_attention(q[:0], k[:0], v[:0], seqlens[:0], pk, pv, idx[:0], return_lse=True)
    assert out.shape == (0, c.Hq, c.Lq, c.D) and lse.shape == (0, c.Hq, c.Lq)


def test_explicit_cuda_backend_on_cpu_tensors_is_refused():
    with pytest.raises(ptv2_fast.BackendUnavailable, match="cannot run"):
        _call(backend="cuda")


@pytest.mark.gpu
def test_cuda_kernel_refuses_unsupported_head_dims():
    c = DCase(D=80)
    args, kw = make_decode(c, "cuda")
    with pytest.raises(ptv2_fast.BackendUnavailable, match="head dim"):
        ptv2_fast.prefix_decode_attention(*args, **kw, backend="cuda")
    with pytest.raises(RuntimeError, match="head dims 64 and 128"):
        torch.ops.ptv2_fast.prefix_decode_attention(*args, None, None, True, 0.1, 0)


def test_decode_names_cache_seqlens_and_refuses_integer_tensors():
    # issue 18 item 12: a bad cache_seqlens was reported as kv_lens; int32 q/k/v were accepted
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 1, 16, generator=g)
    kc, vc = torch.randn(2, 2, 6, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g)
    pk, pv = torch.randn(1, 2, 3, 16, generator=g), torch.randn(1, 2, 3, 16, generator=g)
    with pytest.raises(ValueError, match="cache_seqlens has values outside"):
        ptv2_fast.prefix_decode_attention(q, kc, vc, torch.tensor([6, 9]), pk, pv)
    as_int = [x.to(torch.int32) for x in (q, kc, vc, pk, pv)]
    with pytest.raises(TypeError, match="q has unsupported dtype torch.int32"):
        ptv2_fast.prefix_decode_attention(as_int[0], as_int[1], as_int[2], torch.tensor([6, 6]), as_int[3], as_int[4])
