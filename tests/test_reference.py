"""Whole-model reference (litgpt style): detr's post-norm Seq2Seq equals PyTorch's own
`torch.nn.Transformer` with the same weights, embeddings and output projection included."""

import math

import torch
from torch import nn

from detr import ModelConfig, build_model
from detr.tokenizer import PAD

D, H, LAYERS, FF, V = 32, 4, 2, 64, 50


def sinusoids(length: int, d: int) -> torch.Tensor:
    """The paper's positional encoding, written out independently of detr's."""
    pe = torch.zeros(length, d)
    for pos in range(length):
        for i in range(0, d, 2):
            angle = pos / 10000 ** (i / d)
            pe[pos, i], pe[pos, i + 1] = math.sin(angle), math.cos(angle)
    return pe


def copy_attention(ours, theirs: nn.MultiheadAttention) -> None:
    theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
    theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
    theirs.out_proj.weight.copy_(ours.out_proj.weight)
    theirs.out_proj.bias.copy_(ours.out_proj.bias)


def copy_ff_and_norms(ours, theirs, blocks: list[str]) -> None:
    theirs.linear1.weight.copy_(ours.ff.w1.weight)
    theirs.linear1.bias.copy_(ours.ff.w1.bias)
    theirs.linear2.weight.copy_(ours.ff.w2.weight)
    theirs.linear2.bias.copy_(ours.ff.w2.bias)
    for k, block in enumerate(blocks, start=1):
        getattr(theirs, f"norm{k}").weight.copy_(getattr(ours, block).norm.weight)
        getattr(theirs, f"norm{k}").bias.copy_(getattr(ours, block).norm.bias)


def reference_of(model) -> nn.Transformer:
    """`nn.Transformer` (post-norm, ReLU, no final norms, like detr's post-norm stack) holding detr's weights."""
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True), LAYERS,
                                    enable_nested_tensor=False)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, batch_first=True), LAYERS)
    ref = nn.Transformer(D, H, custom_encoder=encoder, custom_decoder=decoder, batch_first=True).eval()
    with torch.no_grad():
        for ours, theirs in zip(model.encoder.layers, encoder.layers):
            copy_attention(ours.self_attn, theirs.self_attn)
            copy_ff_and_norms(ours, theirs, ["attn_block", "ff_block"])
        for ours, theirs in zip(model.decoder.layers, decoder.layers):
            copy_attention(ours.self_attn, theirs.self_attn)
            copy_attention(ours.cross_attn, theirs.multihead_attn)
            copy_ff_and_norms(ours, theirs, ["self_block", "cross_block", "ff_block"])
    return ref


def test_post_norm_seq2seq_equals_torch_nn_transformer_with_the_same_weights():
    torch.manual_seed(0)
    config = ModelConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=D, n_heads=H, n_layers=LAYERS, d_ff=FF,
                         dropout=0.0, norm="post", activation="relu", max_positions=64, share_embeddings=True)
    model = build_model(config).eval()
    ref = reference_of(model)
    src = torch.randint(4, V, (3, 9))
    tgt = torch.randint(4, V, (3, 7))
    src[1, 6:], src[2, 4:] = PAD, PAD  # padding on both sides, different per row
    tgt[1, 5:], tgt[2, 3:] = PAD, PAD
    table = model.output.weight  # the one shared matrix: source and target embedding and output projection
    pe = sinusoids(16, D)

    def embed(ids):
        return table[ids] * math.sqrt(D) + pe[: ids.size(1)]

    with torch.no_grad():
        ours = model(src, tgt)
        hidden = ref(embed(src), embed(tgt), tgt_mask=torch.ones(7, 7, dtype=torch.bool).triu(1),
                     src_key_padding_mask=src == PAD, tgt_key_padding_mask=tgt == PAD,
                     memory_key_padding_mask=src == PAD, tgt_is_causal=True)
        theirs = hidden @ table.T
    real = tgt != PAD  # padded target positions are never read by the loss or by decoding
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
