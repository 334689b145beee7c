"""Shared test helpers: random problem instances, the op and reference runs, and the error rule of DESIGN.md §5."""

from __future__ import annotations

import dataclasses
import zlib

import torch

import ptv2_fast
from ptv2_fast.reference import prefix_attention_ref

# The device the suite runs on: the GPU when there is one, else the CPU with Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Absolute floor of the error rule, relative to the reference's magnitude: err <= 2 * err_naive + FLOOR * (1 + |ref|max)
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3, torch.float64: 1e-10}


@dataclasses.dataclass(frozen=True)
class Case:
    B: int = 3
    Hq: int = 4
    Hkv: int = 1
    L: int = 17
    S: int = 29
    P: int = 7
    T: int = 3
    D: int = 32
    causal: bool = False
    mask: str = "none"  # "none" | "kv_lens" | "kpm"
    plens: bool = False  # prefix_lens < P for some tasks
    layout: str = "bhld"  # "bhld" contiguous | "blhd": [B, L, H, D] tensors viewed as [B, H, L, D]
    bank3d: bool = False  # pass the bank as [Hkv, P, D] (T must be 1)
    dtype: torch.dtype = torch.float32

    def id(self) -> str:
        d = str(self.dtype).replace("torch.", "")
        return (f"B{self.B}-H{self.Hq}x{self.Hkv}-L{self.L}-S{self.S}-P{self.P}-T{self.T}-D{self.D}"
                f"{'-causal' if self.causal else ''}-{self.mask}{'-plens' if self.plens else ''}"
                f"-{self.layout}{'-bank3d' if self.bank3d else ''}-{d}")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "blhd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, L, H, D] memory
    return x.contiguous()


def make_problem(case: Case, device=DEVICE):
    """Fresh random inputs (seeded per case so a failure reproduces), with repeated and unused bank rows,
    fully padded rows and short prefixes where the case asks for them."""
    g = torch.Generator().manual_seed(zlib.crc32(case.id().encode()))
    dt = case.dtype

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dt)

    q = _layout(rnd(case.B, case.Hq, case.L, case.D), case.layout)
    k = _layout(rnd(case.B, case.Hkv, case.S, case.D), case.layout)
    v = _layout(rnd(case.B, case.Hkv, case.S, case.D), case.layout)
    pk, pv = rnd(case.T, case.Hkv, case.P, case.D), rnd(case.T, case.Hkv, case.P, case.D)
    kw = {"causal": case.causal}
    idx = None
    if case.T > 1:
        unused = int(torch.randint(case.T, (1,), generator=g))
        used = [t for t in range(case.T) if t != unused]
        idx = torch.tensor([used[int(torch.randint(len(used), (1,), generator=g))] for _ in range(case.B)])
        idx[0] = idx[-1] = used[0]  # at least one repeated row
    if case.plens:
        plens = torch.randint(0, case.P + 1, (case.T,), generator=g)
        plens[0] = max(case.P - 1, 0)
        kw["prefix_lens"] = plens
    if case.mask == "kv_lens":
        kvl = torch.randint(0, case.S + 1, (case.B,), generator=g)
        kvl[0], kvl[-1] = 0, case.S  # one fully padded row, one full row
        kw["kv_lens"] = kvl
    elif case.mask == "kpm":
        kpm = torch.rand(case.B, case.S, generator=g) > 0.3
        kpm[0] = False  # fully padded row
        kw["key_padding_mask"] = kpm
    if case.bank3d:
        assert case.T == 1
        pk, pv = pk[0], pv[0]
    tensors = [x.to(device).requires_grad_() for x in (q, k, v, pk, pv)]
    kw = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    idx = idx.to(device) if idx is not None else None
    L = case.L
    dout = rnd(case.B, case.Hq, L, case.D).to(device)
    dlse = torch.randn(case.B, case.Hq, L, generator=g).to(device)
    return tensors, idx, kw, dout, dlse


def _loss(out, lse, dout, dlse):
    if dlse is None:  # the loss through out only (what most callers do: lse gets no gradient)
        return (out.float() * dout.float()).sum()
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return (out.float() * dout.float()).sum() + (finite.float() * dlse.float()).sum()


def run_op(tensors, idx, kw, dout, dlse, backend="triton", **extra):
    out, lse = ptv2_fast.prefix_attention(*tensors, idx, return_lse=True, backend=backend, **kw, **extra)
    grads = torch.autograd.grad(_loss(out, lse, dout, dlse), tensors)
    return out, lse, grads


def run_ref(tensors, idx, kw, dout, dlse, compute_dtype, **extra):
    """The concatenating reference; compute_dtype float64 gives the truth, the input dtype the naive path."""
    xs = [x.detach().to(compute_dtype).requires_grad_() for x in tensors]
    if compute_dtype == tensors[0].dtype:
        xs = [x.detach().clone().requires_grad_() for x in tensors]
    out, lse = prefix_attention_ref(*xs, idx, return_lse=True, compute_dtype=compute_dtype, **kw, **extra)
    grads = torch.autograd.grad(_loss(out, lse, dout.to(out.dtype), dlse), xs)
    return out, lse, grads


def assert_rule(name, got, truth, naive, dtype):
    """DESIGN.md §5: |got - truth| <= 2 |naive - truth| + floor; NaN never passes; -inf must match exactly."""
    got, truth, naive = got.double().cpu(), truth.double().cpu(), naive.double().cpu()
    assert not torch.isnan(got).any(), f"{name}: NaN in output"
    inf_t = torch.isinf(truth)
    assert torch.equal(torch.isinf(got), inf_t), f"{name}: infinities differ from the reference"
    assert torch.equal(got[inf_t], truth[inf_t]), f"{name}: infinities differ from the reference"
    got, truth, naive = (torch.where(inf_t, torch.zeros_like(x), x) for x in (got, truth, naive))
    err = (got - truth).abs().max().item() if got.numel() else 0.0
    base = (naive - truth).abs().max().item() if got.numel() else 0.0
    floor = FLOOR[dtype] * (1.0 + (truth.abs().max().item() if got.numel() else 0.0))
    assert err <= 2 * base + floor, f"{name}: error {err:.3e} > 2 * naive {base:.3e} + floor {floor:.3e}"


def check_case(case: Case, device=DEVICE, backend="triton", dropout_p=0.0, keep=None, torch_seed=None,
               lse_grad=True):
    """The op against the fp64 reference with the error rule. With dropout: ``keep`` is the mask the op
    draws right after ``torch.manual_seed(torch_seed)``, given to the reference. ``lse_grad=False``: the loss
    goes through out only (lse gets no gradient)."""
    tensors, idx, kw, dout, dlse = make_problem(case, device)
    if not lse_grad:
        dlse = None
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
    extra = {"dropout_p": dropout_p} if dropout_p else {}
    ref_extra = {"dropout_mask": keep, "dropout_p": dropout_p} if dropout_p else {}
    out, lse, grads = run_op(tensors, idx, kw, dout, dlse, backend=backend, **extra)
    t_out, t_lse, t_grads = run_ref(tensors, idx, kw, dout, dlse, torch.float64, **ref_extra)
    n_out, n_lse, n_grads = run_ref(tensors, idx, kw, dout, dlse, case.dtype, **ref_extra)
    assert out.dtype == case.dtype and out.shape == (case.B, case.Hq, case.L, case.D)
    assert lse.dtype == torch.float32 and lse.shape == (case.B, case.Hq, case.L)
    assert_rule("out", out, t_out, n_out, case.dtype)
    assert_rule("lse", lse, t_lse, n_lse, case.dtype)
    for name, g, tg, ng, x in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, t_grads, n_grads, tensors):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert_rule(name, g, tg, ng, case.dtype)
