"""``ptv2-fast`` command line: ``bench`` (the op against the naive concatenation paths on this machine),
``e2e`` and ``memory`` (Hugging Face models), ``train`` and ``predict`` (P-Tuning v2 end to end), ``configs``
(the shipped accelerate / DeepSpeed launcher configs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

import ptv2_fast

SHAPE_FLAGS = ("B", "Hq", "Hkv", "L", "S", "P", "T", "D")


def _bench_host(args) -> int:
    import warnings

    from ptv2_fast.benchmarks import host, op_bench

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices per call
    rounds = args.reps if args.reps is not None else 15
    if rounds < 1:
        raise SystemExit("ptv2-fast bench --host: --reps must be at least 1")
    print(f"host cost per call (CPU thread time, min of {rounds} interleaved rounds; one thread)...", file=sys.stderr)
    rep = host.host_report(rounds=rounds, bert_rounds=max(3, rounds // 2))
    rep["environment"] = op_bench.environment("cpu")
    print(host.format_report(rep))
    path = args.json or os.path.join(args.out, "bench_host.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rep, f, indent=2)
    os.replace(tmp, path)
    print(f"\nwrote {path}")
    return 0


_SHAPE_NAMES = {"B": "--batch", "Hq": "--heads", "Hkv": "--kv-heads", "L": "--query-len", "S": "--seq-len",
                "P": "--prefix-len", "T": "--tasks", "D": "--head-dim"}


def _check_shape(shape, dtype: str, device: str) -> None:
    """Refuse a benchmark shape that cannot run, with the flag to change, before anything is allocated."""
    for field, flag in _SHAPE_NAMES.items():
        if getattr(shape, field) < 1:
            what = "a prefix (P-Tuning v2 has one)" if field == "P" else "at least 1"
            raise SystemExit(f"ptv2-fast bench: {flag} must be {what}, got {getattr(shape, field)}")
    if not 16 <= shape.D <= 256:
        raise SystemExit(f"ptv2-fast bench: --head-dim must be in [16, 256], got {shape.D}")
    if shape.Hq % shape.Hkv:
        raise SystemExit(f"ptv2-fast bench: --heads {shape.Hq} must be a multiple of --kv-heads {shape.Hkv}")
    need = _bench_bytes(shape, dtype)
    have = _device_bytes(device)
    if have is not None and need > 0.8 * have:
        raise SystemExit(f"ptv2-fast bench: this shape needs about {need / 2**30:.1f} GiB (the naive path keeps "
                         f"[B, H, L, P + S] scores in fp32 and their gradients), more than 80% of the "
                         f"{have / 2**30:.1f} GiB of {device} memory here; lower --batch, --query-len or --seq-len")


def _bench_bytes(shape, dtype: str) -> int:
    """A generous estimate of the largest provider's peak: the naive path's fp32 scores and their backward
    (about four [B, Hq, L, P + S] tensors) plus q/k/v/out and their gradients with the concatenation."""
    item = 4 if dtype == "fp32" else 2
    scores = shape.B * shape.Hq * shape.L * (shape.P + shape.S) * 4 * 4
    tensors = (shape.B * shape.Hq * shape.L + 4 * shape.B * shape.Hkv * (shape.S + shape.P)) * shape.D * item * 4
    return scores + tensors


def _device_bytes(device: str) -> int | None:
    try:
        if device == "cuda":
            return torch.cuda.mem_get_info()[1]
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def _bench(args) -> int:
    from ptv2_fast.benchmarks import op_bench

    if args.host:
        return _bench_host(args)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("ptv2-fast bench: --device cuda, but torch sees no CUDA GPU")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    reps = args.reps if args.reps is not None else (10 if device == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else (3 if device == "cuda" else 1)
    if reps < 1:
        raise SystemExit(f"ptv2-fast bench: --reps must be at least 1, got {reps}")
    if warmup < 0:
        raise SystemExit(f"ptv2-fast bench: --warmup must be at least 0, got {warmup}")
    modes = args.modes.split(",") if args.modes else None
    for mode in modes or ():
        if mode not in op_bench.ALL_MODES:
            raise SystemExit(f"ptv2-fast bench: unknown mode {mode!r}; choose from {', '.join(op_bench.ALL_MODES)}")
    if args.quick and args.preset not in (None, "quick"):
        raise SystemExit(f"ptv2-fast bench: --quick and --preset {args.preset} ask for different presets")
    preset = "quick" if args.quick else (args.preset or "ptv2-nlu")
    custom = any(getattr(args, f) is not None for f in SHAPE_FLAGS) or args.causal or args.no_padding
    if custom or preset == "nlu":
        base = op_bench.PRESETS.get(preset) or op_bench.SWEEPS[preset].base
        shape = dataclasses.replace(base)
        for field in SHAPE_FLAGS:
            value = getattr(args, field)
            if value is not None:
                setattr(shape, field, value)
        if args.Hq is not None and args.Hkv is None:
            shape.Hkv = shape.Hq  # --heads alone means multi-head attention, not GQA
        shape.causal = shape.causal or args.causal
        shape.padded = shape.padded and not args.no_padding
        _check_shape(shape, dtype, device)
        modes = modes or (["decode"] if shape.L == 1 else list(op_bench.MODES))
        result = op_bench.run(shape, dtype=dtype, device=device, modes=modes, warmup=warmup, reps=reps,
                              progress=sys.stderr.isatty())
        print(op_bench.format_table(result))
        paths = []
    else:
        result = op_bench.run_preset(preset, dtype=dtype, device=device, modes=modes, warmup=warmup, reps=reps,
                                     progress=sys.stderr.isatty())
        print(op_bench.format_summary(result))
        paths = []
        if not args.no_plots:
            try:
                from ptv2_fast.benchmarks.plots import plot_preset

                paths = plot_preset(result, args.out)
            except ImportError:
                print("\n(no plots: matplotlib is not installed; pip install ptv2-fast[bench])")
    if device == "cpu":
        if ptv2_fast.resolve_backend("auto", "cpu") == "cpp":
            print("\nOn the CPU the op runs the fused C++ extension; the fused Triton kernels run on a CUDA GPU.")
        else:
            print("\nOn the CPU the op runs its concatenating reference backend here (the C++ extension is "
                  "unavailable); the fused Triton kernels run on a CUDA GPU.")
    json_path = args.json
    if json_path is None:
        os.makedirs(args.out, exist_ok=True)
        json_path = os.path.join(args.out, f"bench_{'custom' if custom else preset}.json")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {json_path}" + "".join(f"\nwrote {p}" for p in paths))
    return 0


def _e2e(args) -> int:
    from ptv2_fast.benchmarks import e2e

    result = e2e.run(args.model, device=args.device, dtype=args.dtype, steps=args.steps,
                     variants=args.variants.split(","), progress=sys.stderr.isatty(), batch=args.batch, seq=args.seq,
                     prefix=args.prefix)
    print(e2e.format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


def _memory(args) -> int:
    import warnings

    from ptv2_fast.benchmarks import memory_plan

    warnings.filterwarnings("ignore", message=".*past_key_values.*")  # PEFT's cache kwarg on transformers >= 5.2x
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*")  # renamed in transformers 5.2x

    plan = memory_plan.plan(args.model, args.batch, args.seq, args.prefix, tasks=args.tasks, mode=args.mode,
                            dtype=args.dtype, new_tokens=args.new_tokens, attention=args.attention,
                            grad_ckpt=args.grad_checkpointing)
    print(memory_plan.format_plan(plan))
    if args.json:
        memory_plan.save(plan, args.json)
        print(f"\nwrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ptv2-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time prefix attention vs naive_eager / sdpa_concat / sdpa_precat")
    b.add_argument("--quick", action="store_true", help="the quick preset: well under a minute on a 2-core CPU")
    b.add_argument("--host", action="store_true",
                   help="host cost per call instead of kernel time: CPU time of the op's forward and forward+backward "
                        "at a tiny shape against SDPA, device launches and would-be syncs per call, and a 24-layer "
                        "tiny BERT training step, PEFT vs patched (what decides GPU speed at small shapes)")
    b.add_argument("--preset",
                   choices=["quick", "ptv2-nlu", "decoder-train", "serve-decode", "cpu-ext", "nlu"],
                   help="a named sweep (default: ptv2-nlu; nlu is its single B=32 H=16 L=256 P=64 shape); shape "
                        "flags turn any preset into one shape")
    b.add_argument("--batch", dest="B", type=int)
    b.add_argument("--heads", dest="Hq", type=int)
    b.add_argument("--kv-heads", dest="Hkv", type=int)
    b.add_argument("--query-len", dest="L", type=int)
    b.add_argument("--seq-len", dest="S", type=int)
    b.add_argument("--prefix-len", dest="P", type=int)
    b.add_argument("--tasks", dest="T", type=int)
    b.add_argument("--head-dim", dest="D", type=int)
    b.add_argument("--causal", action="store_true")
    b.add_argument("--no-padding", action="store_true", help="every row uses all S keys")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    b.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    b.add_argument("--modes", help="comma-separated of fwd, bwd, fwd+bwd, decode (default: the preset's)")
    b.add_argument("--warmup", type=int, help="untimed runs first (default: 3 on a GPU, 1 on a CPU)")
    b.add_argument("--reps", type=int, help="timed runs, the median is reported (default: 10 on a GPU, 3 on a CPU)")
    b.add_argument("--json", help="write the result (environment, shapes, every figure) to this file")
    b.add_argument("--out", default="ptv2_fast_bench", help="folder for a preset's JSON and PNG plots")
    b.add_argument("--no-plots", action="store_true")
    b.set_defaults(func=_bench)

    e = sub.add_parser("e2e", help="a Hugging Face model's training step and inference pass: PEFT vs patched")
    e.add_argument("model", choices=["minilm", "smollm2", "bert-large", "roberta-large", "llama-1b", "llama-7b"],
                   help="minilm/smollm2: real weights (CPU-friendly); the others: random weights at GPU sizes")
    e.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    e.add_argument("--batch", type=int)
    e.add_argument("--seq", type=int)
    e.add_argument("--prefix", type=int)
    e.add_argument("--steps", type=int, default=4, help="timed steps per phase (after one untimed)")
    e.add_argument("--variants", default="peft,patched,full")
    e.add_argument("--json", help="write the result to this file")
    e.set_defaults(func=_e2e)

    m = sub.add_parser("memory", help="plan peak memory (naive PEFT path vs ptv2_fast) on the meta device")
    m.add_argument("model", help="a preset (minilm, smollm2, bert-large, roberta-large, llama-1b, llama-7b) or the "
                                 "path of a transformers config.json")
    m.add_argument("--batch", type=int, default=8)
    m.add_argument("--seq", type=int, default=512)
    m.add_argument("--prefix", type=int, default=64)
    m.add_argument("--tasks", type=int, default=1)
    m.add_argument("--mode", choices=["train", "serve"], default="train")
    m.add_argument("--new-tokens", type=int, default=0, help="serve: tokens generated after the prompt")
    m.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16")
    m.add_argument("--attention", choices=["fused", "reference"], default="fused",
                   help="plan ptv2_fast's fused kernels (default) or its concatenating reference backend")
    m.add_argument("--grad-checkpointing", action="store_true",
                   help="train: ptv2_fast with activation checkpointing (PEFT refuses it for prefix tuning)")
    m.add_argument("--json", help="write the plan to this file")
    m.set_defaults(func=_memory)

    t = sub.add_parser("train", help="P-Tuning v2 training of one bank of task prefixes (sequence or token "
                                     "classification, causal LM); under torchrun or accelerate launch, "
                                     "data-parallel (DDP) or sharded (--fsdp) over the processes")
    t.add_argument("tasks", nargs="*", default=["sentiment", "topic", "tense"],
                   help="synthetic tasks (sentiment, topic, tense; pos: token classification; plural: causal LM), "
                        "json/jsonl/csv files (text+label, tokens+tags or prompt+completion fields, optional "
                        "split) or hf:DATASET[:CONFIG] (online), each as SPEC or NAME=SPEC; several tasks of one "
                        "kind train one bank in mixed batches (default: the three synthetic classification tasks)")
    t.add_argument("--model", default="minilm", help="minilm or smollm2 (offline packages; smollm2 is a decoder, "
                                                     "for causal-LM tasks), a local folder or a hub name")
    t.add_argument("--out", default="ptv2_fast_run", help="checkpoint folder")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-2, help="prefix learning rate (P-Tuning v2: 5e-3 to 1e-2)")
    t.add_argument("--head-lr", type=float, default=1e-3)
    t.add_argument("--prefix-len", type=int, default=16)
    t.add_argument("--projection", action="store_true", help="the reparameterisation MLP")
    t.add_argument("--prefix-dropout", type=float, default=0.1)
    t.add_argument("--model-dropout", type=float, help="override every dropout of the encoder (0: none)")
    t.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 instead of DDP")
    t.add_argument("--max-len", type=int, default=64)
    t.add_argument("--patience", type=int, default=2, help="epochs without a better mean dev accuracy before stopping")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    t.add_argument("--grad-checkpointing", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoints stay until this run saves its first)")
    t.add_argument("--n-train", type=int, default=600, help="examples per synthetic task (train split)")
    t.add_argument("--n-dev", type=int, default=200, help="examples per synthetic task (dev split)")
    t.add_argument("--max-new-tokens", type=int, default=32, help="causal LM: tokens generated by predict")
    t.set_defaults(func=_train)

    c = sub.add_parser("configs", help="the paths of the shipped launcher configs (accelerate, DeepSpeed ZeRO-3)")
    c.add_argument("name", nargs="?", help="print only this config's path (for --config_file \"$(...)\")")
    c.set_defaults(func=_configs)

    pr = sub.add_parser("predict", help="batched inference with a trained bank, rows of several tasks in one batch: "
                                        "a label, one tag per word, or a generated completion per input")
    pr.add_argument("checkpoint", help="a folder written by ptv2-fast train")
    pr.add_argument("--task", help="the task of every line (plain-text input); jsonl input may name a task per row")
    pr.add_argument("--input", default="-", help="a text file (one example per line), a .jsonl file with task and "
                                                  "text (or tokens / prompt) fields, or - for standard input")
    pr.add_argument("--max-new-tokens", type=int, help="causal LM: tokens to generate (default: the run's setting)")
    pr.add_argument("--batch", type=int, default=64)
    pr.set_defaults(func=_predict)
    args = parser.parse_args(argv)
    return args.func(args)


def _train(args) -> int:
    from ptv2_fast.train import TrainConfig, format_summary, train

    cfg = TrainConfig(tasks=list(args.tasks), model=args.model, out_dir=args.out, prefix_len=args.prefix_len,
                      projection=args.projection, prefix_dropout=args.prefix_dropout, lr=args.lr,
                      head_lr=args.head_lr, epochs=args.epochs, batch_size=args.batch, grad_accum=args.grad_accum,
                      max_len=args.max_len, patience=args.patience, dtype=args.dtype,
                      grad_checkpointing=args.grad_checkpointing, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                      n_train=args.n_train, n_dev=args.n_dev, model_dropout=args.model_dropout, fsdp=args.fsdp,
                      max_new_tokens=args.max_new_tokens)
    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"ptv2-fast train: {e}") from e
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process reports
        print(format_summary(result))
        print(f"checkpoint: {args.out}")
    return 0


def _configs(args) -> int:
    from ptv2_fast.train.distributed import CONFIGS, config_path

    if args.name:
        try:
            print(config_path(args.name))
        except ValueError as e:
            raise SystemExit(f"ptv2-fast configs: {e}") from e
        return 0
    for p in sorted(CONFIGS.iterdir()):
        if p.suffix in (".yaml", ".json"):
            print(f"{p.stem:<28} {p}")
    return 0


def _predict(args) -> int:
    import time

    from ptv2_fast.train import Predictor

    try:
        lines = (sys.stdin.read() if args.input == "-" else open(args.input).read()).splitlines()
    except OSError as e:
        raise SystemExit(f"ptv2-fast predict: {e}") from e
    # jsonl (a .jsonl file, or lines that are JSON objects): text and task per row; else one text per line,
    # blank lines included, so the output lines up with the input
    if args.input.endswith(".jsonl") or (lines and all(ln.lstrip().startswith("{") for ln in lines if ln.strip())):
        try:
            recs = [json.loads(ln) for ln in lines if ln.strip()]
            texts = [next(r[f] for f in ("text", "tokens", "prompt") if f in r) for r in recs]
        except (ValueError, StopIteration, TypeError) as e:
            raise SystemExit(f"ptv2-fast predict: every jsonl row needs a text, tokens or prompt field ({e})") from e
        tasks = [r.get("task", args.task) for r in recs]
    else:
        texts, tasks = lines, [args.task] * len(lines)
    if any(t is None for t in tasks):
        raise SystemExit("ptv2-fast predict: give --task, or a task field on every jsonl row")
    try:
        predictor = Predictor.load(args.checkpoint)
        if args.max_new_tokens is not None:
            predictor.max_new_tokens = args.max_new_tokens
        t0 = time.perf_counter()
        outputs = predictor.predict(texts, tasks, batch_size=args.batch)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"ptv2-fast predict: {e}") from e
    dt = time.perf_counter() - t0
    # one output line per input: a label, the tags of the words ("_" for words cut off by --max-len), or the
    # completion with every line-breaking character escaped (\n, \r, \u2028, ...)
    for out in outputs:
        if isinstance(out, list):
            out = " ".join("_" if tag is None else tag for tag in out)
        print("".join(json.dumps(ch)[1:-1] if ch.splitlines() != [ch] or ch == "\\" else ch for ch in out))
    print(f"{len(texts)} examples in {dt:.2f} s ({len(texts) / max(dt, 1e-9):.0f} examples/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
