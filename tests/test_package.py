"""Packaging: the Triton kernels ship as ptv2_fast.kernels, never as a top-level ``kernels`` module."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

import ptv2_fast


def test_kernels_are_a_subpackage_and_know_nothing_of_ptv2_fast():
    import ptv2_fast.kernels as k

    assert k.__name__ == "ptv2_fast.kernels"
    src = pathlib.Path(k.__file__).parent
    for f in src.glob("*.py"):
        text = f.read_text()
        assert "import ptv2_fast" not in text and "from ptv2_fast" not in text, f"{f.name} imports ptv2_fast"


def test_no_top_level_kernels_module_is_installed(tmp_path):
    # From a neutral folder (not the checkout): a top-level `kernels` module must not be importable from
    # anything this project installed.
    code = ("import importlib.util, sys; s = importlib.util.find_spec('kernels'); "
            "print('none' if s is None else s.origin)")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = res.stdout.strip()
    if origin in ("none", "None"):  # nothing, or a namespace package (no file of ours)
        return
    path = pathlib.Path(origin)
    assert not path.is_file() or "prefix_attention" not in path.read_text(), f"our kernels importable as {origin}"


def test_import_is_light_and_registers_the_op():
    # Importing ptv2_fast must not import triton or the kernels (they load on first use).
    code = ("import sys, ptv2_fast, torch; assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'ptv2_fast.kernels' not in sys.modules; assert hasattr(torch.ops.ptv2_fast, 'prefix_attention')")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert ptv2_fast.__version__


def test_built_wheel_ships_kernels_inside_ptv2_fast(tmp_path):
    import shutil
    import zipfile

    # Build from a copy of the sources, so no stale build/ folder of the checkout leaks into the wheel.
    root = pathlib.Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".venv", ".venv-cuda", ".git", "build", "dist",
                                                             "*.egg-info", "__pycache__", ".pytest_cache",
                                                             ".ruff_cache", "ptv2_fast_bench"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True)
    (wheel,) = tmp_path.glob("ptv2_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ptv2_fast/kernels/prefix_attention_fwd.py" in names
    assert "ptv2_fast/kernels/__init__.py" in names
    assert "ptv2_fast/benchmarks/op_bench.py" in names
    assert "ptv2_fast/train/trainer.py" in names
    for f in ("accelerate_ddp.yaml", "accelerate_fsdp_multinode.yaml", "deepspeed_zero3.json"):  # launcher configs
        assert f"ptv2_fast/train/configs/{f}" in names, f
    # the extension's sources, so an installed wheel can JIT-build it
    for f in ("registration.cpp", "prefix_attention_api.cpp", "cpu/prefix_attention_cpu.cpp",
              "cuda/prefix_decode_cuda.cu", "prefix_decode_params.h"):
        assert f"ptv2_fast/csrc/{f}" in names, f
    assert not any(n.startswith(("kernels/", "benchmarks/", "tests/")) for n in names), "top-level package in wheel"


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (it is in the test extra)")
def test_lint_clean():
    root = pathlib.Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "ptv2_fast", "kernels", "benchmarks", "tests"],
                         cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
