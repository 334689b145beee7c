"""patch_model on tiny random models of every supported family: equivalence with the naive (PEFT-style)
concatenating path, mixed-task batches, the patch's lifecycle, refusals, checkpointing and compile."""

import itertools

import pytest
import torch

pytest.importorskip("transformers")

from _hf_util import DECODERS, MODEL_TYPES, FixedBank, clone_unpatched, inputs, naive_forward, random_bank, tiny_model  # noqa: E402

from ptv2_fast.hf import PrefixEncoder, UnsupportedModelError, is_patched, patch_model, unpatch_model  # noqa: E402

from _util import DEVICE  # noqa: E402

# transformers >= 5.2x renames past_key_values (which the naive reference passes) to cache
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning",
                                        "ignore:.*gradient_checkpointing_enable.*:FutureWarning")

HEADS = ("base", "seq_cls", "token_cls", "causal_lm")
ATOL, RTOL = 3e-5, 1e-4


def _cases():
    for model_type, head in itertools.product(MODEL_TYPES, HEADS):
        if head == "causal_lm" and model_type not in DECODERS:
            continue
        pads = ("none", "right", "left") if model_type in DECODERS else ("none", "right")
        for pad, tasks in itertools.product(pads, ("single", "mixed")):
            yield pytest.param(model_type, head, pad, tasks, id=f"{model_type}-{head}-{pad}-{tasks}")


def _output(out, head):
    return out.last_hidden_state if head == "base" else out.logits


def _loss(out, head, mask):
    y = _output(out, head).float()
    if head in ("base", "token_cls", "causal_lm") and mask is not None:
        y = y * mask[..., None].to(y)  # padded positions' outputs are not defined to agree
    w = torch.linspace(-1, 1, y.shape[-1], device=y.device)
    return (y * w).sum()


@pytest.mark.parametrize("model_type,head,pad,tasks", list(_cases()))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_matches_naive_concatenation(model_type, head, pad, tasks, train, backend="auto"):
    """Outputs and prefix-bank gradients equal the naive path: per-sample prefix copies in the cache and a
    widened mask (what PEFT and P-Tuning v2 do), on an unpatched copy of the same model."""
    model = tiny_model(model_type, head).to(DEVICE).train(train)
    ref = clone_unpatched(model)
    T, P, B, L = (3, 5, 4, 11) if tasks == "mixed" else (1, 6, 3, 9)
    bank = random_bank(model.config, T, P).to(DEVICE)
    index = torch.tensor([2, 0, 2, 1], device=DEVICE) if tasks == "mixed" else None
    ids, mask = inputs(B, L, pad)
    ids, mask = ids.to(DEVICE), None if mask is None else mask.to(DEVICE)

    source = FixedBank(bank)
    patch_model(model, prefix=source, backend=backend)
    out = model(input_ids=ids, attention_mask=mask, prefix_index=index)
    ref_bank = bank.clone().requires_grad_(True)
    ref_out = naive_forward(ref, ref_bank, index, ids, mask)

    got, want = _output(out, head), _output(ref_out, head)
    if mask is not None and head in ("base", "token_cls", "causal_lm"):
        keep = mask.bool()[..., None]
        got, want = got * keep, want * keep
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    _loss(out, head, mask).backward()
    _loss(ref_out, head, mask).backward()
    torch.testing.assert_close(source.bank.grad, ref_bank.grad, atol=ATOL * 10, rtol=RTOL * 10)
    if tasks == "mixed":  # bank row 1 is used once, row 0 once, row 2 twice: all get gradient
        assert all(source.bank.grad[:, :, t].abs().sum() > 0 for t in range(T))


@pytest.mark.parametrize("model_type,head,pad,tasks", list(_cases()))
def test_matches_naive_concatenation_with_the_sdpa_backend(model_type, head, pad, tasks):
    """The same equivalence with the sequence part through PyTorch's fused attention (training mode: forward
    and backward)."""
    from ptv2_fast import _ext

    if DEVICE == "cpu" and not _ext.load():
        pytest.skip("backend='sdpa' on the CPU needs the C++ extension")
    test_matches_naive_concatenation(model_type, head, pad, tasks, True, backend="sdpa")


def test_unused_bank_rows_get_zero_gradient():
    model = patch_model(tiny_model("llama"), prefix=FixedBank(random_bank(tiny_model("llama").config, 4, 3)))
    ids, _ = inputs(2, 7, "none")
    model(input_ids=ids, prefix_index=torch.tensor([3, 1])).last_hidden_state.sum().backward()
    grad = model.ptv2_prefix.bank.grad
    assert grad[:, :, [0, 2]].abs().max() == 0
    assert grad[:, :, 1].abs().sum() > 0 and grad[:, :, 3].abs().sum() > 0


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_mixed_batch_equals_rows_run_alone(model_type):
    """Rows of different tasks in one batch give what each row gives alone with its task."""
    model = tiny_model(model_type).eval()
    patch_model(model, prefix_len=4, num_tasks=3, projection=True)
    ids, mask = inputs(3, 8, "right")
    index = torch.tensor([1, 2, 0])
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask, prefix_index=index).last_hidden_state
        for b in range(3):
            alone = model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1],
                          prefix_index=index[b:b + 1]).last_hidden_state
            n = int(mask[b].sum())
            torch.testing.assert_close(together[b, :n], alone[0, :n], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "gpt2", "llama"])
def test_per_task_prefix_lengths(model_type):
    """A task shorter than the bank's P sees only its first prefix_lens[t] columns, and its positions shift
    by its own length: equal to the naive path run with that task's prefix alone."""
    model = tiny_model(model_type).eval()
    ref = clone_unpatched(model)
    bank = random_bank(model.config, 2, 6)
    lens = torch.tensor([6, 2])
    patch_model(model, prefix=FixedBank(bank, prefix_lens=lens))
    ids, mask = inputs(2, 9, "right")
    index = torch.tensor([1, 0])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, prefix_index=index).last_hidden_state
        for b in range(2):
            t = int(index[b])
            want = naive_forward(ref, bank[:, :, t:t + 1, :, : int(lens[t])], None, ids[b:b + 1],
                                 mask[b:b + 1]).last_hidden_state
            n = int(mask[b].sum())
            torch.testing.assert_close(out[b, :n], want[0, :n], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_shift_positions_off(model_type):
    """shift_positions=False: the sequence keeps positions 0..L-1 (naive path with explicit positions)."""
    model = tiny_model(model_type).eval()
    ref = clone_unpatched(model)
    bank = random_bank(model.config, 1, 4)
    patch_model(model, prefix=FixedBank(bank), shift_positions=False)
    ids, _ = inputs(2, 7, "none")
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
        want = naive_forward(ref, bank, None, ids, None, position_ids=pos).last_hidden_state
        shifted = naive_forward(ref, bank, None, ids, None).last_hidden_state
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (got - shifted).abs().max() > 1e-3  # the option really changes positions


def test_prefix_encoder_runs_once_per_task_not_per_sample():
    enc = PrefixEncoder(2, 2, 16, prefix_len=5, num_tasks=3, projection=True, hidden_size=24)
    calls = []
    real = torch.baddbmm

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    torch.baddbmm = counting
    try:
        bank = enc()
    finally:
        torch.baddbmm = real
    assert bank.shape == (2, 2, 3, 2, 5, 16)
    assert calls == [torch.Size([3, 5, 32]), torch.Size([3, 5, 24])]  # [T, P, .]: once per task
    # each task's row is its own MLP applied to its own embedding
    t = 1
    h = torch.tanh(enc.embedding[t] @ enc.w1[t] + enc.b1[t])
    row = (h @ enc.w2[t] + enc.b2[t]).view(5, 2, 2, 2, 16).permute(1, 2, 3, 0, 4)
    torch.testing.assert_close(bank[:, :, t], row)


def test_prefix_encoder_dropout_per_task_and_per_sample():
    enc = PrefixEncoder(1, 1, 8, prefix_len=64, num_tasks=2, dropout=0.5).train()
    bank = enc()
    assert bank.shape[2] == 2 and 0.3 < (bank == 0).float().mean() < 0.7
    enc.dropout_per_sample = True
    per_sample = enc(torch.tensor([0, 0, 1]))
    assert per_sample.shape[2] == 3  # one row per sample, masks differ between samples of one task
    assert not torch.equal(per_sample[:, :, 0] == 0, per_sample[:, :, 1] == 0)
    enc.eval()
    torch.testing.assert_close(enc(), enc.embedding.view(2, 64, 1, 2, 1, 8).permute(2, 3, 0, 4, 1, 5))
    with pytest.raises(ValueError, match="dropout"):
        PrefixEncoder(1, 1, 8, 4, dropout=1.0)
    with pytest.raises(ValueError, match="prefix_lens"):
        PrefixEncoder(1, 1, 8, 4, 2, prefix_lens=[4, 5])


def test_per_sample_prefix_dropout_in_a_model():
    model = tiny_model("bert").train()
    patch_model(model, prefix_len=8, num_tasks=2, dropout=0.3, dropout_per_sample=True)
    ids, mask = inputs(3, 6, "right")
    out = model(input_ids=ids, attention_mask=mask, prefix_index=torch.tensor([0, 1, 1]))
    out.last_hidden_state.sum().backward()
    assert model.ptv2_prefix.embedding.grad.abs().sum() > 0


def test_patch_is_in_place_and_unpatch_restores():
    model = tiny_model("llama").eval()
    ids, mask = inputs(2, 7, "right")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    patch_model(model, prefix_len=3)
    assert model.config._attn_implementation == "ptv2_fast" and is_patched(model)
    assert patch_model(model) is model  # idempotent
    with torch.no_grad():
        patched = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (patched - before).abs().max() > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"ptv2_prefix.embedding"}
    unpatch_model(model)
    assert model.config._attn_implementation == "eager" and not is_patched(model)
    assert not hasattr(model, "ptv2_prefix") and "forward" not in model.__dict__
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(after, before)
    assert unpatch_model(model) is model  # no-op when unpatched


def test_attention_really_goes_through_the_op(monkeypatch):
    import ptv2_fast.attention as api

    seen = []
    real = api.prefix_attention

    def spy(q, k, v, pk, pv, index, **kwargs):
        seen.append((tuple(q.shape), tuple(pk.shape), kwargs["key_padding_mask"] is not None, kwargs["causal"]))
        return real(q, k, v, pk, pv, index, **kwargs)

    monkeypatch.setattr(api, "prefix_attention", spy)
    model = patch_model(tiny_model("llama"), prefix_len=3, num_tasks=2)
    ids, mask = inputs(2, 5, "left")
    model(input_ids=ids, attention_mask=mask, prefix_index=torch.tensor([1, 0]))
    assert seen == [((2, 4, 5, 16), (2, 2, 3, 16), True, True)] * 2  # 2 layers, GQA bank, padding, causal


def test_only_prefix_and_head_train():
    model = patch_model(tiny_model("roberta", "seq_cls"), prefix_len=2, projection=True)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("classifier") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"ptv2_prefix", "classifier.dense", "classifier.out_proj"}
    frozen = patch_model(tiny_model("llama", "seq_cls"), prefix_len=2, train_head=False)
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == {"ptv2_prefix.embedding"}


def test_shared_config_keeps_other_models_attention():
    from _hf_util import tiny_config
    from transformers import AutoModel

    config = tiny_config("bert")
    first, second = AutoModel.from_config(config), AutoModel.from_config(config)
    impl = config._attn_implementation
    patch_model(first, prefix_len=2)
    assert second.config._attn_implementation == impl and config._attn_implementation == impl
    third = AutoModel.from_config(config)
    assert third.config._attn_implementation == impl
    assert first.config._attn_implementation == "ptv2_fast"


def test_refusals():
    from transformers import AutoModel, OPTConfig

    with pytest.raises(UnsupportedModelError, match="model_type='opt'"):
        patch_model(AutoModel.from_config(OPTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                    ffn_dim=32, num_attention_heads=2)), prefix_len=2)
    with pytest.raises(UnsupportedModelError, match="relative position"):
        patch_model(tiny_model("bert", position_embedding_type="relative_key"), prefix_len=2)
    with pytest.raises(ValueError, match="prefix_len"):
        patch_model(tiny_model("bert"))
    with pytest.raises(ValueError, match="num_kv_heads=4 but the model needs 2"):
        patch_model(tiny_model("llama"), prefix=PrefixEncoder(2, 4, 16, 3))
    model = patch_model(tiny_model("llama"), prefix_len=3, num_tasks=2)
    ids, _ = inputs(2, 5, "none")
    with pytest.raises(ValueError, match="pass prefix_index"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"\[batch\] int tensor with batch=2"):
        model(input_ids=ids, prefix_index=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="prefix_index"):
        model(input_ids=ids, prefix_index=torch.tensor([0, 2]))  # out of range: the op's own check
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(input_ids=ids, prefix_index=torch.tensor([0, 1]), position_ids=torch.tensor([[0, 1, 2, 0, 1]] * 2),
              use_cache=False)
    with pytest.raises(NotImplementedError, match="4D"):
        model(input_ids=ids, prefix_index=torch.tensor([0, 1]), attention_mask=torch.ones(2, 1, 5, 5))


def test_sliding_window_bounded():
    model = tiny_model("mistral", sliding_window=8).eval()
    patch_model(model, prefix_len=3)
    ids, _ = inputs(1, 5, "none")
    model(input_ids=ids)  # 3 + 5 <= 8: sliding window equals full attention
    with pytest.raises(NotImplementedError, match="sliding window"):
        model(input_ids=inputs(1, 6, "none")[0])


def test_reentrant_checkpointing_refused():
    model = patch_model(tiny_model("bert").train(), prefix_len=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        model(input_ids=inputs(1, 4, "none")[0])


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_gradient_checkpointing_with_dropout_replays_the_mask(model_type):
    """With attention and hidden dropout on, a checkpointed step gives the same loss and prefix gradient as
    an uncheckpointed one from the same seed: recomputation replays the dropout masks."""
    kw = ({"attention_probs_dropout_prob": 0.2, "hidden_dropout_prob": 0.1} if model_type == "bert"
          else {"attention_dropout": 0.2})
    results = []
    import ptv2_fast.attention as api

    real, calls = api.prefix_attention, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for checkpointing in (False, True):
        model = tiny_model(model_type, "seq_cls", **kw).train()
        patch_model(model, prefix_len=4, num_tasks=2, projection=True)
        if checkpointing:
            model.gradient_checkpointing_enable()
        ids, mask = inputs(3, 9, "right")
        torch.manual_seed(123)
        calls.clear()
        api.prefix_attention = counting
        try:
            out = model(input_ids=ids, attention_mask=mask, prefix_index=torch.tensor([1, 0, 1]),
                        labels=torch.tensor([0, 2, 1]))
            out.loss.backward()
        finally:
            api.prefix_attention = real
        assert len(calls) == (4 if checkpointing else 2)  # 2 layers; recomputed in backward when checkpointing
        results.append((out.loss.detach(), model.ptv2_prefix.w2.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[0][1].abs().sum() > 0


def test_torch_compile_training_step():
    """torch.compile(model) runs a training step on the CPU and matches eager."""
    losses, grads = [], []
    for compiled in (False, True):
        model = tiny_model("bert", "seq_cls").train()
        patch_model(model, prefix_len=3, num_tasks=2)
        fn = torch.compile(model) if compiled else model  # inductor, as users call it
        ids, mask = inputs(2, 6, "right")
        out = fn(input_ids=ids, attention_mask=mask, prefix_index=torch.tensor([1, 0]), labels=torch.tensor([0, 1]))
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(model.ptv2_prefix.embedding.grad.clone())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_readme_hf_examples_run():
    """The README's Hugging Face examples run as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Use with Hugging Face"):text.index("## Train and serve tasks")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    scope = {}
    for block in blocks:
        exec(block, scope)
    assert torch.isfinite(scope["loss"]) and scope["out"].shape == (3, 15)


def test_deepcopy_of_a_patched_model_is_independent():
    import copy

    model = patch_model(tiny_model("llama").eval(), prefix_len=3, num_tasks=2)
    twin = copy.deepcopy(model)
    ids, _ = inputs(2, 6, "none")
    index = torch.tensor([0, 1])
    with torch.no_grad():
        twin.ptv2_prefix.embedding.mul_(-1)
        a = model(input_ids=ids, prefix_index=index).last_hidden_state
        b = twin(input_ids=ids, prefix_index=index).last_hidden_state
        plain = unpatch_model(copy.deepcopy(model))
        want = naive_forward(plain, twin.ptv2_prefix().detach(), index, ids, None).last_hidden_state
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(b, want, atol=ATOL, rtol=RTOL)
    unpatch_model(twin)  # must not remove the original's position hook
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, prefix_index=index).last_hidden_state, a)


def test_failed_patch_leaves_the_model_unchanged():
    model = tiny_model("llama")
    del model.rotary_emb  # the position consumer is missing: refused after validation, before changes
    with pytest.raises(UnsupportedModelError, match="rotary_emb"):
        patch_model(model, prefix_len=2)
    assert model.config._attn_implementation == "eager" and not is_patched(model)
    assert all(p.requires_grad for p in model.parameters()) and "forward" not in model.__dict__


@pytest.mark.parametrize("how", ["inputs_embeds", "position_ids"])
def test_roberta_positions_follow_peft(how):
    """RoBERTa numbers positions from input_ids past the padding index, shifted by the cache length; from
    inputs_embeds it ignores the cache (no shift); caller-given position ids are shifted by P (as PEFT does)."""
    model = tiny_model("roberta").eval()
    ref = clone_unpatched(model)
    bank = random_bank(model.config, 1, 4)
    patch_model(model, prefix=FixedBank(bank))
    ids, mask = inputs(2, 7, "right")
    if how == "inputs_embeds":
        kw = {"inputs_embeds": model.get_input_embeddings()(ids).detach()}
        want_kw = dict(kw)
    else:
        pos = torch.arange(2, 9).expand(2, 7)
        kw, want_kw = {"input_ids": ids, "position_ids": pos}, {"input_ids": ids, "position_ids": pos + 4}
    with torch.no_grad():
        got = model(attention_mask=mask, **kw).last_hidden_state
        want = naive_forward(ref, bank, None, want_kw.pop("input_ids", None), mask, **want_kw).last_hidden_state
    keep = mask.bool()[..., None]
    torch.testing.assert_close(got * keep, want * keep, atol=ATOL, rtol=RTOL)


def test_more_bad_inputs():
    model = patch_model(tiny_model("bert"), prefix=FixedBank(random_bank(tiny_model("bert").config, 2, 4),
                                                             prefix_lens=torch.tensor([4, 2])))
    ids, _ = inputs(2, 5, "none")
    for bad in ([0, 2], [-1, 0]):
        with pytest.raises(ValueError, match=r"prefix_index has values outside \[0, T\) = \[0, 2\)"):
            model(input_ids=ids, prefix_index=torch.tensor(bad))
    with pytest.raises(ValueError, match="int tensor"):
        model(input_ids=ids, prefix_index=torch.tensor([0.0, 1.0]))
    gc = patch_model(tiny_model("bert").train(), prefix_len=2)
    gc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={})  # torch's default: reentrant
    with pytest.raises(ValueError, match="use_reentrant"):
        gc(input_ids=ids)


def test_per_sample_dropout_with_one_task_and_per_task_lengths(monkeypatch):
    import ptv2_fast.attention as api

    seen = []
    real = api.prefix_attention

    def spy(q, k, v, pk, pv, index, **kwargs):
        seen.append((pk.shape[0], index.tolist(), None if kwargs["prefix_lens"] is None
                     else kwargs["prefix_lens"].tolist()))
        return real(q, k, v, pk, pv, index, **kwargs)

    monkeypatch.setattr(api, "prefix_attention", spy)
    one = patch_model(tiny_model("bert").train(), prefix_len=4, dropout=0.2, dropout_per_sample=True)
    one(input_ids=inputs(3, 5, "none")[0])  # prefix_index optional with one task
    assert seen[-1] == (3, [0, 1, 2], None)
    two = patch_model(tiny_model("bert").train(), prefix_len=4, num_tasks=2, prefix_lens=[4, 1], dropout=0.2,
                      dropout_per_sample=True)
    two(input_ids=inputs(3, 5, "none")[0], prefix_index=torch.tensor([1, 0, 1]))
    assert seen[-1] == (3, [0, 1, 2], [1, 4, 1])  # one bank row per sample, each with its task's length
