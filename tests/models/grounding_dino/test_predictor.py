"""GroundingDINOPredictor: official resize sizes (SPEC §5.2), batched == one by one on a tiny random model with
images of different sizes and different captions, the text cache, autocast validation, bad inputs."""
import numpy as np
import pytest
import torch

from dinokernels.models.grounding_dino import grounding_dino_tiny
from dinokernels.models.grounding_dino.postprocess import assign_classes, post_process
from dinokernels.models.grounding_dino.predictor import (IMAGENET_MEAN, IMAGENET_STD, GroundingDINOPredictor,
                                                         load_image, resize_for_grounding_dino, resized_shape)
from dinokernels.models.grounding_dino.text import build_tokenizer, tiny_vocab

SIZE = (128, 200)  # (short side, long cap) for the tiny model
WORDS = ["cat", "dog", "red", "car", "person", "bird", "tree"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tiny_vocab(WORDS))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    m = grounding_dino_tiny(tokenizer, vocab_size=1040).eval()
    # The box head's last layer is zero-initialised (boxes = proposals); give it weights so boxes depend on the
    # decoder output, and the comparison below covers the box path too.
    torch.nn.init.normal_(m.bbox_embed[0].layers[-1].weight, std=0.1)
    return m


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # landscape, portrait, a second landscape of the same size, square, a long one capped by max_size
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in
            [(60, 90), (80, 50), (60, 90), (100, 100), (40, 160)]]


CAPTIONS = ["cat . dog .", "red car .", "bird . cat . person .", "tree", "Dog . Person ."]


def _predictor(model, **kw):
    options = dict(image_size=SIZE, box_threshold=0.0, text_threshold=0.2)
    options.update(kw)
    return GroundingDINOPredictor(model, **options)


def _assert_same(a, b, atol=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        # Queries tied in the encoder's score may come out in another order: compare sorted by score, then box.
        def order(r):
            keys = torch.cat([r["scores"][:, None], r["boxes"]], 1).tolist()
            return sorted(range(len(keys)), key=lambda i: [round(v, 3) for v in keys[i]])
        ix, iy = order(x), order(y)
        assert len(ix) == len(iy)
        torch.testing.assert_close(x["scores"][ix], y["scores"][iy], atol=atol, rtol=1e-4)
        torch.testing.assert_close(x["boxes"][ix], y["boxes"][iy], atol=atol * 100, rtol=1e-4)
        assert [x["phrases"][i] for i in ix] == [y["phrases"][i] for i in iy]


# ------------------------------------------------------------------------------------------------ resizing


@pytest.mark.parametrize("hw, expected", [
    ((480, 640), (800, 1066)),      # short side to 800, long truncated: int(800 * 640 / 480)
    ((640, 480), (1066, 800)),      # portrait
    ((1000, 3000), (444, 1332)),    # capped: short = round(1333 * 1000 / 3000) = 444, long = int(444 * 3) = 1332
    ((800, 1200), (800, 1200)),     # already the target size: unchanged
    ((333, 333), (800, 800)),
])
def test_resized_shape_official(hw, expected):
    assert resized_shape(*hw) == expected


def test_resized_shape_configurable_and_checked():
    assert resized_shape(60, 90, 128, 200) == (128, 192)
    assert resized_shape(40, 160, 128, 200) == (50, 200)  # capped: round(200 * 40 / 160) = 50
    assert resized_shape(40, 160, 128, None) == (128, 512)
    with pytest.raises(ValueError, match="max_size"):
        resized_shape(10, 10, 800, 700)
    with pytest.raises(ValueError, match="size"):
        resized_shape(10, 10, 0)


def test_resize_normalises_with_imagenet_statistics():
    colour = np.array([124, 116, 104], dtype=np.uint8)
    img = np.broadcast_to(colour, (30, 45, 3)).copy()
    x = resize_for_grounding_dino(img, 64, 100)
    assert x.shape == (3, 64, 96) and x.dtype == torch.float32
    want = (torch.tensor(colour / 255.0) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x.mean((1, 2)).double(), want, atol=1e-5, rtol=0)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(bad)
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match="expected a file path"):
        load_image(123)


# ------------------------------------------------------------------------------------------------ predictions


def test_single_image_matches_model_forward(model, tokenizer, images):
    """The predictor on one image = the model's own forward on the resized image + post_process with the original
    size (the official predict)."""
    predictor = _predictor(model)
    got = predictor.predict(images[0], CAPTIONS[0])
    x = resize_for_grounding_dino(images[0], *SIZE)
    with torch.no_grad():
        out = model(x[None], [CAPTIONS[0]])
    want = post_process(out, torch.tensor([[60.0, 90.0]]), tokenizer, box_threshold=0.0, text_threshold=0.2)
    _assert_same(got, want)
    assert len(got[0]["phrases"]) == model.num_queries  # threshold 0 keeps every query
    assert got[0]["boxes"].shape == (model.num_queries, 4)


@pytest.mark.parametrize("batch_size", [5, 3])
def test_batched_equals_one_by_one(model, images, batch_size):
    predictor = _predictor(model, batch_size=batch_size)
    batched = predictor.predict(images, CAPTIONS)
    single = [predictor.predict([img], [cap])[0] for img, cap in zip(images, CAPTIONS)]
    _assert_same(batched, single)
    # the comparison is not vacuous: different images and captions give different detections
    assert not torch.allclose(batched[0]["scores"], batched[1]["scores"])


def test_default_thresholds_filter(model, images):
    loose = _predictor(model).predict(images[:2], "cat . dog .")
    strict = _predictor(model, box_threshold=0.35, text_threshold=0.25).predict(images[:2], "cat . dog .")
    for lo, hi in zip(loose, strict):
        assert bool((hi["scores"] > 0.35).all())
        assert len(hi["scores"]) == int((lo["scores"] > 0.35).sum())


def test_text_cache_hits_do_not_change_results(model, images):
    predictor = _predictor(model, text_cache_size=2)
    first = predictor.predict(images[:3], ["cat . dog .", "red car .", "cat . dog ."])
    assert (predictor.cache_misses, predictor.cache_hits) == (2, 1)
    second = predictor.predict(images[:3], ["cat . dog .", "red car .", "cat . dog ."])
    assert (predictor.cache_misses, predictor.cache_hits) == (2, 4)
    _assert_same(first, second, atol=0)
    uncached = _predictor(model, text_cache_size=0).predict(images[:3], ["cat . dog .", "red car .", "cat . dog ."])
    _assert_same(first, uncached, atol=0)
    predictor.predict(images[:1], "tree .")  # LRU of 2: evicts the least recently used caption
    assert len(predictor._text_cache) == 2
    predictor.clear_cache()
    assert len(predictor._text_cache) == 0


def test_predict_with_classes(model, images):
    predictor = _predictor(model)
    classes = ["Cat", "red car", "bird"]
    results = predictor.predict_with_classes(images[:2], classes)
    plain = predictor.predict(images[:2], "cat. red car. bird.")
    _assert_same(results, plain, atol=0)
    for r in results:
        assert r["class_ids"] == assign_classes(r["phrases"], classes)
        assert any(c is not None for c in r["class_ids"])


# ------------------------------------------------------------------------------------------------ arguments


def test_autocast_argument(model, images):
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        GroundingDINOPredictor(model, autocast_dtype=torch.float16, device="cpu")
    with pytest.raises(ValueError, match="autocast_dtype"):
        GroundingDINOPredictor(model, autocast_dtype="int8")
    with pytest.raises(ValueError, match="autocast_dtype"):
        GroundingDINOPredictor(model, autocast_dtype=torch.float64)
    assert GroundingDINOPredictor(model, autocast_dtype="float32").autocast_dtype is None
    bf16 = _predictor(model, autocast_dtype="bfloat16")
    assert bf16.autocast_dtype is torch.bfloat16
    got = bf16.predict(images[:2], "cat . dog .")
    ref = _predictor(model).predict(images[:2], "cat . dog .")
    for g, r in zip(got, ref):
        assert g["boxes"].dtype == torch.float32 and torch.isfinite(g["boxes"]).all()
        assert len(g["phrases"]) == len(r["phrases"])  # threshold 0 keeps every query in both


def test_bad_inputs(model, images):
    predictor = _predictor(model)
    with pytest.raises(ValueError, match="empty"):
        predictor.predict(images[0], "   ")
    with pytest.raises(ValueError, match="empty"):
        predictor.predict(images[0], " . ")
    with pytest.raises(ValueError, match="tokens long"):
        predictor.predict(images[0], " . ".join(["cat"] * 40))  # 81 tokens > max_text_len 32
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        predictor.predict(images[:3], ["cat", "dog"])
    with pytest.raises(ValueError, match="images is empty"):
        predictor.predict([], "cat")
    with pytest.raises(ValueError, match=r"images\[1\]"):
        predictor.predict([images[0], np.zeros((5, 5), dtype=np.float64)], "cat")
    with pytest.raises(ValueError, match="box_threshold"):
        predictor.predict(images[0], "cat", box_threshold=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        GroundingDINOPredictor(model, batch_size=0)
    with pytest.raises(TypeError, match="GroundingDINO"):
        GroundingDINOPredictor(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="image_size"):
        GroundingDINOPredictor(model, image_size=(800,))
