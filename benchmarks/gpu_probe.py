"""Where a GPU step's time goes: torch.profiler of the op as Hugging Face calls it and of a warm BERT-large
training step and inference pass, PEFT vs patched (``ptv2-fast profile`` / ``python -m
ptv2_fast.benchmarks.gpu_probe OUT``).

For each probe it records, per call: device (kernel) time, the number of device kernels, the top kernels by
device time, host-side wall time, and the events that make the host wait or copy (``cudaDeviceSynchronize``,
``cudaStreamSynchronize``, ``cudaMemcpy*`` and the ``aten::_local_scalar_dense`` / ``aten::item`` that cause
them). Device time far below wall time means the step is bound by host work; many kernels per layer means
launch overhead; a sync per layer means a host round trip per layer.

The op probe uses the BERT-large layer shape (B=32, H=16, L=128, P=128, D=64) with q/k/v as HF makes them
([B, L, H, D] memory viewed as [B, H, L, D]) and a key padding mask, in bf16, at dropout 0 and 0.1. On a
machine without a GPU, ``--device cpu --small`` runs the same probes on CPU activity at tiny sizes (a smoke
test of the script itself; the numbers mean nothing for a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

SYNC_NAMES = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
              "aten::item")
COPY_NAMES = ("cudaMemcpy", "cudaMemcpyAsync", "Memcpy DtoH", "Memcpy HtoD", "Memcpy DtoD", "aten::copy_")


def _profile(fn, device: str, calls: int = 3) -> dict:
    """Profile ``calls`` calls of ``fn`` (after two warm ones) and summarise per call."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()  # after the profiler started: its start-up is not the step's
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls
    events = prof.events()
    kernels = [e for e in events if _is_device_kernel(e, device)]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(_device_us(e, device))
    top = sorted(((sum(v), len(v), k) for k, v in by_name.items()), reverse=True)[:12]
    syncs = [e.name for e in events if any(e.name.startswith(n) for n in SYNC_NAMES)]
    copies = [e.name for e in events if any(e.name.startswith(n) for n in COPY_NAMES)]
    return {
        "wall_ms_per_call": 1e3 * wall,
        "device_ms_per_call": sum(_device_us(e, device) for e in kernels) / 1e3 / calls,
        "kernels_per_call": len(kernels) / calls,
        "top_kernels": [{"name": n[:120], "ms_per_call": t / 1e3 / calls, "count_per_call": c / calls}
                        for t, c, n in top],
        "syncs_per_call": len(syncs) / calls, "sync_events": sorted(set(syncs)),
        "copies_per_call": len(copies) / calls, "copy_events": sorted(set(copies)),
    }


def _is_device_kernel(e, device: str) -> bool:
    if device == "cuda":
        return str(getattr(e, "device_type", "")).endswith("CUDA") and not e.name.startswith(("Memcpy", "Memset"))
    # CPU smoke run: top-level aten ops stand in for kernels
    return e.name.startswith(("aten::", "ptv2_fast::")) and getattr(e, "cpu_parent", None) is None


def _device_us(e, device: str) -> float:
    if device == "cuda":
        return float(getattr(e, "device_time", 0.0) or getattr(e, "cuda_time", 0.0) or 0.0)
    return float(getattr(e, "cpu_time", 0.0) or 0.0)


def op_probe(device: str, small: bool, dropout_p: float) -> dict:
    """One op call at the BERT-large layer shape as HF calls it: forward, and forward+backward."""
    import ptv2_fast

    B, H, L, P, D = (2, 2, 16, 8, 16) if small else (32, 16, 128, 128, 64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)

    def hf_view(n):  # [B, n, H, D] memory seen as [B, H, n, D], as HF's projections give it
        return torch.randn(B, n, H, D, generator=g).to(device, dtype).transpose(1, 2).requires_grad_()

    q, k, v = hf_view(L), hf_view(L), hf_view(L)
    pk = torch.randn(1, H, P, D, generator=g).to(device, dtype).requires_grad_()
    pv = torch.randn(1, H, P, D, generator=g).to(device, dtype).requires_grad_()
    kpm = torch.ones(B, L, dtype=torch.bool, device=device)
    kpm[B // 2:, L - L // 4:] = False
    dout = torch.randn(B, L, H, D, generator=g).to(device, dtype).transpose(1, 2)

    def fwd():
        with torch.no_grad():
            ptv2_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, dropout_p=dropout_p,
                                       check_values=False)

    def fwd_bwd():
        out = ptv2_fast.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, dropout_p=dropout_p,
                                         check_values=False)
        torch.autograd.grad(out, (q, k, v, pk, pv), dout)

    return {"shape": {"B": B, "H": H, "L": L, "S": L, "P": P, "D": D, "dtype": str(dtype), "dropout_p": dropout_p},
            "backend": ptv2_fast.resolve_backend("auto", device, dtype, dropout_p),
            "forward": _profile(fwd, device), "forward_backward": _profile(fwd_bwd, device)}


def model_probe(device: str, small: bool, variant: str) -> dict:
    """A warm training step and inference pass of BERT-large (random weights), PEFT or PEFT patched."""
    from .e2e import build

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if small:
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
        net, inputs, loss_fn, shape = build("bert-large", variant, device, dtype=dtype, batch=2, seq=16, prefix=8,
                                            model=model)
    else:
        net, inputs, loss_fn, shape = build("bert-large", variant, device, dtype=dtype)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def train():
        net.train()
        loss_fn(net(**inputs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer():
        net.eval()
        with torch.no_grad():
            net(**inputs)

    return {"variant": variant, "shape": dict(zip(("B", "L", "P"), shape)), "train": _profile(train, device, 2),
            "infer": _profile(infer, device, 2)}


def probe(out_dir: str, device: str | None = None, small: bool = False) -> dict:
    """Run every probe; write ``gpu_probe.json`` and ``gpu_probe.txt`` into ``out_dir``; return the result."""
    from .op_bench import environment

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = {"environment": environment(device), "small": small, "op": [], "bert_large": [], "errors": []}
    os.makedirs(out_dir, exist_ok=True)
    # each probe's result is written as soon as it exists: a time limit or a failing probe loses only itself
    for p in (0.0, 0.1):
        _guarded(result, f"op dropout={p}", lambda p=p: result["op"].append(op_probe(device, small, p)), out_dir)
    for variant in ("peft", "patched"):
        _guarded(result, f"bert-large {variant}",
                 lambda v=variant: result["bert_large"].append(model_probe(device, small, v)), out_dir)
    return result


def _guarded(result: dict, name: str, fn, out_dir: str) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (a probe that fails is reported, the others still run)
        result["errors"].append(f"{name}: {type(e).__name__}: {e}")
    _write(result, out_dir)


def _write(result: dict, out_dir: str) -> None:
    for name, text in (("gpu_probe.json", json.dumps(result, indent=2)), ("gpu_probe.txt", format_probe(result))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def _line(tag: str, r: dict) -> str:
    top = ", ".join(f"{k['name'][:48]} {k['ms_per_call']:.3f} ms x{k['count_per_call']:g}" for k in r["top_kernels"][:4])
    return (f"{tag:<34} wall {r['wall_ms_per_call']:8.3f} ms  device {r['device_ms_per_call']:8.3f} ms  "
            f"kernels {r['kernels_per_call']:6.1f}  syncs {r['syncs_per_call']:4.1f}  copies {r['copies_per_call']:5.1f}"
            f"\n{'':<34} top: {top}")


def format_probe(result: dict) -> str:
    lines = [f"device: {result['environment'].get('device', '?')}  torch {result['environment'].get('torch', '?')}"]
    for r in result["op"]:
        tag = f"op dropout={r['shape']['dropout_p']} [{r['backend']}]"
        lines += [_line(tag + " fwd", r["forward"]), _line(tag + " fwd+bwd", r["forward_backward"])]
    for r in result["bert_large"]:
        lines += [_line(f"bert-large {r['variant']} train step", r["train"]),
                  _line(f"bert-large {r['variant']} inference", r["infer"])]
    lines += [f"error: {e}" for e in result.get("errors", [])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptv2_fast.benchmarks.gpu_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for gpu_probe.json and gpu_probe.txt")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when present")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a smoke test of the probe itself)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_probe: --device cuda, but torch sees no CUDA GPU")
    result = probe(args.out, args.device, args.small)
    print(format_probe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
