"""BiMultiHeadAttention folds its image-side projections into the text side (associativity); these tests pin it to
the unfolded formula of SPEC §5.4 item 1, written out here step by step in float64."""
import pytest
import torch

from dinokernels.models.grounding_dino.fusion import BiAttentionBlock, BiMultiHeadAttention


def unfolded_bi_attention(m: BiMultiHeadAttention, v, l, mask_v, mask_l):
    """Every projection applied to every token, heads split, the official safeguards, then the output projections."""
    b, s, _ = v.shape
    t = l.shape[1]
    h, e = m.num_heads, m.head_dim

    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], h, e).permute(0, 2, 1, 3)

    query = heads(torch.nn.functional.linear(v, m.v_proj.weight, m.v_proj.bias) * m.scale)
    key = heads(torch.nn.functional.linear(l, m.l_proj.weight, m.l_proj.bias))
    value_v = heads(torch.nn.functional.linear(v, m.values_v_proj.weight, m.values_v_proj.bias))
    value_l = heads(torch.nn.functional.linear(l, m.values_l_proj.weight, m.values_l_proj.bias))
    a = torch.einsum("bhse,bhte->bhst", query, key)
    a = (a - a.max()).clamp(-5e4, 5e4)  # global maximum over the whole batch
    a_t = a.transpose(-1, -2)
    a_t = (a_t - a_t.amax(-1, keepdim=True)).clamp(-5e4, 5e4)
    if mask_v is not None:
        a_t = a_t.masked_fill(mask_v[:, None, None, :], float("-inf"))
    if mask_l is not None:
        a = a.masked_fill(mask_l[:, None, None, :], float("-inf"))
    out_v = torch.einsum("bhst,bhte->bshe", a.softmax(-1), value_l).reshape(b, s, h * e)
    out_l = torch.einsum("bhts,bhse->bthe", a_t.softmax(-1), value_v).reshape(b, t, h * e)
    return (torch.nn.functional.linear(out_v, m.out_v_proj.weight, m.out_v_proj.bias),
            torch.nn.functional.linear(out_l, m.out_l_proj.weight, m.out_l_proj.bias))


def _module(v_dim, l_dim, embed_dim, heads, seed=0):
    torch.manual_seed(seed)
    m = BiMultiHeadAttention(v_dim, l_dim, embed_dim, heads).double()
    with torch.no_grad():  # non-zero biases: the folded bias terms are part of what is tested
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("b,s,t,v_dim,l_dim,embed_dim,heads", [
    (2, 37, 5, 16, 12, 32, 4),   # padding on both sides, awkward sizes
    (1, 1, 1, 8, 8, 8, 1),       # one image token, one text token
    (3, 50, 9, 24, 20, 48, 2),   # embed_dim larger than both inputs (the official 1024 vs 256)
])
def test_folded_attention_equals_the_unfolded_formula(b, s, t, v_dim, l_dim, embed_dim, heads):
    m = _module(v_dim, l_dim, embed_dim, heads)
    v = torch.randn(b, s, v_dim, dtype=torch.float64, requires_grad=True)
    l = torch.randn(b, t, l_dim, dtype=torch.float64, requires_grad=True)
    mask_v = torch.zeros(b, s, dtype=torch.bool)
    mask_l = torch.zeros(b, t, dtype=torch.bool)
    if b > 1:
        mask_v[1, s // 2:] = True
        mask_l[0, t - 1:] = True if t > 1 else False
    out = m(v, l, mask_v, mask_l)
    ref = unfolded_bi_attention(m, v, l, mask_v, mask_l)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # gradients for the inputs and every weight
    weights = [torch.randn_like(o) for o in out]
    params = [v, l] + list(m.parameters())
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), params)
    grads_ref = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref, weights)), params)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_no_masks_and_gradcheck():
    m = _module(6, 5, 8, 2, seed=1)
    v = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    l = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    for got, want in zip(m(v, l), unfolded_bi_attention(m, v, l, None, None)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a, c: m(a, c), (v, l))


def test_float32_large_image_side_stays_close():
    """At the official sizes' proportions (S ≫ T, embed_dim 4 × v_dim) the float32 rounding of the folded order stays
    at the level of the unfolded one's."""
    torch.manual_seed(3)
    m32 = BiMultiHeadAttention(64, 48, 256, 4)
    m64 = BiMultiHeadAttention(64, 48, 256, 4).double()
    m64.load_state_dict({k: p.double() for k, p in m32.state_dict().items()})
    v, l = torch.randn(1, 3000, 64), torch.randn(1, 12, 48)
    with torch.no_grad():
        exact = unfolded_bi_attention(m64, v.double(), l.double(), None, None)
        folded = m32(v, l)
        unfolded32 = unfolded_bi_attention(m32, v, l, None, None)
    for f, u, x in zip(folded, unfolded32, exact):
        err_folded = (f.double() - x).abs().max().item()
        err_unfolded = (u.double() - x).abs().max().item()
        assert err_folded <= 10 * err_unfolded + 1e-6, (err_folded, err_unfolded)


def test_dropout_keeps_the_bias_term_of_the_dropped_weights(monkeypatch):
    """With dropout the text side's attention rows no longer sum to 1; the folded values_v_proj bias must follow the
    kept weights. Checked by replaying the same dropout masks in the unfolded formula."""
    m = _module(6, 5, 8, 2, seed=4)
    m.dropout = 0.5
    m.train()
    v = torch.randn(2, 9, 6, dtype=torch.float64)
    l = torch.randn(2, 4, 5, dtype=torch.float64)
    masks = []

    def recording_dropout(x, p, training):
        keep = (torch.rand_like(x) >= p).to(x.dtype) / (1 - p)
        masks.append(keep)
        return x * keep

    monkeypatch.setattr(torch.nn.functional, "dropout", recording_dropout)
    out_v, out_l = m(v, l)
    keep_v, keep_l = masks
    # unfolded, with the recorded masks
    h, e = m.num_heads, m.head_dim
    query = (v @ m.v_proj.weight.T + m.v_proj.bias).view(2, 9, h, e).transpose(1, 2) * m.scale
    key = (l @ m.l_proj.weight.T + m.l_proj.bias).view(2, 4, h, e).transpose(1, 2)
    value_v = (v @ m.values_v_proj.weight.T + m.values_v_proj.bias).view(2, 9, h, e).transpose(1, 2)
    a = query @ key.transpose(-1, -2)
    a = (a - a.max()).clamp(-5e4, 5e4)
    a_t = a.transpose(-1, -2)
    a_t = (a_t - a_t.amax(-1, keepdim=True)).clamp(-5e4, 5e4)
    attended = (a_t.softmax(-1) * keep_l) @ value_v
    want_l = attended.transpose(1, 2).reshape(2, 4, h * e) @ m.out_l_proj.weight.T + m.out_l_proj.bias
    torch.testing.assert_close(out_l, want_l, rtol=1e-10, atol=1e-10)
    row_sums = (a_t.softmax(-1) * keep_l).sum(-1)
    assert not torch.allclose(row_sums, torch.ones((), dtype=torch.float64), atol=1e-3)  # rows ≠ 1


def test_block_residual_around_the_folded_attention():
    torch.manual_seed(5)
    block = BiAttentionBlock(8, 6, 16, 2, init_values=0.5).double()
    v, l = torch.randn(2, 11, 8, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    nv, nl = block.layer_norm_v(v), block.layer_norm_l(l)
    dv, dl = unfolded_bi_attention(block.attn, nv, nl, None, None)
    out_v, out_l = block(v, l)
    torch.testing.assert_close(out_v, nv + 0.5 * dv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_l, nl + 0.5 * dl, rtol=1e-10, atol=1e-10)


def test_autocast_keeps_the_linear_layers_dtype():
    """Under bfloat16 autocast the folded layer returns what nn.Linear would (bfloat16), close to float32."""
    torch.manual_seed(6)
    m = BiMultiHeadAttention(32, 24, 64, 4)
    v, l = torch.randn(2, 40, 32), torch.randn(2, 6, 24)
    with torch.no_grad():
        exact = m(v, l)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(v, l)
            unfolded = unfolded_bi_attention(m, v, l, None, None)
    for got, ref, want in zip(low, unfolded, exact):
        assert got.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
