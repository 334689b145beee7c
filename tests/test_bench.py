"""The baselines compute the same attention as the reference, and ``ptv2-fast bench`` produces its table and JSON."""

import json

import pytest
import torch

import ptv2_fast
from ptv2_fast import _ext
from ptv2_fast.benchmarks import baselines, op_bench
from ptv2_fast.cli import main
from ptv2_fast.reference import prefix_attention_ref

from _util import Case, make_problem

# the provider name of ptv2_fast on this machine's CPU: the C++ extension, or the reference without it
OURS = f"ptv2_fast[{ptv2_fast.resolve_backend('auto', 'cpu')}]"


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
    assert names == {OURS, "naive_eager", "sdpa_concat", "sdpa_precat"} | ({"ptv2_fast[sdpa]"} if _ext.load() else set())
    assert {r["mode"] for r in res["results"]} == {"fwd", "fwd+bwd"}
    for name in names:  # every provider in every mode
        assert {r["mode"] for r in res["results"] if r["provider"] == name} == {"fwd", "fwd+bwd"}
    # the kernel each SDPA-based provider ran
    from torch.nn.attention import SDPBackend

    assert res["kernels"]["sdpa_precat"] in SDPBackend.__members__  # MATH here: GQA with a mask
    assert res["kernels"]["ptv2_fast[sdpa]"] == "cpu_flash"
    for r in res["results"]:
        assert r["ms"] > 0 and r["tflops"] > 0 and r["max_err"] < 1e-4, r
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0
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



def test_flops_and_cache_formulas():
    s = op_bench.Shape(B=2, Hq=4, Hkv=2, L=3, S=5, P=7, T=3, D=8)
    fwd = 4 * 2 * 4 * 3 * (7 + 5) * 8
    assert s.flops("fwd") == fwd == s.flops("decode")
    assert s.flops("bwd") == 2.5 * fwd and s.flops("fwd+bwd") == 3.5 * fwd
    per_key = 2 * 2 * 8 * 2  # K and V, Hkv heads, D, fp16 bytes
    assert s.cache_bytes("ptv2_fast[triton]", 2) == per_key * (2 * 5 + 3 * 7)  # the bank once
    assert s.cache_bytes("sdpa_precat", 2) == per_key * 2 * (5 + 7)  # a prefix copy per row


def test_cpu_peak_bytes_counts_live_tensors():
    def two_live():
        a = torch.empty(1000, 250)  # 1 MB
        b = torch.empty(1000, 500)  # 2 MB, while a lives
        del a
        c = torch.empty(1000, 250)  # 1 MB after a was freed
        return b, c

    peak = op_bench.cpu_peak_bytes(two_live)
    assert 3_000_000 <= peak < 3_100_000
    # allocations inside a composite op count too: softmax of fp16 in fp32 upcasts internally
    x = torch.randn(1000, 1000)
    assert op_bench.cpu_peak_bytes(lambda: torch.softmax(x.half(), -1, dtype=torch.float32)) == (2 + 4 + 4) * 10**6
    # and a backward pass: exp saves its output, its gradient is one more buffer
    w = torch.randn(1000, 1000, requires_grad=True)
    assert op_bench.cpu_peak_bytes(lambda: w.exp().sum().backward()) >= 2 * 4 * 10**6


def test_bench_modes_bwd_and_decode():
    shape = op_bench.Shape(B=3, Hq=4, Hkv=2, L=1, S=20, P=6, T=2, D=16)
    res = op_bench.run(shape, modes=("decode", "bwd"), warmup=0, reps=1, progress=False)
    decode = {r["provider"]: r for r in res["results"] if r["mode"] == "decode"}
    assert decode[OURS]["cache_mb"] < decode["sdpa_precat"]["cache_mb"]
    assert all(r["max_err"] < 1e-4 and r["ms"] > 0 for r in res["results"])
    assert {r["provider"] for r in res["results"] if r["mode"] == "bwd"} == {
        OURS, "naive_eager", "sdpa_concat", "sdpa_precat"} | ({"ptv2_fast[sdpa]"} if _ext.load() else set())
    assert decode["ptv2_fast[sdpa]"]["max_err"] < 1e-4


def test_presets_are_well_formed():
    for name, preset in op_bench.SWEEPS.items():
        shapes = preset.shapes()
        if preset.fixed:  # a list of unrelated shapes (cpu-ext: one per model)
            assert {series for series, _ in shapes} == {"single"} and len(shapes) == len(preset.fixed), name
        else:
            assert {"seq", "prefix"} <= {series for series, _ in shapes}, name
        for _, shape in shapes:
            assert shape.Hq % shape.Hkv == 0 and (shape.L == shape.S or shape.L == 1)
    assert op_bench.SWEEPS["serve-decode"].base.L == 1 and op_bench.SWEEPS["serve-decode"].modes == ("decode",)


def test_cli_bench_preset_writes_json_and_pngs(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    tiny = op_bench.Preset(op_bench.Shape(B=2, Hq=2, Hkv=1, L=8, S=8, P=4, T=2, D=16), seq=(8, 16), prefix=(2, 4),
                           description="tiny")
    monkeypatch.setitem(op_bench.SWEEPS, "quick", tiny)
    assert main(["bench", "--quick", "--reps", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "/naive" in text and "wrote" in text
    data = json.loads((tmp_path / "bench_quick.json").read_text())
    assert data["preset"] == "quick" and len(data["runs"]) == 4 and data["environment"]["device"]
    for axis in ("L", "P"):
        png = (tmp_path / f"bench_quick_vs_{axis}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_bench_single_shape_and_bad_flags(tmp_path, capsys):
    assert main(["bench", "--batch", "2", "--heads", "4", "--kv-heads", "2", "--query-len", "1", "--seq-len", "16",
                 "--prefix-len", "4", "--tasks", "3", "--device", "cpu", "--reps", "1", "--warmup", "0",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_custom.json").read_text())
    assert {r["mode"] for r in data["results"]} == {"decode"}  # q_len 1 defaults to decode mode
    with pytest.raises(SystemExit, match="multiple of --kv-heads"):
        main(["bench", "--heads", "4", "--kv-heads", "3", "--device", "cpu"])
    with pytest.raises(SystemExit, match="different presets"):
        main(["bench", "--quick", "--preset", "ptv2-nlu"])
    with pytest.raises(SystemExit, match="unknown mode"):
        main(["bench", "--quick", "--modes", "sideways"])


def test_cli_e2e_runs_and_writes_json(tmp_path, capsys, monkeypatch):
    pytest.importorskip("peft")
    from ptv2_fast.benchmarks import e2e

    out = tmp_path / "e2e.json"
    assert main(["e2e", "minilm", "--batch", "2", "--seq", "12", "--prefix", "4", "--steps", "1", "--device", "cpu",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "patched" in text and "x PEFT" in text
    data = json.loads(out.read_text())
    variants = {r["variant"]: r for r in data["results"]}
    assert set(variants) == set(e2e.VARIANTS)
    for r in data["results"]:
        assert (r["B"], r["L"], r["P"]) == (2, 12, 4)
        for phase in ("train", "infer"):
            assert r[phase]["ms"] > 0 and r[phase]["peak_bytes"] > 0
    assert variants["peft"]["train"]["time_vs_peft"] == 1.0
    assert variants["patched"]["trainable_params"] == variants["peft"]["trainable_params"] > 0


def test_gpu_probe_runs_and_reports_every_probe(tmp_path):
    # On a machine without a GPU the probe runs on CPU activity at tiny sizes: a check of the script itself
    # (benchmarks/gpu_check.sh runs it first on a GPU).
    pytest.importorskip("peft")
    from ptv2_fast.benchmarks import gpu_probe

    res = gpu_probe.probe(str(tmp_path), device="cpu", small=True)
    assert res["errors"] == []
    assert [r["shape"]["dropout_p"] for r in res["op"]] == [0.0, 0.1]
    assert [r["variant"] for r in res["bert_large"]] == ["peft", "patched"]
    for r in res["op"]:
        for part in ("forward", "forward_backward"):
            assert r[part]["wall_ms_per_call"] > 0 and "syncs_per_call" in r[part]
    for r in res["bert_large"]:
        assert r["train"]["kernels_per_call"] > 0 and r["infer"]["kernels_per_call"] > 0
    assert (tmp_path / "gpu_probe.json").is_file()
    assert "bert-large patched train step" in (tmp_path / "gpu_probe.txt").read_text()


def test_bench_host_cli_writes_its_table(tmp_path, capsys):
    pytest.importorskip("peft")
    assert main(["bench", "--host", "--reps", "2", "--json", str(tmp_path / "host.json")]) == 0
    out = capsys.readouterr().out
    assert "| ptv2_fast |" in out and "tiny BERT training step" in out
    rep = json.loads((tmp_path / "host.json").read_text())
    assert rep["counts"]["ptv2_fast"]["forward"]["launches"] == 1
    assert rep["bert_inference_syncs"]["patched_bank"] <= rep["bert_inference_syncs"]["peft"] + 1


@pytest.mark.parametrize("flags,message", [
    (["--prefix-len", "0"], "--prefix-len must be a prefix"),  # killed the process with SIGFPE before
    (["--kv-heads", "0"], "--kv-heads must be at least 1"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--head-dim", "8"], "--head-dim must be in"),
    (["--reps", "0"], "--reps must be at least 1"),
    (["--warmup", "-1"], "--warmup must be at least 0"),
    (["--batch", "4096", "--query-len", "65536", "--seq-len", "65536"], "GiB"),  # a 20 TB request: refused first
])
def test_bench_refuses_impossible_shapes_with_the_flag_to_change(flags, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--device", "cpu", *flags])
