import torch
import torch.nn.functional as F

from detr.layers import Dropout, MultiHeadAttention, PositionalEncoding
from detr.loss import cross_entropy
from detr.tokenizer import PAD


def reference_attention(mha: MultiHeadAttention, q, kv, key_padding):
    """PyTorch's own multi-head attention on the same weights. Inputs (B, T, D)."""
    out, weights = F.multi_head_attention_forward(
        q.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1),
        embed_dim_to_check=q.size(-1), num_heads=mha.n_heads,
        in_proj_weight=None,
        in_proj_bias=torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=mha.out_proj.weight, out_proj_bias=mha.out_proj.bias,
        training=False, key_padding_mask=~key_padding, need_weights=True, average_attn_weights=False,
        use_separate_proj_weight=True,
        q_proj_weight=mha.q_proj.weight, k_proj_weight=mha.k_proj.weight, v_proj_weight=mha.v_proj.weight,
    )
    return out.transpose(0, 1), weights


def test_attention_equals_torch_reference_on_both_paths():
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=16, n_heads=4).eval()
    q, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[0, 5:] = False
    keep[2, 1:] = False
    mask = keep[:, None, None, :]  # (B, 1, 1, S)
    expected, expected_w = reference_attention(mha, q, kv, keep)
    fast, none = mha(q, kv, mask, need_weights=False)
    explicit, weights = mha(q, kv, mask, need_weights=True)
    assert none is None
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_w, atol=1e-5, rtol=1e-5)


def test_attention_weights_are_distributions_with_zero_on_padding():
    torch.manual_seed(1)
    mha = MultiHeadAttention(d_model=8, n_heads=2).eval()
    x = torch.randn(2, 4, 8)
    keep = torch.tensor([[True, True, False, False], [True, True, True, True]])
    _, w = mha(x, x, keep[:, None, None, :], need_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 4))
    assert (w[0, :, :, 2:] == 0).all()


def test_sinusoidal_positions_match_the_paper_formula():
    pe = PositionalEncoding(d_model=6, max_positions=10)
    x = torch.zeros(1, 10, 6)
    table = pe(x)[0]
    pos, i = 7, 2  # dimension 2i = 4 is sin, 2i+1 = 5 is cos
    angle = pos / 10000 ** (2 * i / 6)
    assert abs(table[pos, 4].item() - torch.sin(torch.tensor(angle)).item()) < 1e-6
    assert abs(table[pos, 5].item() - torch.cos(torch.tensor(angle)).item()) < 1e-6
    torch.testing.assert_close(pe(x[:, :3], offset=4)[0], table[4:7])


def test_dropout_keeps_each_element_with_probability_one_minus_p_and_scales_it():
    torch.manual_seed(0)
    drop = Dropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.9) < 0.002  # 10⁶ draws: the standard error is 0.0003
    assert torch.allclose(y[kept], torch.tensor(1 / 0.9))
    assert abs(float(kept[:, :4].float().mean()) - 0.9) < 0.01  # each of the 4 elements a 64-bit draw feeds
    assert abs(float(kept[:, 3::4].float().mean()) - 0.9) < 0.01
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, torch.where(kept, 2 / 0.9, 0.0))  # the same mask, scaled, in the backward pass


def test_dropout_is_the_identity_in_eval_mode_and_reproducible_from_a_seed():
    x = torch.randn(6, 10)
    assert Dropout(0.3).eval()(x) is x
    drop = Dropout(0.3).train()
    torch.manual_seed(1)
    a = drop(x)
    torch.manual_seed(1)
    assert torch.equal(a, drop(x))
    odd = Dropout(0.3).train()(torch.ones(3, 3))  # 9 elements: not a multiple of 4 (torch's own dropout)
    assert bool(((odd == 0) | torch.isclose(odd, torch.tensor(1 / 0.7))).all())


def test_fused_cross_entropy_equals_torch_in_value_and_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(37, 50) * 3).requires_grad_()
    target = torch.randint(0, 50, (37,))
    target[::5] = PAD
    for smoothing in (0.0, 0.1):
        ours = cross_entropy(logits, target, PAD, smoothing)
        (grad,) = torch.autograd.grad(ours, logits, torch.tensor(0.7))
        theirs = F.cross_entropy(logits, target, ignore_index=PAD, label_smoothing=smoothing, reduction="sum")
        (expected,) = torch.autograd.grad(theirs, logits, torch.tensor(0.7))
        assert torch.allclose(ours, theirs, rtol=1e-6)
        assert torch.allclose(grad, expected, atol=1e-6)
        assert grad[::5].abs().max() == 0  # ignored rows get no gradient
    nothing = torch.full((4,), PAD)
    assert float(cross_entropy(logits[:4].detach(), nothing, PAD, 0.1)) == 0.0
