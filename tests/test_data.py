import gzip
import shutil

import pytest

from detr.batching import BatchStream, Encoded, padding_efficiency
from detr.config import DataConfig
from detr.download import fetch_multi30k
from detr.errors import DataError
from detr.readers import (
    check_split,
    iob1_to_iob2,
    read_conll,
    read_examples,
    read_jsonl,
    read_lines,
    read_parallel,
    read_tsv,
)
from detr.tokenizer import train_tokenizer
from tests.conftest import shared_data


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_parallel_files_with_different_line_counts_name_both(tmp_path):
    write(tmp_path / "t.en", "a\nb\nc\n")
    write(tmp_path / "t.de", "x\ny\n")
    with pytest.raises(DataError) as err:
        list(read_parallel(tmp_path / "t.en", tmp_path / "t.de"))
    assert f"{tmp_path}/t.en has 3 lines, {tmp_path}/t.de has 2" in str(err.value)
    config = DataConfig(train=str(tmp_path / "t"), src_lang="en", tgt_lang="de")
    with pytest.raises(DataError, match="has 3 lines"):
        check_split(config, "train")


def test_empty_lines_are_skipped_and_counted(tmp_path):
    write(tmp_path / "t.en", "a\n\nc\n")
    write(tmp_path / "t.de", "x\ny\n \n")
    stats = {}
    pairs = list(read_parallel(tmp_path / "t.en", tmp_path / "t.de", stats))
    assert [(e.src, e.tgt) for e in pairs] == [("a", "x")]
    assert stats == {"empty": 2}


def test_invalid_utf8_names_file_line_and_byte(tmp_path):
    path = write(tmp_path / "bad.txt", b"fine\nab\xffcd\n", "wb")
    with pytest.raises(DataError) as err:
        list(read_lines(path))
    assert str(err.value) == f"{path}:2: invalid UTF-8 at byte 7 of the file (byte 2 of the line)"


def test_tsv_and_jsonl_rows_without_the_field_name_the_line(tmp_path):
    tsv = write(tmp_path / "d.tsv", "src\ttgt\nhello\thallo\nonly-one-column\n")
    with pytest.raises(DataError, match=r"d.tsv:3: row has 1 columns, no column 'tgt'"):
        list(read_tsv(tsv, ["src", "tgt"]))
    with pytest.raises(DataError, match=r"d.tsv:1: no column 'summary'"):
        list(read_tsv(tsv, ["src", "summary"]))
    jsonl = write(tmp_path / "d.jsonl", '{"dialogue": "hi", "summary": "s"}\n{"dialogue": "x"}\n')
    assert next(read_jsonl(jsonl, ["dialogue", "summary"]))[1] == ["hi", "s"]
    with pytest.raises(DataError, match=r"d.jsonl:2: no field 'summary'"):
        list(read_jsonl(jsonl, ["dialogue", "summary"]))
    write(tmp_path / "e.jsonl", "{not json}\n")
    with pytest.raises(DataError, match=r"e.jsonl:1: invalid JSON"):
        list(read_jsonl(tmp_path / "e.jsonl", ["a"]))


def test_config_picks_format_and_fields(tmp_path):
    write(tmp_path / "d.jsonl", '{"dialogue": "hi there", "summary": "greeting"}\n')
    config = DataConfig(train=str(tmp_path / "d.jsonl"), src_field="dialogue", tgt_field="summary")
    (example,) = read_examples(config, "train")
    assert (example.src, example.tgt) == ("hi there", "greeting")


def test_conll_iob1_is_normalised_to_iob2_and_errors_name_the_line(tmp_path):
    assert iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]
    assert iob1_to_iob2(["B-PER", "I-PER"]) == ["B-PER", "I-PER"]
    conll = "-DOCSTART- -X- O O\n\nEU NNP I-NP I-ORG\nrejects VBZ I-VP O\n\nPeter NNP I-NP I-PER\n"
    good = write(tmp_path / "a.txt", conll)
    sentences = list(read_conll(good))
    assert [s.tags for s in sentences] == [["B-ORG", "O"], ["B-PER"]]
    assert sentences[1].where.endswith("a.txt:6")
    write(tmp_path / "b.txt", "EU NNP I-NP I-ORG\nrejects VBZ O\n")
    with pytest.raises(DataError, match=r"b.txt:2: expected 4 columns like the first line, got 3"):
        list(read_conll(tmp_path / "b.txt"))
    write(tmp_path / "c.txt", "EU NNP I-NP X-ORG\n")
    with pytest.raises(DataError, match=r"c.txt:1: illegal tag 'X-ORG'"):
        list(read_conll(tmp_path / "c.txt"))


def toy_stream(tmp_path, n=300, max_tokens=64, pool_size=1000, seed=3, max_len=256, overlong="filter"):
    src = [" ".join(str((i * 7 + j) % 10) for j in range(1 + i % 13)) for i in range(n)]
    write(tmp_path / "t.src", "\n".join(src) + "\n")
    write(tmp_path / "t.tgt", "\n".join(s[::-1] for s in src) + "\n")
    config = DataConfig(train=str(tmp_path / "t"))
    tok = train_tokenizer(src, None, vocab_size=300)
    encode = Encoded(tok, max_len, overlong)
    stream = BatchStream(lambda: read_examples(config, "train"), encode, max_tokens, pool_size, seed, name=config.train)
    return stream, encode


def signature(batches):
    return [(b.src.tolist(), b.tgt_out.tolist()) for b in batches]


def test_batches_respect_the_token_budget_and_cover_every_example(tmp_path):
    stream, _ = toy_stream(tmp_path)
    batches = list(stream)
    assert all(b.src.numel() <= 64 and b.tgt_out.numel() <= 64 for b in batches)
    assert sum(b.src.size(0) for b in batches) == 300
    assert stream.state_dict() == {"epoch": 1, "pool": 0, "consumed": 0}
    assert (batches[0].tgt_in[:, 1:] == batches[0].tgt_out[:, :-1]).all()


@pytest.mark.parametrize("pool_size", [1000, 70])
def test_order_is_seeded_and_resumes_exactly_from_any_position(tmp_path, pool_size):
    stream, _ = toy_stream(tmp_path, pool_size=pool_size)
    full = signature(list(stream) + list(stream))  # two epochs
    again, _ = toy_stream(tmp_path, pool_size=pool_size)
    assert signature(list(again) + list(again)) == full
    other, _ = toy_stream(tmp_path, pool_size=pool_size, seed=4)
    assert signature(list(other)) != full[: len(full) // 2]
    for cut in (1, 5, len(full) // 2 + 2):
        first, _ = toy_stream(tmp_path, pool_size=pool_size)
        taken = []
        while len(taken) < cut:
            for b in first:
                taken.append(b)
                if len(taken) == cut:
                    break
        state = first.state_dict()
        resumed, _ = toy_stream(tmp_path, pool_size=pool_size)
        resumed.load_state_dict(state)
        rest = []
        while len(taken) + len(rest) < len(full):
            rest.extend(resumed)
        assert signature(taken) + signature(rest) == full


def test_overlong_examples_are_filtered_or_truncated(tmp_path):
    stream, encode = toy_stream(tmp_path, max_len=6, overlong="filter")
    kept = sum(b.src.size(0) for b in stream)
    assert 0 < kept < 300 and encode.filtered == 300 - kept
    stream, encode = toy_stream(tmp_path, max_len=6, overlong="truncate")
    batches = list(stream)
    assert sum(b.src.size(0) for b in batches) == 300 and encode.truncated > 0
    assert max(b.src.size(1) for b in batches) <= 6


def test_multi30k_padding_efficiency_is_at_least_090():
    base = shared_data("translation/multi30k")
    config = DataConfig(train=str(base / "train"), src_lang="en", tgt_lang="de")
    tok = train_tokenizer((e.src for e in read_examples(config, "train")),
                          (e.tgt for e in read_examples(config, "train")), vocab_size=8000)
    for max_tokens in (4096, 8192):
        stream = BatchStream(lambda: read_examples(config, "train"), Encoded(tok, 256, "filter"), max_tokens,
                             100_000, seed=1)
        efficiency = padding_efficiency(stream)
        print(f"Multi30k train padding efficiency at max_tokens={max_tokens}: {efficiency:.3f}")
        assert efficiency >= 0.90


def test_fetch_multi30k_from_a_local_mirror_verifies_checksums(tmp_path):
    base = shared_data("translation/multi30k")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    upstream = {"train": "train", "valid": "val", "test2016": "test_2016_flickr"}
    for ours, theirs in upstream.items():
        for lang in ("en", "de"):
            with open(base / f"{ours}.{lang}", "rb") as f, gzip.open(mirror / f"{theirs}.{lang}.gz", "wb") as g:
                shutil.copyfileobj(f, g)
    files = fetch_multi30k(tmp_path / "out", base_url=mirror.as_uri(), langs=["en", "de"])
    assert sorted(p.name for p in files) == sorted(f"{s}.{l}" for s in upstream for l in ("en", "de"))
    assert (tmp_path / "out" / "valid.de").read_bytes() == (base / "valid.de").read_bytes()
    # A corrupted mirror file fails its checksum and leaves nothing behind.
    with gzip.open(mirror / "val.en.gz", "wb") as g:
        g.write(b"tampered\n")
    (tmp_path / "out" / "valid.en").unlink()
    with pytest.raises(DataError, match="checksum mismatch for valid.en"):
        fetch_multi30k(tmp_path / "out", base_url=mirror.as_uri(), langs=["en"])
    assert not (tmp_path / "out" / "valid.en").exists()
    assert not list((tmp_path / "out").glob(".*tmp"))



def test_empty_after_filtering_is_one_error_and_counts_are_logged(tmp_path, caplog):
    stream, _ = toy_stream(tmp_path, max_len=1)
    with pytest.raises(DataError, match=r"t: no examples left after filtering: all 300 are longer than data.max_len=1"):
        list(stream)
    stream, _ = toy_stream(tmp_path, max_len=8)
    with caplog.at_level("INFO", logger="detr.batching"):
        list(stream)
    assert "300 examples read" in caplog.text and "over-long filtered" in caplog.text


def test_toy_numbers_and_agreement():
    import random

    from detr.toy import english_number, german_number, noun_phrase, toy_pair

    assert (english_number(342), german_number(342)) == ("three hundred forty-two", "dreihundertzweiundvierzig")
    assert german_number(21) == "einundzwanzig" and german_number(101) == "einhunderteins"
    assert german_number(100) == "einhundert" and german_number(17) == "siebzehn"
    assert noun_phrase(1, 0, 0) == ("one red dog", "einen roten Hund")  # masculine accusative
    assert noun_phrase(1, 1, 0) == ("one red cat", "eine rote Katze")
    assert noun_phrase(3, 2, 3) == ("three small houses", "drei kleine Häuser")
    en, de = toy_pair(random.Random(0))
    assert en.endswith(".") and de.endswith(".")
