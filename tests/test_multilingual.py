"""One run, several target languages: tags, reading, training, choosing the language, errors."""

import pytest

import detr
from detr import load_config, train
from detr.analysis import attention_maps
from detr.errors import ConfigError, DataError
from detr.readers import read_examples
from detr.toy import make_toy_corpus
from tests.conftest import ROOT, detr_cli, shared_data


@pytest.fixture(scope="module")
def multilingual_run(tmp_path_factory):
    """The toy corpus into German and into "up", a pseudo-language: the same German in capitals."""
    root = tmp_path_factory.mktemp("multilingual")
    make_toy_corpus(root / "data", train=2000, valid=40, test=40, seed=3)
    for split in ("train", "valid", "test"):
        german = (root / "data" / f"{split}.de").read_text()
        (root / "data" / f"{split}.up").write_text(german.upper())
    config = load_config(ROOT / "configs" / "tiny.yaml", {
        "run_dir": str(root / "run"), "data.train": str(root / "data" / "train"),
        "data.valid": str(root / "data" / "valid"), "data.tgt_lang": ["de", "up"],
        "train.max_steps": 300, "train.eval_every": 300, "train.save_every": 300, "train.threads": 1,
        "decode.tgt_lang": "de"})
    train(config)
    return root, config


def test_each_language_is_read_against_the_source_and_tagged(multilingual_run):
    root, config = multilingual_run
    examples = list(read_examples(config.data, "valid"))
    assert [e.lang for e in examples] == ["de"] * 40 + ["up"] * 40
    assert examples[40].tgt == examples[0].tgt.upper() and examples[40].src == examples[0].src
    translator = detr.load(root / "run")
    assert sorted(translator.languages) == ["de", "up"]
    ids = translator.encode_line(1, "three dogs", "up")
    assert ids[0] == translator.languages["up"] and ids[1:] == translator.encode_line(1, "three dogs", "de")[1:]
    assert translator.tokenizer.src.encode("<2up>") != [translator.languages["up"]]  # typed text is never a tag
    maps = attention_maps(translator, "three dogs", options=translator.options(tgt_lang="up"), with_saliency=False)
    assert maps[0].src_tokens[0] == "<2up>" and maps[0].output.isupper()


def test_the_tag_chooses_the_output_language(multilingual_run):
    root, _ = multilingual_run
    translator = detr.load(root / "run")
    sources = (root / "data" / "test.en").read_text().splitlines()
    german = translator.translate(sources, translator.options(tgt_lang="de"))
    capitals = translator.translate(sources, translator.options(tgt_lang="up"))
    def upper(texts):
        return sum(c.isupper() for t in texts for c in t) / max(1, sum(c.isalpha() for t in texts for c in t))

    assert upper(capitals) > 0.9 and upper(german) < 0.2
    out = detr_cli("translate", str(root / "run"), "--tgt-lang", "up", "--beam-size", "1",
                   "-i", str(root / "data" / "test.en"))
    assert out.returncode == 0 and out.stdout.splitlines() == translator.translate(
        sources, translator.options(tgt_lang="up", beam_size=1))


def test_an_unknown_or_missing_language_is_one_clear_line(multilingual_run, toy_run):
    root, _ = multilingual_run
    out = detr_cli("translate", str(root / "run"), "--tgt-lang", "fr", "-i", str(root / "data" / "test.en"))
    assert out.returncode == 2 and "decode.tgt_lang=fr: unknown language; this run translates into de, up" in out.stderr
    translator = detr.load(root / "run")
    with pytest.raises(ConfigError, match="choose one with --tgt-lang"):
        translator.translate(["a dog"], translator.options(tgt_lang=None))
    bilingual = detr.load(toy_run / "run")
    with pytest.raises(ConfigError, match="this run is not multilingual"):
        bilingual.options(tgt_lang="de")


def test_bad_multilingual_configs(tmp_path):
    with pytest.raises(ConfigError, match="data.tgt_lang: a list of distinct language names"):
        load_config(ROOT / "configs" / "tiny.yaml", {"data.tgt_lang": ["de", "de"]})
    config = load_config(ROOT / "configs" / "tiny.yaml", {"data.tgt_lang": ["de", "fr"],
                                                          "data.train": str(tmp_path / "train.tsv")})
    (tmp_path / "train.tsv").write_text("src\ttgt\na\tb\n")
    with pytest.raises(DataError, match="data.tgt_lang is a list of languages, which needs parallel files"):
        list(read_examples(config.data, "train"))


def test_the_multilingual_recipe_trains_two_steps_on_40_lines_of_each_language(tmp_path):
    multi30k = shared_data("translation/multi30k")
    for split in ("train", "valid"):
        for lang in ("en", "de", "fr", "cs"):
            lines = (multi30k / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:40]
            (tmp_path / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = load_config(ROOT / "configs" / "multi30k_en_multi.yaml", {
        "run_dir": str(tmp_path / "run"), "data.train": str(tmp_path / "train"), "data.valid": str(tmp_path / "valid"),
        "data.vocab_size": 600, "train.max_steps": 2, "train.eval_every": 2, "train.max_tokens": 1024,
        "train.eval_max_sentences": 4, "train.threads": 1, "decode.max_len_b": 4})
    assert config.data.tgt_lang == ["de", "fr", "cs"]
    train(config)
    translator = detr.load(tmp_path / "run")
    assert sorted(translator.languages) == ["cs", "de", "fr"]
    for lang in ("de", "fr", "cs"):
        assert len(translator.translate(["A dog runs."], translator.options(tgt_lang=lang, beam_size=2))) == 1
