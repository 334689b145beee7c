"""Test setup: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any kernel is defined, i.e. before ptv2_fast.kernels is imported.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Deterministic mode (used to poison outputs) needs this for cuBLAS in the fp64 reference on a GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def poisoned_outputs():
    """Fill every fresh torch.empty with NaN, so an output element a kernel forgot to write fails the test."""
    import torch.utils.deterministic as det

    old_alg, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    # warn_only: the reference's own ops may lack deterministic GPU kernels; poisoning still applies.
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_alg)
    det.fill_uninitialized_memory = old_fill


def pytest_runtest_logreport(report):
    """With PTV2_FAST_FAILURE_LOG set, append each failure to that file as it happens (for time-limited GPU
    runs, where a killed pytest never prints its summary)."""
    path = os.environ.get("PTV2_FAST_FAILURE_LOG")
    if path and report.failed:
        text = str(report.longrepr)
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{text[-1500:]}\n")
