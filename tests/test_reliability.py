"""Crash, hang and code-execution scenarios: each reproduces a failure a user hit and checks its fix.

Kill and crash scenarios run in subprocesses with timeouts, so a regression fails the test instead of
hanging or crashing the suite.
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ptv2_fast import _ext

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _env(cache: Path) -> dict:
    return {"PTV2_FAST_EXT_CACHE": str(cache), "PTV2_FAST_EXT_CUDA": "0", "MAX_JOBS": "2", "PYTHONPATH": str(ROOT)}


def _fresh_build(cache: Path) -> Path:
    res = subprocess.run([sys.executable, "-m", "ptv2_fast._ext", "--no-cuda"], env={**os.environ, **_env(cache)},
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    return Path(next(ln for ln in res.stdout.splitlines() if ln.startswith("library:")).split(": ", 1)[1])


@pytest.fixture(scope="module")
def template_cache(tmp_path_factory):
    """One complete CPU build in a private cache; tests copy it (ninja then finds its objects up to date)."""
    root = tmp_path_factory.mktemp("ext-template")
    _fresh_build(root)
    return root


@pytest.fixture
def cache(template_cache, tmp_path):
    import shutil

    dst = tmp_path / "cache"
    shutil.copytree(template_cache, dst)
    return dst


# -- item 1: a build killed mid-way must not make later processes hang -----------------------------------

def test_lock_left_by_a_killed_build_does_not_hang_the_next(cache):
    # torch's own build baton ("lock" in the build folder) is what a killed build leaves behind; torch waits
    # on it forever. We hold our own flock while building, so the baton is stale and is removed.
    key_dir = cache / _ext.build_key(False)
    for lib in key_dir.glob("*.so*"):
        lib.unlink()
    (key_dir / "work" / "lock").write_text("")
    (key_dir / ".ptv2_fast.lock").write_text("pid 999999 on a dead host")  # a flock file whose holder died
    lib = _fresh_build(cache)  # hung forever before the fix ("waiting for lock")
    assert lib.is_file() and _ext.verify(lib) is None


def test_waiting_for_a_held_lock_times_out_with_a_message(tmp_path):
    lock = tmp_path / ".ptv2_fast.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, time, sys
        fh = open({str(lock)!r}, "a+"); fcntl.flock(fh, fcntl.LOCK_EX); fh.write("pid holder"); fh.flush()
        print("held", flush=True); time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(_ext.ExtensionBuildError, match="timed out after 1 s .*pid holder"):
            with _ext._file_lock(lock, timeout=1.0):
                pytest.fail("acquired a lock another process holds")
    finally:
        holder.kill()
        holder.wait()
    with _ext._file_lock(lock, timeout=5.0):  # the holder died: the kernel dropped its flock
        pass


@pytest.mark.slow
def test_a_killed_first_build_leaves_a_cache_the_next_process_completes(tmp_path):
    env = _env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "ptv2_fast._ext", "--no-cuda"], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    key_dir = tmp_path / _ext.build_key(False)
    import time

    deadline = time.monotonic() + 120
    while not (key_dir / "work" / "lock").exists() and time.monotonic() < deadline:  # torch's baton: mid-build
        time.sleep(0.1)
    os.killpg(proc.pid, 9)  # the build and its compilers, as a kill of a terminal would
    proc.wait()
    assert not list(key_dir.glob("*.so")), "a killed build must leave no library under the loaded name"
    lib = _fresh_build(tmp_path)  # must finish, not wait forever
    assert _ext.verify(lib) is None


# -- item 3: a truncated or corrupted cached library is rebuilt, never loaded --------------------------

@pytest.mark.parametrize("damage", ["truncate", "corrupt", "no-record"])
def test_damaged_cached_library_is_rebuilt_not_loaded(cache, damage):
    lib = next((cache / _ext.build_key(False)).glob("*.so"))
    data = lib.read_bytes()
    if damage == "truncate":
        lib.write_bytes(data[: len(data) // 3])
    elif damage == "corrupt":
        lib.write_bytes(data[:4096] + bytes(b ^ 0xFF for b in data[4096:8192]) + data[8192:])
    else:
        (lib.parent / (lib.name + ".sha256")).unlink()
    assert _ext.verify(lib) is not None
    code = """
        import torch, ptv2_fast
        from ptv2_fast import _ext
        assert _ext.load(quiet=True), _ext.status()
        q = torch.randn(1, 2, 3, 16)
        print("backend", ptv2_fast.resolve_backend("auto", "cpu"), ptv2_fast.prefix_attention(q, q, q, q[0], q[0]).shape)
    """
    res = _run(code, _env(cache), timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr  # SIGBUS before the fix (returncode -7)
    assert "backend cpp" in res.stdout
    assert "not usable" in res.stderr and "rebuilding" in res.stderr
    assert _ext.verify(lib) is None and lib.read_bytes() != b""


def test_disable_switch_reads_false_as_false(monkeypatch):
    for value, off in (("1", True), ("true", True), ("0", False), ("false", False), ("", False), ("no", False)):
        monkeypatch.setenv("PTV2_FAST_DISABLE_EXT", value)
        assert _ext.disabled() is off, value


# -- item 2: --resume never executes code from resume.pt -------------------------------------------------

class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_state_never_unpickles_code(tmp_path):
    from ptv2_fast.train.resume import load_resume_state

    marker = tmp_path / "pwned"
    bad = tmp_path / "resume.pt"
    torch.save({"optimizer": _Exploit(marker), "rng": None}, bad)
    with pytest.raises(ValueError, match="nothing in it was executed"):
        load_resume_state(bad)
    assert not marker.exists()
    with open(bad, "wb") as fh:  # a plain pickle, not a torch zip file
        pickle.dump(_Exploit(marker), fh)
    with pytest.raises(ValueError, match="cannot be resumed from"):
        load_resume_state(bad)
    assert not marker.exists()


def test_resume_state_round_trips_and_rejects_foreign_dicts(tmp_path):
    import random

    from ptv2_fast.train.resume import load_resume_state, save_resume

    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    rng = random.Random(5)
    save_resume(tmp_path, ({"w": torch.zeros(2)}, None), opt, rng, [{"epoch": 1, "mean": 0.5}],
                 {"mean": 0.5}, 0, 0)
    state = load_resume_state(tmp_path / "resume.pt")
    r2 = random.Random()
    r2.setstate(state["rng"])
    assert r2.random() == rng.random()
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])
    opt2.load_state_dict(state["optimizer"])
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ptv2_fast resume state"):
        load_resume_state(tmp_path / "other.pt")


# -- item 4: any stride pattern, however large, never reads out of bounds ----------------------------------

def test_triton_kernels_take_a_huge_head_dim_stride(tmp_path):
    # A valid fp16 view whose head-dim stride is 2**28 elements: the last column sits 15 * 2**28 elements past
    # the first, beyond 32-bit offsets. The storage is a sparse file (8 GiB apparent, a few pages touched).
    # Before the fix the kernels computed these offsets in 32 bits and the process died with SIGSEGV.
    code = """
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, ptv2_fast
        D, n = 16, 2**28
        numel = (D - 1) * n + 64
        path = sys.argv[1]
        with open(path, "wb") as f:
            f.truncate(numel * 2)
        store = torch.from_file(path, shared=True, size=numel, dtype=torch.float16)
        B, H, L, S, P = 1, 1, 3, 4, 2
        q = store.as_strided((B, H, L, D), (0, 0, 1, n))
        g = torch.Generator().manual_seed(0)
        vals = torch.randn(B, H, L, D, generator=g).half()
        q.copy_(vals)
        q.requires_grad_()
        k, v = (torch.randn(B, H, S, D, generator=g).half().requires_grad_() for _ in range(2))
        pk, pv = (torch.randn(1, H, P, D, generator=g).half().requires_grad_() for _ in range(2))
        out = ptv2_fast.prefix_attention(q, k, v, pk, pv, backend="triton")
        dq, = torch.autograd.grad(out.float().sum(), q)
        qr = vals.float().requires_grad_()
        ref = ptv2_fast.prefix_attention(qr, k.float(), v.float(), pk.float(), pv.float(), backend="reference")
        dqr, = torch.autograd.grad(ref.sum(), qr)
        print("errors", (out.float() - ref).abs().max().item(), (dq.float() - dqr).abs().max().item())
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(tmp_path / "sparse.bin")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])  # -11 (SIGSEGV) before the fix
    errs = [float(x) for x in res.stdout.split("errors", 1)[1].split()]
    assert max(errs) < 2e-2, errs


# -- item 5: the raw op checks what its schema promises, on every backend ----------------------------------

@pytest.mark.parametrize("backend", ["triton", "reference", "cpp"])
def test_raw_op_refuses_bad_input(backend):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 5, 16, generator=g) for _ in range(3))
    pk, pv = torch.randn(1, 2, 3, 16, generator=g), torch.randn(1, 2, 3, 16, generator=g)
    op = torch.ops.ptv2_fast.prefix_attention
    with pytest.raises((ValueError, RuntimeError), match="batch"):  # read past the end of k before the fix
        op(q, k[:1], v[:1], pk, pv, None, None, None, None, False, 0.25, 0.0, None, backend)
    with pytest.raises((ValueError, RuntimeError), match="dropout_p"):  # returned zeros before the fix
        op(q, k, v, pk, pv, None, None, None, None, False, 0.25, 2.0, torch.tensor([1, 2]), backend)
    out, lse = op(q, k, v, pk, pv, None, None, None, None, False, 0.25, 0.0, None, backend)
    with pytest.raises((ValueError, RuntimeError), match="dout"):  # a wrongly shaped dout was accepted
        torch.ops.ptv2_fast.prefix_attention_backward(out[:, :, :3], None, q, k, v, pk, pv, None, None, None, None,
                                                      out, lse, False, 0.25, 0.0, None, backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        op(q, k, v, pk, pv, None, None, None, None, False, 0.25, 0.0, None, "nonsense")


# --- issue 18 item 10: training data and flags ----------------------------------------------------------------

def test_task_names_cannot_leave_the_run_folder(tmp_path):
    from ptv2_fast.train import load_task

    rows = [{"text": f"t{i}", "label": i % 2} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("../../x", "a/b", "..", ".hidden", "a b", "x" * 101):
        with pytest.raises(ValueError, match="task name"):
            load_task(f"{name}={tmp_path / 'd.jsonl'}")
    assert load_task(f"ok-1.v2={tmp_path / 'd.jsonl'}").name == "ok-1.v2"


def test_labels_that_name_one_class_are_one_class_and_bools_are_refused(tmp_path):
    from ptv2_fast.train import load_task_file

    rows = [{"text": f"t{i}", "label": v} for i, v in enumerate([0, 1, 1.0, 0.0, "1", "0", 1, 0, 1, 0])]
    (tmp_path / "n.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_task_file(tmp_path / "n.jsonl").labels == ["0", "1"]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows + [{"text": "x", "label": True}]))
    with pytest.raises(ValueError, match="record 10 has the boolean label"):
        load_task_file(tmp_path / "b.jsonl")


def test_bad_json_names_the_file_and_line_and_bad_records_are_refused(tmp_path):
    from ptv2_fast.train import load_task_file

    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y", "label": \n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: invalid JSON"):
        load_task_file(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text('[\n  {"text": "x", "label": 1},\n  {"text": "y" "label": 0}\n]')
    with pytest.raises(ValueError, match=r"b\.json:3: invalid JSON"):
        load_task_file(tmp_path / "b.json")
    (tmp_path / "c.json").write_text('[{"text": "x", "label": 1}, ["y", 0]]')
    with pytest.raises(ValueError, match="record 1 is a list"):
        load_task_file(tmp_path / "c.json")
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "\xff\xfe", "label": 1}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        load_task_file(tmp_path / "d.jsonl")


@pytest.mark.parametrize("field, value, match", [
    ("lr", float("nan"), "lr must be a positive finite number"),
    ("lr", -1.0, "lr must be a positive finite number"),
    ("head_lr", float("inf"), "head_lr must be a positive finite number"),
    ("prefix_dropout", 1.0, "prefix_dropout"),
    ("prefix_len", 0, "prefix_len must be positive"),
])
def test_impossible_settings_are_refused_before_any_work(tmp_path, field, value, match):
    from ptv2_fast.train import TrainConfig, train

    cfg = TrainConfig(tasks=["sentiment"], out_dir=str(tmp_path / "run"), progress=False, **{field: value})
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not (tmp_path / "run" / "ptv2_train.json").exists()


def test_an_out_that_cannot_hold_a_run_is_refused_before_training(tmp_path):
    from ptv2_fast.train import TrainConfig, train

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train(TrainConfig(tasks=["sentiment"], out_dir=str(tmp_path / "file"), progress=False))
    with pytest.raises(ValueError, match="cannot be written"):  # a folder that cannot be created
        train(TrainConfig(tasks=["sentiment"], out_dir=str(tmp_path / "file" / "run"), progress=False))


# --- issue 18 item 7: NaN in, NaN out; hidden slots never reach the result (the C++ kernels) -------------------

def _nan_problem():
    from _util import Case, make_problem

    (q, k, v, pk, pv), idx, kw, dout, _ = make_problem(Case(B=3, Hq=4, Hkv=2, L=9, S=40, P=5, T=3, D=16,
                                                            mask="kpm"), "cpu")
    return [x.detach() for x in (q, k, v, pk, pv)], idx, kw, dout


@pytest.mark.skipif(not _ext.load(), reason="needs the C++ extension")
@pytest.mark.parametrize("where", ["query", "visible-key"])
def test_cpp_a_nan_query_gives_nan_not_a_masked_row(where):
    import ptv2_fast

    (q, k, v, pk, pv), idx, kw, dout = _nan_problem()
    if where == "query":
        q[1, 2, 3, 0] = float("nan")
    else:  # a prefix key of row 1's task: seen by every query of that row; check one query of it
        pk[idx[1], 2 // (q.shape[1] // k.shape[1]), 0, 0] = float("nan")
        others = idx != idx[1]
        out = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="cpp", **kw)
        assert out[1].isnan().any() and out[1, 2, 3].isnan().all() and not out[others].isnan().any()
        return
    q.requires_grad_()
    out, lse = ptv2_fast.prefix_attention(q, k, v, pk, pv, idx, backend="cpp", return_lse=True, **kw)
    assert out[1, 2, 3].isnan().all() and lse[1, 2, 3].isnan()
    rest = torch.ones_like(lse, dtype=torch.bool)
    rest[1, 2, 3] = False
    assert not out[rest].isnan().any() and not lse[rest].isnan().any()
    (dq,) = torch.autograd.grad((out * dout).sum(), q)
    assert dq[1, 2, 3].isnan().all() and not dq[rest].isnan().any()


@pytest.mark.skipif(not _ext.load(), reason="needs the C++ extension")
def test_cpp_keys_hidden_by_the_padding_mask_never_leak_nan():
    import ptv2_fast

    (q, k, v, pk, pv), idx, kw, dout = _nan_problem()
    kpm = kw["key_padding_mask"]
    hidden = (~kpm).nonzero()
    assert len(hidden) > 0
    clean = [x.clone().requires_grad_() for x in (q, k, v)]
    dirty_k, dirty_v = k.clone(), v.clone()
    for b, j in hidden.tolist():
        dirty_k[b, :, j] = float("nan")
        dirty_v[b, :, j] = float("inf")
    dirty = [q.clone().requires_grad_(), dirty_k.requires_grad_(), dirty_v.requires_grad_()]
    outs = []
    for qq, kk, vv in (clean, dirty):
        o = ptv2_fast.prefix_attention(qq, kk, vv, pk, pv, idx, backend="cpp", **kw)
        outs.append((o, torch.autograd.grad((o * dout).sum(), (qq, kk, vv))))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1][0], outs[1][1][0])  # dq
    for g in outs[1][1]:
        assert not g.isnan().any()


@pytest.mark.parametrize("mask", ["kv_lens", "kpm", "plens"])
def test_reference_hidden_slots_never_leak_nan(mask):
    # NaN/inf in slots no query sees (past kv_lens, masked by key_padding_mask, past a task's prefix length)
    import ptv2_fast

    from _util import Case, make_problem

    case = Case(B=3, Hq=4, Hkv=2, L=6, S=11, P=5, T=3, D=16, mask="none" if mask == "plens" else mask,
                plens=mask == "plens", dtype=torch.float64)
    (q, k, v, pk, pv), idx, kw, dout, _ = make_problem(case, "cpu")
    base = [x.detach() for x in (q, k, v, pk, pv)]
    dirty = [x.clone() for x in base]
    if mask == "kv_lens":
        for b, n in enumerate(kw["kv_lens"].tolist()):
            dirty[1][b, :, n:], dirty[2][b, :, n:] = float("nan"), float("inf")
    elif mask == "kpm":
        hid = ~kw["key_padding_mask"]
        dirty[1][hid[:, None, :, None].expand_as(dirty[1])] = float("nan")
        dirty[2][hid[:, None, :, None].expand_as(dirty[2])] = float("nan")
    else:
        for t, n in enumerate(kw["prefix_lens"].tolist()):
            dirty[3][t, :, n:], dirty[4][t, :, n:] = float("nan"), float("nan")
    results = []
    for xs in (base, dirty):
        xs = [x.clone().requires_grad_() for x in xs]
        out = ptv2_fast.prefix_attention(*xs, idx, backend="reference", **kw)
        results.append((out, torch.autograd.grad((out * dout).sum(), xs[0])))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1][0], results[1][1][0])


def test_reference_with_no_keys_at_all():
    import ptv2_fast

    q = torch.randn(2, 2, 3, 16, dtype=torch.float64, requires_grad=True)
    empty = torch.zeros(2, 2, 0, 16, dtype=torch.float64)
    out, lse = ptv2_fast.prefix_attention(q, empty, empty, empty[:1], empty[:1], backend="reference", return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()
    (g,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(g, torch.zeros_like(g))
