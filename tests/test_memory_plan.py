"""``ptv2-fast memory``: the meta-device plan against measured CPU peaks, its formulas, and the CLI."""

import json

import pytest

pytest.importorskip("peft")

from _hf_util import tiny_config  # noqa: E402

from ptv2_fast.benchmarks import memory_plan  # noqa: E402
from ptv2_fast.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
# The stated tolerance: the simulated step peak is within 10% of the measured CPU peak (on these models it
# is exact but for the Llama training step, 6% low: CPU kernels whose allocations differ from their meta
# counterparts).
TOLERANCE = 0.10


def _config_file(tmp_path, model_type, **kw):
    cfg = tiny_config(model_type, hidden_size=128, intermediate_size=256, max_position_embeddings=256, **kw)
    cfg.architectures = ["LlamaForCausalLM"] if model_type == "llama" else ["BertModel"]
    cfg.save_pretrained(tmp_path / model_type)
    return str(tmp_path / model_type / "config.json")


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("mode", ["train", "serve"])
def test_simulated_step_peak_matches_measured_cpu_peak(tmp_path, model_type, mode):
    """The naive path, and ptv2_fast planned with the attention the CPU runs (the fused C++ kernels, or the
    reference backend without the extension), against the same step measured on the CPU (torch's profiler,
    exact tensor bytes)."""
    from ptv2_fast import _ext

    path = _config_file(tmp_path, model_type)
    attention = "fused" if _ext.load() else "reference"
    plan = memory_plan.plan(path, batch=8, seq=96, prefix=32, mode=mode, attention=attention)
    for variant in ("naive", "ptv2_fast"):
        got = memory_plan.measure_step_cpu(path, variant, batch=8, seq=96, prefix=32, mode=mode)
        want = plan[variant]["step"] + (plan[variant].get("kv_cache", 0) if mode == "serve" else 0)
        assert abs(want - got) <= TOLERANCE * got, (variant, want, got)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_gradient_checkpointing_plan_matches_measured_cpu_peak(tmp_path, model_type):
    """ptv2_fast's training step with activation checkpointing, simulated vs measured; and it needs less
    than the same step without (the naive path stays unchanged: PEFT refuses checkpointing)."""
    from ptv2_fast import _ext

    path = _config_file(tmp_path, model_type)
    attention = "fused" if _ext.load() else "reference"
    with_ckpt = memory_plan.plan(path, batch=8, seq=96, prefix=32, mode="train", attention=attention, grad_ckpt=True)
    without = memory_plan.plan(path, batch=8, seq=96, prefix=32, mode="train", attention=attention)
    got = memory_plan.measure_step_cpu(path, "ptv2_fast", batch=8, seq=96, prefix=32, mode="train", grad_ckpt=True)
    assert abs(with_ckpt["ptv2_fast"]["step"] - got) <= TOLERANCE * got
    assert with_ckpt["ptv2_fast"]["step"] < without["ptv2_fast"]["step"]
    assert with_ckpt["naive"] == without["naive"]


def test_fused_plan_keeps_no_attention_matrix(tmp_path):
    """Planned for the fused kernels, ptv2_fast's training step needs less than the naive path's, which keeps
    the [B, H, L, P+S] probabilities for backward."""
    path = _config_file(tmp_path, "bert")
    fused = memory_plan.plan(path, batch=8, seq=96, prefix=32, mode="train")
    reference = memory_plan.plan(path, batch=8, seq=96, prefix=32, mode="train", attention="reference")
    assert fused["ptv2_fast"]["step"] < fused["naive"]["step"]
    assert fused["ptv2_fast"]["step"] < reference["ptv2_fast"]["step"]
    assert fused["naive"]["step"] == reference["naive"]["step"]


def test_static_components_and_serving_cache(tmp_path):
    path = _config_file(tmp_path, "llama")
    from transformers import AutoConfig

    from ptv2_fast.hf.models import geometry

    geo = geometry(AutoConfig.from_pretrained(path.rsplit("/", 1)[0]))
    layers, kv_heads, head_dim = geo.num_layers, geo.num_kv_heads, geo.head_dim
    B, S, P, T, new = 6, 40, 16, 3, 10
    plan = memory_plan.plan(path, batch=B, seq=S, prefix=P, tasks=T, mode="serve", dtype="bf16", new_tokens=new)
    per_key = layers * 2 * kv_heads * head_dim * 2  # K and V, bf16
    assert plan["naive"]["kv_cache"] == per_key * B * (S + new + P)  # each row carries its prefix copy
    assert plan["ptv2_fast"]["kv_cache"] == per_key * B * (S + new)  # sequence tokens only: the bank is a parameter
    prefix_fp32 = layers * 2 * kv_heads * head_dim * P * 4
    assert plan["naive"]["prefix"] == plan["ptv2_fast"]["prefix"] == T * prefix_fp32
    assert plan["naive"]["weights"] == plan["ptv2_fast"]["weights"] > 0
    train = memory_plan.plan(path, batch=2, seq=16, prefix=P, tasks=T, mode="train")
    assert train["ptv2_fast"]["optimizer"] == 2 * T * prefix_fp32 and train["naive"]["optimizer"] == 2 * prefix_fp32
    for variant in ("naive", "ptv2_fast"):
        row = train[variant]
        assert row["total"] == sum(v for k, v in row.items() if k != "total")


def test_plan_allocates_nothing_for_a_7b_model():
    """llama-7b plans on the meta device: no parameter is ever materialised."""
    plan = memory_plan.plan("llama-7b", batch=4, seq=64, prefix=8, mode="serve", dtype="bf16")
    assert 12 * 2**30 < plan["naive"]["weights"] < 14 * 2**30
    assert plan["ptv2_fast"]["kv_cache"] < plan["naive"]["kv_cache"]


def test_cli_memory_prints_and_writes_json(tmp_path, capsys):
    path = _config_file(tmp_path, "bert")
    out = tmp_path / "plan.json"
    assert main(["memory", path, "--batch", "2", "--seq", "16", "--prefix", "4", "--dtype", "fp32",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "naive (PEFT)" in text and "ptv2_fast" in text and "step peak" in text
    data = json.loads(out.read_text())
    assert data["mode"] == "train" and data["ptv2_fast"]["total"] > 0
    with pytest.raises(ValueError, match="unknown model"):
        memory_plan.plan("no-such-model", 1, 8, 2)
