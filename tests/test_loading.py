"""One way to load a run: `detr.load` gives every kind of run its predictor, honours `weights`
for all of them, and says plainly what a run is when a command does not apply to it."""


import pytest
import torch
from safetensors.torch import load_file, save_file

import detr
from detr import CheckpointError, Classifier, ConfigError, Tagger, Translator, load_config
from detr.checkpoint import average_checkpoints, load_run
from detr.config import DecodeConfig
from tests.conftest import detr_cli
from tests.test_tasks import labelled_config


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classify")
    config = load_config(labelled_config(tmp, "classify", **{"train.max_steps": 30, "train.save_every": 10,
                                                             "train.eval_every": 10}))
    detr.train(config)
    return tmp


@pytest.fixture(scope="module")
def tag_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tag")
    detr.train(load_config(labelled_config(tmp, "tag", **{"train.max_steps": 20, "train.eval_every": 20})))
    return tmp


def test_every_kind_of_run_loads_through_one_loader(toy_run, classify_run, tag_run):
    assert isinstance(detr.load(toy_run / "run"), Translator)
    assert isinstance(detr.load(classify_run / "run"), Classifier)
    assert isinstance(detr.load(tag_run / "run"), Tagger)
    run = load_run(classify_run / "run")
    assert run.config.task == "classify" and run.task.labels == ["neg", "pos"] and not run.model.training


def test_weights_are_honoured_for_a_classify_run(classify_run):
    run = classify_run / "run"
    averaged, steps = average_checkpoints(run, 3)
    assert steps == [10, 20, 30]
    texts = ["the film was good and the cast was long", "the plot was dull and the music was long"]
    plain = detr.load(run).classify(texts)
    mixed = detr.load(run, weights=averaged).classify(texts)
    assert [p for _, p in plain] != [p for _, p in mixed]  # the averaged weights were used, not model.safetensors
    # evaluate --weights on a classify run scores those weights: a head that always says "neg"
    state = load_file(str(run / "model.safetensors"))
    state["out.bias"] = torch.tensor([100.0, -100.0])
    save_file(state, str(classify_run / "neg.safetensors"))
    valid = str(classify_run / "valid.tsv")
    honest = detr_cli("evaluate", str(run), "--data", valid, "--json")
    forced = detr_cli("evaluate", str(run), "--data", valid, "--json", "--weights",
                      str(classify_run / "neg.safetensors"))
    assert honest.returncode == 0 and forced.returncode == 0, forced.stderr
    assert '"accuracy"' in forced.stdout and forced.stdout != honest.stdout
    labels = detr_cli("classify", str(run), "--weights", str(classify_run / "neg.safetensors"), stdin="good film\n")
    assert labels.stdout == "neg\n"


@pytest.mark.parametrize("command,kind", [("translate", "classify"), ("generate", "classify"), ("tag", "classify"),
                                          ("classify", "translate")])
def test_a_command_on_the_wrong_kind_of_run_says_what_the_run_is(toy_run, classify_run, command, kind):
    run = classify_run / "run" if kind == "classify" else toy_run / "run"
    out = detr_cli(command, str(run), stdin="one line\n")
    assert out.returncode == 2 and f"is a {kind} run" in out.stderr and "weights do not fit" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_run_decode_settings_are_the_default_and_flags_change_them(toy_run):
    translator = detr.load(toy_run / "run")
    saved = load_config(toy_run / "run" / "config.yaml").decode
    assert translator.decode == saved and translator.options().beam_size == saved.beam_size
    lines = ["we have two red dogs.", "she counts one old cat."]
    default = detr_cli("translate", str(toy_run / "run"), stdin="\n".join(lines) + "\n")
    assert default.stdout.splitlines() == translator.translate(lines)
    greedy = detr_cli("translate", str(toy_run / "run"), "--beam-size", "1", "--max-len-b", "3", "--max-len-a", "0",
                      stdin="\n".join(lines) + "\n")
    assert greedy.stdout.splitlines() == translator.translate(lines, translator.options(beam_size=1, max_len_b=3,
                                                                                        max_len_a=0.0))


def test_the_old_beam_flag_still_works_with_a_warning(toy_run):
    lines = "we have two red dogs.\nyou paint one big boat.\n"
    old = detr_cli("translate", str(toy_run / "run"), "--beam", "2", stdin=lines)
    new = detr_cli("translate", str(toy_run / "run"), "--beam-size", "2", stdin=lines)
    assert old.returncode == new.returncode == 0
    assert old.stdout == new.stdout and "--beam is deprecated" in old.stderr and "--beam-size" in old.stderr
    assert "deprecated" not in new.stderr


def test_inspect_defaults_to_the_run_beam_size(toy_run, tmp_path):
    out = detr_cli("inspect", str(toy_run / "run"), "--src", "we have two red dogs.", "--out", str(tmp_path / "i"),
                   "--nbest", "2")
    assert out.returncode == 0, out.stderr  # nbest 2 needs a beam: the run's beam size (4) is used, not greedy


def test_labeller_batches_come_from_decode_settings(classify_run):
    run = load_run(classify_run / "run")
    texts = [f"the film was {w} and the plot was long" for w in ("good", "bad", "dull", "superb")] * 5
    wide = run.task.predictor(run.model, run.config).classify(texts)
    narrow_config = run.config.__class__(**{**run.config.__dict__, "decode": DecodeConfig(max_tokens=16,
                                                                                          batch_size=1)})
    narrow = run.task.predictor(run.model, narrow_config)
    assert narrow.decode.batch_size == 1
    got = narrow.classify(texts)
    assert [label for label, _ in got] == [label for label, _ in wide]
    for (_, a), (_, b) in zip(got, wide):
        assert a == pytest.approx(b, abs=1e-5)


def test_vocabulary_sizes_come_from_the_tokenizer(tmp_path):
    from tests.test_train import toy_config

    config = toy_config(tmp_path, **{"train.max_steps": 1})
    assert config.model.src_vocab_size is None
    result = detr.train(config)
    saved = load_config(result.run_dir / "config.yaml").model
    tok = detr.load(result.run_dir).tokenizer
    assert (saved.src_vocab_size, saved.tgt_vocab_size) == (tok.src.vocab_size, tok.tgt.vocab_size)
    wrong = toy_config(tmp_path, run="run2", **{"train.max_steps": 1, "model.src_vocab_size": 123,
                                               "model.tgt_vocab_size": 123})
    with pytest.raises(ConfigError, match="model.src_vocab_size=123, but the tokenizer has"):
        detr.train(wrong)


def test_max_len_beyond_max_positions_is_refused_when_the_config_is_read(tmp_path):
    with pytest.raises(ConfigError, match="data.max_len=300 exceeds model.max_positions=256"):
        load_config(None, {"model_preset": "tiny", "model.max_positions": 256, "data.max_len": 300,
                           "train.max_steps": 5})
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  max_positions: 64\ndata:\n  max_len: 100\ntrain:\n  max_steps: 5\n")
    out = detr_cli("train", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"detr: error: {path}: data.max_len=100 exceeds model.max_positions=64: inputs that long would not fit "
        f"the positional encoding; lower data.max_len or raise model.max_positions"]


def test_a_tokenizer_of_another_run_is_caught_at_load(tmp_path, toy_run):
    from tests.test_train import toy_config

    for name, seed in (("a", 1), ("b", 2)):
        detr.train(toy_config(tmp_path, run=name, **{"train.max_steps": 1, "data.vocab_size": 320,
                                                     "train.seed": seed, "data.tokenizer_max_lines": 100 * seed}))
    (tmp_path / "a" / "tokenizer.json").write_bytes((tmp_path / "b" / "tokenizer.json").read_bytes())
    with pytest.raises(CheckpointError, match="is not the one model.safetensors was trained with"):
        detr.load(tmp_path / "a")


def test_non_finite_weights_are_refused(tmp_path, toy_run):
    state = load_file(str(toy_run / "run" / "model.safetensors"))
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="nan.safetensors: weight .* holds NaN or infinite values"):
        detr.load(toy_run / "run", weights=tmp_path / "nan.safetensors")
