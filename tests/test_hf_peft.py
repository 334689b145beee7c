"""patch_model(peft_model): same outputs, loss and prompt-encoder gradients as the unpatched PEFT model;
greedy generation; PEFT adapter format round trips."""

import copy

import pytest
import torch

pytest.importorskip("peft")

from _hf_util import greedy_by_forward, inputs, naive_forward, tiny_model  # noqa: E402
from peft import PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402

from ptv2_fast.hf import is_patched, load_peft_adapters, patch_model, save_peft_adapter, unpatch_model  # noqa: E402
from ptv2_fast.hf.peft import PeftPrefixSource  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
ATOL, RTOL = 3e-5, 1e-4


def _peft(model_type, head, task_type, projection=False, P=5):
    model = tiny_model(model_type, head)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P,
                                                          prefix_projection=projection, encoder_hidden_size=24))
    with torch.no_grad():  # PEFT initialises near zero; make the prefix matter
        for p in peft_model.prompt_encoder.parameters():
            p.normal_()
    return peft_model


def _labels(head, ids, mask):
    if head == "causal_lm":
        return ids.masked_fill(mask == 0, -100)
    if head == "seq_cls":
        return torch.arange(ids.shape[0]) % 3
    return (ids % 3).masked_fill(mask == 0, -100)


def _grads(peft_model):
    return [p.grad for p in peft_model.prompt_encoder.parameters()]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("projection", [False, True])
def test_causal_lm_matches_unpatched_peft(model_type, projection):
    peft_model = _peft(model_type, "causal_lm", "CAUSAL_LM", projection)
    ref = copy.deepcopy(peft_model)
    patch_model(peft_model)
    assert is_patched(peft_model)
    ids, mask = inputs(4, 11, "right")
    out = peft_model(input_ids=ids, attention_mask=mask, labels=_labels("causal_lm", ids, mask))
    want = ref(input_ids=ids, attention_mask=mask, labels=_labels("causal_lm", ids, mask))
    keep = mask.bool()[..., None]
    torch.testing.assert_close(out.logits * keep, want.logits * keep, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.loss, want.loss, atol=ATOL, rtol=RTOL)
    out.loss.backward()
    want.loss.backward()
    for got, exp in zip(_grads(peft_model), _grads(ref)):
        torch.testing.assert_close(got, exp, atol=ATOL, rtol=1e-3)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "llama"])
def test_feature_extraction_matches_unpatched_peft(model_type):
    peft_model = _peft(model_type, "base", "FEATURE_EXTRACTION", projection=True)
    ref = copy.deepcopy(peft_model)
    patch_model(peft_model)
    ids, mask = inputs(3, 9, "right")
    out = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()[..., None]
    torch.testing.assert_close(out * keep, want * keep, atol=ATOL, rtol=RTOL)
    (out * keep).sum().backward()
    (want * keep).sum().backward()
    for got, exp in zip(_grads(peft_model), _grads(ref)):
        torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("model_type,head,task_type", [
    ("bert", "seq_cls", "SEQ_CLS"), ("roberta", "seq_cls", "SEQ_CLS"), ("llama", "seq_cls", "SEQ_CLS"),
    ("bert", "token_cls", "TOKEN_CLS"), ("qwen2", "token_cls", "TOKEN_CLS")])
def test_classification_heads(model_type, head, task_type):
    """PEFT's own SEQ_CLS/TOKEN_CLS prefix path fails on current transformers (its base models take no
    past_key_values); the patched path works and equals the naive PEFT-semantics path, head trained."""
    peft_model = _peft(model_type, head, task_type, projection=True)
    base_copy = copy.deepcopy(peft_model.get_base_model())
    source = PeftPrefixSource(peft_model)
    patch_model(peft_model)
    ids, mask = inputs(4, 10, "right")
    labels = _labels(head, ids, mask)
    out = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    bank = source().detach().requires_grad_(True)
    want = naive_forward(base_copy, bank, None, ids, mask, labels=labels)
    logits, ref_logits = out.logits, want.logits
    if head == "token_cls":
        logits, ref_logits = logits * mask[..., None], ref_logits * mask[..., None]
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.loss, want.loss, atol=ATOL, rtol=RTOL)
    out.loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("prompt_encoder" in n for n in trained)
    assert any("classifier" in n or "score" in n for n in trained)  # PEFT's modules_to_save head trains


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("pad", ["none", "left"])
def test_greedy_generation_matches_peft(model_type, pad):
    """generate() with a cache of sequence tokens only equals greedy decoding of the unpatched PEFT model by
    full forward passes (PEFT's own generate() drops the prefix on transformers >= 5.2x, so its forward
    is the ground truth)."""
    peft_model = _peft(model_type, "causal_lm", "CAUSAL_LM").eval()
    ref = copy.deepcopy(peft_model)
    patch_model(peft_model)
    ids, mask = inputs(3, 7, pad)
    mask = torch.ones_like(ids) if mask is None else mask
    got = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = greedy_by_forward(ref, ids, mask, 10)
    assert torch.equal(got, want)


def test_generate_mixed_tasks_equals_each_task_alone():
    model = tiny_model("llama", "causal_lm").eval()
    patch_model(model, prefix_len=4, num_tasks=3, projection=True)
    ids, mask = inputs(3, 6, "left")
    index = torch.tensor([2, 0, 1])
    together = model.generate(input_ids=ids, attention_mask=mask, prefix_index=index, max_new_tokens=8,
                              do_sample=False, pad_token_id=0)
    for b in range(3):
        alone = model.generate(input_ids=ids[b:b + 1, mask[b].bool()], prefix_index=index[b:b + 1],
                               max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(together[b, -8:], alone[0, -8:])


def test_unpatch_restores_peft(tmp_path):
    peft_model = _peft("gpt2", "causal_lm", "CAUSAL_LM")
    ids, mask = inputs(2, 6, "none")
    before = peft_model(input_ids=ids).logits
    patch_model(peft_model)
    assert patch_model(peft_model) is peft_model
    unpatch_model(peft_model)
    assert not is_patched(peft_model) and "forward" not in peft_model.__dict__
    torch.testing.assert_close(peft_model(input_ids=ids).logits, before)


def test_peft_adapter_round_trip(tmp_path):
    """ptv2_fast bank rows -> PEFT adapter folders -> PeftModel gives the patched model's outputs; and PEFT
    folders -> a ptv2_fast bank gives PEFT's outputs."""
    model = tiny_model("llama", "causal_lm").eval()
    base_copy = copy.deepcopy(model)
    patch_model(model, prefix_len=5, num_tasks=2, projection=True, prefix_lens=[5, 3])
    ids, _ = inputs(2, 7, "none")
    folders = [save_peft_adapter(model.ptv2_prefix, t, str(tmp_path / f"task{t}"), model.config,
                                 task_type="CAUSAL_LM") for t in range(2)]
    with torch.no_grad():
        ours = model(input_ids=ids, prefix_index=torch.tensor([0, 1])).logits
    for t, folder in enumerate(folders):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base_copy), folder).eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=ids[t:t + 1]).logits
        torch.testing.assert_close(ours[t:t + 1], theirs, atol=ATOL, rtol=RTOL)
    loaded = load_peft_adapters(folders)
    assert loaded.num_tasks == 2 and loaded.prefix_lens.tolist() == [5, 3] and not loaded.projection
    other = patch_model(copy.deepcopy(base_copy), prefix=loaded).eval()
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids, prefix_index=torch.tensor([0, 1])).logits, ours,
                                   atol=ATOL, rtol=RTOL)


def test_load_peft_adapter_refuses_other_types(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match="LORA"):
        load_peft_adapters(str(tmp_path))


def test_token_type_ids_handled_as_peft_does():
    """PEFT ignores token_type_ids for FEATURE_EXTRACTION (and CAUSAL_LM) but keeps them for SEQ_CLS."""
    ids, mask = inputs(2, 8, "none")
    types = torch.tensor([[0] * 4 + [1] * 4] * 2)
    peft_model = _peft("bert", "base", "FEATURE_EXTRACTION")
    ref = copy.deepcopy(peft_model)
    patch_model(peft_model)
    with pytest.warns(UserWarning, match="Token type ids"):
        got = peft_model(input_ids=ids, token_type_ids=types).last_hidden_state
    with pytest.warns(UserWarning, match="Token type ids"):
        want = ref(input_ids=ids, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)

    cls = _peft("bert", "seq_cls", "SEQ_CLS")
    source = PeftPrefixSource(cls)
    plain = copy.deepcopy(cls.get_base_model())
    patch_model(cls)
    with torch.no_grad():
        got = cls(input_ids=ids, token_type_ids=types).logits
        want = naive_forward(plain, source(), None, ids, None, token_type_ids=types).logits
        without = naive_forward(plain, source(), None, ids, None).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (want - without).abs().max() > 1e-4


def test_num_items_in_batch_reaches_the_loss():
    peft_model = _peft("llama", "causal_lm", "CAUSAL_LM")
    ref = copy.deepcopy(peft_model)
    patch_model(peft_model)
    ids, mask = inputs(2, 8, "none")
    got = peft_model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(100)).loss
    want = ref(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(100)).loss
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_patching_other_peft_models_or_options_is_refused():
    from peft import LoraConfig

    from ptv2_fast.hf import UnsupportedModelError

    lora = get_peft_model(tiny_model("llama", "causal_lm"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(UnsupportedModelError, match="LORA"):
        patch_model(lora)
    assert not is_patched(lora)
    with pytest.raises(ValueError, match="do not apply"):
        patch_model(_peft("gpt2", "causal_lm", "CAUSAL_LM"), prefix_len=3)


def test_generate_beams_sequences_inputs_and_static_cache():
    model = tiny_model("llama", "causal_lm").eval()
    patch_model(model, prefix_len=4, num_tasks=2)
    ids, _ = inputs(2, 6, "none")
    index = torch.tensor([1, 0])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    beams = model.generate(inputs=ids, prefix_index=index, num_beams=3, num_return_sequences=2, **kw)
    assert beams.shape == (4, 11)
    for b in range(2):
        alone = model.generate(inputs=ids[b:b + 1], prefix_index=index[b:b + 1], num_beams=3,
                               num_return_sequences=2, **kw)
        assert torch.equal(beams[2 * b:2 * b + 2], alone)
    with pytest.raises(NotImplementedError, match="default cache"):
        model.generate(input_ids=ids, prefix_index=index, cache_implementation="static", **kw)


def test_save_peft_adapter_checks_the_model(tmp_path):
    from ptv2_fast.hf import PrefixEncoder

    with pytest.raises(ValueError, match="does not fit"):
        save_peft_adapter(PrefixEncoder(3, 2, 16, 4), 0, str(tmp_path), tiny_model("llama").config)
