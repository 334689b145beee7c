"""``PrefixEncoder``: a bank of T task prefixes for every layer of a model, P-Tuning v2 style."""

from __future__ import annotations

import math

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """A bank of ``num_tasks`` trainable prefixes for all layers, produced once per forward.

    ``forward()`` returns the bank ``[layers, 2, T, Hkv, P, D]`` (index 0 of dim 1 holds keys, 1 values).
    Each task has its own parameters, as if T P-Tuning v2 prefixes were trained separately:

    - direct (``projection=False``): ``embedding`` [T, P, layers*2*Hkv*D], as PEFT's PrefixEncoder
      without projection (and P-Tuning v2's ``prefix_projection=False``).
    - reparameterised (``projection=True``): per task ``Embedding(P, token_dim) -> Linear(token_dim,
      hidden) -> Tanh -> Linear(hidden, layers*2*Hkv*D)``, evaluated once per task per forward (never once
      per sample) with batched matrix products.

    The last dimension is laid out as PEFT's and P-Tuning v2's are, ``[layers, 2, Hkv, D]``, so a PEFT
    adapter's ``prompt_embeddings`` loads into one task row unchanged (see ``ptv2_fast.hf.peft``).

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention geometry (GQA: Hkv key/value heads).
        prefix_len: P, the (largest) prefix length.
        num_tasks: T, the number of bank rows.
        projection: use the reparameterisation MLP.
        token_dim: width of the prefix embedding when ``projection`` (default Hkv*D, as PEFT).
        hidden_size: width of the MLP's hidden layer (default ``token_dim``, as PEFT's encoder_hidden_size).
        prefix_lens: optional per-task valid lengths [T] (<= P); columns past a task's length are unused.
        dropout: prefix dropout probability (P-Tuning v2 applies ``hidden_dropout_prob`` to the prefix).
        dropout_per_sample: P-Tuning v2 draws a separate dropout mask for every sample; by default ptv2_fast
            draws one mask per task per forward (no B-fold prefix copy). Set True for the per-sample masks;
            the model then reads a B-row bank (one row per sample) for that forward.
        dtype, device: of the parameters.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, prefix_len: int, num_tasks: int = 1, *,
                 projection: bool = False, token_dim: int | None = None, hidden_size: int | None = None,
                 prefix_lens=None, dropout: float = 0.0, dropout_per_sample: bool = False, dtype=None, device=None):
        super().__init__()
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("prefix_len", prefix_len), ("num_tasks", num_tasks)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"PrefixEncoder: {name} must be a positive int, got {val!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"PrefixEncoder: dropout must be in [0, 1), got {dropout}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.prefix_len, self.num_tasks, self.projection = prefix_len, num_tasks, projection
        self.dropout_p, self.dropout_per_sample = float(dropout), bool(dropout_per_sample)
        out_dim = num_layers * 2 * num_kv_heads * head_dim
        kw = {"dtype": dtype, "device": device}
        T, P = num_tasks, prefix_len
        if projection:
            self.token_dim = token_dim or num_kv_heads * head_dim
            self.hidden_size = hidden_size or self.token_dim
            self.embedding = nn.Parameter(torch.empty(T, P, self.token_dim, **kw))
            self.w1 = nn.Parameter(torch.empty(T, self.token_dim, self.hidden_size, **kw))
            self.b1 = nn.Parameter(torch.empty(T, self.hidden_size, **kw))
            self.w2 = nn.Parameter(torch.empty(T, self.hidden_size, out_dim, **kw))
            self.b2 = nn.Parameter(torch.empty(T, out_dim, **kw))
        else:
            self.token_dim, self.hidden_size = out_dim, None
            self.embedding = nn.Parameter(torch.empty(T, P, out_dim, **kw))
        if prefix_lens is not None:
            lens = torch.as_tensor(prefix_lens, dtype=torch.int64).flatten().cpu()
            if lens.numel() != T or bool((lens < 0).any()) or bool((lens > P).any()):
                raise ValueError(f"PrefixEncoder: prefix_lens must be {T} ints in [0, {P}], got {lens.tolist()}")
            self.register_buffer("prefix_lens", lens.to(device), persistent=True)
        else:
            self.prefix_lens = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as nn.Embedding (N(0, 1)) and nn.Linear (uniform in +-1/sqrt(fan_in)) would."""
        with torch.no_grad():
            nn.init.normal_(self.embedding)
            if self.projection:
                for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
                    bound = 1.0 / math.sqrt(w.shape[1])
                    nn.init.uniform_(w, -bound, bound)
                    nn.init.uniform_(b, -bound, bound)

    def task_embeddings(self) -> torch.Tensor:
        """[T, P, layers*2*Hkv*D]: each task's prefix in PEFT's ``prompt_embeddings`` layout."""
        if not self.projection:
            return self.embedding
        h = torch.tanh(torch.baddbmm(self.b1.unsqueeze(1), self.embedding, self.w1))
        return torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)

    def forward(self, prefix_index: torch.Tensor | None = None) -> torch.Tensor:
        """The bank ``[layers, 2, T, Hkv, P, D]`` (dropout applied in training).

        With ``dropout_per_sample`` in training, ``prefix_index`` [B] selects one row per sample before the
        dropout and the result has B rows instead of T (row b belongs to sample b).
        """
        emb = self.task_embeddings()
        if self.training and self.dropout_p > 0.0 and self.dropout_per_sample:
            if prefix_index is None:
                raise ValueError("PrefixEncoder(dropout_per_sample=True) needs prefix_index [B] in training")
            emb = emb.index_select(0, prefix_index.to(emb.device, torch.int64))
        emb = nn.functional.dropout(emb, self.dropout_p, self.training)
        return bank_from_embeddings(emb, self.num_layers, self.num_kv_heads, self.head_dim)

    def per_sample(self) -> bool:
        """True when this forward's bank has one row per sample (per-sample prefix dropout in training)."""
        return self.training and self.dropout_p > 0.0 and self.dropout_per_sample

    def extra_repr(self) -> str:
        return (f"layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"prefix_len={self.prefix_len}, tasks={self.num_tasks}, projection={self.projection}, "
                f"dropout={self.dropout_p}")


def bank_from_embeddings(emb: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[T, P, layers*2*Hkv*D] (PEFT/P-Tuning v2 layout) -> bank [layers, 2, T, Hkv, P, D] (a view)."""
    T, P, width = emb.shape
    if width != num_layers * 2 * num_kv_heads * head_dim:
        raise ValueError(f"prefix embeddings have width {width}, expected layers*2*Hkv*D = "
                         f"{num_layers}*2*{num_kv_heads}*{head_dim}")
    return emb.view(T, P, num_layers, 2, num_kv_heads, head_dim).permute(2, 3, 0, 4, 1, 5)
