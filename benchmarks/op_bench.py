"""Times ptv2_fast.prefix_attention against the baselines of ``baselines`` on one shape (DESIGN.md §6).

Medians of warmed-up repeats, ratios to ``naive_eager`` and ``sdpa_concat`` from the same run, attention
TFLOP/s counting the prefix, peak memory on CUDA, and each provider's max error against the fp64 reference.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import statistics
import sys
import time

import torch

import ptv2_fast
from ptv2_fast.reference import prefix_attention_ref

from . import baselines

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass
class Shape:
    """B rows, Hq/Hkv heads, L queries, S sequence keys, P prefix length, T tasks, head dim D."""

    B: int = 32
    Hq: int = 16
    Hkv: int = 16
    L: int = 256
    S: int = 256
    P: int = 64
    T: int = 1
    D: int = 64
    causal: bool = False
    padded: bool = True

    def visible_keys_per_query(self) -> float:
        if not self.causal:
            return self.P + self.S
        seen = sum(min(self.S, max(0, i + self.S - self.L + 1)) for i in range(self.L))
        return self.P + seen / self.L

    def flops(self, mode: str) -> float:
        """Nominal attention FLOPs: padding counted as work (as FlashAttention's benchmarks do), causal not."""
        fwd = 4.0 * self.B * self.Hq * self.L * self.visible_keys_per_query() * self.D
        return fwd if mode == "fwd" else 3.5 * fwd  # backward = 2.5 x forward (5 matmuls vs 2)


PRESETS = {
    # The shape the core issue asks to time: P-Tuning v2 NLU, B=32, H=16, L=256, P=64, D=64, padded.
    "nlu": Shape(),
    # Small enough for a 2-core CPU in well under a minute, same structure.
    "quick": Shape(B=8, Hq=12, Hkv=12, L=128, S=128, P=32, T=2, D=64),
}


def make_inputs(shape: Shape, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    q = rnd(shape.B, shape.Hq, shape.L, shape.D)
    k, v = rnd(shape.B, shape.Hkv, shape.S, shape.D), rnd(shape.B, shape.Hkv, shape.S, shape.D)
    pk, pv = rnd(shape.T, shape.Hkv, shape.P, shape.D), rnd(shape.T, shape.Hkv, shape.P, shape.D)
    idx = torch.randint(0, shape.T, (shape.B,), generator=g).to(device)
    kw = {"causal": shape.causal}
    if shape.padded:
        kvl = torch.randint(max(1, shape.S // 2), shape.S + 1, (shape.B,), generator=g)
        kvl[0] = shape.S
        kw["kv_lens"] = kvl.to(device)
    dout = rnd(shape.B, shape.Hq, shape.L, shape.D)
    return (q, k, v, pk, pv), idx, kw, dout


def providers(shape: Shape, tensors, idx, kw, device):
    """name -> (fn() -> out, leaves that take gradients)."""
    q, k, v, pk, pv = tensors
    backend = ptv2_fast.resolve_backend("auto", device)
    mask = baselines.widened_mask(q, k, pk, idx, None, kw.get("kv_lens"), None, shape.causal)
    keys, values = baselines.precat(k, v, pk, pv, idx)
    return {
        f"ptv2_fast[{backend}]": (lambda: ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, **kw), tensors),
        "naive_eager": (lambda: baselines.naive_eager(q, k, v, pk, pv, idx, **kw), tensors),
        "sdpa_concat": (lambda: baselines.sdpa_concat(q, k, v, pk, pv, idx, **kw), tensors),
        "sdpa_precat": (lambda: baselines.sdpa_precat(q, keys, values, mask), (q, keys, values)),
    }


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _step(fn, leaves, dout, mode):
    if mode == "fwd":
        with torch.no_grad():
            return fn()
    out = fn()
    torch.autograd.backward(out, dout, inputs=list(leaves))
    for x in leaves:
        x.grad = None
    return out


def time_ms(fn, leaves, dout, mode, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        _step(fn, leaves, dout, mode)
    _sync(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _step(fn, leaves, dout, mode)
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_mem_mb(fn, leaves, dout, mode, device):
    """Peak memory a step adds on top of its inputs, in MiB (CUDA only; None elsewhere)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(fn, leaves, dout, mode)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def environment(device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "ptv2_fast": ptv2_fast.__version__}
    dev = torch.device(device)
    if dev.type == "cuda":
        env["device"] = torch.cuda.get_device_name(dev)
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def run(shape: Shape, dtype: str = "fp32", device: str = "cpu", modes=MODES, warmup: int = 3, reps: int = 10,
        progress=True) -> dict:
    """Benchmark every provider on ``shape``; returns the JSON-ready result."""
    torch.manual_seed(0)
    tensors, idx, kw, dout = make_inputs(shape, DTYPES[dtype], device)
    truth = prefix_attention_ref(*tensors, idx, compute_dtype=torch.float64, **kw).double()
    provs = providers(shape, tensors, idx, kw, device)
    rows = []
    for name, (fn, leaves) in provs.items():
        for x in leaves:
            x.requires_grad_(True)
        with torch.no_grad():
            err = (fn().double() - truth).abs().max().item()
        for mode in modes:
            if progress:
                print(f"  {name:<22} {mode:<8}", end="\r", file=sys.stderr, flush=True)
            ms = time_ms(fn, leaves, dout, mode, device, warmup, reps)
            rows.append({"provider": name, "mode": mode, "ms": ms, "tflops": shape.flops(mode) / ms / 1e9,
                         "peak_mem_mb": peak_mem_mb(fn, leaves, dout, mode, device), "max_err": err})
    if progress:
        print(" " * 40, end="\r", file=sys.stderr)
    for r in rows:
        same = {o["provider"]: o["ms"] for o in rows if o["mode"] == r["mode"]}
        r["vs_naive_eager"] = r["ms"] / same["naive_eager"]
        r["vs_sdpa_concat"] = r["ms"] / same["sdpa_concat"]
    return {"environment": environment(device), "dtype": dtype, "shape": dataclasses.asdict(shape),
            "warmup": warmup, "reps": reps, "results": rows}


def format_table(result: dict) -> str:
    env, s = result["environment"], result["shape"]
    head = (f"prefix attention, {result['dtype']}, B={s['B']} Hq={s['Hq']} Hkv={s['Hkv']} L={s['L']} S={s['S']} "
            f"P={s['P']} T={s['T']} D={s['D']} causal={s['causal']} padded={s['padded']}\n"
            f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}\n"
            f"median of {result['reps']} runs after {result['warmup']} warm-up\n")
    cols = (f"{'provider':<22} {'mode':<8} {'ms':>9} {'x naive':>8} {'x sdpa_cat':>10} {'TFLOP/s':>8} "
            f"{'peak MiB':>9} {'max err':>9}")
    lines = [head, cols, "-" * len(cols)]
    for r in result["results"]:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        lines.append(f"{r['provider']:<22} {r['mode']:<8} {r['ms']:>9.3f} {r['vs_naive_eager']:>8.2f} "
                     f"{r['vs_sdpa_concat']:>10.2f} {r['tflops']:>8.3f} {mem:>9} {r['max_err']:>9.2e}")
    return "\n".join(lines)
