"""The settings of a training run, and their checks (run before any model is loaded or data is read)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path


@dataclasses.dataclass
class TrainConfig:
    """Settings of a run. Defaults follow P-Tuning v2 for small encoders (prefix 16, no reparameterisation,
    learning rate 1e-2, prefix dropout 0.1). ``max_new_tokens``: generation length of causal-LM prediction."""

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
    overwrite: bool = False  # replace a run already in out_dir (refused otherwise, unless resume)
    progress: bool = True
    model_dropout: float | None = None  # override every dropout of the encoder (e.g. 0 for exact comparisons)
    fsdp: bool = False  # under torchrun: shard the model with FSDP2 instead of replicating it (DDP)
    max_new_tokens: int = 32


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that would train nothing useful, before any model is loaded: non-finite or non-positive
    learning rates (``--lr nan`` trained an all-NaN prefix and saved it as the best checkpoint), impossible
    sizes, and an ``--out`` that cannot hold a run (a file, or a folder that cannot be written: found only
    after an epoch of training otherwise)."""
    for name in ("lr", "head_lr"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not 0.0 <= cfg.prefix_dropout < 1.0:
        raise ValueError(f"prefix_dropout must be in [0, 1), got {cfg.prefix_dropout!r}")
    if cfg.model_dropout is not None and not 0.0 <= cfg.model_dropout < 1.0:
        raise ValueError(f"model_dropout must be in [0, 1), got {cfg.model_dropout!r}")
    for name in ("prefix_len", "epochs", "batch_size", "grad_accum", "patience", "max_len", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)!r}")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".ptv2_write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written: {e.strerror or e}") from None
