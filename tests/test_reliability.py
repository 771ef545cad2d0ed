"""Hostile input and faults: output lines stay aligned with input lines, text is text, one
writer per run, every fault is one clear line, bad values are refused."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import detr
from detr import CheckpointError, ConfigError, DataError, load_config
from detr.readers import one_line
from detr.tokenizer import SPECIALS, train_tokenizer
from tests.conftest import ROOT, detr_cli
from tests.test_tasks import labelled_config

HOSTILE = ["we have two red dogs.", "", "   ", "<pad> </s> <s> <unk> dogs", "line\rwith\vodd\fbreaks\u2028here",
           "tab\there", "\x00\x1b[31m", "ünïcödé ✓ 𝔘", "x" * 3000]


def cli(*args, stdin=None):  # bytes out: the tests read what detr wrote, byte for byte
    return detr_cli(*args, stdin=stdin, text=False)


def lines_of(out: subprocess.CompletedProcess) -> list[str]:
    return out.stdout.decode("utf-8").split("\n")[:-1]


@pytest.fixture(scope="module")
def run(toy_run):
    return toy_run / "run"


@pytest.fixture(scope="module")
def label_runs(tmp_path_factory):
    runs = {}
    for task in ("classify", "tag"):
        tmp = tmp_path_factory.mktemp(task)
        detr.train(load_config(labelled_config(tmp, task, **{"train.max_steps": 10, "train.eval_every": 10})))
        runs[task] = tmp / "run"
    return runs


# ----------------------------------------------------------------------------- 1. line i belongs to input i


@pytest.mark.parametrize("args,per_line", [([], 1), (["--beam-size", "3", "--nbest", "3"], 3),
                                           (["--beam-size", "2", "--nbest", "2", "--alignment"], 2)])
def test_translate_gives_n_lines_per_input_line_whatever_the_input(run, args, per_line):
    out = cli("translate", str(run), *args, "--max-len-b", "4", stdin="\n".join(HOSTILE) + "\n")
    assert out.returncode == 0, out.stderr
    got = lines_of(out)
    assert len(got) == len(HOSTILE) * per_line
    if per_line > 1:
        assert all(line.count("\t") == (2 if "--alignment" in args else 1) for line in got)


def test_generate_gives_num_samples_lines_per_input_line(run):
    out = cli("generate", str(run), "--num-samples", "3", "--temperature", "50", "--max-len-b", "6",
              stdin="\n".join(HOSTILE) + "\n")
    assert out.returncode == 0, out.stderr
    assert len(lines_of(out)) == 3 * len(HOSTILE)


def test_generated_line_breaks_never_split_an_output():
    assert one_line("a\nb\rc\vd\fe\x1cf\x85g\u2028h\u2029i\tj") == "a b c d e f g h i j"
    assert one_line("plain text") == "plain text" and len(one_line("x\r\n").splitlines()) == 1


@pytest.mark.parametrize("command,per_line", [("translate", 1), ("generate", 2), ("classify", 1), ("tag", None)])
def test_a_failure_at_line_k_keeps_every_result_before_it(run, label_runs, command, per_line):
    target = {"classify": label_runs["classify"], "tag": label_runs["tag"]}.get(command, run)
    good = [f"Anna visited Paris number {i} ." for i in range(5)]
    data = ("\n".join(good) + "\n").encode() + b"bad \xff line\n" + b"after the bad line\n"
    extra = ["--num-samples", "2"] if command == "generate" else []
    out = cli(command, str(target), *extra, stdin=data)
    assert out.returncode == 2 and b"<stdin>:6: invalid UTF-8" in out.stderr and b"Traceback" not in out.stderr
    got = lines_of(out)
    if per_line is None:  # tag: one block of word<TAB>tag lines per sentence, then a blank line
        assert got.count("") == len(good)
    else:
        assert len(got) == per_line * len(good)


def test_classify_and_tag_keep_line_counts_for_blank_and_hostile_lines(label_runs):
    out = cli("classify", str(label_runs["classify"]), stdin="\n".join(HOSTILE) + "\n")
    assert out.returncode == 0, out.stderr and len(lines_of(out)) == len(HOSTILE)
    assert len(lines_of(out)) == len(HOSTILE)
    out = cli("tag", str(label_runs["tag"]), "--json", stdin="\n".join(HOSTILE) + "\n")
    assert out.returncode == 0, out.stderr
    assert len(lines_of(out)) == len(HOSTILE)


# ----------------------------------------------------------------------------- 2. text is text


def test_special_token_names_in_text_are_ordinary_text():
    tok = train_tokenizer(["the dog </s> sat <pad> on the <unk> mat <s>"] * 40, None, 300)
    text = "a <pad> b </s> c <s> d <unk> e"
    ids = tok.src.encode(text)
    assert not set(ids) & set(range(len(SPECIALS)))  # no special id is reachable by typing its name
    assert tok.src.decode(ids) == text  # lossless round trip, special names included


def test_a_typed_end_of_sentence_does_not_cut_a_translation(run):
    translator = detr.load(run)
    assert translator.encode_line(1, "we have </s> two dogs")[:-1].count(translator.tokenizer.src.eos) == 0
    out = translator.translate(["we have two red dogs. </s> she counts one old cat."])
    assert out[0]  # the model saw the whole line


# ----------------------------------------------------------------------------- 3. one writer per run


def test_a_second_trainer_on_the_same_run_gets_one_line_naming_the_holder(tmp_path):
    from tests.test_train import toy_config

    config = toy_config(tmp_path, **{"train.max_steps": 100000, "train.save_every": 5})
    config.save(tmp_path / "c.yaml")
    first = subprocess.Popen([sys.executable, "-m", "detr", "train", str(tmp_path / "c.yaml"), "--no-progress"],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        saved = [tmp_path / "run" / name for name in ("trainer_state.pt", "model.safetensors")]  # (the second
        while not all(p.exists() for p in saved) and time.time() < deadline:  # at the first validation)
            time.sleep(0.2)
        assert all(p.exists() for p in saved), "the first trainer never saved"
        for extra in ([], ["--resume"]):
            second = cli("train", str(tmp_path / "c.yaml"), "--no-progress", *extra)
            assert second.returncode == 2 and b"Traceback" not in second.stderr
            assert f"being written by another detr process (pid {first.pid})".encode() in second.stderr
        assert isinstance(detr.load(tmp_path / "run"), detr.Translator)  # readers need no lock
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the OS dropped the killed trainer's lock: resuming works without any clean-up
    resumed = cli("train", str(tmp_path / "c.yaml"), "--no-progress", "--resume", "--train.max_steps", "1")
    assert b"being written" not in resumed.stderr


# ----------------------------------------------------------------------------- 4. faults are one line


def test_a_full_output_device_is_one_line(run):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    out = cli("translate", str(run), "-o", "/dev/full", stdin="we have two red dogs.\n")
    assert out.returncode == 1 and out.stderr.decode().strip().splitlines() == [
        "detr: error: cannot write: No space left on device"]
    with open("/dev/full", "wb") as full:
        out = subprocess.run([sys.executable, "-m", "detr", "translate", str(run)], input=b"one dog.\n",
                             stdout=full, stderr=subprocess.PIPE, cwd=ROOT)
    assert out.returncode == 1 and b"No space left on device" in out.stderr and b"Traceback" not in out.stderr


def test_unwritable_outputs_are_one_line(run, tmp_path, toy_run):
    out = cli("evaluate", str(run), "--src", str(toy_run / "data" / "test.en"), "--ref",
              str(toy_run / "data" / "test.de"), "-o", str(tmp_path / "no" / "such" / "dir" / "hyp.txt"))
    assert out.returncode == 2 and b"cannot write" in out.stderr and b"Traceback" not in out.stderr
    readonly = tmp_path / "ro"
    shutil.copytree(run, readonly)
    os.chmod(readonly, 0o555)
    try:
        if os.access(readonly, os.W_OK):
            pytest.skip("running as a user who can write a read-only folder (root)")
        out = cli("average", str(readonly), "--last", "1")
        assert out.returncode == 2 and b"cannot write" in out.stderr and b"Traceback" not in out.stderr
    finally:
        os.chmod(readonly, 0o755)


def test_an_output_on_a_read_only_filesystem_is_one_line(run, tmp_path):
    for args in (["average", str(run), "--last", "1", "--out", "/proc/detr-average.safetensors"],
                 ["translate", str(run), "-o", "/proc/detr-out.txt"]):
        out = cli(*args, stdin="one dog.\n")
        assert out.returncode == 2 and b"cannot write" in out.stderr and b"Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_a_full_disk_while_training_is_one_line_and_the_last_checkpoint_resumes(tmp_path, monkeypatch):
    import errno

    import detr.trainer
    from tests.test_train import toy_config

    real_save = detr.trainer.save_trainer_state
    calls = []

    def full_on_second_save(state, path):
        calls.append(state["step"])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(state, path)

    monkeypatch.setattr(detr.trainer, "save_trainer_state", full_on_second_save)
    config = toy_config(tmp_path, **{"train.max_steps": 6, "train.save_every": 2})
    with pytest.raises(detr.TrainingError) as err:
        detr.train(config)
    assert str(err.value) == (f"cannot write to {tmp_path / 'run'} at step 4: No space left on device; the last "
                              f"good checkpoint is step 2; free the space and continue with --resume")
    monkeypatch.setattr(detr.trainer, "save_trainer_state", real_save)
    assert torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert detr.train(config, resume=True).steps == 6  # resumable from the last good checkpoint


def test_empty_files_given_to_evaluate_are_one_line(run, tmp_path):
    (tmp_path / "empty.en").write_text("")
    (tmp_path / "empty.de").write_text("")
    out = cli("evaluate", str(run), "--src", str(tmp_path / "empty.en"), "--ref", str(tmp_path / "empty.de"))
    assert out.returncode == 2 and out.stderr.decode().strip().splitlines() == [
        f"detr: error: {tmp_path / 'empty.en'}: empty file: nothing to score"]


def test_a_torn_last_metrics_line_is_repaired_on_resume(tmp_path):
    from tests.test_train import toy_config

    detr.train(toy_config(tmp_path, **{"train.max_steps": 4, "train.save_every": 2, "train.log_every": 1}))
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "split": "tra')  # a crash mid-line
    result = detr.train(toy_config(tmp_path, **{"train.max_steps": 6, "train.save_every": 2, "train.log_every": 1}),
                        resume=True)
    assert result.steps == 6
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_trainer_state_missing_keys_or_tampered_is_one_line(tmp_path):
    from tests.test_train import toy_config

    config = toy_config(tmp_path, **{"train.max_steps": 2, "train.save_every": 2})
    detr.train(config)
    state_path = tmp_path / "run" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["optimizer"], state["rng"]
    torch.save(state, state_path)
    more = toy_config(tmp_path, **{"train.max_steps": 4})
    with pytest.raises(CheckpointError, match="the trainer state lacks optimizer, rng; it cannot be resumed"):
        detr.train(more, resume=True)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": 1, "evil": Payload()}, state_path)
    with pytest.raises(CheckpointError) as err:
        detr.train(more, resume=True)
    assert "tampered or corrupt" in str(err.value) and "weights_only" not in str(err.value)


# ----------------------------------------------------------------------------- 5. bad values refused


def test_duplicate_yaml_keys_are_an_error_naming_key_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=rf"{path}:4: duplicate key 'lr' \(first given on line 2\)"):
        load_config(path)


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
def test_non_finite_numbers_are_refused_in_configs_and_flags(value, run):
    with pytest.raises(ConfigError, match="train.lr: expected a finite number"):
        load_config(None, [f"train.lr={value}", "train.max_steps=1"])
    flag = value.replace(".", "")
    out = cli("translate", str(run), f"--length-penalty={flag}", stdin="one dog.\n")
    assert out.returncode == 2 and b"decode.length_penalty: expected a finite number" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [(["generate", "--num-samples", "0"], "decode.num_samples must be positive"),
                                          (["translate", "--beam-size", "0"], "decode.beam_size must be positive"),
                                          (["translate", "--batch-size", "-3"], "decode.batch_size must be positive")])
def test_zero_and_negative_counts_are_one_line(run, args, message):
    out = cli(args[0], str(run), *args[1:], stdin="one dog.\n")
    assert out.returncode == 2 and message.encode() in out.stderr and b"Traceback" not in out.stderr


@pytest.mark.parametrize("row,message", [
    ({"tokens": "Anna visited Paris", "ner": ["B-PER", "O", "B-LOC"]}, "must be lists of equal length"),
    ({"tokens": ["Anna", "visited"], "ner": "O O"}, "must be lists of equal length"),
    ({"tokens": [["Anna"], "x"], "ner": ["O", "O"]}, "must be a list of words"),
    ({"tokens": ["Anna"], "ner": [7]}, "illegal tag 7"),
])
def test_wrong_json_shapes_in_tag_data_name_file_and_line(tmp_path, row, message):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"tokens": ["Anna"], "ner": ["B-PER"]}) + "\n" + json.dumps(row) + "\n")
    config = load_config(labelled_config(tmp_path, "tag", **{"data.train": str(train), "data.valid": None,
                                                             "data.format": "auto"}))
    with pytest.raises(DataError, match=rf"{train}:2: .*{message}"):
        detr.train(config)


def test_a_package_that_is_not_a_model_package_is_never_imported(tmp_path, monkeypatch):
    pkg = tmp_path / "evil_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, message in (("package:evil_pkg", "is not a pretrained-model package"),
                          ("package:os.path", "must name a top-level package")):
        config = load_config(labelled_config(tmp_path, "classify", **{"model.pretrained": spec}))
        with pytest.raises(ConfigError, match=message):
            detr.train(config)
    assert not (tmp_path / "ran").exists()


def test_a_corrupt_pretrained_folder_is_one_line(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "model.safetensors").write_bytes(b"garbage")
    (folder / "vocab.txt").write_text("[PAD]\n")
    config = load_config(labelled_config(tmp_path, "classify", **{"model.pretrained": str(folder)}))
    with pytest.raises(ConfigError, match="config.json is not readable JSON"):
        detr.train(config)


# ----------------------------------------------------------------------------- 7. messages name the cause


def test_a_data_path_that_is_a_directory_says_so(tmp_path):
    from tests.test_train import toy_config

    (tmp_path / "adir.en").mkdir()
    (tmp_path / "adir.de").mkdir()
    config = toy_config(tmp_path, **{"data.train": str(tmp_path / "adir"), "data.src_lang": "en",
                                     "data.tgt_lang": "de"})
    with pytest.raises(DataError, match="is a directory, not a file"):
        detr.train(config)


@pytest.mark.parametrize("task,name,content,expected", [
    ("classify", "train", "a sentence\n", "classification reads a .tsv file"),
    ("tag", "train.tsv", "tokens\tner\nAnna\tB-PER\n", "tagging reads CoNLL column files"),
])
def test_data_in_the_wrong_format_for_the_task_says_which_was_expected(tmp_path, task, name, content, expected):
    (tmp_path / name).write_text(content)
    config = load_config(labelled_config(tmp_path, task, **{"data.train": str(tmp_path / name), "data.valid": None,
                                                            "data.format": "auto"}))
    with pytest.raises(DataError, match=expected):
        detr.train(config)


# ----------------------------------------------------------------------------- 6. the page is safe


def test_the_inspection_page_shows_hostile_text_as_text(run, tmp_path):
    from detr.visualize import html_page

    hostile = 'dogs </script><script>document.body.dataset.pwned="yes"</script> <!-- "quotes" & \'more\''
    page = html_page({"note": hostile, "outputs": []})
    data = page.split('<script type="application/json" id="data">')[1].split("</script>")[0]
    assert "<" not in data and ">" not in data and "&" not in data  # nothing in the data can end its element
    out = cli("inspect", str(run), "--src", hostile, "--ref", hostile, "--out", str(tmp_path / "page"))
    assert out.returncode == 0, out.stderr
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", (tmp_path / "page" / "index.html").as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    assert 'data-ready="yes"' in dom and "pwned" not in dom.split("<body")[1].split(">")[0]
