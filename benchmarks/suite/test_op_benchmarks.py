"""The op microbenchmarks as pytest-benchmark tests, for regression tracking (not part of the unit tests):

    pytest benchmarks/suite --benchmark-autosave            # store a run
    pytest benchmarks/suite --benchmark-compare             # compare with the last stored run

Shapes: the quick preset's base shape everywhere, plus ptv2-nlu's on a GPU. Providers and modes are those
of ``ptv2-fast bench``; each benchmark records the shape, dtype and device in ``extra_info``.
"""

import dataclasses

import pytest
import torch

from ptv2_fast.benchmarks import op_bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bf16" if DEVICE == "cuda" else "fp32"
SHAPES = {"quick": op_bench.SWEEPS["quick"].base}
if DEVICE == "cuda":
    SHAPES["ptv2-nlu"] = op_bench.SWEEPS["ptv2-nlu"].base
    SHAPES["serve-decode"] = op_bench.SWEEPS["serve-decode"].base
PROVIDERS = ("ptv2_fast", "naive_eager", "sdpa_concat", "sdpa_precat", "cascade")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_op(benchmark, shape_name, mode, provider):
    shape = SHAPES[shape_name]
    if shape.L == 1:
        mode = "decode" if mode == "fwd" else pytest.skip("decode shapes are forward only")
    tensors, idx, kw, dout = op_bench.make_inputs(shape, op_bench.DTYPES[DTYPE], DEVICE)
    provs = op_bench.providers(shape, tensors, idx, kw, DEVICE)
    name = next(p for p in provs if p.startswith(provider))
    fn, leaves, has_bwd = provs[name]
    if mode == "fwd+bwd" and not has_bwd:
        pytest.skip(f"{provider} has no backward")
    for x in leaves:
        x.requires_grad_(True)
    benchmark.extra_info.update(provider=name, mode=mode, dtype=DTYPE, device=DEVICE, **dataclasses.asdict(shape))

    def step():
        op_bench._step(fn, leaves, dout, mode)
        op_bench._sync(DEVICE)

    benchmark.pedantic(step, warmup_rounds=2, rounds=10 if DEVICE == "cpu" else 50)
