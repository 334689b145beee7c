"""Times ptv2_fast.prefix_attention against the baselines of ``baselines`` on one shape (DESIGN.md §6).

Medians of warmed-up repeats, ratios to ``naive_eager`` and ``sdpa_concat`` from the same run, attention
TFLOP/s counting the prefix, peak memory on CUDA, and each provider's max error against the fp64 reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
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
ALL_MODES = ("fwd", "bwd", "fwd+bwd", "decode")


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
        return {"fwd": fwd, "decode": fwd, "bwd": 2.5 * fwd}.get(mode, 3.5 * fwd)  # bwd: 5 matmuls vs 2

    def cache_bytes(self, provider: str, itemsize: int) -> int:
        """K/V bytes a serving cache holds for this shape: each row's copy of the prefix for the concatenating
        paths and flash_attn (its cache rows hold [prefix ; sequence]), the bank once (T rows) for ptv2_fast."""
        per_key = 2 * self.Hkv * self.D * itemsize
        if provider.startswith("ptv2_fast"):
            return per_key * (self.B * self.S + self.T * self.P)
        return per_key * self.B * (self.S + self.P)


PRESETS = {
    # The shape the core issue asks to time: P-Tuning v2 NLU, B=32, H=16, L=256, P=64, D=64, padded.
    "nlu": Shape(),
}


@dataclasses.dataclass
class Preset:
    """A named sweep: shapes varied along the sequence axis and along the prefix axis (one plot each)."""

    base: Shape
    seq: tuple = ()       # values of L (= S), or of S alone for decode presets
    prefix: tuple = ()    # values of P
    modes: tuple = MODES
    description: str = ""
    fixed: tuple = ()     # or a list of unrelated shapes (series "single"), e.g. one per model

    def shapes(self) -> list[tuple[str, Shape]]:
        """(series, shape) pairs: series "seq" varies L/S, "prefix" varies P; a shape on both appears twice."""
        if self.fixed:
            return [("single", s) for s in self.fixed]
        out = []
        decode = self.base.L == 1
        for n in self.seq:
            out.append(("seq", dataclasses.replace(self.base, S=n) if decode else
                        dataclasses.replace(self.base, L=n, S=n)))
        for p in self.prefix:
            out.append(("prefix", dataclasses.replace(self.base, P=p)))
        return out or [("single", self.base)]


SWEEPS = {
    "quick": Preset(Shape(B=4, Hq=8, Hkv=8, L=128, S=128, P=32, T=2, D=64), seq=(64, 128), prefix=(16, 64),
                    description="a small P-Tuning v2 shape; finishes in well under a minute on a 2-core CPU"),
    "ptv2-nlu": Preset(Shape(B=32, Hq=16, Hkv=16, L=256, S=256, P=64, T=1, D=64), seq=(128, 256, 512),
                       prefix=(8, 64, 224), description="P-Tuning v2 NLU: B=32, H=16, D=64, non-causal, padded"),
    "decoder-train": Preset(Shape(B=1, Hq=32, Hkv=8, L=4096, S=4096, P=128, T=1, D=128, causal=True, padded=False),
                            seq=(2048, 4096, 8192), prefix=(32, 512),
                            description="decoder training: Hq=32, Hkv=8, D=128, causal, P=128 (a GPU preset)"),
    "cpu-ext": Preset(Shape(B=8, Hq=12, Hkv=12, L=128, S=128, P=32, T=1, D=32),
                      fixed=(Shape(B=8, Hq=12, Hkv=12, L=128, S=128, P=32, T=1, D=32),
                             Shape(B=4, Hq=9, Hkv=3, L=512, S=512, P=64, T=1, D=64, causal=True, padded=False)),
                      description="CPU shapes of the C++ extension: MiniLM-like (B=8, H=12, L=128, P=32, D=32, "
                                  "padded) and SmolLM2-like (B=4, Hq=9, Hkv=3, L=512, P=64, D=64, causal)"),
    "serve-decode": Preset(Shape(B=64, Hq=32, Hkv=8, L=1, S=1024, P=128, T=8, D=128, padded=True),
                           seq=(512, 1024, 2048, 4096), prefix=(32, 512), modes=("decode",),
                           description="mixed-task serving decode: B=64, T=8 tasks, q_len 1, cache 512-4k"),
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
    """name -> (fn() -> out, leaves that take gradients, whether it has a backward).

    ptv2_fast twice: as ``backend="auto"`` picks (``ptv2_fast[<its choice>]``) and as ``ptv2_fast[sdpa]``
    (PyTorch's fused kernels on the sequence, ours on the prefix: the fair, fused form of a cascade), unless
    auto already picks sdpa or sdpa cannot run here."""
    q, k, v, pk, pv = tensors
    backend = ptv2_fast.resolve_backend("auto", device, q.dtype)
    mask = baselines.widened_mask(q, k, pk, idx, None, kw.get("kv_lens"), None, shape.causal)
    keys, values = baselines.precat(k, v, pk, pv, idx)
    provs = {
        f"ptv2_fast[{backend}]": (lambda: ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, **kw), tensors, True),
        "naive_eager": (lambda: baselines.naive_eager(q, k, v, pk, pv, idx, **kw), tensors, True),
        "sdpa_concat": (lambda: baselines.sdpa_concat(q, k, v, pk, pv, idx, **kw), tensors, True),
        "sdpa_precat": (lambda: baselines.sdpa_precat(q, keys, values, mask), (q, keys, values), True),
    }
    if backend != "sdpa" and _sdpa_runs(device, q.dtype):
        provs["ptv2_fast[sdpa]"] = (
            lambda: ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="sdpa", **kw), tensors, True)
    flash = baselines.flash_attn_provider(shape, tensors, idx, kw)
    if flash is not None:
        provs["flash_attn"] = (flash, tensors, False)
    decode = _decode_provider(shape, tensors, idx, kw)
    if decode is not None:
        provs.update(decode)
    return provs


def _sdpa_runs(device, dtype) -> bool:
    from ptv2_fast.ops.backends import BackendUnavailable

    try:
        ptv2_fast.resolve_backend("sdpa", device, dtype)
    except BackendUnavailable:
        return False
    return True


def kernels(shape: Shape, tensors, idx, kw) -> dict:
    """The attention kernel each SDPA-based provider actually runs: for ``ptv2_fast[sdpa]`` the sequence part's
    (``ptv2_fast.ops.sdpa.sequence_kernel``), for the concatenating SDPA baselines ``torch._fused_sdp_choice``."""
    from torch.nn.attention import SDPBackend

    from ptv2_fast.ops import sdpa

    q, k, v, pk, pv = tensors
    mask = baselines.widened_mask(q, k, pk, idx, None, kw.get("kv_lens"), None, shape.causal)
    keys, values = baselines.precat(k, v, pk, pv, idx)
    try:
        choice = SDPBackend(torch._fused_sdp_choice(q, keys, values, mask)).name
    except (RuntimeError, ValueError) as e:
        choice = f"unknown ({type(e).__name__})"
    return {"ptv2_fast[sdpa]": sdpa.sequence_kernel(q, k, kw.get("kv_lens"), None, shape.causal),
            "sdpa_precat": choice, "sdpa_concat": choice}


def _decode_provider(shape: Shape, tensors, idx, kw):
    """``prefix_decode_attention`` (the native decode kernel: CUDA on a GPU, C++ on a CPU) on decode shapes
    (L = 1): the cache is k/v as they are ([B, Hkv, S, D], sequence tokens only), kv_lens its valid length."""
    if shape.L != 1:
        return None
    from ptv2_fast.decode import resolve_decode_backend

    q, k, v, pk, pv = (x.detach() for x in tensors)
    name = resolve_decode_backend("auto", q)
    if name == "reference":
        return None
    kvl = kw.get("kv_lens")
    seqlens = kvl if kvl is not None else torch.full((shape.B,), shape.S, device=q.device)
    fn = lambda: ptv2_fast.prefix_decode_attention(q, k, v, seqlens, pk, pv, idx, causal=shape.causal)  # noqa: E731
    return {f"ptv2_fast[decode-{name}]": (fn, tensors, False)}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _step(fn, leaves, dout, mode):
    if mode in ("fwd", "decode"):
        with torch.no_grad():
            return fn()
    out = fn()
    torch.autograd.backward(out, dout, inputs=list(leaves))
    for x in leaves:
        x.grad = None
    return out


def _once(fn, leaves, dout, mode, device) -> float:
    """Seconds of one run of ``mode``; "bwd" times the backward alone (its forward runs untimed)."""
    if mode != "bwd":
        t0 = time.perf_counter()
        _step(fn, leaves, dout, mode)
        _sync(device)
        return time.perf_counter() - t0
    out = fn()
    _sync(device)
    t0 = time.perf_counter()
    torch.autograd.backward(out, dout, inputs=list(leaves))
    _sync(device)
    dt = time.perf_counter() - t0
    for x in leaves:
        x.grad = None
    return dt


def time_ms(fn, leaves, dout, mode, device, warmup: int, reps: int) -> float:
    """Median wall time of ``mode`` in ms."""
    for _ in range(warmup):
        _once(fn, leaves, dout, mode, device)
    return statistics.median(_once(fn, leaves, dout, mode, device) * 1e3 for _ in range(reps))


def interleaved_ms(entries: dict, dout, mode, device, warmup: int, reps: int) -> dict:
    """Median ms of each provider {name: (fn, leaves, ...)}, their repeats interleaved round-robin, so that a
    slow spell of a shared machine falls on every provider alike rather than on whichever ran then.
    ``samples_ms`` (the same call's raw repeats, in ms) is filled as a side result for spreads and ratios."""
    for _ in range(warmup):
        for fn, leaves, *_ in entries.values():
            _once(fn, leaves, dout, mode, device)
    samples = {name: [] for name in entries}
    for _ in range(reps):
        for name, (fn, leaves, *_) in entries.items():
            samples[name].append(_once(fn, leaves, dout, mode, device))
    samples_ms.clear()
    samples_ms.update({name: [t * 1e3 for t in v] for name, v in samples.items()})
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


samples_ms: dict = {}  # the last interleaved_ms call's repeats per provider, in ms


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null for the block (C++ logging bypasses sys.stderr)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn) -> int:
    """Peak bytes of torch tensors that ``fn()`` allocates above what was allocated before it, on the CPU.

    From torch's profiler with memory profiling: its raw allocation and free records (one per allocator
    call, nested ops included) in time order; the running sum's maximum. Exact for tensor memory, blind to
    the allocator's caching, and deterministic.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ side logs a line at every start and stop
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        current += record.nbytes()
        peak = max(peak, current)
    return peak


def peak_bytes(fn, device) -> int:
    """Peak memory ``fn()`` adds on top of what is allocated before it, in bytes:
    ``torch.cuda.max_memory_allocated`` on CUDA, ``cpu_peak_bytes`` on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(fn)


def peak_mem_mb(fn, leaves, dout, mode, device):
    """Peak memory one step adds, in MiB (``bwd`` counts its forward)."""
    mode = "fwd+bwd" if mode == "bwd" else mode
    return peak_bytes(lambda: _step(fn, leaves, dout, mode), device) / 2**20


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


def _truth(tensors, idx, kw):
    """The fp64 reference output, one kv head (and its query heads) at a time when the scores are large
    (decoder-train's L=8192 would otherwise hold tens of GB in fp64)."""
    q, k, v, pk, pv = tensors
    B, Hq, L, _ = q.shape
    Hkv = k.shape[1]
    if B * Hq * L * (k.shape[2] + pk.shape[-2]) < 2**27:
        return prefix_attention_ref(*tensors, idx, compute_dtype=torch.float64, **kw).double()
    g = Hq // Hkv
    parts = [prefix_attention_ref(q[:, j * g:(j + 1) * g], k[:, j:j + 1], v[:, j:j + 1], pk[..., j:j + 1, :, :],
                                  pv[..., j:j + 1, :, :], idx, compute_dtype=torch.float64, **kw).double()
             for j in range(Hkv)]
    return torch.cat(parts, dim=1)


def run(shape: Shape, dtype: str = "fp32", device: str = "cpu", modes=MODES, warmup: int = 3, reps: int = 10,
        progress=True, bar=None) -> dict:
    """Benchmark every provider on ``shape``; returns the JSON-ready result.

    Providers without a backward (flash_attn, the decode kernel) are timed in fwd/decode modes only. Within a mode the
    providers' repeats are interleaved (``interleaved_ms``), so the ratios of one run compare like with like.
    ``bar``: a tqdm bar advanced once per (provider, mode).
    """
    torch.manual_seed(0)
    tensors, idx, kw, dout = make_inputs(shape, DTYPES[dtype], device)
    truth = _truth(tensors, idx, kw)
    provs = providers(shape, tensors, idx, kw, device)
    rows = []
    itemsize = tensors[0].element_size()
    errs = {}
    for name, (fn, leaves, _) in provs.items():
        for x in leaves:
            x.requires_grad_(True)
        with torch.no_grad():
            got = fn()
        if got.shape != truth.shape:
            raise RuntimeError(f"{name} returned shape {list(got.shape)}, expected {list(truth.shape)}")
        errs[name] = (got.double() - truth).abs().max().item()
    precat_reps = {}
    for mode in modes:
        if progress and bar is None:
            print(f"  {mode:<8}", end="\r", file=sys.stderr, flush=True)
        timed = {n: e for n, e in provs.items() if mode not in ("bwd", "fwd+bwd") or e[2]}
        ms_of = interleaved_ms(timed, dout, mode, device, warmup, reps)
        for name, (fn, leaves, _) in provs.items():
            if bar is not None:
                bar.set_postfix_str(f"{name} {mode}")
                bar.update(1)
            if name not in timed:
                continue
            ms = ms_of[name]
            reps_ms = samples_ms[name]
            row = {"provider": name, "mode": mode, "ms": ms, "ms_min": min(reps_ms), "ms_max": max(reps_ms),
                   "tflops": shape.flops(mode) / ms / 1e9,
                   "peak_mem_mb": peak_mem_mb(fn, leaves, dout, mode, device), "max_err": errs[name]}
            if mode == "decode":
                row["cache_mb"] = shape.cache_bytes(name, itemsize) / 2**20
            row["_reps"] = reps_ms
            rows.append(row)
        if "sdpa_precat" in samples_ms:
            precat_reps[mode] = samples_ms["sdpa_precat"]
    if progress and bar is None:
        print(" " * 40, end="\r", file=sys.stderr)
    for r in rows:
        same = {o["provider"]: o["ms"] for o in rows if o["mode"] == r["mode"]}
        r["vs_naive_eager"] = r["ms"] / same["naive_eager"]
        r["vs_sdpa_concat"] = r["ms"] / same["sdpa_concat"]
        # the ratio within each interleaved round, median and range: drift of a shared machine cancels out
        reps_ms = r.pop("_reps")
        rounds = [a / b for a, b in zip(reps_ms, precat_reps[r["mode"]])] if r["mode"] in precat_reps else []
        if rounds:
            r["vs_sdpa_precat"] = statistics.median(rounds)
            r["vs_sdpa_precat_range"] = [min(rounds), max(rounds)]
    return {"environment": environment(device), "dtype": dtype, "shape": dataclasses.asdict(shape),
            "warmup": warmup, "reps": reps, "kernels": kernels(shape, tensors, idx, kw), "results": rows}


def run_preset(name: str, dtype: str = "fp32", device: str = "cpu", modes=None, warmup: int = 3, reps: int = 10,
               progress: bool = True) -> dict:
    """Every shape of the sweep ``SWEEPS[name]``; returns {"preset", "environment", "runs": [run(...) + series]}."""
    preset = SWEEPS[name]
    modes = tuple(modes or preset.modes)
    shapes = preset.shapes()
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # progress bars come with the bench extra
            tqdm = None
        if tqdm is not None:
            unique = len({tuple(dataclasses.asdict(shape).values()) for _, shape in shapes})
            bar = tqdm(total=unique * 5 * len(modes), desc=f"bench {name}", unit="run", leave=False)
    runs, done = [], {}
    for series, shape in shapes:
        key = tuple(dataclasses.asdict(shape).values())
        if key not in done:  # a shape on both sweeps is measured once
            done[key] = run(shape, dtype, device, modes, warmup, reps, progress=False, bar=bar)
        runs.append(dict(done[key], series=series))
    if bar is not None:
        bar.close()
    return {"preset": name, "description": preset.description, "environment": environment(device),
            "dtype": dtype, "modes": list(modes), "runs": runs}


def format_table(result: dict) -> str:
    env, s = result["environment"], result["shape"]
    head = (f"prefix attention, {result['dtype']}, B={s['B']} Hq={s['Hq']} Hkv={s['Hkv']} L={s['L']} S={s['S']} "
            f"P={s['P']} T={s['T']} D={s['D']} causal={s['causal']} padded={s['padded']}\n"
            f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}\n"
            f"median of {result['reps']} runs after {result['warmup']} warm-up\n")
    cols = (f"{'provider':<22} {'mode':<8} {'ms':>9} {'x naive':>8} {'x sdpa_cat':>10} {'TFLOP/s':>8} "
            f"{'peak MiB':>9} {'cache MiB':>9} {'max err':>9}")
    lines = [head, cols, "-" * len(cols)]
    for r in result["results"]:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        cache = f"{r['cache_mb']:.1f}" if r.get("cache_mb") is not None else "-"
        lines.append(f"{r['provider']:<22} {r['mode']:<8} {r['ms']:>9.3f} {r['vs_naive_eager']:>8.2f} "
                     f"{r['vs_sdpa_concat']:>10.2f} {r['tflops']:>8.3f} {mem:>9} {cache:>9} {r['max_err']:>9.2e}")
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    """One line per (shape, mode) of a ``run_preset`` result: ptv2_fast's time (backend "auto"), its ratio to each
    baseline measured in the same run (< 1 means ptv2_fast is faster), ``ptv2_fast[sdpa]``'s time and ratio to
    ``sdpa_precat`` where auto picked another backend, and peak memory."""
    env = result["environment"]
    lines = [f"ptv2-fast bench {result['preset']} ({result['dtype']}): {result['description']}",
             f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}",
             "time ratio = ptv2_fast / baseline (below 1: ptv2_fast faster); memory = peak MiB of one step", ""]
    head = (f"{'B':>3} {'Hq/Hkv':>6} {'L':>5} {'S':>5} {'P':>4} {'T':>2} {'mode':<8} {'ptv2 ms':>9} {'/naive':>7} "
            f"{'/sdpa_cat':>9} {'/precat':>8} {'[sdpa] ms':>9} {'/precat':>8} {'mem ptv2':>9} {'naive':>8} "
            f"{'sdpa_cat':>8}")
    lines += [head, "-" * len(head)]
    seen = set()
    for run in result["runs"]:
        s = run["shape"]
        key = tuple(s.values())
        if key in seen:
            continue
        seen.add(key)
        for mode in result["modes"]:
            rows = {r["provider"]: r for r in run["results"] if r["mode"] == mode}
            ours = next((r for p, r in rows.items() if p.startswith("ptv2_fast")), None)
            if ours is None:
                continue
            alt = rows.get("ptv2_fast[sdpa]") if ours["provider"] != "ptv2_fast[sdpa]" else None

            def ratio(name, rows=rows, ours=ours):
                r = rows.get(name)
                return f"{ours['ms'] / r['ms']:.2f}" if r else "-"

            alt_ms = f"{alt['ms']:.3f}" if alt else "-"
            alt_precat = f"{alt['vs_sdpa_precat']:.2f}" if alt and "vs_sdpa_precat" in alt else "-"

            def mem(name, rows=rows):
                r = rows.get(name)
                return "-" if r is None or r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"

            lines.append(f"{s['B']:>3} {str(s['Hq']) + '/' + str(s['Hkv']):>6} {s['L']:>5} {s['S']:>5} {s['P']:>4} "
                         f"{s['T']:>2} {mode:<8} {ours['ms']:>9.3f} {ratio('naive_eager'):>7} "
                         f"{ratio('sdpa_concat'):>9} {ratio('sdpa_precat'):>8} {alt_ms:>9} {alt_precat:>8} "
                         f"{mem(ours['provider']):>9} {mem('naive_eager'):>8} {mem('sdpa_concat'):>8}")
    return "\n".join(lines)
