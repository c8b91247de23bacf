"""Caption construction and token maps (dinokernels.models.grounding_dino.targets): Open-GD caption format and
sampling, spans, positive maps against the tokenizer's own char_to_token (the official span → token rule),
truncation, the COCO normalisation, bad inputs."""
import random

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast

from dinokernels.models.grounding_dino.targets import (build_caption, name_spans, normalize_positive_map,
                                                       positive_map_from_spans)

WORDS = ["red", "green", "blue", "circle", "square", "triangle", "star", "cat", "dog", "a", "photo", "of", "##s",
         "yellow", "cross"]


def tiny_tokenizer():
    """A BERT-layout vocab ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, "." 1012) with a few words."""
    vocab = {f"[unused{i}]": i for i in range(1, 100)}
    vocab.update({"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103})
    vocab.update({f"[unused{i}]": i for i in range(104, 1012)})
    vocab["."] = 1012
    vocab.update({w: 1013 + i for i, w in enumerate(WORDS)})
    return BertTokenizerFast(vocab=vocab)


def official_rule_map(enc, spans, max_text_len):
    """The official span → token rule, from the facts: first token = char_to_token(begin) (retry begin+1,
    begin+2), last = char_to_token(end−1) (retry end−2, end−3), fill [first, last]."""
    out = torch.zeros(len(spans), max_text_len)
    for g, (b, e) in enumerate(spans):
        first = next((enc.char_to_token(c) for c in (b, b + 1, b + 2) if enc.char_to_token(c) is not None), None)
        last = next((enc.char_to_token(c) for c in (e - 1, e - 2, e - 3) if enc.char_to_token(c) is not None), None)
        if first is None or last is None:
            continue
        out[g, first:last + 1] = 1
    return out[:, :max_text_len]


# ----------------------------------------------------------------------------- build_caption

def test_caption_format_and_spans():
    caption, spans = build_caption(["red circle", "blue square"], ["green star", "yellow cross"], rng=0)
    assert caption.endswith(" .") and not caption.endswith(" . .")
    names = caption[:-2].split(" . ")
    assert sorted(names) == sorted(["red circle", "blue square", "green star", "yellow cross"])
    assert set(spans) == set(names)
    for name, (b, e) in spans.items():
        assert caption[b:e] == name
    assert " . ".join(names) + " ." == caption


def test_caption_negative_count_and_cap():
    pos = ["red circle", "blue square"]
    neg = [f"neg{i}" for i in range(10)]
    for max_names, expect in ((50, 12), (5, 5), (2, 2), (1, 2)):  # positives are always all kept
        caption, spans = build_caption(pos, neg, rng=1, max_names=max_names)
        assert len(spans) == expect and all(p in spans for p in pos)
    # Duplicated positives are merged; a negative equal to a positive is ignored.
    caption, spans = build_caption(["cat", "cat"], ["cat", "dog"], rng=2)
    assert sorted(caption[:-2].split(" . ")) == ["cat", "dog"]


def test_caption_determinism_and_shuffle():
    pos, neg = ["a1", "a2"], [f"n{i}" for i in range(6)]
    assert build_caption(pos, neg, rng=7) == build_caption(pos, neg, rng=7)
    assert build_caption(pos, neg, rng=random.Random(7)) == build_caption(pos, neg, rng=7)
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    assert build_caption(pos, neg, rng=g1) == build_caption(pos, neg, rng=g2)
    # Shuffled: every name lands in the first position for some seed, negatives subsampled differently.
    firsts = {build_caption(pos, neg, rng=s, max_names=4)[0].split(" . ")[0] for s in range(200)}
    assert firsts == set(pos + neg)


def test_caption_bad_inputs():
    with pytest.raises(TypeError, match="positive_names"):
        build_caption("red circle", [], rng=0)
    with pytest.raises(ValueError, match=r"'negative_names'\[1\] is empty"):
        build_caption(["a"], ["b", " "], rng=0)
    with pytest.raises(ValueError, match="contains '.'"):
        build_caption(["a.b"], [], rng=0)
    with pytest.raises(ValueError, match="both empty"):
        build_caption([], [], rng=0)
    with pytest.raises(ValueError, match="max_names"):
        build_caption(["a"], [], rng=0, max_names=-1)
    with pytest.raises(TypeError, match="rng"):
        build_caption(["a"], [], rng="seed")


def test_name_spans():
    caption = "a photo of category . cat . dogs . dog ."
    assert caption[22:25] == "cat" and caption[35:38] == "dog"  # whole words only: not in "category", "dogs"
    assert name_spans(caption, ["cat", "dog", "bird", "Photo"]) == [(22, 25), (35, 38), None, (2, 7)]
    with pytest.raises(ValueError, match="names"):
        name_spans(caption, [""])


# ----------------------------------------------------------------------------- positive maps

@pytest.mark.parametrize("seed", range(3))
def test_positive_map_matches_official_rule(seed):
    tok = tiny_tokenizer()
    names = ["red circle", "blue squares", "green star", "yellow cross", "cat", "dogs"]
    caption, spans = build_caption(names[:3], names[3:], rng=seed)
    enc = tok(caption, return_offsets_mapping=True)
    span_list = [spans[n] for n in names]
    got = positive_map_from_spans(enc["offset_mapping"], span_list, max_text_len=256)
    assert got.shape == (6, 256) and got.dtype == torch.float32
    assert torch.equal(got, official_rule_map(enc, span_list, 256))
    # "blue squares" covers blue, square, ##s; special tokens and delimiters are never marked.
    ids = enc["input_ids"]
    row = got[1].nonzero().flatten().tolist()
    assert [tok.convert_ids_to_tokens(ids[i]) for i in row] == ["blue", "square", "##s"]
    assert got[:, [i for i, t in enumerate(ids) if t in (101, 102, 1012)]].sum() == 0


def test_positive_map_truncation_multiple_spans_and_none():
    tok = tiny_tokenizer()
    caption = "red circle . cat . blue square ."
    enc = tok(caption, return_offsets_mapping=True)  # [CLS] red circle . cat . blue square . [SEP]
    got = positive_map_from_spans(enc["offset_mapping"], [(0, 10), [(13, 16), (19, 23)], None, []], max_text_len=7)
    assert got.shape == (4, 7)
    assert got[0].tolist() == [0, 1, 1, 0, 0, 0, 0]
    assert got[1].tolist() == [0, 0, 0, 0, 1, 0, 1]  # cat, and blue (square fell past max_text_len)
    assert got[2].sum() == 0 and got[3].sum() == 0
    # Offsets as a tensor, and tokens past the caption (padding, (0, 0)) are never marked.
    padded = torch.tensor(enc["offset_mapping"] + [(0, 0)] * 3)
    assert torch.equal(positive_map_from_spans(padded, [(0, 10)], 16)[0, :11],
                       torch.tensor([0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0.0]))


def test_positive_map_bad_inputs():
    off = [(0, 0), (0, 3), (4, 10), (0, 0)]
    with pytest.raises(ValueError, match="offsets"):
        positive_map_from_spans([(0, 1, 2)], [(0, 1)])
    with pytest.raises(TypeError, match="offsets"):
        positive_map_from_spans(torch.zeros(3, 2), [(0, 1)])
    with pytest.raises(ValueError, match="offsets"):
        positive_map_from_spans([(3, 1)], [(0, 1)])
    with pytest.raises(ValueError, match=r"'spans'\[0\]"):
        positive_map_from_spans(off, [(5, 5)])
    with pytest.raises(TypeError, match=r"'spans'\[1\]"):
        positive_map_from_spans(off, [(0, 3), "red"])
    with pytest.raises(ValueError, match="max_text_len"):
        positive_map_from_spans(off, [(0, 3)], max_text_len=0)
    assert positive_map_from_spans(off, [], 8).shape == (0, 8)


def test_normalize_positive_map():
    m = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    got = normalize_positive_map(m)
    expect = torch.tensor([[0, 1 / (2 + 1e-6), 1 / (2 + 1e-6), 0], [1 / (1 + 1e-6), 0, 0, 0], [0, 0, 0, 0]],
                          dtype=torch.float64)
    assert got.dtype == torch.float64 and torch.allclose(got, expect, rtol=1e-15, atol=0)
    as_float32 = normalize_positive_map(m.bool())
    assert as_float32.dtype == torch.float32 and torch.allclose(as_float32, expect.float(), rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="nonnegative"):
        normalize_positive_map(-m)
    with pytest.raises(ValueError, match=r"\(G, T\)"):
        normalize_positive_map(m[0])


def test_targets_with_positive_maps():
    from dinokernels.models.grounding_dino.targets import targets_with_positive_maps
    tok = tiny_tokenizer()
    captions = ["red circle . cat .", "blue square . dog . red circle ."]
    enc = tok(captions, padding="longest", return_offsets_mapping=True, return_tensors="pt")
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "positive_spans": [(0, 10)], "caption": captions[0]},
               {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]),
                "positive_spans": [(20, 30), (14, 17)], "caption": captions[1]}]
    for offsets in (enc["offset_mapping"], [o.tolist() for o in enc["offset_mapping"]]):
        out = targets_with_positive_maps(targets, offsets, max_text_len=16)
        assert "positive_map" not in targets[0]  # inputs untouched
        assert out[0]["caption"] == captions[0] and out[0]["positive_map"].shape == (1, 16)
        assert out[0]["positive_map"][0, :4].tolist() == [0, 1, 1, 0]
        ids = enc["input_ids"][1].tolist()
        rows = [[tok.convert_ids_to_tokens(ids[j]) for j in r.nonzero().flatten().tolist()]
                for r in out[1]["positive_map"]]
        assert rows == [["red", "circle"], ["dog"]]
    with pytest.raises(ValueError, match="2 boxes but 1 positive_spans"):
        targets_with_positive_maps([targets[0], dict(targets[1], positive_spans=[(0, 4)])], enc["offset_mapping"])
    with pytest.raises(ValueError, match="1 offset mappings for 2 targets"):
        targets_with_positive_maps(targets, enc["offset_mapping"][:1])
    with pytest.raises(ValueError, match="positive_spans"):
        targets_with_positive_maps([{"boxes": torch.zeros(0, 4)}], [[(0, 0)]])
