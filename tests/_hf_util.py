"""Tiny random Hugging Face models and the naive (PEFT-style, concatenating) prefix reference."""

from __future__ import annotations

import copy

import torch
from torch import nn

MODEL_TYPES = ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2")
DECODERS = ("gpt2", "llama", "mistral", "qwen2")
VOCAB = 97


def tiny_config(model_type: str, **overrides):
    """A 2-layer random config of ``model_type`` (GQA 4/2 heads for the Llama family), no dropout."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, hidden_size=64)
    if model_type in ("bert", "roberta"):
        cls = tf.BertConfig if model_type == "bert" else tf.RobertaConfig
        cfg = cls(**common, intermediate_size=64, max_position_embeddings=96, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, pad_token_id=1)
    elif model_type == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, n_positions=96, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    else:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[model_type]
        extra = {"sliding_window": None} if model_type == "mistral" else {}
        cfg = cls(**common, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=96,
                  pad_token_id=0, **extra)
    for key, val in overrides.items():
        setattr(cfg, key, val)
    cfg.num_labels = 3
    cfg.classifier_dropout = 0.0
    if model_type == "gpt2":
        cfg.summary_first_dropout = 0.0
    return cfg


def tiny_model(model_type: str, head: str = "base", seed: int = 0, **overrides):
    """head: base | seq_cls | token_cls | causal_lm."""
    import transformers as tf

    auto = {"base": tf.AutoModel, "seq_cls": tf.AutoModelForSequenceClassification,
            "token_cls": tf.AutoModelForTokenClassification, "causal_lm": tf.AutoModelForCausalLM}[head]
    torch.manual_seed(seed)
    model = auto.from_config(tiny_config(model_type, **overrides), attn_implementation="eager")
    return model.float()


class FixedBank(nn.Module):
    """A prefix source that is one trainable leaf bank [layers, 2, T, Hkv, P, D] (for exact gradient checks)."""

    def __init__(self, bank: torch.Tensor, prefix_lens=None):
        super().__init__()
        self.bank = nn.Parameter(bank.clone())
        layers, _, self.num_tasks, self.num_kv_heads, self.prefix_len, self.head_dim = bank.shape
        self.num_layers = layers
        self.prefix_lens = prefix_lens

    def forward(self, prefix_index=None):
        return self.bank


def random_bank(config, tasks: int, P: int, seed: int = 1) -> torch.Tensor:
    from ptv2_fast.hf.models import geometry

    g = geometry(config)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(g.num_layers, 2, tasks, g.num_kv_heads, P, g.head_dim, generator=gen)


def inputs(batch: int, length: int, padding: str, seed: int = 2):
    """input_ids [B, L] (no pad id inside real tokens) and the 2D mask (None for padding='none')."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    if padding == "none":
        return ids, None
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(1, batch):
        n = (3 * b) % (length - 1) + 1  # some padding on every row but the first
        if padding == "right":
            mask[b, length - n:] = 0
        else:
            mask[b, :n] = 0
    ids = ids.masked_fill(mask == 0, 1)
    return ids, mask


def naive_forward(model, bank, prefix_index, input_ids, attention_mask, **kwargs):
    """The PEFT / P-Tuning v2 path on an unpatched model: per-sample prefix copies in a DynamicCache and a
    mask widened by P ones (positions shift by P through the cache length)."""
    from transformers import DynamicCache

    B = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[0]
    layers, _, T, _, P, _ = bank.shape
    rows = torch.zeros(B, dtype=torch.long, device=bank.device) if prefix_index is None else prefix_index
    cache = DynamicCache(config=model.config)
    for layer in range(layers):
        cache.update(bank[layer, 0][rows], bank[layer, 1][rows], layer)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
    return model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                 **kwargs)


def clone_unpatched(model):
    return copy.deepcopy(model)


@torch.no_grad()
def greedy_by_forward(model, input_ids, attention_mask, steps: int, **kwargs):
    """Greedy decoding by full forward passes (no cache): position ids from the mask, as generate() makes
    them, so left padding is handled. The slow ground truth for generate()."""
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids
