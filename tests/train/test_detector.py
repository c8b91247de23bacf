"""train.detector: the Grounding DINO training loop on tiny synthetic sets (a few iterations each), resume, the COCO
folder input, the COCO evaluation (perfect predictions give AP 1) and clear errors for bad inputs."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinokernels.data.synthetic_shapes import write_coco
from dinokernels.train import detector as D
from dinokernels.train.checkpoint import load_checkpoint

TINY = dict(num_train=4, num_val=2, image_size=64, batch_size=2, colors=["red", "blue"], shapes=["circle", "square"],
            max_names=4, num_queries=6, progress=False, threads=1)


def tiny_config(tmp_path, name="run", **kw):
    values = dict(TINY, out=str(tmp_path / name))
    values.update(kw)
    return D.make_detector_config(**values)


def test_two_iterations_write_checkpoint_log_summary(tmp_path):
    config = tiny_config(tmp_path, epochs=1, max_iters=2)
    summary = D.train_detector(config)
    out = tmp_path / "run"
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "log.jsonl", "loss.png", "summary.json"]
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    stored = json.load(open(out / "summary.json"))
    assert stored["iterations"] == 2 and stored["categories"] == ["red circle", "red square", "blue circle",
                                                                  "blue square"]
    for key in ("AP", "AP50"):
        assert 0.0 <= stored["coco"][key] <= 1.0
    check = stored["named_vs_unnamed"]
    assert check["images"] == 2 and check["named_boxes"] + check["unnamed_boxes"] > 0
    assert summary["coco"] == stored["coco"]
    ckpt = load_checkpoint(str(out / "checkpoint.pth"))
    assert ckpt["format"] == D.CHECKPOINT_FORMAT and ckpt["iteration"] == 2
    assert ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0  # 4 images / batch 2: the epoch is complete
    # The checkpoint rebuilds the model (vocabulary included) with the trained weights.
    model, tokenizer, names = D.build_detector_from_checkpoint(str(out / "checkpoint.pth"))
    assert names == stored["categories"]
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    image = torch.randn(1, 3, 64, 64)
    logits = model(image, ["red circle . blue square ."])["pred_logits"]
    assert logits.shape == (1, 6, model.max_text_len) and torch.isfinite(logits[..., :8]).all()


def test_resume_mid_epoch_continues_the_same_run(tmp_path):
    straight = D.train_detector(tiny_config(tmp_path, "straight", epochs=2, evaluate=False))
    assert straight["iterations"] == 4
    D.train_detector(tiny_config(tmp_path, "split", epochs=2, max_iters=1, evaluate=False))
    path = str(tmp_path / "split" / "checkpoint.pth")
    first = load_checkpoint(path)
    assert (first["epoch"], first["step_in_epoch"], first["iteration"]) == (0, 1, 1)
    resumed = D.DetectorConfig.from_dict(dict(first["config"], max_iters=None, resume=path))
    summary = D.train_detector(resumed)
    assert summary["iterations"] == 4
    log = [json.loads(line)["iteration"] for line in open(tmp_path / "split" / "log.jsonl")]
    assert log == [1, 2, 3, 4]
    a = load_checkpoint(str(tmp_path / "straight" / "checkpoint.pth"))["model"]
    b = load_checkpoint(path)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_coco_folder_input(tmp_path):
    write_coco(str(tmp_path / "coco"), n_train=4, n_val=2, image_size=64, colors=["green", "purple"],
               shapes=["star", "cross"])
    config = D.make_detector_config(data=str(tmp_path / "coco"), out=str(tmp_path / "run"), epochs=1, max_iters=1,
                                    batch_size=2, image_size=64, num_queries=5, progress=False, threads=1)
    assert config.model == "small" and config.lr == 1e-4 and config.clip_max_norm == 0.1
    summary = D.train_detector(config)
    assert summary["categories"][0] == "green star" and summary["train_images"] == 4
    assert 0.0 <= summary["coco"]["AP50"] <= 1.0
    vocab = load_checkpoint(str(tmp_path / "run" / "checkpoint.pth"))["model_spec"]["vocab"]
    assert {"green", "purple", "star", "cross"} <= set(vocab)


class PerfectModel(torch.nn.Module):
    """Returns, image after image, the ground truth of `dataset`: query g has the box of object g (in canvas
    coordinates) and logit +12 on its category's tokens of the evaluation caption, −12 elsewhere."""

    def __init__(self, dataset, tokenizer, max_text_len=32, queries=5):
        super().__init__()
        self.max_text_len = max_text_len
        _, _, self.maps = D._name_maps(tokenizer, dataset.category_names, max_text_len)
        self.dataset, self.queries, self.next = dataset, queries, 0

    def forward(self, images, masks=None, input_ids=None, attention_mask=None, token_type_ids=None):
        logits, boxes = [], []
        for _ in range(images.shape[0]):
            _, _, target = self.dataset[self.next]
            self.next += 1
            lg = torch.full((self.queries, self.max_text_len), -12.0)
            bx = torch.full((self.queries, 4), 0.5)
            for g, (box, label) in enumerate(zip(target["boxes"], target["labels"])):
                lg[g] = torch.where(self.maps[label] > 0, 12.0, -12.0)
                bx[g] = box
            logits.append(lg)
            boxes.append(bx)
        return {"pred_logits": torch.stack(logits), "pred_boxes": torch.stack(boxes)}


def test_evaluation_of_perfect_predictions_is_ap_1(tmp_path):
    dataset = D.ShapesDetection("val", 6, 64, seed=3, max_names=4, colors=["red", "blue"],
                                shapes=["circle", "square"])
    from dinokernels.models.grounding_dino.text import build_tokenizer
    tokenizer = build_tokenizer(D.vocab_for_names(dataset.category_names))
    result = D.evaluate_detector(PerfectModel(dataset, tokenizer), tokenizer, dataset, batch_size=4)
    assert result["AP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0)
    # One box moved off its object: AP50 falls below 1 (the evaluation reads the boxes).
    model = PerfectModel(dataset, tokenizer)
    original = model.forward

    def shifted(*args, **kwargs):
        out = original(*args, **kwargs)
        if model.next <= 4:
            out["pred_boxes"][0, 0, :2] = (out["pred_boxes"][0, 0, :2] + 0.5) % 1.0
        return out

    model.forward = shifted
    assert D.evaluate_detector(model, tokenizer, dataset, batch_size=4)["AP50"] < 0.99


def test_evaluation_maps_padded_canvas_back_to_image_pixels(tmp_path):
    # A 40 × 80 (h × w) image with one 20 × 10 box: the canvas is 64 × 64 (scale 0.8), padded below.
    root = tmp_path / "coco"
    for split in ("train", "val"):
        os.makedirs(root / split)
        Image.fromarray(np.full((40, 80, 3), 120, np.uint8)).save(root / split / "a.png")
    os.makedirs(root / "annotations")
    gt = {"images": [{"id": 7, "file_name": "a.png", "height": 40, "width": 80}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [50, 12, 20, 10], "area": 200,
                           "iscrowd": 0}],
          "categories": [{"id": 3, "name": "Red Circle"}, {"id": 5, "name": "blue square"}]}
    for split in ("train", "val"):
        json.dump(gt, open(root / "annotations" / f"instances_{split}.json", "w"))
    ann, images = D.find_coco_split(str(root), "val")
    dataset = D.CocoDetection(ann, images, image_size=64, seed=0, max_names=4)
    image, mask, target = dataset[0]
    assert image.shape == (3, 64, 64) and mask[:32].logical_not().all() and mask[32:].all()
    torch.testing.assert_close(target["boxes"], torch.tensor([[60 * 0.8 / 64, 17 * 0.8 / 64, 16 / 64, 8 / 64]]))
    assert dataset.category_names == ["red circle", "blue square"] and target["labels"].tolist() == [0]
    from dinokernels.models.grounding_dino.text import build_tokenizer
    tokenizer = build_tokenizer(D.vocab_for_names(dataset.category_names))
    result = D.evaluate_detector(PerfectModel(dataset, tokenizer), tokenizer, dataset)
    assert result["AP"] == pytest.approx(1.0)


def _coco_folder(root, data):
    os.makedirs(root / "train")
    os.makedirs(root / "val")
    os.makedirs(root / "annotations")
    for split in ("train", "val"):
        json.dump(data, open(root / "annotations" / f"instances_{split}.json", "w"))
    return str(root)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        D.train_detector(D.make_detector_config(data=str(tmp_path / "missing"), out=str(tmp_path / "o")))
    empty_folder = tmp_path / "empty"
    os.makedirs(empty_folder)
    with pytest.raises(FileNotFoundError, match="no train annotations"):
        D.build_datasets(D.make_detector_config(data=str(empty_folder)))
    no_cats = _coco_folder(tmp_path / "nocats", {"images": [{"id": 1, "file_name": "x.png"}], "annotations": []})
    with pytest.raises(ValueError, match="'categories'"):
        D.build_datasets(D.make_detector_config(data=no_cats))
    cats = [{"id": 1, "name": "cat"}]
    no_images = _coco_folder(tmp_path / "noimages", {"images": [], "annotations": [], "categories": cats})
    with pytest.raises(ValueError, match="no images"):
        D.build_datasets(D.make_detector_config(data=no_images))
    dotted = _coco_folder(tmp_path / "dotted", {"images": [{"id": 1, "file_name": "x.png"}], "annotations": [],
                                                "categories": [{"id": 1, "name": "st. bernard"}]})
    with pytest.raises(ValueError, match="contains '.'"):
        D.build_datasets(D.make_detector_config(data=dotted))
    missing_file = _coco_folder(tmp_path / "nofile", {"images": [{"id": 1, "file_name": "x.png"}],
                                                      "annotations": [], "categories": cats})
    with pytest.raises(FileNotFoundError, match="missing"):
        D.build_datasets(D.make_detector_config(data=missing_file))
    with pytest.raises(ValueError, match="text_encoder"):
        D.make_detector_config(model="swint")
    with pytest.raises(ValueError, match="unknown colour"):
        D.make_detector_config(colors=["mauve"])
    with pytest.raises(ValueError, match="epochs"):
        D.make_detector_config(epochs=0)
    with pytest.raises(ValueError, match="not a train-detector checkpoint"):
        torch.save({"model": {}}, tmp_path / "other.pth")
        D.build_detector_from_checkpoint(str(tmp_path / "other.pth"))


class CaptionReadingModel(torch.nn.Module):
    """Query g gets object g's box; its logits are +12 on the tokens of object g's category name when that name is
    in the caption (text_blind: on every real token), −12 elsewhere."""

    def __init__(self, dataset, tokenizer, text_blind=False, max_text_len=32, queries=5):
        super().__init__()
        self.dataset, self.tokenizer, self.text_blind = dataset, tokenizer, text_blind
        self.max_text_len, self.queries, self.next = max_text_len, queries, 0

    def forward(self, images, masks=None, input_ids=None, attention_mask=None, token_type_ids=None):
        _, _, target = self.dataset[self.next]
        self.next += 1
        ids = input_ids[0].tolist()
        logits = torch.full((1, self.queries, self.max_text_len), -12.0)
        boxes = torch.full((1, self.queries, 4), 0.5)
        for g, (box, label) in enumerate(zip(target["boxes"], target["labels"])):
            boxes[0, g] = box
            if self.text_blind:
                logits[0, g, :len(ids)] = 12.0
                continue
            name = self.tokenizer(self.dataset.category_names[label], add_special_tokens=False)["input_ids"]
            dot = self.tokenizer.convert_tokens_to_ids(".")
            for start in range(len(ids) - len(name)):
                if ids[start:start + len(name)] == name and ids[start + len(name)] == dot:  # the whole phrase
                    logits[0, g, start:start + len(name)] = 12.0
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_named_unnamed_check_separates_text_reading_from_text_blind():
    dataset = D.ShapesDetection("val", 8, 64, seed=1, max_names=4, colors=["red", "blue"],
                                shapes=["circle", "square"])
    from dinokernels.models.grounding_dino.text import build_tokenizer
    tokenizer = build_tokenizer(D.vocab_for_names(dataset.category_names))
    reading = D.named_unnamed_check(CaptionReadingModel(dataset, tokenizer), tokenizer, dataset, seed=5)
    assert reading["named_boxes"] > 0 and reading["unnamed_boxes"] > 0
    assert reading["AP50_named"] == pytest.approx(1.0)
    assert reading["named_recall"] == 1.0 and reading["unnamed_detected"] == 0.0
    assert reading["named_score"] > 0.99 and reading["unnamed_score"] < 0.01
    blind = D.named_unnamed_check(CaptionReadingModel(dataset, tokenizer, text_blind=True), tokenizer, dataset,
                                  seed=5)
    assert blind["unnamed_detected"] == 1.0 and blind["unnamed_score"] > 0.99
    assert blind["unnamed_detected_any_token"] == 1.0



def test_two_process_ddp_run(tmp_path):
    # Two CPU processes (gloo, file:// rendezvous): the sampler shards the images, rank 0 writes the outputs.
    import subprocess
    import sys
    import textwrap
    import time
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent('''
        import json, sys
        from dinokernels.train import detector as D
        from dinokernels.train.distributed import cleanup_distributed, get_world_size
        settings = json.loads(sys.argv[1])
        D.train_detector(D.make_detector_config(**settings))
        assert get_world_size() == 2
        cleanup_distributed()
    '''))
    settings = dict(TINY, num_train=8, out=str(tmp_path / "run"), epochs=1, max_iters=2, evaluate=False)
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1",
                   DINOKERNELS_INIT_METHOD="file://" + str(tmp_path / "store"), DINOKERNELS_BACKEND="kernel")
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(settings)], cwd=str(tmp_path),
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 240
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    logs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ckpt = load_checkpoint(str(tmp_path / "run" / "checkpoint.pth"))
    assert ckpt["iteration"] == 2 and ckpt["epoch"] == 1  # 8 images / 2 ranks / batch 2: 2 steps per epoch
    assert [json.loads(line)["iteration"] for line in open(tmp_path / "run" / "log.jsonl")] == [1, 2]
