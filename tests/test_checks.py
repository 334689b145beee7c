"""Every bad input of DESIGN.md §3 raises a clear exception naming the argument, before any kernel runs."""

import pytest
import torch

import ptv2_fast
from ptv2_fast import BackendUnavailable

B, HQ, HKV, L, S, P, T, D = 2, 4, 2, 5, 6, 3, 3, 16


def _args(**over):
    g = torch.Generator().manual_seed(0)
    a = {
        "q": torch.randn(B, HQ, L, D, generator=g), "k": torch.randn(B, HKV, S, D, generator=g),
        "v": torch.randn(B, HKV, S, D, generator=g), "prefix_k": torch.randn(T, HKV, P, D, generator=g),
        "prefix_v": torch.randn(T, HKV, P, D, generator=g), "prefix_index": torch.tensor([0, 2]),
    }
    a.update(over)
    return a


def _call(backend="triton", **over):
    # On the test device (the GPU when there is one); tensors placed elsewhere on purpose (meta) stay there.
    from _util import DEVICE

    a = {n: x.to(DEVICE) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x
         for n, x in _args(**over).items()}
    pos = [a.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v", "prefix_index")]
    return ptv2_fast.prefix_attention(*pos, backend=backend, **a)


BAD = [
    ("k batch", dict(k=torch.randn(B + 1, HKV, S, D), v=torch.randn(B + 1, HKV, S, D)), ValueError, "batch"),
    ("k head dim", dict(k=torch.randn(B, HKV, S, D + 1), v=torch.randn(B, HKV, S, D + 1)), ValueError, "head dim"),
    ("v shape", dict(v=torch.randn(B, HKV, S + 1, D)), ValueError, "v has shape"),
    ("Hq % Hkv", dict(k=torch.randn(B, 3, S, D), v=torch.randn(B, 3, S, D)), ValueError, "Hq % Hkv"),
    ("prefix heads", dict(prefix_k=torch.randn(T, 1, P, D), prefix_v=torch.randn(T, 1, P, D)),
     ValueError, "prefix_k has 1 heads"),
    ("prefix dim", dict(prefix_k=torch.randn(T, HKV, P, 32), prefix_v=torch.randn(T, HKV, P, 32)),
     ValueError, "prefix_k has head dim"),
    ("prefix_v shape", dict(prefix_v=torch.randn(T, HKV, P + 1, D)), ValueError, "prefix_v has shape"),
    ("q rank", dict(q=torch.randn(B, L, D)), ValueError, "q must be 4-D"),
    ("bank rank", dict(prefix_k=torch.randn(P, D), prefix_v=torch.randn(P, D)), ValueError, "prefix_k must be"),
    ("dtype mismatch", dict(k=torch.randn(B, HKV, S, D, dtype=torch.float16)), TypeError, "k has dtype"),
    ("int q", dict(q=torch.ones(B, HQ, L, D, dtype=torch.int32)), TypeError, "unsupported dtype"),
    ("device mismatch", dict(k=torch.randn(B, HKV, S, D, device="meta")), ValueError, "k is on meta"),
    ("head dim too small", dict(q=torch.randn(B, HQ, L, 8), k=torch.randn(B, HKV, S, 8), v=torch.randn(B, HKV, S, 8),
                                prefix_k=torch.randn(T, HKV, P, 8), prefix_v=torch.randn(T, HKV, P, 8)), ValueError, "D=8"),
    ("head dim too large", dict(q=torch.randn(1, 2, 1, 272), k=torch.randn(1, 2, 1, 272), v=torch.randn(1, 2, 1, 272),
                                prefix_k=torch.randn(T, 2, 1, 272), prefix_v=torch.randn(T, 2, 1, 272),
                                prefix_index=torch.tensor([0])), ValueError, "D=272"),
    ("prefix_index shape", dict(prefix_index=torch.tensor([0, 1, 2])), ValueError, "prefix_index must have shape"),
    ("prefix_index dtype", dict(prefix_index=torch.tensor([0.0, 1.0])), TypeError, "prefix_index must be int"),
    ("prefix_index type", dict(prefix_index=[0, 1]), TypeError, "prefix_index must be a torch.Tensor"),
    ("prefix_index negative", dict(prefix_index=torch.tensor([0, -1])), ValueError, "prefix_index has values outside"),
    ("prefix_index >= T", dict(prefix_index=torch.tensor([0, T])), ValueError, "prefix_index has values outside"),
    ("prefix_index None with T>1", dict(prefix_index=None), ValueError, "prefix_index is None"),
    ("prefix_lens > P", dict(prefix_lens=torch.tensor([P, P + 1, 0])), ValueError, "prefix_lens has values"),
    ("prefix_lens negative", dict(prefix_lens=torch.tensor([-1, 0, 0])), ValueError, "prefix_lens has values"),
    ("prefix_lens shape", dict(prefix_lens=torch.tensor([1, 1])), ValueError, "prefix_lens must have shape"),
    ("kv_lens > S", dict(kv_lens=torch.tensor([S + 1, 0])), ValueError, "kv_lens has values"),
    ("kv_lens negative", dict(kv_lens=torch.tensor([-2, 0])), ValueError, "kv_lens has values"),
    ("kv_lens shape", dict(kv_lens=torch.tensor([1])), ValueError, "kv_lens must have shape"),
    ("kv_lens and mask", dict(kv_lens=torch.tensor([1, 1]), key_padding_mask=torch.ones(B, S, dtype=torch.bool)),
     ValueError, "either kv_lens or key_padding_mask"),
    ("mask dtype", dict(key_padding_mask=torch.ones(B, S)), TypeError, "key_padding_mask must be bool"),
    ("mask shape", dict(key_padding_mask=torch.ones(B, S + 1, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    ("dropout 1", dict(dropout_p=1.0), ValueError, "dropout_p"),
    ("dropout negative", dict(dropout_p=-0.1), ValueError, "dropout_p"),
    ("scale", dict(scale=-1.0), ValueError, "scale"),
    ("kv_lens dtype", dict(kv_lens=torch.tensor([1.0, 2.0])), TypeError, "kv_lens must be int"),
    ("prefix_lens dtype", dict(prefix_lens=torch.tensor([1.0, 2.0, 0.0])), TypeError, "prefix_lens must be int"),
    ("prefix_index device", dict(prefix_index=torch.tensor([0, 1], device="meta")), ValueError, "prefix_index is on meta"),
    ("mask device", dict(key_padding_mask=torch.ones(B, S, dtype=torch.bool, device="meta")), ValueError,
     "key_padding_mask is on meta"),
    ("scale nan", dict(scale=float("nan")), ValueError, "scale"),
    ("scale inf", dict(scale=float("inf")), ValueError, "scale"),
    ("q not a tensor", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("backend name", dict(backend="flash"), ValueError, "backend must be one of"),
    ("cuda backend for prefix_attention", dict(backend="cuda"), BackendUnavailable, "decode kernel"),
]


@pytest.mark.parametrize("what,over,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(what, over, exc, msg):
    over = dict(over)
    backend = over.pop("backend", "triton")
    with pytest.raises(exc, match=msg):
        _call(backend=backend, **over)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    from ptv2_fast.ops import backends

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        backends.resolve("triton", torch.device("cpu"))
    from ptv2_fast import _ext

    assert backends.resolve("auto", torch.device("cpu")) == ("cpp" if _ext.load() else "reference")


def test_unchecked_input_is_clamped_inside_the_kernels():
    # Straight to the launcher, bypassing every check: out-of-range indices and lengths must be clamped,
    # never read outside a tensor; the result equals the reference on the clamped values.
    from ptv2_fast.kernels import prefix_attention_fwd
    from ptv2_fast.reference import prefix_attention_ref

    from _util import DEVICE

    a = {n: x.to(DEVICE) for n, x in _args(prefix_index=torch.tensor([7, -3])).items()}
    plens, kvl = torch.tensor([P + 5, -1, 2], device=DEVICE), torch.tensor([S + 9, -4], device=DEVICE)
    out, lse = prefix_attention_fwd(a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"], a["prefix_index"], plens,
                                    kvl, None, False, D ** -0.5, 0.0, 0, 0)
    ref, ref_lse = prefix_attention_ref(a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"],
                                        a["prefix_index"].clamp(0, T - 1), prefix_lens=plens.clamp(0, P),
                                        kv_lens=kvl.clamp(0, S), return_lse=True, compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)


def test_unchecked_input_is_clamped_in_the_backward_kernels_too():
    from ptv2_fast.kernels import prefix_attention_bwd, prefix_attention_fwd
    from ptv2_fast.ops.backends import ref_bwd

    from _util import DEVICE

    a = {n: x.to(DEVICE) for n, x in _args(prefix_index=torch.tensor([7, -3])).items()}
    plens, kvl = torch.tensor([P + 5, -1, 2], device=DEVICE), torch.tensor([S + 9, -4], device=DEVICE)
    tensors = [a[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    common = (False, D ** -0.5, 0.0, 0, 0)
    out, lse = prefix_attention_fwd(*tensors, a["prefix_index"], plens, kvl, None, *common)
    dout = torch.randn_like(out)
    got = prefix_attention_bwd(dout, None, *tensors, a["prefix_index"], plens, kvl, None, out, lse, *common)
    clamped = (a["prefix_index"].clamp(0, T - 1), plens.clamp(0, P), kvl.clamp(0, S))
    want = ref_bwd(dout, None, *tensors, *clamped, None, out, lse, *common)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_checks_run_before_values_are_used_on_any_backend():
    with pytest.raises(ValueError, match="prefix_index has values outside"):
        _call(backend="reference", prefix_index=torch.tensor([0, 9]))


def test_value_checks_are_cached_per_tensor_version_and_bounds():
    from ptv2_fast.ops import checks

    idx = torch.tensor([0, 2])
    checks.check_values(idx, None, None, T=3, P=4, S=5)
    assert getattr(idx, checks._TAG) == (idx._version, 0, 2, idx.data_ptr())
    import copy

    moved = copy.deepcopy(idx)
    moved[1] = 7  # a deep copy restarts at version 1 with the tag: the data pointer tells it apart
    with pytest.raises(ValueError, match="prefix_index"):
        checks.check_values(moved, None, None, T=3, P=4, S=5)
    idx[1] = 5  # an in-place change bumps the version: checked again, and caught
    with pytest.raises(ValueError, match="prefix_index"):
        checks.check_values(idx, None, None, T=3, P=4, S=5)
    ok = torch.tensor([0, 2])
    checks.check_values(ok, None, None, T=3, P=4, S=5)
    with pytest.raises(ValueError, match="prefix_index"):  # same tensor, smaller bank: checked again
        checks.check_values(ok, None, None, T=2, P=4, S=5)


def test_auto_warns_once_and_falls_back_when_triton_cannot_load(monkeypatch):
    from ptv2_fast.ops import backends

    def broken():
        raise BackendUnavailable("backend='triton' needs a working triton install (ImportError: no triton)")

    monkeypatch.setattr(backends, "_triton_kernels", broken)
    with pytest.warns(UserWarning, match="falls back to the concatenating reference"):
        assert backends.resolve("auto", torch.device("cuda")) == "reference"
    with pytest.raises(BackendUnavailable, match="no triton"):
        backends.resolve("triton", torch.device("cuda"))


def test_float64_on_cuda_goes_to_the_reference_and_is_refused_by_triton():
    # The Triton kernels do not compile for float64 on a GPU (seen on an H100, triton 3.6).
    from ptv2_fast.ops import backends

    assert backends.resolve("auto", torch.device("cuda"), torch.float64) == "reference"
    with pytest.raises(BackendUnavailable, match="float64"):
        backends.resolve("triton", torch.device("cuda"), torch.float64)


def test_rng_key_is_validated():
    a = _args()
    with pytest.raises(ValueError, match="rng_key must be an int64 CPU tensor"):
        torch.ops.ptv2_fast.prefix_attention(a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"], a["prefix_index"],
                                             None, None, None, False, 0.25, 0.1, torch.tensor([1, 2, 3]), "reference")
