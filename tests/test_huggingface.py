"""Hugging Face: a post-norm run exported as a MarianMTModel folder gives detr's logits, tokens and greedy
output; an OPUS-MT style Marian folder imported as a detr run tokenizes, scores and translates as
transformers does and trains on; import∘export is the identity; what cannot map is refused in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from detr import ConfigError, load
from detr.errors import CheckpointError
from detr.export import huggingface as hf
from detr.rundir import RunDir
from tests.conftest import ROOT, detr_cli, train_toy

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, MarianMTModel  # noqa: E402


@pytest.fixture(scope="module")
def post_norm_run(tmp_path_factory):
    """A tiny post-norm run (the layout Marian has), trained for a few seconds on the toy corpus."""
    return train_toy(tmp_path_factory.mktemp("post_norm"), steps=200, test=100,
                     **{"model.norm": "post", "model.activation": "gelu"})


@pytest.fixture(scope="module")
def exported(post_norm_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    done = detr_cli("export", str(post_norm_run / "run"), "--to", "huggingface", "--out", str(out))
    assert done.returncode == 0 and "Hugging Face MarianMTModel" in done.stdout, done.stderr
    return out


def test_the_export_loads_in_transformers_and_gives_detrs_tokens_logits_and_greedy_output(post_norm_run, exported):
    translator = load(post_norm_run / "run")
    marian = MarianMTModel.from_pretrained(exported).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    lines = (post_norm_run / "data" / "test.en").read_text().splitlines()
    for number, line in enumerate(lines + [" a leading space", "two  spaces ", "\ttab"], 1):
        assert tokenizer(line)["input_ids"] == translator.encode_line(number, line), line
    batch = tokenizer(lines[:8], padding=True, return_tensors="pt")
    prefix = torch.tensor([[1, *translator.tokenizer.tgt.encode("sie kaufen")]] * 8)
    with torch.no_grad():
        ours = translator.model(batch["input_ids"], prefix)
        theirs = marian(**batch, decoder_input_ids=prefix).logits
    assert (ours - theirs).abs().max() < 1e-4
    generated = marian.generate(**tokenizer(lines, padding=True, return_tensors="pt"), num_beams=1, do_sample=False,
                                max_new_tokens=60)
    assert tokenizer.batch_decode(generated, skip_special_tokens=True) == \
        translator.translate(lines, translator.options(beam_size=1, max_len_a=0.0, max_len_b=59))


def test_importing_an_export_gives_back_the_same_weights_and_tokenizer(post_norm_run, exported, tmp_path):
    done = detr_cli("import", "huggingface", str(exported), "--to", str(tmp_path / "back"))
    assert done.returncode == 0, done.stderr
    original, back = RunDir(post_norm_run / "run"), RunDir(tmp_path / "back")
    a, b = load_file(original.model), load_file(back.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert original.tokenizer.read_bytes() == back.tokenizer.read_bytes()
    again = detr_cli("import", "huggingface", str(exported), "--to", str(tmp_path / "back"))
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_what_marian_cannot_hold_is_named_and_nothing_is_written(toy_run, tmp_path):
    out = tmp_path / "pre"
    refused = detr_cli("export", str(toy_run / "run"), "--to", "huggingface", "--out", str(out))  # a pre-norm run
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and not out.exists()
    assert "Marian (the Hugging Face class with detr's layout) cannot hold model.norm=pre" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def opus_mt_folder(data, out):
    """A Marian folder laid out as OPUS-MT's: SentencePiece models per side, one vocab.json with </s> 0,
    <unk> 1 and <pad> last (also the decoder's start), swish, random weights."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece (the test extra) builds the OPUS-MT fixture")
    from transformers import MarianConfig, MarianTokenizer

    out.mkdir(parents=True)
    pieces = []
    for lang, name in (("en", "source"), ("de", "target")):
        spm.SentencePieceTrainer.train(input=str(data / f"train.{lang}"), model_prefix=str(out / name),
                                       vocab_size=100, model_type="unigram", unk_id=0, bos_id=1, eos_id=2,
                                       pad_id=-1, minloglevel=2)
        (out / f"{name}.model").rename(out / f"{name}.spm")
        proc = spm.SentencePieceProcessor(model_file=str(out / f"{name}.spm"))
        pieces += [proc.id_to_piece(i) for i in range(proc.get_piece_size())
                   if not (proc.is_control(i) or proc.is_unknown(i))]
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    V = len(vocab)
    config = MarianConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          activation_function="swish", max_position_embeddings=128, scale_embedding=True,
                          pad_token_id=V - 1, eos_token_id=0, decoder_start_token_id=V - 1, forced_eos_token_id=0)
    torch.manual_seed(0)
    model = MarianMTModel(config)
    with torch.no_grad():  # weights larger than the 0.02 initialisation: logits that tell tokens apart
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    MarianTokenizer(str(out / "source.spm"), str(out / "target.spm"), str(out / "vocab.json")).save_pretrained(out)
    return out


def test_an_opus_mt_folder_becomes_a_run_that_tokenizes_scores_translates_and_trains(post_norm_run, tmp_path):
    from transformers import MarianTokenizer

    folder = opus_mt_folder(post_norm_run / "data", tmp_path / "opus")
    done = detr_cli("import", "huggingface", str(folder), "--to", str(tmp_path / "run"))
    assert done.returncode == 0 and "one extra vocabulary entry, <pad>" in done.stdout, done.stderr
    translator = load(tmp_path / "run")
    marian, tokenizer = MarianMTModel.from_pretrained(folder).eval(), MarianTokenizer.from_pretrained(folder)
    _, mapping = hf._marian_vocabulary(folder, marian.config)
    to_marian = torch.tensor([marian.config.pad_token_id if i is None else i for i in mapping])
    lines = (post_norm_run / "data" / "test.en").read_text().splitlines()[:40] + [
        "Two  spaces and a trailing one ", "ünïcode straße", "\tTab", "Ⅻ ﬁve"]
    for number, line in enumerate(lines, 1):
        assert to_marian[translator.encode_line(number, line)].tolist() == tokenizer(line)["input_ids"], line
    # Logits: equal on every entry Marian has (detr's <pad>, the one extra, has logit 0).
    src = torch.tensor([translator.encode_line(1, lines[0])])
    tgt = torch.tensor([[1, 7, 9, 11]])
    with torch.no_grad():
        ours = translator.model(src, tgt)
        theirs = marian(input_ids=to_marian[src], decoder_input_ids=to_marian[tgt]).logits
    kept = [j for j, i in enumerate(mapping) if i is not None]
    assert (ours[..., kept] - theirs[..., to_marian[kept]]).abs().max() < 1e-4
    generated = marian.generate(**tokenizer(lines[:10], padding=True, return_tensors="pt"), num_beams=1,
                                do_sample=False, max_new_tokens=12)
    assert tokenizer.batch_decode(generated, skip_special_tokens=True) == \
        translator.translate(lines[:10], translator.options(beam_size=1, max_len_a=0.0, max_len_b=11))
    data = post_norm_run / "data"
    tuned = detr_cli("train", str(tmp_path / "run" / "config.yaml"), "--run_dir", str(tmp_path / "ft"),
                     "--data.train", str(data / "train"), "--data.valid", str(data / "valid"), "--data.src_lang", "en",
                     "--data.tgt_lang", "de", "--train.max_steps", "4", "--train.max_epochs", "0",
                     "--train.eval_every", "4", "--train.save_every", "4", "--no-progress")
    assert tuned.returncode == 0 and "starting from the weights in" in tuned.stderr, tuned.stderr
    assert load(tmp_path / "ft").translate(["a red dog"]) is not None


def test_a_fine_tuning_start_with_another_runs_tokenizer_is_one_line(post_norm_run, tmp_path):
    data = post_norm_run / "data"
    done = detr_cli("train", str(ROOT / "configs" / "tiny.yaml"), "--run_dir", str(tmp_path / "ft"),
                    "--data.train", str(data / "train"), "--data.valid", str(data / "valid"), "--data.vocab_size",
                    "300", "--train.init_from", str(RunDir(post_norm_run / "run").model), "--no-progress")
    assert done.returncode == 2 and "train.init_from:" in done.stderr and "another tokenizer" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_partial_or_foreign_folder_is_named(exported, tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        hf.import_marian(tmp_path, tmp_path / "run")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(ConfigError, match="a bert model; detr imports Marian"):
        hf.import_marian(tmp_path, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", hf.MARKER, hf.DETR_TOKENIZER):
        (broken / name).write_bytes((exported / name).read_bytes())
    with pytest.raises(CheckpointError, match="not a complete Hugging Face export .missing model.safetensors"):
        hf.import_marian(broken, tmp_path / "run")
