"""The baselines compute the same attention as the reference, and ``ptv2-fast bench`` produces its table and JSON."""

import json

import pytest
import torch

import ptv2_fast
from ptv2_fast.benchmarks import baselines, op_bench
from ptv2_fast.cli import main
from ptv2_fast.reference import prefix_attention_ref

from _util import Case, make_problem


@pytest.mark.parametrize("case", [
    pytest.param(Case(P=7, T=3, Hkv=2, causal=True, mask="kv_lens", plens=True), id="gqa-causal-kvlens"),
    pytest.param(Case(P=5, T=1, Hkv=4, mask="kpm", bank3d=True), id="shared-prefix-kpm"),
    pytest.param(Case(P=5, T=2, Hkv=4), id="no-mask"),
])
def test_baselines_equal_the_reference(case):
    tensors, idx, kw, _, _ = make_problem(case)
    if "kv_lens" in kw:
        kw["kv_lens"] = kw["kv_lens"].clamp(min=1)  # the baselines give NaN/uniform rows where nothing is visible
    if "key_padding_mask" in kw:
        kw["key_padding_mask"][:, 0] = True
    truth = prefix_attention_ref(*tensors, idx, compute_dtype=torch.float64, **kw)
    for fn in (baselines.naive_eager, baselines.sdpa_concat):
        torch.testing.assert_close(fn(*tensors, idx, **kw).double(), truth.double(), rtol=1e-5, atol=1e-5)
    q, k, v, pk, pv = tensors
    keys, values = baselines.precat(k, v, pk, pv, idx)
    mask = baselines.widened_mask(q, k, pk, idx, kw.get("prefix_lens"), kw.get("kv_lens"), kw.get("key_padding_mask"),
                           kw["causal"])
    torch.testing.assert_close(baselines.sdpa_precat(q, keys, values, mask).double(), truth.double(),
                               rtol=1e-5, atol=1e-5)


def test_bench_run_reports_every_provider_and_mode():
    shape = op_bench.Shape(B=2, Hq=2, Hkv=1, L=16, S=24, P=8, T=2, D=16, causal=True)
    res = op_bench.run(shape, dtype="fp32", device="cpu", warmup=0, reps=2, progress=False)
    names = {r["provider"] for r in res["results"]}
    assert names == {"ptv2_fast[reference]", "naive_eager", "sdpa_concat", "sdpa_precat"}
    assert {r["mode"] for r in res["results"]} == {"fwd", "fwd+bwd"}
    for r in res["results"]:
        assert r["ms"] > 0 and r["tflops"] > 0 and r["max_err"] < 1e-4, r
        if r["provider"] == "naive_eager":
            assert r["vs_naive_eager"] == 1.0
    assert res["environment"]["torch"] == torch.__version__ and res["environment"]["date"]
    json.dumps(res)
    # FLOPs count the prefix and only the visible causal part of the sequence.
    full = op_bench.Shape(B=1, Hq=1, Hkv=1, L=4, S=4, P=2, T=1, D=1, causal=True)
    assert full.visible_keys_per_query() == 2 + (1 + 2 + 3 + 4) / 4


def test_cli_bench_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--batch", "2", "--heads", "2", "--query-len", "8", "--seq-len", "8",
                 "--prefix-len", "4", "--reps", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "naive_eager" in text and "sdpa_concat" in text and "ptv2_fast[" in text
    data = json.loads(out.read_text())
    assert data["shape"]["B"] == 2 and data["shape"]["Hkv"] == 2 and data["environment"]["device"]
    assert ptv2_fast.__version__ == data["environment"]["ptv2_fast"]
