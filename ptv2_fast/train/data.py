"""Tasks for ``ptv2-fast train``: the embedded synthetic ones, or local json / jsonl / csv files.

A file holds one example per record with a ``text`` and a ``label`` field (any label values; their sorted
set becomes the classes), and optionally ``split`` ("train", or "dev"/"validation"; anything else, such as
test rows, is refused). Without a split field a seeded 20% of the records becomes the dev split.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from .synthetic import GENERATORS, Task, make_task


def _records(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return list(csv.DictReader(fh))
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json task file must hold a list of records (or {{'data': [...]}})")
    return data


DEV_NAMES = ("dev", "validation", "valid", "val")


def _split(value, path, i):
    """"train" or "dev" (dev, validation, valid, val; any case), None when absent; test rows and other
    values are refused rather than trained on."""
    if value is None or str(value).strip() == "":
        return None
    v = str(value).strip().lower()
    if v == "train":
        return "train"
    if v in DEV_NAMES:
        return "dev"
    raise ValueError(f"{path}: record {i} has split {value!r}; use train or dev (validation), and keep test rows out")


def load_task_file(path: str | Path, name: str | None = None, seed: int = 0) -> Task:
    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl", ".csv"):
        raise ValueError(f"{path}: task files are .json, .jsonl or .csv")
    recs = _records(path)
    for i, r in enumerate(recs):
        if r.get("text") is None or r.get("label") is None:
            raise ValueError(f"{path}: record {i} lacks a 'text' or 'label' value: {r!r}")
    labels = sorted({str(r["label"]) for r in recs})
    if len(labels) < 2:
        raise ValueError(f"{path}: a classification task needs at least two label values, got {labels}")
    index = {lab: i for i, lab in enumerate(labels)}
    items = [(str(r["text"]), index[str(r["label"])], _split(r.get("split"), path, i)) for i, r in enumerate(recs)]
    if any(s for _, _, s in items):
        if any(s is None for _, _, s in items):
            raise ValueError(f"{path}: some records have a split field and some do not")
        train = [(t, y) for t, y, s in items if s == "train"]
        dev = [(t, y) for t, y, s in items if s == "dev"]
    else:
        rng = random.Random(seed)
        rng.shuffle(items)
        n_dev = max(1, len(items) // 5)
        dev, train = [(t, y) for t, y, _ in items[:n_dev]], [(t, y) for t, y, _ in items[n_dev:]]
    if not train or not dev:
        raise ValueError(f"{path}: needs both train and dev examples")
    return Task(name or path.stem, labels, train=train, dev=dev)


def load_task(spec: str, seed: int = 0, n_train: int = 600, n_dev: int = 200) -> Task:
    """``spec``: a synthetic task name (sentiment, topic, tense), a file path, or ``name=path``."""
    if spec in GENERATORS:
        return make_task(spec, n_train=n_train, n_dev=n_dev, seed=seed)
    name, _, path = spec.rpartition("=")
    if not Path(path).is_file():
        raise ValueError(f"task {spec!r} is neither a synthetic task ({', '.join(GENERATORS)}) nor a file")
    return load_task_file(path, name or None, seed=seed)
