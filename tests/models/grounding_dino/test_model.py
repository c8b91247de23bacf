"""GroundingDINO: official parameter names, output contract, backend agreement, padding, bad inputs.
Peer parity (transformers) is in test_parity_transformers.py."""
import json
from pathlib import Path

import pytest
import torch

import dinokernels
from dinokernels.models.grounding_dino import text as gd_text
from dinokernels.models.grounding_dino.model import (GroundingDINO, grounding_dino_swinb_cogcoor,
                                                     grounding_dino_swint_ogc, grounding_dino_tiny)
from dinokernels.models.grounding_dino.position_encoding import (PositionEmbeddingSineHW, box_position_embedding,
                                                                 text_position_embedding)
from dinokernels.models.grounding_dino.transformer import ContrastiveEmbed, inverse_sigmoid

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "official_keys"
WORDS = ["a", "cat", "dog", "red", "car", "tree", "remote", "control", "person", "on", "the", "left", "sky", "blue"]
CAPTIONS = ["cat . dog . red car .", "a person on the left", "blue sky . tree ."]


@pytest.fixture(scope="module")
def tokenizer():
    return gd_text.build_tokenizer(gd_text.tiny_vocab(WORDS))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model = grounding_dino_tiny(tokenizer)
    with torch.no_grad():  # non-trivial box heads and fusion gates (their init is zero / 1e-4)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _images(b, h=64, w=96):
    return torch.randn(b, 3, h, w)  # fresh draws: conftest seeds every test (DINOKERNELS_TEST_SEED reproduces)


# ------------------------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("name, builder", [("swint_ogc", grounding_dino_swint_ogc),
                                           ("swinb_cogcoor", grounding_dino_swinb_cogcoor)])
def test_state_dict_is_the_official_one(name, builder):
    """Keys, order, shapes and dtypes equal the official model's (manifest), with a bert-base-sized BertConfig;
    only the manifest's known checkpoint extras (old BERT position_ids buffer, training-only label_enc) are absent."""
    with open(FIXTURES / f"groundingdino_{name}.json") as f:
        manifest = json.load(f)
    with torch.device("meta"):  # shapes only: no 170M-parameter init
        model = builder(text_encoder=transformers.BertConfig())
    sd = model.state_dict()
    expected = {k: tuple(v) for k, v in manifest["keys"].items()}
    assert list(sd) == list(expected)  # same keys in the same order
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    dtypes = manifest.get("dtypes", {})
    for k, v in sd.items():
        assert v.dtype == getattr(torch, dtypes.get(k, "float32")), k
    assert not set(manifest["known_extra_checkpoint_keys"]) & set(sd)
    # The shared decoder box head: one module under every index, as the official model.
    assert all(m is model.bbox_embed[0] for m in model.bbox_embed)
    assert all(m is model.bbox_embed[0] for m in model.transformer.decoder.bbox_embed)
    assert model.transformer.enc_out_bbox_embed is not model.bbox_embed[0]


def test_official_defaults():
    with torch.device("meta"):
        model = grounding_dino_swint_ogc(text_encoder=transformers.BertConfig())
    t = model.transformer
    assert (model.num_queries, model.max_text_len, model.inverse_sigmoid_eps) == (900, 256, 1e-3)
    assert (len(t.encoder.layers), len(t.decoder.layers), t.d_model) == (6, 6, 256)
    assert t.encoder.text_layers[0].self_attn.num_heads == 4 and t.encoder.fusion_layers[0].attn.num_heads == 4
    assert t.encoder.fusion_layers[0].drop_path.drop_prob == 0.1
    assert t.encoder.layers[0].self_attn.n_points == 4 and t.decoder.layers[0].cross_attn.n_points == 4
    assert model.position_embedding.temperature_h == model.position_embedding.temperature_w == 20


# ------------------------------------------------------------------------------------------------------------------
# Pieces against formulas written from SPEC


def test_image_position_embedding_formula():
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True
    pos = PositionEmbeddingSineHW(8, 20.0, 20.0)(mask)
    assert pos.shape == (2, 16, 5, 7)
    i, j, c = 2, 1, 3  # image 1 has 3 valid rows and 4 valid columns
    y = (i + 1) / (3 + 1e-6) * 2 * torch.pi
    x = (j + 1) / (4 + 1e-6) * 2 * torch.pi
    freq = 20.0 ** (2 * (c // 2) / 8)
    assert pos[1, c, i, j].item() == pytest.approx(torch.cos(torch.tensor(y / freq)).item(), abs=1e-6)
    assert pos[1, 8 + c - 1, i, j].item() == pytest.approx(torch.sin(torch.tensor(x / freq)).item(), abs=1e-6)


def test_text_and_box_position_embedding_formula():
    ids = torch.tensor([[0, 1, 2, 0]])
    emb = text_position_embedding(ids, 16)
    p, k = 2, 5
    angle = 2 * torch.pi * p / 10000 ** (2 * (k // 2) / 16)
    assert emb[0, 2, k].item() == pytest.approx(torch.cos(torch.tensor(angle)).item(), abs=1e-6)
    boxes = torch.tensor([[0.1, 0.7, 0.3, 0.2]])
    e = box_position_embedding(boxes, 8)
    assert e.shape == (1, 32)
    # order (y, x, w, h): the first block embeds y = 0.7
    assert e[0, 0].item() == pytest.approx(torch.sin(torch.tensor(0.7 * 2 * torch.pi)).item(), abs=1e-6)
    assert e[0, 8].item() == pytest.approx(torch.sin(torch.tensor(0.1 * 2 * torch.pi)).item(), abs=1e-6)


def test_inverse_sigmoid_and_contrastive_embed():
    x = torch.tensor([0.0, 0.5, 1.0, 0.9])
    out = inverse_sigmoid(x, 1e-3)
    assert out[1] == 0 and out[0].item() == pytest.approx(float(torch.log(torch.tensor(1e-3))), rel=1e-6)
    assert out[2].item() == pytest.approx(-out[0].item(), rel=1e-6)
    h, t = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    logits = ContrastiveEmbed(8)(h, t, mask)
    assert logits.shape == (2, 3, 8)
    torch.testing.assert_close(logits[0, :, :5], h[0] @ t[0].T)
    assert torch.isneginf(logits[0, :, 5:]).all() and torch.isneginf(logits[1, :, 2:]).all()


# ------------------------------------------------------------------------------------------------------------------
# Whole model


def test_outputs_contract(tiny, tokenizer):
    with torch.no_grad():
        out = tiny(_images(3), CAPTIONS)
    b, q, t = 3, tiny.num_queries, tiny.max_text_len
    assert out["pred_logits"].shape == (b, q, t) and out["pred_boxes"].shape == (b, q, 4)
    tok = gd_text.tokenize_captions(tokenizer, [gd_text.preprocess_caption(c) for c in CAPTIONS], max_text_len=t)
    lengths = tok["attention_mask"].sum(1)
    for i, n in enumerate(lengths.tolist()):
        assert torch.isfinite(out["pred_logits"][i, :, :n]).all()
        assert torch.isneginf(out["pred_logits"][i, :, n:]).all()
        assert out["text_mask"][i, :n].all() and not out["text_mask"][i, n:].any()
    assert torch.equal(out["input_ids"], tok["input_ids"].to(out["input_ids"].device))
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == len(tiny.transformer.decoder.layers) - 1
    for aux in out["aux_outputs"] + [out["interm_outputs"]]:
        assert aux["pred_logits"].shape == (b, q, t) and aux["pred_boxes"].shape == (b, q, 4)
        assert torch.equal(torch.isfinite(aux["pred_logits"]), torch.isfinite(out["pred_logits"]))
    assert not torch.equal(out["aux_outputs"][0]["pred_boxes"], out["pred_boxes"])


def test_kernel_backend_matches_reference(tiny):
    images = _images(2)
    with torch.no_grad():
        kernel = tiny(images, CAPTIONS[:2])
        with dinokernels.use_backend("reference"):
            reference = tiny(images, CAPTIONS[:2])
    finite = torch.isfinite(reference["pred_logits"])
    torch.testing.assert_close(kernel["pred_logits"][finite], reference["pred_logits"][finite], rtol=0, atol=1e-4)
    torch.testing.assert_close(kernel["pred_boxes"], reference["pred_boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(kernel["interm_outputs"]["pred_boxes"], reference["interm_outputs"]["pred_boxes"],
                               rtol=0, atol=1e-4)


def test_batch_equals_each_image_alone(tiny):
    """A list of differently sized images is padded (mask True = padding) and captions of different lengths are
    padded: each image's result equals that image run alone (same padded canvas and mask, its caption unpadded).
    The backbone sees the zero padding (as officially), so an unpadded run differs by design."""
    imgs = [torch.randn(3, 64, 96), torch.randn(3, 40, 72)]
    caps = [CAPTIONS[2], CAPTIONS[1]]
    with torch.no_grad():
        both = tiny(imgs, caps)
        assert both["text_token_mask"].sum(1).unique().numel() == 2  # one caption is padded
        for i in range(2):
            canvas = torch.zeros(1, 3, 64, 96)
            canvas[0, :, :imgs[i].shape[1], :imgs[i].shape[2]] = imgs[i]
            mask = torch.ones(1, 64, 96, dtype=torch.bool)
            mask[0, :imgs[i].shape[1], :imgs[i].shape[2]] = False
            alone = tiny(canvas, caps[i:i + 1], masks=mask)
            finite = torch.isfinite(alone["pred_logits"][0])
            assert torch.equal(finite, torch.isfinite(both["pred_logits"][i]))
            torch.testing.assert_close(both["pred_logits"][i][finite], alone["pred_logits"][0][finite], rtol=0,
                                       atol=1e-4)
            torch.testing.assert_close(both["pred_boxes"][i], alone["pred_boxes"][0], rtol=0, atol=1e-4)
            torch.testing.assert_close(both["interm_outputs"]["pred_boxes"][i],
                                       alone["interm_outputs"]["pred_boxes"][0], rtol=0, atol=1e-4)


def _flat(out, prefix=""):
    """forward's nested output as {path: tensor}."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    items = out.items() if isinstance(out, dict) else enumerate(out)
    flat = {}
    for k, v in items:
        flat.update(_flat(v, f"{prefix}/{k}"))
    return flat


@pytest.mark.parametrize("limit", [1, 2 * 8 * 12])  # one image per chunk; two (8 × 12 stride-8 positions each)
def test_cpu_chunks_equal_the_whole_batch(tiny, limit):
    """On the CPU a batch of large images runs a few at a time (cpu_chunk_positions): every output, nested ones
    included, equals the unchunked run, for a padded batch of 3 with captions of different lengths."""
    import copy

    model = copy.deepcopy(tiny).double()  # float64: only the chunking could make the outputs differ
    imgs = [torch.randn(3, 64, 96), torch.randn(3, 40, 72), torch.randn(3, 64, 50)]
    imgs = [x.double() for x in imgs]
    caps = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[2]]
    calls = []
    model.transformer.register_forward_pre_hook(lambda m, args: calls.append(args[0][0].shape[0]))
    with torch.no_grad():
        model.cpu_chunk_positions = None
        whole = _flat(model(imgs, caps))
        model.cpu_chunk_positions = limit
        chunked = _flat(model(imgs, caps))
    assert calls == [3] + ([1, 1, 1] if limit == 1 else [2, 1])  # the chunking really happened
    assert whole.keys() == chunked.keys() and len(whole) >= 9
    for key, want in whole.items():
        got = chunked[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        if got.is_floating_point():
            finite = torch.isfinite(want)
            assert torch.equal(finite, torch.isfinite(got)), key
            torch.testing.assert_close(got[finite], want[finite], rtol=1e-10, atol=1e-10,
                                       msg=lambda m, key=key: f"{key}: {m}")
        else:
            assert torch.equal(got, want), key


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "8192"])
def test_cpu_chunk_positions_is_checked_when_set(tiny, bad):
    with pytest.raises(ValueError, match="cpu_chunk_positions"):
        tiny.cpu_chunk_positions = bad
    assert tiny.cpu_chunk_positions == 8192  # unchanged


def test_cpu_chunks_train_like_the_whole_batch(tiny):
    """Gradients through the chunked image path equal the unchunked ones (training on the CPU chunks too); float64,
    so that only the chunking could make them differ."""
    import copy

    model = copy.deepcopy(tiny).double()
    imgs = _images(2).double()
    grads = []
    for limit in (None, 1):
        model.zero_grad()
        model.cpu_chunk_positions = limit
        out = model(imgs, CAPTIONS[:2])
        (out["pred_boxes"].sum() + out["pred_logits"].masked_fill(~torch.isfinite(out["pred_logits"]), 0).sum()
         + out["interm_outputs"]["pred_boxes"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-11,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_transformers_input_names_and_masks(tiny):
    images = _images(2)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, 50:] = True
    masks[1, :, 70:] = True
    with torch.no_grad():
        ours = tiny(images, CAPTIONS[:2], masks=masks)
        hf_style = tiny(pixel_values=images, pixel_mask=(~masks).long(), captions=CAPTIONS[:2])
        tok = gd_text.tokenize_captions(tiny.tokenizer, [gd_text.preprocess_caption(c) for c in CAPTIONS[:2]],
                                        max_text_len=tiny.max_text_len)
        by_ids = tiny(images, masks=masks, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                      token_type_ids=tok["token_type_ids"])
    for other in (hf_style, by_ids):
        assert torch.equal(other["pred_boxes"], ours["pred_boxes"])
        assert torch.equal(other["pred_logits"], ours["pred_logits"])


def test_official_mask_layout(tiny):
    """Batch 1: the official tiling equals the correct one. Batch 2 with different caption structures: it differs
    (the official code gives image 0's sub-sentence mask to image 1's heads)."""
    official = grounding_dino_tiny(tiny.tokenizer, text_mask_layout="official").eval()
    official.load_state_dict(tiny.state_dict())
    images = _images(2)
    with torch.no_grad():
        one_c, one_o = tiny(images[:1], CAPTIONS[:1]), official(images[:1], CAPTIONS[:1])
        two_c, two_o = tiny(images, CAPTIONS[:2]), official(images, CAPTIONS[:2])
    assert torch.equal(one_c["pred_logits"], one_o["pred_logits"])
    finite = torch.isfinite(two_c["pred_logits"])
    assert (two_c["pred_logits"][finite] - two_o["pred_logits"][finite]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="text_mask_layout"):
        grounding_dino_tiny(tiny.tokenizer, text_mask_layout="hf")


def test_truncation_after_masks(tiny, tokenizer):
    """Captions longer than max_text_len are cut after tokenisation: every logit column is then a real token."""
    long_caption = " . ".join(["red car on the left"] * 12)
    with torch.no_grad():
        out = tiny(_images(1), [long_caption])
    assert out["input_ids"].shape == (1, tiny.max_text_len)
    assert torch.isfinite(out["pred_logits"]).all()


def test_backward_reaches_every_part(tiny):
    model = grounding_dino_tiny(tiny.tokenizer)
    model.load_state_dict(tiny.state_dict())
    model.train()
    out = model(_images(2), CAPTIONS[:2])
    logits = out["pred_logits"]
    loss = logits[torch.isfinite(logits)].sigmoid().mean() + out["pred_boxes"].sum() + \
        out["interm_outputs"]["pred_boxes"].sum() + sum(a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    named = dict(model.named_parameters())
    for name in ["backbone.0.patch_embed.proj.weight", "bert.embeddings.word_embeddings.weight", "feat_map.weight",
                 "input_proj.3.0.weight", "transformer.level_embed", "transformer.encoder.fusion_layers.0.gamma_v",
                 "transformer.encoder.text_layers.1.linear1.weight", "transformer.encoder.layers.0.linear1.weight",
                 "transformer.decoder.layers.1.ca_text.in_proj_weight", "transformer.tgt_embed.weight",
                 "transformer.enc_output.weight", "transformer.enc_out_bbox_embed.layers.2.weight"]:
        grad = named[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    shared = model.bbox_embed[0].layers[2].weight.grad  # the shared box head (named once, under the decoder)
    assert shared is not None and torch.isfinite(shared).all() and shared.abs().sum() > 0


def test_state_dict_round_trip(tiny):
    copy = grounding_dino_tiny(tiny.tokenizer)
    copy.load_state_dict(tiny.state_dict(), strict=True)
    copy.eval()
    images = _images(1)
    with torch.no_grad():
        assert torch.equal(copy(images, CAPTIONS[:1])["pred_boxes"], tiny(images, CAPTIONS[:1])["pred_boxes"])


def test_builder_from_a_local_bert_directory(tmp_path):
    """grounding_dino_swint_ogc(dir): BERT weights and tokenizer read from a local directory (nothing downloaded),
    special ids resolved through the tokenizer; a small run with few queries."""
    bert = gd_text.build_text_encoder(transformers.BertConfig(vocab_size=1100, hidden_size=8, num_hidden_layers=1,
                                                              num_attention_heads=2, intermediate_size=16))
    bert.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(gd_text.tiny_vocab(WORDS)) + "\n")
    model = grounding_dino_swint_ogc(str(tmp_path), num_queries=20, num_encoder_layers=1, num_decoder_layers=2).eval()
    assert model.tokenizer is not None and model.special_token_ids == [101, 102, 1012, 1029]
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96), ["cat . dog ."])
    assert out["pred_logits"].shape == (1, 20, 256) and torch.isfinite(out["pred_logits"][0, :, :6]).all()
    assert torch.isneginf(out["pred_logits"][0, :, 6:]).all()  # [CLS] cat . dog . [SEP]
    with pytest.raises(ValueError, match="text_encoder is required"):
        grounding_dino_swint_ogc()


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs


def _bad_calls(images):
    nan = images.clone()
    nan[0, 0, 0, 0] = float("nan")
    return [
        (lambda m: m(images[:, :2], CAPTIONS[:2]), "3 channels"),
        (lambda m: m(images[0], CAPTIONS[:1]), r"\(B, 3, H, W\)"),
        (lambda m: m(images.long(), CAPTIONS[:2]), "floating point"),
        (lambda m: m(nan, CAPTIONS[:2]), "NaN"),
        (lambda m: m(images[:0], []), "empty"),
        (lambda m: m([], []), "empty"),
        (lambda m: m(images, CAPTIONS[:1]), "1 captions for 2 images"),
        (lambda m: m(images), "captions or input_ids"),
        (lambda m: m(None, CAPTIONS[:2]), "images"),
        (lambda m: m(images, CAPTIONS[:2], pixel_values=images), "not both"),
        (lambda m: m(images, CAPTIONS[:2], masks=torch.zeros(2, 5, 5, dtype=torch.bool)), "masks must be"),
        (lambda m: m(images, CAPTIONS[:2], masks=torch.ones(2, 64, 96, dtype=torch.bool)), "top-left"),
        (lambda m: m(images, input_ids=torch.full((2, 4), 10 ** 6)), "input_ids must be in"),
        (lambda m: m(images, input_ids=torch.ones(2, 4)), "integer"),
        (lambda m: m(images, input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3)),
         "attention_mask"),
        (lambda m: m(images, CAPTIONS[:2], input_ids=torch.ones(2, 4, dtype=torch.long)), "not both"),
        (lambda m: m(images, [1, 2]), "list of strings"),
    ]


@pytest.mark.parametrize("case", range(17))
def test_bad_inputs_raise_named_errors(tiny, case):
    call, message = _bad_calls(_images(2))[case]
    with pytest.raises(ValueError, match=message):
        with torch.no_grad():
            call(tiny)


def test_too_small_image_for_the_queries(tiny):
    model = grounding_dino_tiny(tiny.tokenizer, num_queries=900).eval()
    with pytest.raises(ValueError, match="num_queries=900"):
        with torch.no_grad():
            model(_images(1), CAPTIONS[:1])


def test_captions_need_a_tokenizer(tiny):
    model = grounding_dino_tiny(None)
    with pytest.raises(ValueError, match="tokenizer"):
        model(_images(1), CAPTIONS[:1])


def test_bad_constructor_arguments(tiny):
    with pytest.raises(ValueError, match="inverse_sigmoid_eps"):
        grounding_dino_tiny(tiny.tokenizer, inverse_sigmoid_eps=0.0)
    with pytest.raises(ValueError, match="d_model"):
        grounding_dino_tiny(tiny.tokenizer, d_model=48)
    with pytest.raises(ValueError, match="text_encoder"):
        GroundingDINO(tiny.backbone[0], torch.nn.Linear(2, 2), backbone_channels=[16, 32, 64])
