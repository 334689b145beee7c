"""ptv2_fast._ext: how the extension is built, cached, locked, disabled and how a failure degrades."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import ptv2_fast
from ptv2_fast import _ext

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_state(monkeypatch):
    """A load() that has not decided yet; the real state is restored afterwards."""
    monkeypatch.setattr(_ext, "_state", {"loaded": None, "error": None, "path": None})


def test_key_covers_sources_torch_and_archs(monkeypatch):
    base = _ext.build_key(False)
    assert base == _ext.build_key(False)  # stable
    assert _ext.build_key(True) != base  # CUDA archs in the key
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert _ext.build_key(False) != base
    monkeypatch.undo()
    monkeypatch.setenv("PTV2_FAST_CUDA_ARCHS", "7.5")
    assert _ext.build_key(True) != _ext.build_key(False)


def test_key_changes_when_a_source_changes(tmp_path, monkeypatch):
    import shutil

    src = tmp_path / "csrc"
    shutil.copytree(_ext.source_dir(), src)
    monkeypatch.setattr(_ext, "source_dir", lambda: src)
    before = _ext.build_key(False)
    with open(src / "cpu" / "prefix_attention_cpu.cpp", "a") as fh:
        fh.write("\n// edited\n")
    assert _ext.build_key(False) != before


def test_cuda_sources_only_with_cuda():
    cpu = {p.suffix for p in _ext.sources(False)}
    assert cpu == {".cpp"}
    assert ".cu" in {p.suffix for p in _ext.sources(True)}
    assert _ext.cuda_wanted() == (torch.version.cuda is not None and _ext.cuda_home() is not None)


def test_disable_env_var(fresh_state, monkeypatch):
    monkeypatch.setenv("PTV2_FAST_DISABLE_EXT", "1")
    monkeypatch.setattr(_ext, "build", lambda **kw: pytest.fail("must not build when disabled"))
    assert _ext.load() is False
    assert ptv2_fast.resolve_backend("auto", "cpu") == "reference"
    with pytest.raises(ptv2_fast.BackendUnavailable, match="disabled"):
        ptv2_fast.resolve_backend("cpp", "cpu")


def test_failed_build_warns_once_and_falls_back(fresh_state, monkeypatch, tmp_path):
    log = tmp_path / "build.log"
    log.write_text("error: something did not compile\n")

    def failing_build(**kw):
        raise _ext.ExtensionBuildError(f"building the ptv2_fast extension failed; compiler output in {log}", log)

    monkeypatch.setattr(_ext, "build", failing_build)
    monkeypatch.setattr(_ext, "_prebuilt", lambda: None)
    monkeypatch.setenv("PTV2_FAST_EXT_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _ext.load(quiet=True) is False
        assert _ext.load(quiet=True) is False  # decided: no second warning
        q = torch.randn(1, 2, 3, 16)
        out = ptv2_fast.prefix_attention(q, q[:, :1], q[:, :1], torch.randn(1, 4, 16), torch.randn(1, 4, 16))
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1 and str(log) in msgs[0] and "Falling back" in msgs[0]
    assert torch.isfinite(out).all()


def test_concurrent_builds_share_one_library(tmp_path):
    # Two processes build into the same empty cache at once: the file lock makes one compile and the other
    # wait, and both end with the same working library.
    env = {**os.environ, "PTV2_FAST_EXT_CACHE": str(tmp_path), "PTV2_FAST_EXT_CUDA": "0", "MAX_JOBS": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "ptv2_fast._ext", "--no-cuda"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    libs = [next(ln for ln in o.splitlines() if ln.startswith("library:")) for o in outs]
    assert libs[0] == libs[1]
    assert len(list(tmp_path.glob("*/*.so"))) == 1  # one installed library (work/ holds the link output)
    assert _ext.verify(Path(libs[0].split(": ", 1)[1])) is None
    assert all("build info: cpu" in o for o in outs)


def test_cli_reports_a_failed_build(tmp_path, monkeypatch, capsys):
    log = tmp_path / "build.log"
    log.write_text("fatal error: boom.h: No such file\n")

    def failing_build(**kw):
        raise _ext.ExtensionBuildError("building the ptv2_fast extension failed", log)

    monkeypatch.setattr(_ext, "build", failing_build)
    assert _ext.main(["--no-cuda"]) == 1
    err = capsys.readouterr().err
    assert "boom.h" in err


def test_build_info_and_fakes_are_registered():
    assert _ext.load()
    assert torch.ops.ptv2_fast.build_info() in ("cpu", "cpu+cuda")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 5, 32)
        k = torch.empty(2, 2, 7, 32)
        pk = torch.empty(1, 2, 3, 32)
        out, lse = torch.ops.ptv2_fast.prefix_attention_fwd(q, k, k, pk, pk, None, None, None, None, False, 0.1)
        assert out.shape == q.shape and lse.shape == (2, 4, 5) and lse.dtype == torch.float32


def test_ahead_of_time_build_is_used_without_a_jit_build(tmp_path):
    # PTV2_FAST_BUILD_EXT=1 pip install . compiles the library into the package, tagged with its torch; an
    # import then loads it and never compiles (the JIT cache stays empty).
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".venv-cuda", ".git", "build", "dist",
                                                             "*.egg-info", "__pycache__", ".pytest_cache",
                                                             ".ruff_cache", "ptv2_fast_bench"))
    target = tmp_path / "site"
    env = {**os.environ, "PTV2_FAST_BUILD_EXT": "1", "PTV2_FAST_EXT_CUDA": "0", "MAX_JOBS": "2"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(src)], env=env, check=True, timeout=900)
    assert list((target / "ptv2_fast").glob("ptv2_fast_ext*.so"))
    cache = tmp_path / "jit-cache"
    code = ("import ptv2_fast, torch; from ptv2_fast import _ext; assert _ext.load(), _ext.status(); "
            "print(_ext.status()['path']); q = torch.randn(1, 2, 3, 16); "
            "print(ptv2_fast.resolve_backend('auto', 'cpu'), ptv2_fast.prefix_attention(q, q, q, q[0], q[0]).shape)")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(target), "PTV2_FAST_EXT_CACHE": str(cache)})
    assert str(target) in res.stdout and "cpp" in res.stdout, res.stdout + res.stderr
    assert not cache.exists()
