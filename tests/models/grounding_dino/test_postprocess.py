"""Grounding DINO post-processing (dinokernels.models.grounding_dino.postprocess): thresholds, phrases (combined
labels, remove_combined, special and ≥ 255 columns), batches, pixel boxes; transformers'
post_process_grounded_object_detection as the oracle where the semantics coincide (it keeps "."); class captions
and assignment; the COCO top-k scorer against a brute-force float64 ranking."""
import math

import pytest
import torch
from transformers import BertTokenizerFast, GroundingDinoImageProcessorPil, GroundingDinoProcessor
from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoObjectDetectionOutput

from dinokernels.models.grounding_dino.postprocess import (assign_classes, classes_to_caption, coco_style_scores,
                                                           extract_phrase, post_process)
from dinokernels.models.grounding_dino.targets import normalize_positive_map, positive_map_from_spans

WORDS = ["red", "green", "blue", "circle", "square", "star", "cat", "dog", "a", "of", "##s", "yellow", "cross"]


def tiny_tokenizer():
    """BERT layout ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, "." 1012) with a few words."""
    vocab = {f"[unused{i}]": i for i in range(1, 100)}
    vocab.update({"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103})
    vocab.update({f"[unused{i}]": i for i in range(104, 1012)})
    vocab["."] = 1012
    vocab.update({w: 1013 + i for i, w in enumerate(WORDS)})
    return BertTokenizerFast(vocab=vocab)


TOK = tiny_tokenizer()


def encode(captions):
    enc = TOK(captions, padding="longest", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


def logits_for(mask, Q, generator, T=256, scale=3.0, shift=-2.0):
    B, L = mask.shape
    z = torch.randn(B, Q, T, generator=generator) * scale + shift
    valid = torch.zeros(B, T, dtype=torch.bool)
    valid[:, :L] = mask
    return z.masked_fill(~valid[:, None, :], float("-inf"))


def random_boxes(B, Q, generator):
    return torch.cat([torch.rand(B, Q, 2, generator=generator) * 0.6 + 0.2,
                      torch.rand(B, Q, 2, generator=generator) * 0.3 + 0.05], -1)


def hf_post_process(logits, boxes, input_ids, threshold, text_threshold, sizes):
    proc = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(), tokenizer=TOK)
    out = GroundingDinoObjectDetectionOutput(logits=logits, pred_boxes=boxes)
    return proc.post_process_grounded_object_detection(out, input_ids, threshold=threshold,
                                                       text_threshold=text_threshold, target_sizes=sizes)


# ----------------------------------------------------------------------------- against transformers

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("thresholds", [(0.35, 0.25), (0.5, 0.4), (0.2, 0.6)])
def test_matches_transformers_batched(seed, thresholds):
    g = torch.Generator().manual_seed(seed)
    ids, mask = encode(["red circle . blue squares .", "cat . a dog of yellow cross . green star ."])
    logits = logits_for(mask, Q=12, generator=g)
    boxes = random_boxes(2, 12, g)
    sizes = [(480, 640), (300, 200)]
    ours = post_process({"pred_logits": logits, "pred_boxes": boxes}, sizes, TOK, ids, *thresholds)
    theirs = hf_post_process(logits, boxes, ids, *thresholds, sizes)
    assert len(ours) == 2 and sum(len(r["phrases"]) for r in ours) > 0
    for o, t in zip(ours, theirs):
        assert torch.allclose(o["scores"], t["scores"], rtol=0, atol=0)
        assert torch.allclose(o["boxes"], t["boxes"], rtol=1e-6, atol=1e-4)
        assert o["phrases"] == [p.replace(".", "") for p in t["text_labels"]]  # HF keeps "."


# ----------------------------------------------------------------------------- hand-made cases

def hand_case():
    # [CLS] red circle . blue square ##s . [SEP]
    ids, mask = encode(["red circle . blue squares ."])
    assert ids[0].tolist() == [101, 1013, 1016, 1012, 1015, 1017, 1023, 1012, 102]
    z = torch.full((1, 4, 256), -6.0)
    z[:, :, 9:] = float("-inf")
    z[0, 0, [1, 2]] = torch.tensor([2.0, 1.5])  # "red circle"
    z[0, 1, [1, 4, 5, 6]] = torch.tensor([-0.5, 3.0, 2.0, 1.0])  # "blue squares", red at p 0.38 (combined)
    z[0, 2, 0] = 4.0  # only [CLS] is high: kept box, empty phrase
    z[0, 3, [2, 3]] = torch.tensor([-1.5, 0.2])  # max p 0.55 on "."; circle at p 0.18 < 0.25
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 1, 1]]])
    return {"pred_logits": z, "pred_boxes": boxes}, ids


def test_thresholds_phrases_and_boxes():
    outputs, ids = hand_case()
    (r,) = post_process(outputs, [(100, 200)], TOK, ids)
    assert r["query_indices"].tolist() == [0, 1, 2, 3]
    assert r["phrases"][0] == "red circle"
    assert r["phrases"][1] == "red blue squares"  # combined label: tokens of two phrases
    assert r["phrases"][2] == ""  # column 0 counts for the score, never for the phrase
    assert r["phrases"][3].strip() == ""  # "." removed
    assert torch.allclose(r["scores"], torch.sigmoid(torch.tensor([2.0, 3.0, 4.0, 0.2])))
    assert torch.allclose(r["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    assert torch.allclose(r["boxes"][3], torch.tensor([0.0, 0.0, 200.0, 100.0]))
    # Box threshold above query 3's score drops it; a text threshold above 0.38 drops "red" from query 1.
    (r,) = post_process(outputs, [(100, 200)], TOK, ids, box_threshold=0.6, text_threshold=0.4)
    assert r["query_indices"].tolist() == [0, 1, 2] and r["phrases"][1] == "blue squares"


def test_remove_combined():
    outputs, ids = hand_case()
    (r,) = post_process(outputs, [(100, 200)], TOK, ids, remove_combined=True)
    assert r["phrases"][0] == "red circle"
    assert r["phrases"][1] == "blue squares"  # the segment around the argmax ("blue") only
    assert r["phrases"][2] == ""  # argmax on [CLS] (the first delimiter)
    # Argmax on a "." delimiter: the segment that ends at it; circle is below the text threshold.
    assert r["phrases"][3] == ""
    probs = torch.zeros(256)
    probs[[2, 3]] = torch.tensor([0.3, 0.6])
    assert extract_phrase(probs, ids[0].tolist(), TOK, 0.25, remove_combined=True) == "circle"


def test_special_columns_sep_and_255():
    # A caption of 256 tokens: column 255 (a real token) is never part of a phrase; [SEP] is (as officially).
    ids = [101] + [1019] * 254 + [102]
    probs = torch.zeros(256)
    probs[[5, 255]] = 0.9
    assert extract_phrase(probs, ids, TOK, 0.25) == "cat"
    ids_short = [101, 1019, 1012, 102]
    probs = torch.zeros(256)
    probs[[1, 3]] = 0.9
    assert extract_phrase(probs, ids_short, TOK, 0.25) == "cat [SEP]"
    # Columns past the caption's ids are ignored.
    probs = torch.zeros(256)
    probs[[1, 10]] = 0.9
    assert extract_phrase(probs, ids_short, TOK, 0.25) == "cat"


def test_batch_with_different_lengths_and_no_detections():
    g = torch.Generator().manual_seed(5)
    ids, mask = encode(["cat .", "red circle . blue square . green star ."])
    logits = logits_for(mask, Q=6, generator=g)
    logits[0] = logits[0].clamp(max=-5)  # nothing kept in image 0
    boxes = random_boxes(2, 6, g)
    res = post_process({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 20], [30, 40]]), TOK, ids)
    assert res[0]["boxes"].shape == (0, 4) and res[0]["phrases"] == [] and res[0]["scores"].shape == (0,)
    single = post_process({"pred_logits": logits[1:], "pred_boxes": boxes[1:]}, [(30, 40)], TOK, ids[1:])[0]
    assert single["phrases"] == res[1]["phrases"] and torch.equal(single["boxes"], res[1]["boxes"])
    # input_ids taken from the model's outputs when not passed.
    from_outputs = post_process({"pred_logits": logits, "pred_boxes": boxes, "input_ids": ids}, [(10, 20), (30, 40)],
                                TOK)
    assert [r["phrases"] for r in from_outputs] == [r["phrases"] for r in res]


def test_post_process_bad_inputs():
    outputs, ids = hand_case()
    with pytest.raises(ValueError, match="target_sizes"):
        post_process(outputs, [(100, 200, 3)], TOK, ids)
    with pytest.raises(ValueError, match="target_sizes"):
        post_process(outputs, [(0, 200)], TOK, ids)
    with pytest.raises(ValueError, match="target_sizes"):
        post_process(outputs, None, TOK, ids)
    with pytest.raises(ValueError, match="input_ids"):
        post_process(outputs, [(1, 1)], TOK, torch.cat([ids, ids]))
    with pytest.raises(ValueError, match="input_ids"):
        post_process(outputs, [(1, 1)], TOK)
    with pytest.raises(ValueError, match="pred_boxes"):
        post_process({"pred_logits": outputs["pred_logits"]}, [(1, 1)], TOK, ids)
    with pytest.raises(ValueError, match="pred_boxes"):
        post_process({**outputs, "pred_boxes": outputs["pred_boxes"][..., :2]}, [(1, 1)], TOK, ids)
    bad = outputs["pred_logits"].clone()
    bad[0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        post_process({**outputs, "pred_logits": bad}, [(1, 1)], TOK, ids)
    with pytest.raises(ValueError, match="box_threshold"):
        post_process(outputs, [(1, 1)], TOK, ids, box_threshold=float("nan"))


# ----------------------------------------------------------------------------- classes

def test_classes_to_caption_and_assign():
    assert classes_to_caption(["Cat", "dog", "traffic light"]) == "cat. dog. traffic light."
    assert classes_to_caption(["cat."]) == "cat."
    classes = ["cat", "dog", "hot dog"]
    assert assign_classes(["cat", "hot dog", "dog cat", "bird", "", "Cat"], classes) == [0, 1, 0, None, None, 0]
    assert assign_classes(["hot dog"], ["hot dog", "dog"]) == [0]  # first class in list order wins
    with pytest.raises(ValueError, match="classes"):
        classes_to_caption([])
    with pytest.raises(ValueError, match=r"classes'\[1\]"):
        classes_to_caption(["cat", " "])
    with pytest.raises(ValueError, match="phrases"):
        assign_classes("cat", classes)


# ----------------------------------------------------------------------------- COCO scorer

def test_coco_style_scores_against_brute_force():
    g = torch.Generator().manual_seed(3)
    caption = "red circle . blue square . cat . dog ."
    enc = TOK(caption, return_offsets_mapping=True)
    spans = [(0, 10), (13, 24), (27, 30), (33, 36)]
    maps = normalize_positive_map(positive_map_from_spans(enc["offset_mapping"], spans, 256)).double()
    mask = torch.zeros(2, len(enc["input_ids"]), dtype=torch.bool) | True
    logits = logits_for(mask, Q=7, generator=g).double()
    boxes = random_boxes(2, 7, g).double()
    res = coco_style_scores({"pred_logits": logits, "pred_boxes": boxes}, maps, top_k=10,
                            target_sizes=[(100, 50), (20, 40)])
    for b, r in enumerate(res):
        ranked = []
        for q in range(7):
            for c in range(4):
                p = sum(1 / (1 + math.exp(-float(logits[b, q, t]))) * float(maps[c, t])
                        for t in range(256) if maps[c, t] > 0)
                ranked.append((p, q, c))
        ranked.sort(key=lambda x: -x[0])
        assert r["scores"].tolist() == pytest.approx([p for p, _, _ in ranked[:10]], rel=1e-12)
        assert r["labels"].tolist() == [c for _, _, c in ranked[:10]]
        h, w = [(100, 50), (20, 40)][b]
        for (p, q, c), bx in zip(ranked[:10], r["boxes"]):
            cx, cy, bw, bh = boxes[b, q].tolist()
            assert bx.tolist() == pytest.approx([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                                                 (cy + bh / 2) * h], rel=1e-12)
    # top_k larger than Q·C, per-image maps, normalised boxes without sizes.
    res = coco_style_scores({"pred_logits": logits, "pred_boxes": boxes}, maps[None].expand(2, 4, 256), top_k=300)
    assert res[0]["scores"].shape == (28,) and (res[0]["boxes"] <= 1).all()


def test_coco_style_scores_bad_inputs():
    outputs, _ = hand_case()
    with pytest.raises(ValueError, match="positive_maps_normalised"):
        coco_style_scores(outputs, torch.zeros(3, 255))
    with pytest.raises(ValueError, match="positive_maps_normalised"):
        coco_style_scores(outputs, torch.zeros(2, 3, 256))
    with pytest.raises(ValueError, match="positive_maps_normalised"):
        coco_style_scores(outputs, -torch.ones(3, 256))
    with pytest.raises(ValueError, match="top_k"):
        coco_style_scores(outputs, torch.zeros(3, 256), top_k=0)


def test_coco_path_perfect_predictions_give_ap_1(tmp_path):
    """SyntheticShapes COCO files → logits that put each GT's query on its category's tokens → coco_style_scores →
    to_coco_detections → pycocotools COCOeval: AP 1.0; shuffled labels give a low AP."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from dinokernels.data.synthetic_shapes import SyntheticShapes, write_coco
    from dinokernels.models.grounding_dino.postprocess import to_coco_detections
    paths = write_coco(str(tmp_path), n_train=1, n_val=6, seed=3, image_size=96)
    gt = COCO(paths["val_annotations"])
    ds = SyntheticShapes("val", num_images=6, image_size=96, seed=3)
    names = ds.category_names
    caption = " . ".join(names) + " ."
    spans, at = [], 0
    for n in names:
        spans.append((at, at + len(n)))
        at += len(n) + 3
    enc = TOK(caption, return_offsets_mapping=True)
    maps = positive_map_from_spans(enc["offset_mapping"], spans, 256)
    Q = 10

    def run(label_shift):
        logits = torch.full((6, Q, 256), -8.0)
        logits[:, :, len(enc["input_ids"]):] = float("-inf")
        boxes = torch.full((6, Q, 4), 0.5)
        for i in range(6):
            _, t = ds[i]
            for q, (box, label) in enumerate(zip(t["boxes"], t["labels"].tolist())):
                cls = (label + label_shift) % len(names)
                logits[i, q, maps[cls] > 0] = 8.0
                boxes[i, q] = box
        res = coco_style_scores({"pred_logits": logits, "pred_boxes": boxes}, normalize_positive_map(maps),
                                top_k=100, target_sizes=[(96, 96)] * 6)
        dets = to_coco_detections(res, gt.getImgIds(), [c["id"] for c in gt.loadCats(gt.getCatIds())])
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        return ev.stats[0]

    assert run(0) == pytest.approx(1.0, abs=1e-6)
    assert run(1) < 0.2
    with pytest.raises(ValueError, match="image_ids"):
        to_coco_detections([{"scores": torch.zeros(0), "labels": torch.zeros(0), "boxes": torch.zeros(0, 4)}], [])
