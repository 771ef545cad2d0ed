import pytest

from detr.errors import CheckpointError
from detr.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, train_tokenizer
from tests.conftest import shared_data

TEXT = ["Zwei junge Männer spielen Fußball.", "A dog runs   across the grass!", "Ein Hund läuft über das Gras."]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_round_trip_of_arbitrary_text_and_specials(model_type):
    tok = train_tokenizer(TEXT * 20, None, vocab_size=400, model_type=model_type)
    for text in TEXT + ["unseen ☃ 日本語 \t tabs  and  spaces ", "", " leading"]:
        ids = tok.src.encode(text)
        assert UNK not in ids
        assert tok.src.decode(ids) == text
    assert [tok.src.hf.id_to_token(i) for i in (PAD, BOS, EOS, UNK)] == ["<pad>", "<s>", "</s>", "<unk>"]


def test_joint_and_separate_vocabularies_save_to_one_file(tmp_path):
    joint = train_tokenizer(TEXT, TEXT, vocab_size=350)
    separate = train_tokenizer(TEXT, [t.upper() for t in TEXT], vocab_size=350, joint=False)
    for tok, name in ((joint, "j.json"), (separate, "s.json")):
        tok.save(tmp_path / name)
        loaded = Tokenizer.load(tmp_path / name)
        assert loaded.joint == tok.joint
        assert loaded.tgt.encode(TEXT[0]) == tok.tgt.encode(TEXT[0])
    assert separate.src.encode("ZWEI") != separate.tgt.encode("ZWEI")


def test_lowercase_option():
    tok = train_tokenizer(TEXT, None, vocab_size=350, lowercase=True)
    assert tok.src.decode(tok.src.encode("Zwei HUNDE")) == "zwei hunde"


def test_bad_tokenizer_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "t.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="t.json: not a valid detr tokenizer"):
        Tokenizer.load(tmp_path / "t.json")
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")


def test_multi30k_test2016_round_trips_without_a_single_failure():
    base = shared_data("translation/multi30k")
    train_src = (base / "train.en").read_text(encoding="utf-8").splitlines()
    train_tgt = (base / "train.de").read_text(encoding="utf-8").splitlines()
    tok = train_tokenizer(train_src, train_tgt, vocab_size=8000)
    failures = 0
    for lang in ("en", "de"):
        lines = (base / f"test2016.{lang}").read_text(encoding="utf-8").splitlines()
        for line, ids in zip(lines, tok.src.encode_batch(lines)):
            failures += tok.src.decode(ids) != line
    print(f"round-trip failures on test2016 en+de: {failures}")
    assert failures == 0
