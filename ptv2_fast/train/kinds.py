"""What differs between the task kinds of ``ptv2-fast train``: the model class, how a batch is encoded, the
loss, the dev metric and prediction. One run trains tasks of one kind.

- ``seq_cls``: one label per text. One classifier whose outputs are the concatenation of every task's label
  space; a row of task t is scored on its task's slice only (the other logits are masked out of its softmax).
  Metric: accuracy.
- ``token_cls``: one tag per word, the same joint tag space per token. Each word's first sub-token carries its
  tag. Metric: entity F1 for BIO tag sets (``B-X``/``I-X``/``O``, entities as conlleval and seqeval count
  them), word accuracy for other tag sets.
- ``causal_lm``: a completion per prompt. The loss is the LM loss on the completion (and end-of-sequence)
  tokens; only the prefix bank trains. Metric: teacher-forced token accuracy of the dev completions;
  prediction generates.

Examples are tuples ``(task id, input, target)``, where input and target depend on the kind:

| kind | input | target |
| --- | --- | --- |
| seq_cls | text | joint label index |
| token_cls | list of words | list of joint tag indices |
| causal_lm | prompt | completion |
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

IGNORE = -100


class _Labels:
    """The joint label space: task t owns outputs [offset[t], offset[t] + n[t])."""

    def __init__(self, tasks):
        self.n = [len(t.labels) for t in tasks]
        self.offset = [sum(self.n[:i]) for i in range(len(tasks))]
        self.total = sum(self.n)

    def mask(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Bool [B, total]: the outputs each row may be scored on."""
        cols = torch.arange(self.total, device=task_ids.device)
        lo = torch.tensor(self.offset, device=task_ids.device)[task_ids]
        hi = lo + torch.tensor(self.n, device=task_ids.device)[task_ids]
        return (cols[None] >= lo[:, None]) & (cols[None] < hi[:, None])


def _autocast(device: torch.device, dtype):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


class _Kind:
    def score_batch(self, model, tok, batch, max_len: int, device, dtype) -> tuple[int, int]:
        """(right, counted) of the dev metric on one batch of examples."""
        enc, task_ids, targets = self.encode(tok, batch, max_len, device)
        return self.score(model, enc, task_ids, targets, dtype)


class SeqCls(_Kind):
    name = "seq_cls"
    auto_class = "AutoModelForSequenceClassification"
    has_head = True

    def __init__(self, tasks):
        self.tasks, self.space = tasks, _Labels(tasks)

    @property
    def num_labels(self) -> int:
        return self.space.total

    def metric_name(self) -> str:
        return "accuracy"

    def examples(self, split: str) -> list[tuple]:
        return [(t, x, self._joint(t, y)) for t, task in enumerate(self.tasks) for x, y in getattr(task, split)]

    def _joint(self, t: int, y):
        return self.space.offset[t] + y

    def encode(self, tok, batch, max_len: int, device):
        """(model inputs, task_ids [B], targets [B] or None when the batch has no targets)."""
        enc = tok([x for _, x, _ in batch], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        ys = [y for _, _, y in batch]
        targets = None if None in ys else torch.tensor(ys, device=device)  # None: prediction
        return enc, torch.tensor([t for t, _, _ in batch], device=device), targets

    def logits(self, model, enc, task_ids, dtype) -> torch.Tensor:
        """Joint-space logits with other tasks' outputs at -inf: [B, total] (seq_cls) or [B, L, total]."""
        with _autocast(task_ids.device, dtype):
            logits = model(**enc, prefix_index=task_ids).logits.float()
        mask = self.space.mask(task_ids)
        return logits.masked_fill(~(mask if logits.dim() == 2 else mask[:, None]), float("-inf"))

    def loss_sum(self, model, enc, task_ids, targets, dtype) -> torch.Tensor:
        """The summed cross-entropy over the batch's targets (the trainer divides by the global count)."""
        logits = self.logits(model, enc, task_ids, dtype)
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE,
                                                 reduction="sum")

    @staticmethod
    def num_targets(targets: torch.Tensor) -> int:
        return int((targets != IGNORE).sum())

    def score(self, model, enc, task_ids, targets, dtype) -> tuple[int, int]:
        """(right, counted) on one batch."""
        pred = self.logits(model, enc, task_ids, dtype).argmax(-1)
        keep = targets != IGNORE
        return int((pred == targets)[keep].sum()), int(keep.sum())

    def baseline(self, task) -> float:
        """The majority-class rate of the dev split."""
        ys = [y for _, y in task.dev]
        return max(ys.count(c) for c in range(len(task.labels))) / max(1, len(ys))

    def predict(self, model, tok, batch, max_len: int, device, **_) -> list:
        enc, task_ids, _ = self.encode(tok, batch, max_len, device)
        pred = self.logits(model, enc, task_ids, None).argmax(-1).tolist()
        return [self.tasks[t].labels[p - self.space.offset[t]] for (t, _, _), p in zip(batch, pred)]


class TokenCls(SeqCls):
    name = "token_cls"
    auto_class = "AutoModelForTokenClassification"

    def __init__(self, tasks):
        super().__init__(tasks)
        self.bio = [is_bio(t.labels) for t in tasks]

    def metric_name(self) -> str:
        kinds = {"entity F1" if b else "word accuracy" for b in self.bio}
        return " / ".join(sorted(kinds))

    def _joint(self, t: int, y):
        return [self.space.offset[t] + tag for tag in y]

    def score(self, model, enc, task_ids, targets, dtype) -> tuple[int, int]:
        """(right, counted) such that right / counted is the metric: words right / words, or for BIO tasks
        2·TP / (2·TP + FP + FN) over entities, which sums over batches like a ratio of counts."""
        pred = self.logits(model, enc, task_ids, dtype).argmax(-1)
        keep = targets != IGNORE
        right = counted = 0
        for i, t in enumerate(task_ids.tolist()):
            gold, got = targets[i][keep[i]].tolist(), pred[i][keep[i]].tolist()
            if not self.bio[t]:
                right += sum(a == b for a, b in zip(gold, got))
                counted += len(gold)
                continue
            names = self.tasks[t].labels
            off = self.space.offset[t]
            g, p = spans([names[x - off] for x in gold]), spans([names[x - off] for x in got])
            right += 2 * len(g & p)
            counted += len(g) + len(p)
        return right, counted

    @staticmethod
    def _tokenize(tok, batch, max_len: int):
        if not getattr(tok, "is_fast", False):
            raise ValueError("token classification needs a fast tokenizer (it maps sub-tokens to words)")
        return tok([list(x) for _, x, _ in batch], is_split_into_words=True, padding=True, truncation=True,
                   max_length=max_len, return_tensors="pt")

    @staticmethod
    def _first_tokens(enc, i: int):
        """(position, word) of each word's first sub-token in row i of a (padded) BatchEncoding."""
        prev = None
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None and w != prev:
                yield j, w
            prev = w

    def _encoded(self, be, batch, device):
        """(model inputs, task_ids, targets [B, L]) from a tokenized batch: each word's tag on its first
        sub-token, IGNORE elsewhere (and on cut-off words)."""
        targets = torch.full(be["input_ids"].shape, IGNORE, dtype=torch.long)
        for i, (_, _, tags) in enumerate(batch):
            if tags is not None:
                for j, w in self._first_tokens(be, i):
                    targets[i, j] = tags[w]
        enc = {k: v.to(device) for k, v in be.items()}
        return enc, torch.tensor([t for t, _, _ in batch], device=device), targets.to(device)

    def encode(self, tok, batch, max_len: int, device):
        return self._encoded(self._tokenize(tok, batch, max_len), batch, device)

    def score_batch(self, model, tok, batch, max_len: int, device, dtype) -> tuple[int, int]:
        be = self._tokenize(tok, batch, max_len)
        right, counted = self.score(model, *self._encoded(be, batch, device), dtype)
        return right, counted + self._cut(be, batch)

    def _cut(self, be, batch) -> int:
        """What max_len cut off in a tokenized batch, counted as wrong in the dev metric: the cut-off words, or
        for BIO tasks the gold entities starting in them (missed entities)."""
        n = 0
        for i, (t, x, y) in enumerate(batch):
            kept = sum(1 for _ in self._first_tokens(be, i))
            if not self.bio[t]:
                n += len(x) - kept
            elif kept < len(x):
                names = self.tasks[t].labels
                n += sum(1 for start, _, _ in spans([names[v - self.space.offset[t]] for v in y]) if start >= kept)
        return n

    def baseline(self, task) -> float | None:
        """The majority-tag rate over the dev words (None for BIO tasks: tagging all O scores 0 F1)."""
        if is_bio(task.labels):
            return None
        tags = [tag for _, ys in task.dev for tag in ys]
        return max(tags.count(c) for c in range(len(task.labels))) / max(1, len(tags))

    def predict(self, model, tok, batch, max_len: int, device, **_) -> list:
        """One tag name per word (None for words cut off by max_len)."""
        enc = self._tokenize(tok, batch, max_len)
        task_ids = torch.tensor([t for t, _, _ in batch], device=device)
        pred = self.logits(model, {k: v.to(device) for k, v in enc.items()}, task_ids, None).argmax(-1).tolist()
        out = []
        for i, (t, words, _) in enumerate(batch):
            tags = [None] * len(words)
            for j, w in self._first_tokens(enc, i):  # positions of the same padded batch the model saw
                tags[w] = self.tasks[t].labels[pred[i][j] - self.space.offset[t]]
            out.append(tags)
        return out


class CausalLM(_Kind):
    name = "causal_lm"
    auto_class = "AutoModelForCausalLM"
    has_head = False
    num_labels = None

    def __init__(self, tasks):
        self.tasks = tasks

    def examples(self, split: str) -> list[tuple]:
        return [(t, p, c) for t, task in enumerate(self.tasks) for p, c in getattr(task, split)]

    @staticmethod
    def _special(tok):
        """(bos or None, eos, pad) token ids; eos falls back to sep, pad to eos."""
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        if eos is None:
            raise ValueError("causal-LM tasks need a tokenizer with an end-of-sequence (or separator) token")
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        return bos, eos, pad

    def _pieces(self, tok, prompt: str, completion: str | None):
        """(bos list, prompt ids, completion ids + [eos] or None). The completion is tokenized as the
        continuation of the prompt (so no stray word-boundary token starts it)."""
        bos, eos, _ = self._special(tok)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = None
        if completion is not None:
            full = tok(prompt + " " + completion, add_special_tokens=False)["input_ids"]
            c = full[len(p):] if full[:len(p)] == p else tok(" " + completion, add_special_tokens=False)["input_ids"]
            c = c + [eos]
        return ([bos] if bos is not None else []), p, c

    @staticmethod
    def _fit(head: list, p: list, c: list | None, max_len: int) -> tuple[list, list]:
        """Cut to max_len tokens: the start of the completion is kept first (at least half of max_len, or
        all of it), then the end of the prompt; the bos token always stays. Returns (prompt part, completion
        part) with the bos inside the prompt part."""
        c = c or []
        keep_c = min(len(c), max(max_len // 2, max_len - len(head) - len(p)))
        room = max(0, max_len - len(head) - keep_c)
        return head + (p[len(p) - room:] if room else []), c[:keep_c]

    def encode(self, tok, batch, max_len: int, device):
        """Right-padded [bos] prompt completion [eos]; targets: the completion and eos, IGNORE elsewhere."""
        _, _, pad = self._special(tok)
        rows, targets = [], []
        for _, prompt, completion in batch:
            p, c = self._fit(*self._pieces(tok, prompt, completion), max_len)
            rows.append(p + c)
            targets.append([IGNORE] * len(p) + c)
        n = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (n - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], device=device)
        labels = torch.tensor([y + [IGNORE] * (n - len(y)) for y in targets], device=device)
        return {"input_ids": ids, "attention_mask": mask}, torch.tensor([t for t, _, _ in batch], device=device), labels

    def loss_sum(self, model, enc, task_ids, targets, dtype) -> torch.Tensor:
        """The summed next-token cross-entropy over the completion tokens (0 when a shard has none)."""
        with _autocast(task_ids.device, dtype):
            logits = model(**enc, prefix_index=task_ids, use_cache=False).logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(),
                                                 ignore_index=IGNORE, reduction="sum")

    @staticmethod
    def num_targets(targets: torch.Tensor) -> int:
        return int((targets[:, 1:] != IGNORE).sum())

    def score(self, model, enc, task_ids, targets, dtype) -> tuple[int, int]:
        """Teacher-forced next-token accuracy on the completion tokens."""
        with _autocast(task_ids.device, dtype):
            pred = model(**enc, prefix_index=task_ids, use_cache=False).logits[:, :-1].argmax(-1)
        tgt = targets[:, 1:]
        keep = tgt != IGNORE
        return int((pred == tgt)[keep].sum()), int(keep.sum())

    def baseline(self, task) -> None:
        return None

    def metric_name(self) -> str:
        return "token accuracy"

    def predict(self, model, tok, batch, max_len: int, device, max_new_tokens: int = 32, **_) -> list[str]:
        """Greedy completions; rows of different tasks in one left-padded batch. A prompt longer than max_len
        keeps the bos token and its last tokens."""
        _, eos, pad = self._special(tok)
        rows = [self._fit(*self._pieces(tok, p, None), max_len)[0] for _, p, _ in batch]
        if not all(rows):
            raise ValueError("an empty prompt, and this tokenizer has no beginning-of-sequence token to start from")
        n = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], device=device)
        task_ids = torch.tensor([t for t, _, _ in batch], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, prefix_index=task_ids, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=eos)
        texts = []
        for row in out.tolist():
            new = row[n:]
            new = new[:new.index(eos)] if eos in new else new
            texts.append(tok.decode(new, skip_special_tokens=True).strip())
        return texts


def is_bio(labels) -> bool:
    """A BIO tag set: "O" and tags B-X / I-X, with at least one B-."""
    return any(t.startswith("B-") for t in labels) and all(t == "O" or t[:2] in ("B-", "I-") for t in labels)


def spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """Entities (start, end, type) of a BIO tag sequence, as conlleval counts them: an entity starts at B-X,
    or at I-X that does not continue an entity of type X, and runs over the I-X that follow."""
    out, start, typ = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, kind = tag.partition("-") if tag != "O" else ("O", "", "")
        if prefix == "I" and start is not None and kind == typ:
            continue
        if start is not None:
            out.add((start, i, typ))
        start, typ = (i, kind) if prefix in ("B", "I") else (None, None)
    return out


KINDS = {k.name: k for k in (SeqCls, TokenCls, CausalLM)}


def for_tasks(tasks):
    """The kind object of a run; all its tasks must be of one kind."""
    kinds = sorted({t.kind for t in tasks})
    if len(kinds) != 1:
        raise ValueError(f"one run trains tasks of one kind, got {kinds} "
                         f"({', '.join(f'{t.name}: {t.kind}' for t in tasks)})")
    return KINDS[kinds[0]](tasks)
