import dataclasses

import pytest
import torch

from detr import ModelConfig, Seq2Seq, build_model
from detr.errors import ConfigError
from detr.layers import AttentionRecord
from detr.model import padding_mask
from detr.tokenizer import BOS, PAD


def ids(*rows, pad_to=None):
    width = pad_to or max(len(r) for r in rows)
    return torch.tensor([list(r) + [PAD] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("norm,positional,activation", [
    ("pre", "sinusoidal", "relu"), ("post", "sinusoidal", "gelu"),
    ("pre", "learned", "gelu"), ("post", "learned", "relu"),
])
def test_cached_step_by_step_decoding_equals_parallel_forward(tiny_config, norm, positional, activation):
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config, norm=norm, positional=positional, activation=activation)
    model = build_model(config).eval()
    src = ids([5, 6, 7, 8, 2], [9, 10, 2], [11, 2])
    tgt = torch.randint(4, 60, (3, 6))
    tgt[:, 0] = BOS
    parallel = model(src, tgt)
    src_mask = padding_mask(src)
    memory = model.encode(src, src_mask)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t : t + 1], memory, src_mask, cache) for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), parallel, atol=1e-5, rtol=1e-5)
    assert cache.length == 6


@pytest.mark.parametrize("norm,positional", [("pre", "sinusoidal"), ("post", "learned")])
def test_packed_encoding_equals_padded_encoding(tiny_config, monkeypatch, norm, positional):
    """Joiners of a running batch are encoded without their padding, several sentences in one row
    under a block-diagonal mask, in packs of at most PACK_TOKENS tokens: the memory is `encode`'s."""
    import detr.model

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_config, norm=norm, positional=positional)).eval()
    lengths = [9, 2, 5, 1, 7, 3, 12, 4]
    src = ids(*[torch.randint(4, 50, (n,)).tolist() for n in lengths])
    real = (src != PAD)[..., None]
    for budget in (8, 12, 256):  # packs of one sentence, of a few, of all
        monkeypatch.setattr(detr.model, "PACK_TOKENS", budget)
        packed = model.encode_packed(src)
        assert packed.shape == (len(lengths), max(lengths), tiny_config.d_model)
        torch.testing.assert_close(packed * real, model.encode(src) * real, atol=1e-5, rtol=1e-5)
        assert not packed[~real.squeeze(-1)].any()
    assert [(s.start, s.stop) for s in detr.model._packs(lengths, 12)] == [(0, 2), (2, 4), (4, 6), (6, 7), (7, 8)]


def test_cache_select_reorders_and_shrinks_the_batch(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    src = ids([5, 6, 7, 2], [9, 10, 2], [11, 12, 13, 14, 2])
    tgt = torch.randint(4, 60, (3, 4))
    src_mask = padding_mask(src)
    memory = model.encode(src, src_mask)
    cache = model.new_cache()
    model.decode(tgt[:, :3], memory, src_mask, cache)
    keep = torch.tensor([2, 0])
    cache.select(keep)
    last = model.decode(tgt[keep, 3:], memory[keep], src_mask[keep], cache)
    torch.testing.assert_close(last, model(src[keep], tgt[keep])[:, 3:], atol=1e-5, rtol=1e-5)


def test_outputs_do_not_depend_on_batch_neighbours_or_padding(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    alone = model(ids([5, 6, 7, 2]), ids([BOS, 8, 9]))
    in_batch = model(ids([5, 6, 7, 2], [9, 10, 11, 12, 13, 14, 2], pad_to=10), ids([BOS, 8, 9], [BOS, 4, 5, 6, 7, 8]))
    torch.testing.assert_close(in_batch[0, :3], alone[0], atol=1e-5, rtol=1e-5)


def test_causal_mask_hides_the_future(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    src = ids([5, 6, 7, 2])
    a = torch.tensor([[BOS, 8, 9, 10, 11]])
    b = a.clone()
    b[0, 3:] = torch.tensor([40, 41])
    la, lb = model(src, a), model(src, b)
    torch.testing.assert_close(la[:, :3], lb[:, :3])
    assert not torch.allclose(la[:, 3:], lb[:, 3:])


def test_attention_record_returns_every_layer_and_head(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    src, tgt = ids([5, 6, 7, 2], [8, 2]), ids([BOS, 9, 10], [BOS, 11])
    record = AttentionRecord()
    mask = padding_mask(src)
    logits = model.decode(tgt, model.encode(src, mask, record), mask, attention=record)
    torch.testing.assert_close(logits, model(src, tgt), atol=1e-5, rtol=1e-5)
    n, h = tiny_config.n_layers, tiny_config.n_heads
    assert len(record.encoder) == len(record.decoder_self) == len(record.cross) == n
    assert record.encoder[0].shape == (2, h, 4, 4)
    assert record.cross[0].shape == (2, h, 3, 4)
    assert (record.cross[1][1, :, :, 2:] == 0).all()  # padded source keys
    assert (record.decoder_self[0][0].triu(1) == 0).all()  # future target positions
    for weights in record.encoder + record.decoder_self + record.cross:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert not any(hasattr(m, "last_weights") for m in model.modules())


@pytest.mark.parametrize("name,expected", [("base", 65e6), ("big", 213e6)])
def test_paper_presets_match_table_3_parameter_counts(name, expected):
    config = ModelConfig.preset(name, src_vocab_size=37000, tgt_vocab_size=37000, share_embeddings=True)
    with torch.device("meta"):
        model = Seq2Seq(config)
    count = model.num_parameters()
    assert abs(count - expected) / expected < 0.03, count


def test_presets_have_the_paper_sizes():
    base, big = ModelConfig.preset("base"), ModelConfig.preset("big")
    assert (base.d_model, base.n_heads, base.d_ff, base.n_layers, base.dropout) == (512, 8, 2048, 6, 0.1)
    assert (big.d_model, big.n_heads, big.d_ff, big.n_layers, big.dropout) == (1024, 16, 4096, 6, 0.3)


def test_shared_weight_matrix_is_one_tensor_and_receives_every_gradient(tiny_config):
    config = dataclasses.replace(tiny_config, tgt_vocab_size=50, share_embeddings=True)
    model = build_model(config)
    shared = model.encoder.embed.tokens.weight
    assert shared is model.decoder.embed.tokens.weight is model.output.weight
    assert sum(p is shared for p in model.parameters()) == 1
    # Each use alone sends a gradient into the one tensor. The stacks end in LayerNorm, whose plain
    # sum has an exact gradient of 0 (only rounding noise): weigh the outputs before summing.
    src, tgt = ids([5, 6, 2]), ids([BOS, 7])
    weigh = torch.randn(config.d_model, generator=torch.Generator().manual_seed(0))
    for use in ("source embedding", "target embedding", "output projection"):
        model.zero_grad()
        if use == "source embedding":
            (model.encode(src) * weigh).sum().backward()
        elif use == "target embedding":
            mem = torch.zeros(1, 3, config.d_model)
            (model.decoder(tgt, mem, padding_mask(src)) * weigh).sum().backward()
        else:
            model.output(torch.ones(1, 1, config.d_model)).sum().backward()
        assert shared.grad is not None and shared.grad.abs().sum() > 0, use


def test_tie_output_ties_only_target_embedding_and_output(tiny_config):
    model = build_model(tiny_config)
    assert model.output.weight is model.decoder.embed.tokens.weight
    assert model.encoder.embed.tokens.weight is not model.output.weight
    untied = build_model(dataclasses.replace(tiny_config, tie_output=False))
    assert untied.output.weight is not untied.decoder.embed.tokens.weight


@pytest.mark.parametrize("change,field", [
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(d_ff=0), "model.d_ff"),
    (dict(n_layers=-1), "model.n_layers"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(activation="swish"), "model.activation"),
    (dict(norm="sandwich"), "model.norm"),
    (dict(share_embeddings=True), "share_embeddings"),
])
def test_impossible_configs_raise_an_error_naming_the_field(tiny_config, change, field):
    with pytest.raises(ConfigError, match=field):
        build_model(dataclasses.replace(tiny_config, **change))


def test_a_frozen_encoder_bottom_gets_no_gradient_and_the_shared_word_matrix_still_learns(tiny_config):
    from detr.freeze import freeze_encoder

    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config, share_embeddings=True, tgt_vocab_size=50, positional="learned")
    model = build_model(config)
    freeze_encoder(model, 1)
    below = []  # whether the first unfrozen layer's input still carries a gradient path
    model.encoder.layers[1].register_forward_pre_hook(lambda m, args: below.append(args[0].requires_grad))
    src = ids([5, 6, 7, 8, 2], [9, 10, 2])
    tgt = torch.randint(4, 50, (2, 5))
    model(src, tgt).logsumexp(-1).sum().backward()
    assert below == [False]  # no backward pass runs through the embedding or layer 1
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.layers[0].parameters())
    assert all(p.grad is not None for p in model.encoder.layers[1].parameters() if p.requires_grad)
    words = model.encoder.embeddings.weight
    assert words is model.decoder.embed.tokens.weight and words.requires_grad and words.grad is not None
    own = [p for p in model.encoder.embed.parameters() if p is not words]  # the learned positions
    assert own and all(not p.requires_grad and p.grad is None for p in own)


def test_freezing_more_layers_than_the_encoder_has_names_the_key(tiny_config):
    from detr.freeze import freeze_encoder

    model = build_model(tiny_config)
    with pytest.raises(ConfigError, match=rf"train.freeze_encoder_layers: 9, but the encoder has "
                                          rf"{len(model.encoder.layers)} layers"):
        freeze_encoder(model, 9)


def test_a_cache_selection_in_place_equals_index_select(tiny_config):
    """Reordering, shrinking and rows leaving (their places filled by the last rows) at random."""
    from detr.search import swap_out

    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    src = torch.randint(4, 20, (9, 6))
    src_mask = padding_mask(src)
    cache = model.new_cache()
    with torch.no_grad():
        model.decode(torch.randint(4, 20, (9, 3)), model.encode(src, src_mask), src_mask, cache)
    gen = torch.Generator().manual_seed(1)
    for i in range(12):
        rows = cache.layers[0].self_k.size(0)
        index = torch.randperm(rows, generator=gen)[:max(1, rows - 1)] if rows > 3 else torch.arange(rows)
        if i % 3 == 0:
            index = swap_out(torch.rand(rows, generator=gen) < 0.3)
        expected = [[x.index_select(0, index) for x in (lc.self_k, lc.self_v, lc.cross_k, lc.cross_v)]
                    for lc in cache.layers]
        cache.select(index)
        for lc, want in zip(cache.layers, expected):
            for got, x in zip((lc.self_k, lc.self_v, lc.cross_k, lc.cross_v), want):
                assert torch.equal(got, x)


def test_swap_out_moves_only_the_last_rows_into_the_places_left():
    from detr.search import swap_out

    leaving = torch.tensor([False, True, False, True, False, False, True, False])
    keep = swap_out(leaving)
    assert keep.tolist() == [0, 5, 2, 7, 4]
    assert sorted(keep.tolist()) == (~leaving).nonzero().squeeze(1).tolist()
    assert swap_out(torch.tensor([True, True])).tolist() == []
    assert swap_out(torch.tensor([False, False])).tolist() == [0, 1]
