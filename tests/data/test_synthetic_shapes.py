"""Synthetic shapes detection data (dinokernels.data.synthetic_shapes): determinism, boxes tight around each
shape's drawn pixels, shape kinds by fill ratio, captions with positives and negatives, the torch Dataset view,
COCO files loaded by pycocotools, bad arguments."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinokernels.data.synthetic_shapes import (BACKGROUND_BAND, SHAPE_COLORS, SyntheticShapes, collate_detection,
                                               shape_categories, write_coco)


def color_mask(img, color):
    return (img == np.array(color, dtype=np.uint8)).all(-1)


def test_deterministic_and_seeded():
    a, b = SyntheticShapes(num_images=5, seed=3), SyntheticShapes(num_images=5, seed=3)
    for i in range(5):
        ia, aa = a.sample(i)
        ib, ab = b.sample(i)
        assert np.array_equal(ia, ib) and aa == ab
        (ta, ma), (tb, mb) = a[i], b[i]
        assert torch.equal(ta, tb) and ma["caption"] == mb["caption"] and torch.equal(ma["boxes"], mb["boxes"])
    # Indices are independent of each other (sample 4 alone equals sample 4 after the others).
    assert np.array_equal(SyntheticShapes(num_images=5, seed=3).sample(4)[0], a.sample(4)[0])
    other_seed = SyntheticShapes(num_images=5, seed=4)
    other_split = SyntheticShapes("val", num_images=5, seed=3)
    assert not np.array_equal(other_seed.sample(0)[0], a.sample(0)[0])
    assert not np.array_equal(other_split.sample(0)[0], a.sample(0)[0])


@pytest.mark.parametrize("image_size", [128, (96, 200)])
def test_boxes_tight_around_drawn_shapes(image_size):
    ds = SyntheticShapes(num_images=12, image_size=image_size, seed=1)
    h, w = ds.height, ds.width
    counts = []
    for i in range(len(ds)):
        img, anns = ds.sample(i)
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        assert 1 <= len(anns) <= 4
        counts.append(len(anns))
        covered = {c: np.zeros((h, w), bool) for c in SHAPE_COLORS}
        for a in anns:
            cat = ds.categories[a["category_id"] - 1]
            x, y, bw, bh = a["bbox"]
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
            m = color_mask(img, SHAPE_COLORS[cat["color"]])[y:y + bh, x:x + bw]
            # Tight: every border row and column of the box holds a shape pixel.
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
            assert m.sum() == a["area"]
            covered[cat["color"]][y:y + bh, x:x + bw] = True
            fill = a["area"] / (bw * bh)
            expected = {"square": (1.0, 1.0), "circle": (0.72, 0.85), "triangle": (0.45, 0.62),
                        "star": (0.2, 0.5), "cross": (0.45, 0.65)}[cat["shape"]]
            assert expected[0] <= fill <= expected[1], (cat["shape"], fill)
        # No pixel of a shape colour outside that colour's boxes (the background never takes those colours).
        for c, cov in covered.items():
            assert not (color_mask(img, SHAPE_COLORS[c]) & ~cov).any()
    assert len(set(counts)) > 1


def test_background_band_and_colours():
    lo, hi = BACKGROUND_BAND
    for rgb in SHAPE_COLORS.values():
        assert any(v < lo or v > hi for v in rgb)
    ds = SyntheticShapes(num_images=6, seed=2)
    for i in range(6):
        img, anns = ds.sample(i)
        shape_px = np.zeros(img.shape[:2], bool)
        for rgb in SHAPE_COLORS.values():
            shape_px |= color_mask(img, rgb)
        bg = img[~shape_px]
        assert bg.min() >= lo and bg.max() <= hi and bg.std() > 2  # textured, not flat


def test_captions_positives_and_negatives():
    ds = SyntheticShapes(num_images=10, seed=5, max_names=6)
    saw_negative = False
    for i in range(len(ds)):
        _, t = ds[i]
        names = t["caption"][:-2].split(" . ")
        assert t["caption"].endswith(" .")
        present = {ds.category_names[k] for k in t["labels"].tolist()}
        assert present <= set(names)
        assert len(names) == max(len(present), 6)
        saw_negative |= bool(set(names) - present)
        for k, (b, e) in zip(t["labels"].tolist(), t["positive_spans"]):
            assert t["caption"][b:e] == ds.category_names[k]
        for name, (b, e) in t["category_spans"].items():
            assert t["caption"][b:e] == name
    assert saw_negative
    # set_epoch re-draws captions, never images.
    img0, t0 = ds[0]
    ds.set_epoch(1)
    captions = set()
    for e in range(1, 8):
        ds.set_epoch(e)
        img, t = ds[0]
        assert torch.equal(img, img0) and torch.equal(t["boxes"], t0["boxes"])
        captions.add(t["caption"])
    assert len(captions) > 1


def test_dataset_tensors():
    ds = SyntheticShapes(num_images=3, image_size=(64, 96), seed=6)
    img, t = ds[1]
    raw, anns = ds.sample(1)
    assert img.shape == (3, 64, 96) and img.dtype == torch.float32
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(img * std + mean, torch.from_numpy(raw).permute(2, 0, 1).float() / 255, atol=1e-6)
    assert t["boxes"].shape == (len(anns), 4) and t["labels"].dtype == torch.int64
    for box, a in zip(t["boxes"], anns):
        x, y, w, h = a["bbox"]
        assert box.tolist() == pytest.approx([(x + w / 2) / 96, (y + h / 2) / 64, w / 96, h / 64])
    assert ((t["boxes"] > 0) & (t["boxes"] <= 1)).all()
    assert t["image_id"] == 2 and t["size"].tolist() == [64, 96]
    raw_ds = SyntheticShapes(num_images=3, image_size=(64, 96), seed=6, normalize=False)
    assert torch.allclose(raw_ds[1][0], torch.from_numpy(raw).permute(2, 0, 1).float() / 255)
    images, targets = collate_detection([ds[0], ds[1], ds[2]])
    assert images.shape == (3, 3, 64, 96) and len(targets) == 3
    with pytest.raises(ValueError, match="differ in size"):
        collate_detection([ds[0], SyntheticShapes(num_images=1, image_size=64)[0]])


def test_positive_maps_from_dataset_spans():
    from transformers import BertTokenizerFast

    from dinokernels.models.grounding_dino.targets import positive_map_from_spans
    words = sorted({w for c in shape_categories() for w in c["name"].split()})
    vocab = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012}
    vocab.update({f"[unused{i}]": i for i in list(range(1, 100)) + list(range(104, 1012))})
    vocab.update({w: 1013 + k for k, w in enumerate(words)})
    tok = BertTokenizerFast(vocab=vocab)
    _, t = SyntheticShapes(num_images=2, seed=7)[1]
    enc = tok(t["caption"], return_offsets_mapping=True)
    pm = positive_map_from_spans(enc["offset_mapping"], t["positive_spans"], 256)
    for row, k in zip(pm, t["labels"].tolist()):
        toks = [tok.convert_ids_to_tokens(enc["input_ids"][j]) for j in row.nonzero().flatten().tolist()]
        assert " ".join(toks) == SyntheticShapes(num_images=1).category_names[k]


def test_write_coco_loads_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    paths = write_coco(str(tmp_path), n_train=4, n_val=2, seed=8, image_size=64)
    assert sorted(os.listdir(paths["train_images"])) == [f"{i:06d}.png" for i in range(4)]
    coco = COCO(paths["val_annotations"])
    ds = SyntheticShapes("val", num_images=2, image_size=64, seed=8)
    assert len(coco.getImgIds()) == 2 and len(coco.getCatIds()) == 25
    assert coco.loadCats(1)[0]["name"] == "red circle"
    for i, img_id in enumerate(sorted(coco.getImgIds())):
        info = coco.loadImgs(img_id)[0]
        img = np.asarray(Image.open(os.path.join(paths["val_images"], info["file_name"])))
        raw, anns = ds.sample(i)
        assert np.array_equal(img, raw)
        got = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert [a["bbox"] for a in got] == [a["bbox"] for a in anns]
        assert [a["category_id"] for a in got] == [a["category_id"] for a in anns]
        assert info["caption"] == ds[i][1]["caption"]
    with open(paths["train_annotations"]) as f:
        data = json.load(f)
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])


def test_category_subsets_and_bad_arguments():
    ds = SyntheticShapes(num_images=4, colors=["red", "blue"], shapes=["circle", "star"], seed=9)
    assert ds.category_names == ["red circle", "red star", "blue circle", "blue star"]
    for i in range(4):
        assert all(1 <= a["category_id"] <= 4 for a in ds.sample(i)[1])
    with pytest.raises(ValueError, match="colour"):
        shape_categories(["pink"])
    with pytest.raises(ValueError, match="shape"):
        shape_categories(None, ["hexagon"])
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes("dev")
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapes(image_size=16)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapes(image_size=(64, 64, 3))
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticShapes(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="max_scale"):
        SyntheticShapes(min_scale=0.5, max_scale=0.2)
    with pytest.raises(IndexError, match="out of range"):
        SyntheticShapes(num_images=2)[2]
    assert SyntheticShapes(num_images=2, seed=1)[-1][1]["image_id"] == 2
    with pytest.raises(TypeError, match="directory"):
        write_coco(None)
