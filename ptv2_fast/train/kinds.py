"""What differs between the task kinds of ``ptv2-fast train``: the model class, how a batch is encoded, the
loss, the dev metric and prediction. One run trains tasks of one kind.

- ``seq_cls``: one label per text. One classifier whose outputs are the concatenation of every task's label
  space; a row of task t is scored on its task's slice only (the other logits are masked out of its softmax).
  Metric: accuracy.
- ``token_cls``: one tag per word, the same joint tag space per token. Each word's first sub-token carries its
  tag. Metric: word accuracy.
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


class SeqCls:
    name = "seq_cls"
    auto_class = "AutoModelForSequenceClassification"
    has_head = True

    def __init__(self, tasks):
        self.tasks, self.space = tasks, _Labels(tasks)

    @property
    def num_labels(self) -> int:
        return self.space.total

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

    def loss(self, model, enc, task_ids, targets, dtype) -> torch.Tensor:
        logits = self.logits(model, enc, task_ids, dtype)
        return torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE)

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

    def _joint(self, t: int, y):
        return [self.space.offset[t] + tag for tag in y]

    def encode(self, tok, batch, max_len: int, device):
        """Targets [B, L]: each word's tag on its first sub-token, IGNORE elsewhere (and on cut-off words)."""
        if not getattr(tok, "is_fast", False):
            raise ValueError("token classification needs a fast tokenizer (it maps sub-tokens to words)")
        enc = tok([list(x) for _, x, _ in batch], is_split_into_words=True, padding=True, truncation=True,
                  max_length=max_len, return_tensors="pt")
        targets = torch.full(enc["input_ids"].shape, IGNORE, dtype=torch.long)
        for i, (_, _, tags) in enumerate(batch):
            prev = None
            for j, w in enumerate(enc.word_ids(i)):
                if w is not None and w != prev:
                    targets[i, j] = IGNORE if tags is None else tags[w]
                prev = w
        enc = {k: v.to(device) for k, v in enc.items()}
        return enc, torch.tensor([t for t, _, _ in batch], device=device), targets.to(device)

    def baseline(self, task) -> float:
        """The majority-tag rate over the dev words."""
        tags = [tag for _, ys in task.dev for tag in ys]
        return max(tags.count(c) for c in range(len(task.labels))) / max(1, len(tags))

    def predict(self, model, tok, batch, max_len: int, device, **_) -> list:
        """One tag name per word (None for words cut off by max_len)."""
        batch = [(t, x, None) for t, x, _ in batch]
        enc, task_ids, _ = self.encode(tok, batch, max_len, device)
        pred = self.logits(model, enc, task_ids, None).argmax(-1).tolist()
        wordmap = tok([list(x) for _, x, _ in batch], is_split_into_words=True, truncation=True, max_length=max_len)
        out = []
        for i, (t, words, _) in enumerate(batch):
            tags = [None] * len(words)
            for j, w in enumerate(wordmap.word_ids(i)):
                if w is not None and tags[w] is None:
                    tags[w] = self.tasks[t].labels[pred[i][j] - self.space.offset[t]]
            out.append(tags)
        return out


class CausalLM:
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
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        return bos, eos, pad

    def _prompt_ids(self, tok, prompt: str) -> list[int]:
        bos, _, _ = self._special(tok)
        return ([bos] if bos is not None else []) + tok(prompt, add_special_tokens=False)["input_ids"]

    def encode(self, tok, batch, max_len: int, device):
        """Right-padded [bos] prompt completion [eos]; targets: the completion and eos, IGNORE elsewhere."""
        _, eos, pad = self._special(tok)
        rows, targets = [], []
        for _, prompt, completion in batch:
            p = self._prompt_ids(tok, prompt)
            c = tok(" " + completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            ids = (p + c)[:max_len]
            rows.append(ids)
            targets.append(([IGNORE] * len(p) + c)[:max_len])
        n = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (n - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows], device=device)
        labels = torch.tensor([y + [IGNORE] * (n - len(y)) for y in targets], device=device)
        return {"input_ids": ids, "attention_mask": mask}, torch.tensor([t for t, _, _ in batch], device=device), labels

    def loss(self, model, enc, task_ids, targets, dtype) -> torch.Tensor:
        with _autocast(task_ids.device, dtype):
            logits = model(**enc, prefix_index=task_ids).logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(),
                                                 ignore_index=IGNORE)

    def score(self, model, enc, task_ids, targets, dtype) -> tuple[int, int]:
        """Teacher-forced next-token accuracy on the completion tokens."""
        with _autocast(task_ids.device, dtype):
            pred = model(**enc, prefix_index=task_ids).logits[:, :-1].argmax(-1)
        tgt = targets[:, 1:]
        keep = tgt != IGNORE
        return int((pred == tgt)[keep].sum()), int(keep.sum())

    def baseline(self, task) -> None:
        return None

    def predict(self, model, tok, batch, max_len: int, device, max_new_tokens: int = 32, **_) -> list[str]:
        """Greedy completions; rows of different tasks in one left-padded batch."""
        _, eos, pad = self._special(tok)
        rows = [self._prompt_ids(tok, p)[-max_len:] for _, p, _ in batch]
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
            new = new[:new.index(eos)] if eos is not None and eos in new else new
            texts.append(tok.decode(new, skip_special_tokens=True).strip())
        return texts


KINDS = {k.name: k for k in (SeqCls, TokenCls, CausalLM)}


def for_tasks(tasks):
    """The kind object of a run; all its tasks must be of one kind."""
    kinds = sorted({t.kind for t in tasks})
    if len(kinds) != 1:
        raise ValueError(f"one run trains tasks of one kind, got {kinds} "
                         f"({', '.join(f'{t.name}: {t.kind}' for t in tasks)})")
    return KINDS[kinds[0]](tasks)
