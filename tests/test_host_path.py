"""What a call costs on the host, counted so it cannot creep back: device launches per call, would-be device
syncs per forward, output and gradient layouts (no layout copies), and kernel specialisations."""

import subprocess
import sys
import textwrap

import pytest
import torch

import ptv2_fast
from ptv2_fast.benchmarks.host import bert_inference_syncs, count_device_work, tiny_bert

from _util import Case, make_problem


def _problem(B=3, T=2, mask="kv_lens", causal=True, Hq=4, Hkv=2):
    return make_problem(Case(B=B, Hq=Hq, Hkv=Hkv, L=9, S=11, P=5, T=T, D=16, causal=causal, mask=mask, plens=True))


@pytest.mark.parametrize("mask", ["kv_lens", "kpm", "none"])
def test_triton_forward_is_one_launch_and_backward_two(mask):
    (q, k, v, pk, pv), idx, kw, dout, _ = _problem(mask=mask)
    with torch.no_grad():
        ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="triton", **kw)  # range-checks the new index tensors
        with count_device_work() as c:  # steady state: the same tensors again
            ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="triton", **kw)
    assert c["triton"] == {"prefix_attention_fwd_kernel": 1} and c["aten"] == {}, c
    out = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="triton", **kw)
    with count_device_work() as c:
        torch.autograd.grad(out, (q, k, v, pk, pv), dout)
    # dq with delta fused in, then one launch for the sequence and prefix dk/dv (rows grouped by task in-kernel)
    assert c["triton"] == {"prefix_attention_bwd_dq_kernel": 1, "prefix_attention_bwd_dkdv_kernel": 1}, c
    assert c["aten"] == {}, c  # no sort, searchsorted, casts, sums or copies around the kernels
    assert c["launches"] == 2


def test_triton_backward_with_split_prefix_reduction_is_three_launches(monkeypatch):
    monkeypatch.setenv("PTV2_FAST_PREFIX_SPLITS", "3")
    (q, k, v, pk, pv), idx, kw, dout, _ = _problem(B=7, T=3)
    out, lse = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="triton", return_lse=True, **kw)
    dlse = torch.randn_like(lse)
    with count_device_work() as c:
        grads = torch.autograd.grad((out, lse), (q, k, v, pk, pv), (dout, dlse))
    assert c["launches"] == 3 and c["aten"] == {}, c
    assert c["triton"]["prefix_attention_bwd_reduce_kernel"] == 1
    monkeypatch.setenv("PTV2_FAST_PREFIX_SPLITS", "1")
    out, lse = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="triton", return_lse=True, **kw)
    ref = torch.autograd.grad((out, lse), (q, k, v, pk, pv), (dout, dlse))
    for g, r in zip(grads, ref):  # the split sum is the unsplit one up to rounding
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_cpp_forward_and_backward_are_one_op_each():
    (q, k, v, pk, pv), idx, kw, dout, _ = _problem()
    with count_device_work() as c:  # the C++ op range-checks on the CPU itself: no Python check, no sync
        out = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="cpp", **kw)
    assert c["aten"] == {"prefix_attention_fwd": 1}, c
    with count_device_work() as c:
        torch.autograd.grad(out, (q, k, v, pk, pv), dout)
    assert c["aten"] == {"prefix_attention_bwd": 1}, c


@pytest.mark.parametrize("backend", ["triton", "cpp", "reference"])
def test_outputs_and_gradients_keep_the_inputs_layout(backend):
    # HF hands over q/k/v as [B, L, H, D] memory viewed as [B, H, L, D]: out in that layout makes HF's
    # transpose + reshape after attention free, and gradients in it make the backward of HF's view free.
    B, Hq, Hkv, L, S, P, T, D = 2, 4, 2, 6, 7, 3, 2, 16
    q = torch.randn(B, L, Hq, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, D).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, Hkv, D).transpose(1, 2).requires_grad_()
    bank = torch.randn(2, T, Hkv, P, D, requires_grad=True)
    pk, pv = bank.unbind(0)
    idx = torch.tensor([1, 0])
    out = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend=backend)
    assert out.stride() == q.stride() and out.transpose(1, 2).is_contiguous()
    with count_device_work() as c:
        gq, gk, gv = torch.autograd.grad(out.transpose(1, 2).reshape(B, L, -1).sum(), (q, k, v))
    assert gq.stride() == q.stride() and gk.stride() == k.stride() and gv.stride() == v.stride()
    if backend != "reference":  # the fused backends write the gradients in place: no copy anywhere
        assert "clone" not in c["aten"] and "copy" not in c["aten"] and "_to_copy" not in c["aten"], c["aten"]


def test_layer_calls_never_sync_and_direct_calls_sync_once_per_new_tensor():
    (q, k, v, pk, pv), idx, kw, _, _ = _problem()
    with torch.no_grad():
        with count_device_work() as c:
            ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="triton", check_values=False, **kw)
        assert c["n_syncs"] == 0, c
        fresh = idx.clone()
        with count_device_work() as c:
            for _ in range(3):  # one range check for the new tensors, then none while they are unchanged
                ptv2_fast.prefix_attention(q, k, v, pk, pv, fresh, backend="triton", **kw)
        assert c["n_syncs"] == 1, c


def test_patched_inference_syncs_at_most_once_more_than_peft():
    pytest.importorskip("peft")
    syncs = bert_inference_syncs(layers=4)
    assert syncs["patched"] <= syncs["peft"] + 1, syncs
    # a prefix_index made inside inference_mode has no version counter: checked once per forward, not per layer
    assert syncs["patched_bank"] <= syncs["peft"] + 1, syncs


def test_patched_layers_split_the_bank_once_per_forward():
    pytest.importorskip("peft")
    from ptv2_fast.hf import patch_model

    layers = 4
    net = patch_model(tiny_bert(layers).get_base_model(), prefix_len=4, num_tasks=2)
    ids = torch.randint(5, 100, (2, 8))
    out = net(input_ids=ids, attention_mask=torch.ones(2, 8, dtype=torch.long), prefix_index=torch.tensor([1, 0]))
    with count_device_work() as c:
        out.last_hidden_state.sum().backward()
    # one stack of all layers' prefix gradients; slicing the bank per layer instead zero-fills a bank-sized
    # gradient in every layer's backward (zeros / select_backward / index_put per layer)
    assert c["aten"].get("stack", 0) == 1, c["aten"]
    for name in ("select_backward", "slice_backward", "index_put", "zeros", "new_zeros"):
        assert c["aten"].get(name, 0) == 0, (name, c["aten"])
    assert c["aten"].get("prefix_attention_bwd", 0) == layers


def test_dropout_keys_never_select_a_new_specialisation():
    # Triton specialises integer arguments (== 1, divisible by 16); a seed or offset that did would make the
    # dropout kernels recompile at random steps. Checked on the kernels as compiled for a GPU (no interpreter).
    code = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton.runtime.jit as jit
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from ptv2_fast.kernels import prefix_attention as launch
        backend = CUDABackend(GPUTarget("cuda", 90, 32))
        checked = []
        for name in dir(launch):
            kernel = getattr(launch, name)
            if not name.endswith("_kernel") or not hasattr(kernel, "params"):
                continue
            params = {p.name: p for p in kernel.params}
            if "seed" not in params:
                continue
            for arg in ("seed", "rng_offset"):
                p = params[arg]
                specs = {jit.native_specialize_impl(backend, value, p.is_const, not p.do_not_specialize, True)
                         for value in (1, 7, 16, 48, 2**31 - 2)}
                assert len(specs) == 1, (name, arg, specs)
            checked.append(name)
        print(sorted(checked))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for kernel in ("prefix_attention_fwd_kernel", "prefix_attention_bwd_dq_kernel", "prefix_attention_bwd_dkdv_kernel",
                   "prefix_attention_dropout_mask_kernel"):
        assert kernel in res.stdout, res.stdout


def test_create_graph_is_refused_not_silently_graphless():
    (q, k, v, pk, pv), idx, kw, dout, _ = _problem()
    out = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, **kw)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out, q, dout, create_graph=True)


def test_row_splits_share_a_task_whose_rows_are_contiguous(monkeypatch):
    # Rows of one task side by side (as a batch sorted by task is): every split gets every NSPLIT-th row of the
    # task, and the sum equals the unsplit gradient.
    (q, k, v, pk, pv), _, kw, dout, _ = _problem(B=8, T=2)
    idx = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    grads = {}
    for splits in ("1", "3"):
        monkeypatch.setenv("PTV2_FAST_PREFIX_SPLITS", splits)
        out = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="triton", **kw)
        grads[splits] = torch.autograd.grad(out, (pk, pv), dout)
    for a, b in zip(grads["1"], grads["3"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
