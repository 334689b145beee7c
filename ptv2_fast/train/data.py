"""Tasks for ``ptv2-fast train``: the embedded synthetic ones, local json / jsonl / csv files, or Hugging Face
dataset names (``hf:NAME`` or ``hf:NAME:CONFIG``; these need the ``datasets`` package and a network).

A record's fields decide the task's kind:

| fields | kind |
| --- | --- |
| ``text`` and ``label`` (any label values; their sorted set becomes the classes) | sequence classification |
| ``tokens`` and ``tags`` (lists, or space-separated strings in csv) | token classification |
| ``prompt`` and ``completion`` | causal LM |

A record may also hold a ``split`` field: "train", or "dev"/"validation". Anything else, such as test rows,
is refused. Without a split field, a seeded 20% of the records becomes the dev split. Hub datasets may
name their columns differently (``sentence``, ``ner_tags``, ``question``/``answer``, ...); the usual names
are recognised.
"""

from __future__ import annotations

import csv
import json
import random
import re
import warnings
from pathlib import Path

from .synthetic import GENERATORS, Task, make_task

DEV_NAMES = ("dev", "validation", "valid", "val")
# kind -> (input field, target field); then the column names hub datasets use for them
FIELDS = {"seq_cls": ("text", "label"), "token_cls": ("tokens", "tags"), "causal_lm": ("prompt", "completion")}
HUB_COLUMNS = {"text": ("text", "sentence", "content", "document"), "label": ("label", "labels"),
               "tokens": ("tokens", "words"), "tags": ("tags", "ner_tags", "pos_tags", "chunk_tags"),
               "prompt": ("prompt", "instruction", "question", "input"),
               "completion": ("completion", "output", "response", "answer")}
# instruction datasets (Alpaca: instruction/input/output, Dolly: instruction/context/response): the second
# column, when not empty, follows the instruction in the prompt
PROMPT_EXTRA = ("input", "context")


# A task name becomes a folder name (its PEFT adapter) under the run's --out: letters, digits, ., _ and -,
# starting with a letter or digit (so never "..", a path separator or a hidden file).
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_task_name(name: str, source=None) -> str:
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name) or ".." in name:
        where = f"{source}: " if source is not None else ""
        raise ValueError(f"{where}task name {name!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit (it names the task's adapter folder); give one with NAME=SPEC")
    return name


def _records(path: Path) -> list[dict]:
    """The file's records, each a dict; errors name the file and, for JSON, the line."""
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as fh:
                return list(csv.DictReader(fh))
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if path.suffix.lower() == ".jsonl":
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json task file must hold a list of records (or {{'data': [...]}})")
    bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: record {bad} is a {type(data[bad]).__name__}, not an object with named fields")
    return data


def _label(value, source, i) -> str:
    """A label value as its class name: 1, 1.0 and "1" name one class; a bool is refused (True == 1 in JSON
    arithmetic but "True" as text: ambiguous)."""
    if isinstance(value, bool):
        raise ValueError(f"{source}: record {i} has the boolean label {value!r}; use 0/1 or class names")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        raise ValueError(f"{source}: record {i} has a {type(value).__name__} label {value!r}")
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() and "e" not in text.lower() else text


def _split(value, source, i):
    """"train" or "dev" (dev, validation, valid, val; any case), None when absent; test rows and other
    values are refused rather than trained on."""
    if value is None or str(value).strip() == "":
        return None
    v = str(value).strip().lower()
    if v == "train":
        return "train"
    if v in DEV_NAMES:
        return "dev"
    raise ValueError(f"{source}: record {i} has split {value!r}; use train or dev (validation), and keep test rows out")


def _kind(recs: list[dict], source, columns=None) -> str:
    if not recs:
        raise ValueError(f"{source}: no records")
    for kind, (x, y) in FIELDS.items():
        if x in recs[0] and y in recs[0]:
            return kind
    raise ValueError(f"{source}: records need text+label (classification), tokens+tags (token classification) or "
                     f"prompt+completion (causal LM) fields; the first has {sorted(columns or recs[0])}")


def _words(value) -> list[str]:
    return value.split() if isinstance(value, str) else [str(w) for w in value]


def task_from_records(name: str, recs: list[dict], source, seed: int = 0, label_names: list[str] | None = None) -> Task:
    """A task from records (see the module docstring); ``label_names``: the classes/tags in order, when the
    labels are already indices into them (hub datasets)."""
    check_task_name(name, source)
    kind = _kind(recs, source)
    x_field, y_field = FIELDS[kind]
    for i, r in enumerate(recs):
        if r.get(x_field) is None or r.get(y_field) is None:
            raise ValueError(f"{source}: record {i} lacks a {x_field!r} or {y_field!r} value: {r!r}")
    labels: list[str] = []
    if kind == "token_cls":  # an empty sentence has nothing to tag: skip it
        recs = [r for r in recs if _words(r["tokens"])]
        if not recs:
            raise ValueError(f"{source}: every record has an empty token list")
    if kind == "causal_lm":
        items = [(str(r["prompt"]), str(r["completion"])) for r in recs]
    else:
        raw = [[r[y_field]] if kind == "seq_cls" else _words(r[y_field]) for r in recs]
        if label_names is not None:
            labels = list(label_names)
            bad = next((v for row in raw for v in row if not 0 <= int(v) < len(labels)), None)
            if bad is not None:
                raise ValueError(f"{source}: label {bad} is outside the dataset's {len(labels)} classes {labels}")
            names = [[labels[int(v)] for v in row] for row in raw]
        else:
            names = [[_label(v, source, i) for v in row] for i, row in enumerate(raw)]
            labels = sorted({v for row in names for v in row})
        if kind == "seq_cls" and len(labels) < 2:
            raise ValueError(f"{source}: a classification task needs at least two label values, got {labels}")
        index = {lab: i for i, lab in enumerate(labels)}
        if kind == "seq_cls":
            items = [(str(r["text"]), index[row[0]]) for r, row in zip(recs, names)]
        else:
            items = []
            for i, (r, row) in enumerate(zip(recs, names)):
                words = _words(r["tokens"])
                if len(words) != len(row) or not words:
                    raise ValueError(f"{source}: record {i} has {len(words)} tokens but {len(row)} tags")
                items.append((tuple(words), tuple(index[v] for v in row)))
    splits = [_split(r.get("split"), source, i) for i, r in enumerate(recs)]
    if any(splits):
        if not all(splits):
            raise ValueError(f"{source}: some records have a split field and some do not")
        train = [it for it, s in zip(items, splits) if s == "train"]
        dev = [it for it, s in zip(items, splits) if s == "dev"]
    else:
        items = list(items)
        random.Random(seed).shuffle(items)
        n_dev = max(1, len(items) // 5)
        dev, train = items[:n_dev], items[n_dev:]
    if not train or not dev:
        raise ValueError(f"{source}: needs both train and dev examples")
    return Task(name, labels, train=train, dev=dev, kind=kind)


def load_task_file(path: str | Path, name: str | None = None, seed: int = 0) -> Task:
    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl", ".csv"):
        raise ValueError(f"{path}: task files are .json, .jsonl or .csv")
    return task_from_records(name or path.stem, _records(path), path, seed=seed)


def load_hub_task(spec: str, name: str | None = None, seed: int = 0) -> Task:
    """``spec``: ``NAME`` or ``NAME:CONFIG`` of a Hugging Face dataset with a train split (and a validation
    split, else 20% of train becomes dev)."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError("hub datasets need the datasets package (pip install datasets)") from e
    path, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(path, config or None)
    except Exception as e:  # offline, unknown name, missing config, ...: say which dataset
        text = f"{type(e).__name__}: {e}"
        offline = isinstance(e, (ConnectionError, TimeoutError)) or any(
            w in text.lower() for w in ("offline", "connection", "network", "resolve"))
        raise ValueError(f"could not load the dataset {spec!r} from the hub ({text})" +
                         ("; hub datasets need a network, local files do not" if offline else "")) from e
    dev_split = next((s for s in DEV_NAMES if s in ds), None)
    if "train" not in ds:
        raise ValueError(f"dataset {spec!r} has no train split (splits: {list(ds)})")
    columns = list(ds["train"].column_names)
    rename = {}
    for field, options in HUB_COLUMNS.items():
        found = next((c for c in options if c in columns), None)
        if found is not None:
            rename[field] = found
    extra = next((c for c in PROMPT_EXTRA if c in columns and c != rename.get("prompt")), None)
    recs, dropped = [], 0
    for split in ["train"] + ([dev_split] if dev_split else []):
        for row in ds[split]:
            rec = {f: row[c] for f, c in rename.items()}
            if extra and "prompt" in rec and str(row[extra] or "").strip():
                rec["prompt"] = f"{rec['prompt']}\n{row[extra]}"
            if dev_split:
                rec["split"] = "dev" if split == dev_split else "train"
            # a negative class index means "no gold label" (e.g. SNLI's -1): such rows are left out
            y = rec.get("label", rec.get("tags"))
            if isinstance(y, int) and y < 0 or isinstance(y, list) and any(isinstance(v, int) and v < 0 for v in y):
                dropped += 1
                continue
            recs.append(rec)
    if dropped:
        warnings.warn(f"dataset {spec!r}: {dropped} rows without a gold label (negative class index) left out",
                      stacklevel=2)
    label_names = None
    kind = _kind(recs, spec, columns)
    y_col = rename.get(FIELDS[kind][1])
    if kind != "causal_lm" and y_col is not None:
        feature = ds["train"].features[y_col]
        feature = getattr(feature, "feature", feature)  # a sequence of ClassLabel for tags
        label_names = getattr(feature, "names", None)
    default = path.rsplit("/", 1)[-1] + (f"_{config}" if config else "")
    return task_from_records(name or default, recs, spec, seed=seed, label_names=label_names)


def load_task(spec: str, seed: int = 0, n_train: int = 600, n_dev: int = 200) -> Task:
    """``spec``: a synthetic task name, a file path or ``hf:NAME[:CONFIG]``, optionally after ``name=``."""
    if spec in GENERATORS:
        return make_task(spec, n_train=n_train, n_dev=n_dev, seed=seed)
    name, _, source = spec.partition("=") if "=" in spec else ("", "", spec)
    if source.startswith("hf:"):
        return load_hub_task(source[3:], name or None, seed=seed)
    if not Path(source).is_file():
        raise ValueError(f"task {spec!r} is neither a synthetic task ({', '.join(GENERATORS)}), a file, nor an "
                         "hf:NAME dataset")
    return load_task_file(source, name or None, seed=seed)
