"""Grounding DINO training (SPEC §5.8, Open-GroundingDino's recipe) on a COCO-format folder or the built-in synthetic
shapes, with COCO box AP (pycocotools) on the val split.

* Captions: the categories present in the image plus random negatives (up to `max_names` names), shuffled,
  " . "-joined, re-drawn every epoch; each box's target is the token map of its category name.
* Loss: `GroundingDINOCriterion` (token focal + L1 + GIoU on every decoder layer and the encoder proposals).
* Optimiser: AdamW, learning rates `lr` (transformer, heads, feature map), `lr_backbone`, `lr_text` (0 freezes the
  text encoder, the default for a pretrained BERT), weight decay, gradient-norm clipping, ×0.1 after `lr_drop`
  epochs.
* Outputs (config.out): checkpoint.pth (atomic; model, optimiser, epoch, position in the epoch, RNG states, the
  settings and the tokenizer vocabulary, so `build_detector_from_checkpoint` rebuilds the model), log.jsonl,
  loss.png, summary.json (COCO AP/AP50 with a caption of all category names, and a named-vs-unnamed check).
* DDP under torchrun through train.distributed (gloo on the CPU); evaluation runs on rank 0.

The `small` model (Swin embed 32, one block per stage; a 1-layer BERT over a vocabulary of the category words;
d_model 64; 2 + 2 layers) trains from scratch on the synthetic shapes on two CPU cores (the demo preset, `DEMO`:
704 iterations, 4.5 minutes at load 5-6, held-out AP50 0.50); `swint` is Grounding DINO-T with a local BERT
(`text_encoder`).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import atomic_write, get_rng_state, load_checkpoint, save_checkpoint, set_rng_state, to_plain
from .distributed import (ShardedSampler, get_world_size, init_distributed, is_distributed, is_main_process,
                          local_device, wrap_ddp)
from .progress import JsonlLog, ProgressBar, format_seconds

__all__ = ["DetectorConfig", "make_detector_config", "train_detector", "evaluate_detector", "coco_evaluate",
           "named_unnamed_check", "build_detector", "build_detector_from_checkpoint", "CocoDetection",
           "ShapesDetection", "check_output_folder", "format_summary", "MODEL_SIZES", "DEMO", "DEMO_SHAPES",
           "CHECKPOINT_FORMAT", "caption_of_names"]

CHECKPOINT_FORMAT = "dinokernels.grounding_detector.v1"
MODEL_SIZES = ("small", "swint")

# The built-in demo: synthetic shapes and the small model from scratch (about 10 minutes on two CPU cores).
DEMO_SHAPES = {"colors": ["red", "green", "blue"], "shapes": ["circle", "square", "triangle"]}
# One thread: on a shared, oversubscribed 2-core machine two threads were 10-30× slower (spinning OpenMP workers).
DEMO: Dict[str, Any] = dict(model="small", epochs=11, batch_size=8, lr=2e-3, warmup_iters=50, lr_drop=9,
                            image_size=96, num_train=512, num_val=64, max_names=9, num_queries=30, threads=1)


@dataclass
class DetectorConfig:
    """Settings of `train_detector` (see the module docstring; every field is a `train-detector` flag)."""
    data: Optional[str] = None             # COCO folder; None = built-in synthetic shapes
    out: str = "out-detector"
    model: str = "small"                   # small | swint
    text_encoder: Optional[str] = None     # local BERT folder (swint)
    weights: Optional[str] = None          # initial weights (released .pth or a train-detector checkpoint)
    epochs: int = 15
    batch_size: int = 4
    lr: float = 1e-4
    lr_backbone: Optional[float] = None    # None: 1e-5, or lr for the small model from scratch
    lr_text: Optional[float] = None        # None: 0 (frozen) for a pretrained BERT, lr for the small model
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    lr_drop: int = 11                      # epochs before the ×0.1 drop (0: never)
    warmup_iters: int = 0                  # linear learning-rate warm-up (Open-GD: none)
    image_size: int = 800                  # longer side (COCO: resized, padded to a square); synthetic: side
    max_names: int = 50
    num_queries: Optional[int] = None      # None: the size's default (small 30, swint 900)
    num_train: int = 512                   # synthetic only
    num_val: int = 64
    colors: Optional[List[str]] = None     # synthetic categories: colours × shapes (None: the demo's)
    shapes: Optional[List[str]] = None
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: Optional[int] = None          # torch CPU threads (None: torch's default)
    checkpoint_every: int = 0
    max_iters: Optional[int] = None        # stop after this many iterations (smoke runs)
    evaluate: bool = True
    progress: bool = True
    resume: Optional[str] = None

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "DetectorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"DetectorConfig: unknown settings {unknown}")
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> Dict[str, Any]:
        return to_plain(asdict(self))

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def backbone_lr(self) -> float:
        if self.lr_backbone is not None:
            return self.lr_backbone
        return self.lr if self.model == "small" and self.weights is None else 1e-5

    def text_lr(self) -> float:
        if self.lr_text is not None:
            return self.lr_text
        return self.lr if self.model == "small" and self.weights is None else 0.0

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.model in MODEL_SIZES, f"model must be one of {MODEL_SIZES}, got {self.model!r}")
        need(self.model != "swint" or self.text_encoder is not None,
             "model swint needs text_encoder (--text-encoder DIR: a local bert-base-uncased folder)")
        need(self.model != "small" or self.text_encoder is None,
             "text_encoder is for --model swint (the small model builds its own BERT over the category words)")
        for name in ("epochs", "batch_size", "image_size", "max_names", "num_train", "num_val"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be a positive int, got {v!r}")
        for name in ("lr_drop", "warmup_iters", "seed", "num_workers", "checkpoint_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be a nonnegative int, got {v!r}")
        for name in ("num_queries", "max_iters", "threads"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                 f"{name} must be a positive int, got {v!r}")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
             f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("lr_backbone", "lr_text", "weight_decay", "clip_max_norm"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0),
                 f"{name} must be a finite number >= 0, got {v!r}")
        need(self.image_size >= 32, f"image_size must be at least 32 pixels, got {self.image_size}")
        if self.data is None:
            from ..data.synthetic_shapes import shape_categories
            shape_categories(self.colors, self.shapes)  # names unknown colours / shapes
        else:
            need(self.colors is None and self.shapes is None, "colors / shapes are for the synthetic data (no --data)")
        device = self.device
        need(device == "auto" or device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available")


def make_detector_config(**given) -> DetectorConfig:
    """A DetectorConfig from the given settings; without `data`, unset fields take the demo's values (`DEMO`,
    `DEMO_SHAPES`)."""
    values: Dict[str, Any] = {}
    if given.get("data") is None:
        values.update(DEMO)
        values.update(DEMO_SHAPES)
        if "text_encoder" in given and "model" not in given:
            values["model"] = "swint"
    elif given.get("text_encoder") is not None and "model" not in given:
        values["model"] = "swint"
    values.update({k: v for k, v in given.items() if v is not None})
    if values.get("colors") is not None:
        values["colors"] = list(values["colors"])
    if values.get("shapes") is not None:
        values["shapes"] = list(values["shapes"])
    return DetectorConfig.from_dict(values)


# ---- captions and vocabulary ----------------------------------------------------------------------------------

def caption_of_names(names: Sequence[str]) -> Tuple[str, List[Tuple[int, int]]]:
    """The evaluation caption "a . b . c ." of `names` (in order) and each name's character span."""
    spans, pieces, at = [], [], 0
    for k, name in enumerate(names):
        if k:
            pieces.append(" . ")
            at += 3
        spans.append((at, at + len(name)))
        pieces.append(name)
        at += len(name)
    return "".join(pieces) + " .", spans


def _words(name: str) -> List[str]:
    # What BERT's basic tokenizer splits a lower-cased name into: words and single punctuation marks.
    return re.findall(r"\w+|[^\w\s]", name.lower())


def vocab_for_names(names: Sequence[str]) -> List[str]:
    """The small model's BERT-layout vocabulary (text.tiny_vocab) holding every word of the category names."""
    from ..models.grounding_dino.text import tiny_vocab
    words: List[str] = []
    for n in names:
        words.extend(_words(n))
    return tiny_vocab(sorted(set(words)))


def _check_category_names(names: Sequence[str], where: str) -> List[str]:
    out = []
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"{where}: category {i} has no name")
        if "." in n:
            raise ValueError(f"{where}: category name {n!r} contains '.', the caption's phrase delimiter")
        out.append(" ".join(n.lower().split()))
    if len(set(out)) != len(out):
        dup = sorted({n for n in out if out.count(n) > 1})
        raise ValueError(f"{where}: duplicate category names {dup}")
    return out


# ---- data -----------------------------------------------------------------------------------------------------

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class _CaptionedDetection(torch.utils.data.Dataset):
    """Shared part of the two data sets: per image a uint8 (h, w, 3) array and COCO annotations; items are
    (image (3, S, S) normalised and zero-padded bottom/right, mask (S, S) True = padding, target) with the image
    resized so that its longer side is S = image_size. target: "boxes" (G, 4) cxcywh normalised to the S × S canvas,
    "labels" (G,) category indices, "caption", "positive_spans", "image_id", "scale" (canvas pixels per original
    pixel), "orig_size" (h, w)."""

    category_names: List[str]
    image_size: int
    max_names: int
    seed: int

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Captions (negatives, order) are re-drawn per epoch."""
        self.epoch = int(epoch)

    def image_ids(self) -> List[int]:
        raise NotImplementedError

    def load(self, index: int) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
        raise NotImplementedError

    def caption(self, index: int, labels: Sequence[int]) -> Tuple[str, Dict[str, Tuple[int, int]]]:
        from ..models.grounding_dino.targets import build_caption
        present = [self.category_names[k] for k in labels]
        negatives = [n for n in self.category_names if n not in set(present)]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, index, 7919 + self.epoch]))
        return build_caption(present, negatives, rng, max_names=self.max_names)

    def canvas(self, img: np.ndarray) -> Tuple[Tensor, Tensor, float]:
        """uint8 (h, w, 3) → normalised (3, S, S), mask (S, S), scale."""
        h, w = img.shape[:2]
        s = self.image_size
        scale = s / max(h, w)
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            image = torch.nn.functional.interpolate(image[None], size=(nh, nw), mode="bilinear",
                                                    align_corners=False, antialias=scale < 1)[0]
        image = (image - _MEAN) / _STD
        out = image.new_zeros((3, s, s))
        out[:, :nh, :nw] = image
        mask = torch.ones((s, s), dtype=torch.bool)
        mask[:nh, :nw] = False
        return out, mask, scale

    def __getitem__(self, index: int):
        img, anns = self.load(index)
        image, mask, scale = self.canvas(img)
        s = float(self.image_size)
        labels = [int(a["label"]) for a in anns]
        caption, spans = self.caption(index, labels)
        f = scale / s  # original pixels → canvas fraction
        boxes = torch.tensor([[(a["bbox"][0] + a["bbox"][2] / 2) * f, (a["bbox"][1] + a["bbox"][3] / 2) * f,
                               a["bbox"][2] * f, a["bbox"][3] * f] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "caption": caption,
                  "positive_spans": [spans[self.category_names[k]] for k in labels],
                  "image_id": self.image_ids()[index], "scale": scale,
                  "orig_size": (int(img.shape[0]), int(img.shape[1]))}
        return image, mask, target

    def coco_ground_truth(self) -> Dict[str, Any]:
        raise NotImplementedError


def collate(batch):
    """[(image (3, S, S), mask (S, S), target)] → (images (B, 3, S, S), masks (B, S, S), targets)."""
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch]), [b[2] for b in batch]


class ShapesDetection(_CaptionedDetection):
    """The built-in synthetic shapes (data.synthetic_shapes.SyntheticShapes), images generated once and kept in
    memory as uint8."""

    def __init__(self, split: str, num_images: int, image_size: int, seed: int, max_names: int,
                 colors: Optional[Sequence[str]] = None, shapes: Optional[Sequence[str]] = None):
        super().__init__()
        from ..data.synthetic_shapes import SyntheticShapes
        self.shapes = SyntheticShapes(split, num_images=num_images, image_size=image_size, seed=seed,
                                      colors=colors, shapes=shapes, max_names=max_names)
        self.category_names = _check_category_names(self.shapes.category_names, "synthetic shapes")
        self.category_ids = [c["id"] for c in self.shapes.categories]
        self.image_size, self.max_names, self.seed = image_size, max_names, seed * 4 + {"train": 1, "val": 2}[split]
        self._cache: Dict[int, Tuple[np.ndarray, List[Dict[str, Any]]]] = {}

    def __len__(self) -> int:
        return len(self.shapes)

    def image_ids(self) -> List[int]:
        return list(range(1, len(self.shapes) + 1))

    def load(self, index: int):
        if index not in self._cache:
            img, anns = self.shapes.sample(index)
            self._cache[index] = (img, [dict(a, label=int(a["category_id"]) - 1) for a in anns])
        return self._cache[index]

    def coco_ground_truth(self) -> Dict[str, Any]:
        return self.shapes.coco()


class CocoDetection(_CaptionedDetection):
    """A COCO instances file and its image folder. Crowd annotations and boxes under one pixel are left out of
    training (as DETR does); evaluation uses the file as it is."""

    def __init__(self, annotations: str, images: str, image_size: int, seed: int, max_names: int,
                 categories: Optional[Sequence[Dict[str, Any]]] = None):
        super().__init__()
        where = f"COCO annotations {annotations!r}"
        try:
            with open(annotations) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{where}: must be a JSON object with images, annotations and categories")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{where}: no '{key}' list (a COCO instances file has images, annotations and "
                                 f"categories)")
        if not data["categories"]:
            raise ValueError(f"{where}: 'categories' is empty: the category names are the text prompts")
        if not data["images"]:
            raise ValueError(f"{where}: no images")
        cats = categories if categories is not None else data["categories"]
        try:
            self.category_ids = [int(c["id"]) for c in cats]
            names = [c["name"] for c in cats]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: every category needs an integer 'id' and a 'name'") from e
        self.category_names = _check_category_names(names, where)
        if categories is not None and sorted(int(c["id"]) for c in data["categories"]) != sorted(self.category_ids):
            raise ValueError(f"{where}: its categories differ from the training set's")
        label_of = {cid: k for k, cid in enumerate(self.category_ids)}
        self.data, self.folder = data, images
        self.image_size, self.max_names, self.seed = image_size, max_names, seed
        self.images = []
        for i, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise ValueError(f"{where}: images[{i}] needs 'id' and 'file_name'")
            self.images.append(im)
        per_image: Dict[int, List[Dict[str, Any]]] = {int(im["id"]): [] for im in self.images}
        for i, a in enumerate(data["annotations"]):
            try:
                image_id, cid, bbox = int(a["image_id"]), int(a["category_id"]), [float(v) for v in a["bbox"]]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: annotations[{i}] needs image_id, category_id and bbox [x, y, w, h]") \
                    from e
            if image_id not in per_image:
                raise ValueError(f"{where}: annotations[{i}] refers to image_id {image_id}, which is not in images")
            if cid not in label_of:
                raise ValueError(f"{where}: annotations[{i}] has category_id {cid}, which is not in categories")
            if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox):
                raise ValueError(f"{where}: annotations[{i}] bbox must be 4 finite numbers, got {a['bbox']}")
            if a.get("iscrowd", 0) or bbox[2] < 1 or bbox[3] < 1:
                continue
            per_image[image_id].append({"bbox": bbox, "label": label_of[cid]})
        self.annotations = per_image
        missing = [im["file_name"] for im in self.images[:1000]
                   if not os.path.isfile(os.path.join(images, im["file_name"]))]
        if missing:
            raise FileNotFoundError(f"{where}: {len(missing)} image file(s) missing from {images!r}, e.g. "
                                    f"{missing[0]!r}")

    def __len__(self) -> int:
        return len(self.images)

    def image_ids(self) -> List[int]:
        return [int(im["id"]) for im in self.images]

    def load(self, index: int):
        from PIL import Image
        im = self.images[index]
        path = os.path.join(self.folder, im["file_name"])
        try:
            with Image.open(path) as f:
                img = np.array(f.convert("RGB"))  # writable copy
        except OSError as e:
            raise OSError(f"image {path!r} cannot be read: {e}") from e
        anns = self.annotations[int(im["id"])]
        h, w = img.shape[:2]
        clipped = []
        for a in anns:  # boxes clipped to the image (COCO boxes may overhang by a fraction of a pixel)
            x0, y0 = min(max(a["bbox"][0], 0.0), w), min(max(a["bbox"][1], 0.0), h)
            x1, y1 = min(a["bbox"][0] + a["bbox"][2], w), min(a["bbox"][1] + a["bbox"][3], h)
            if x1 - x0 >= 1 and y1 - y0 >= 1:
                clipped.append({"bbox": [x0, y0, x1 - x0, y1 - y0], "label": a["label"]})
        return img, clipped

    def coco_ground_truth(self) -> Dict[str, Any]:
        return self.data


_SPLIT_FILES = {"train": ("train", "train2017"), "val": ("val", "val2017")}


def find_coco_split(folder: str, split: str) -> Tuple[str, str]:
    """(annotations json, image folder) of `split` in a COCO folder: annotations/instances_<split>[2017].json and
    <split>[2017]/ or images/<split>[2017]/."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--data {folder!r}: no such folder")
    tried_ann, tried_img = [], []
    for name in _SPLIT_FILES[split]:
        ann = os.path.join(folder, "annotations", f"instances_{name}.json")
        tried_ann.append(ann)
        if not os.path.isfile(ann):
            continue
        for img_dir in (os.path.join(folder, name), os.path.join(folder, "images", name)):
            tried_img.append(img_dir)
            if os.path.isdir(img_dir):
                return ann, img_dir
    if not tried_img:
        raise FileNotFoundError(f"--data {folder!r}: no {split} annotations (looked for "
                                f"{', '.join(os.path.relpath(p, folder) for p in tried_ann)})")
    raise FileNotFoundError(f"--data {folder!r}: no {split} image folder (looked for "
                            f"{', '.join(os.path.relpath(p, folder) for p in tried_img)})")


def build_datasets(config: DetectorConfig):
    """(train, val) data sets of the config."""
    if config.data is None:
        train = ShapesDetection("train", config.num_train, config.image_size, config.seed, config.max_names,
                                config.colors, config.shapes)
        val = ShapesDetection("val", config.num_val, config.image_size, config.seed, config.max_names,
                              config.colors, config.shapes)
        return train, val
    ann, img_dir = find_coco_split(config.data, "train")
    train = CocoDetection(ann, img_dir, config.image_size, config.seed, config.max_names)
    val_ann, val_dir = find_coco_split(config.data, "val")
    val = CocoDetection(val_ann, val_dir, config.image_size, config.seed, config.max_names,
                        categories=train.data["categories"])
    if not any(train.annotations.values()):
        raise ValueError(f"--data {config.data!r}: the train split has no usable (non-crowd) boxes")
    return train, val


# ---- model ----------------------------------------------------------------------------------------------------

_SMALL = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), window_size=7, bert_hidden=64,
              bert_layers=1, bert_heads=2, bert_dropout=0.0, d_model=64, nheads=4, enc_layers=2, dec_layers=2,
              ffn=128, points=2, max_text_len=64, num_queries=30)


def _text_len_for(names: Sequence[str], tokenizer, limit: int) -> int:
    """Tokens of the evaluation caption (all names) rounded up to a multiple of 8, at most `limit`."""
    longest = 2 + sum(len(tokenizer.tokenize(n)) + 1 for n in names)  # [CLS] + each name and its "." + [SEP]
    return int(min(limit, 8 * math.ceil(longest / 8)))


def build_detector(spec: Dict[str, Any], text_encoder: Optional[str] = None):
    """(GroundingDINO, tokenizer) from a model spec (what `model_spec` returns and checkpoints store)."""
    from ..models.grounding_dino import text as T
    from ..models.grounding_dino.model import GroundingDINO, grounding_dino_swint_ogc
    from ..models.grounding_dino.swin import SwinTransformer

    if spec["size"] == "small":
        from transformers import BertConfig
        s = spec
        tokenizer = T.build_tokenizer(list(s["vocab"]))
        backbone = SwinTransformer(embed_dim=s["embed_dim"], depths=tuple(s["depths"]),
                                   num_heads=tuple(s["num_heads"]), window_size=s["window_size"], drop_path_rate=0.0)
        bert = T.build_text_encoder(BertConfig(vocab_size=len(s["vocab"]), hidden_size=s["bert_hidden"],
                                               num_hidden_layers=s["bert_layers"],
                                               num_attention_heads=s["bert_heads"],
                                               intermediate_size=2 * s["bert_hidden"], max_position_embeddings=64,
                                               hidden_dropout_prob=s["bert_dropout"],
                                               attention_probs_dropout_prob=s["bert_dropout"]))
        model = GroundingDINO(backbone, bert, tokenizer, num_queries=s["num_queries"], d_model=s["d_model"],
                              nheads=s["nheads"], num_encoder_layers=s["enc_layers"],
                              num_decoder_layers=s["dec_layers"], dim_feedforward=s["ffn"],
                              enc_n_points=s["points"], dec_n_points=s["points"], max_text_len=s["max_text_len"],
                              fusion_drop_path=0.0)
        return model, tokenizer
    if spec["size"] == "swint":
        folder = text_encoder if text_encoder is not None else spec.get("text_encoder")
        if folder is None or not os.path.isdir(folder):
            raise FileNotFoundError(f"the swint model needs its local BERT folder (text_encoder), got {folder!r}")
        model = grounding_dino_swint_ogc(text_encoder=folder, num_queries=spec["num_queries"])
        return model, model.tokenizer
    raise ValueError(f"unknown model size {spec.get('size')!r}; known: {MODEL_SIZES}")


def model_spec(config: DetectorConfig, category_names: Sequence[str]) -> Dict[str, Any]:
    """What rebuilds the model: size, dimensions, and for the small model its vocabulary (from the names)."""
    if config.model == "small":
        spec = dict(_SMALL, size="small", vocab=vocab_for_names(category_names))
        if config.num_queries is not None:
            spec["num_queries"] = config.num_queries
        from ..models.grounding_dino.text import build_tokenizer
        spec["max_text_len"] = _text_len_for(category_names, build_tokenizer(spec["vocab"]), 256)
        return to_plain(spec)
    return {"size": "swint", "text_encoder": os.path.abspath(config.text_encoder),
            "num_queries": config.num_queries or 900}


def _check_names_tokenize(tokenizer, names: Sequence[str]) -> None:
    unk = getattr(tokenizer, "unk_token", "[UNK]")
    for n in names:
        if unk in tokenizer.tokenize(n):
            raise ValueError(f"category name {n!r} has a word the text encoder's vocabulary does not know ({unk})")


def build_detector_from_checkpoint(path_or_checkpoint, map_location="cpu", text_encoder: Optional[str] = None):
    """(model in eval mode, tokenizer, category names) from a train-detector checkpoint (path or loaded dict).
    text_encoder: the local BERT folder of a swint model, if it moved since training."""
    ckpt = path_or_checkpoint
    where = "checkpoint"
    if isinstance(ckpt, (str, os.PathLike)):
        where = f"checkpoint {os.fspath(ckpt)!r}"
        ckpt = load_checkpoint(os.fspath(ckpt), map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where} is not a train-detector checkpoint (format {CHECKPOINT_FORMAT})")
    model, tokenizer = build_detector(ckpt["model_spec"], text_encoder)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, tokenizer, list(ckpt["category_names"])


def _load_initial_weights(model: nn.Module, path: str) -> None:
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        model.load_state_dict(ckpt["model"])
        return
    from ..models.grounding_dino.convert import load_official_weights
    load_official_weights(model, path)


# ---- optimiser ------------------------------------------------------------------------------------------------

def param_groups(model: nn.Module, config: DetectorConfig) -> List[Dict[str, Any]]:
    """Three AdamW groups: the rest (lr), the backbone (backbone lr), the text encoder (text lr); a group with
    learning rate 0 is frozen (requires_grad off) instead."""
    groups = {"main": [], "backbone": [], "text": []}
    for name, p in model.named_parameters():
        key = "backbone" if name.startswith("backbone.") else "text" if name.startswith("bert.") else "main"
        groups[key].append(p)
    lrs = {"main": config.lr, "backbone": config.backbone_lr(), "text": config.text_lr()}
    out = []
    for key, params in groups.items():
        if lrs[key] == 0:
            for p in params:
                p.requires_grad_(False)
        elif params:
            out.append({"params": params, "lr": lrs[key], "base_lr": lrs[key], "name": key})
    return out


def _lr_factor(config: DetectorConfig, epoch: int) -> float:
    return 0.1 if config.lr_drop and epoch >= config.lr_drop else 1.0


# ---- evaluation -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _coco_api(gt: Dict[str, Any]):
    from pycocotools.coco import COCO
    with _quiet():
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
    return coco


def coco_evaluate(ground_truth: Dict[str, Any], detections: List[Dict[str, Any]]) -> Dict[str, float]:
    """pycocotools COCOeval (bbox) of `detections` (COCO results list) against a COCO instances dict → {"AP",
    "AP50", "AP75", "AR100"} (−1 where no ground truth counts, as COCOeval reports)."""
    from pycocotools.cocoeval import COCOeval
    gt = _coco_api(ground_truth)
    if not gt.getAnnIds():
        raise ValueError("coco_evaluate: the ground truth has no annotations")
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR100": 0.0}
    with _quiet():
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    return {"AP": float(s[0]), "AP50": float(s[1]), "AP75": float(s[2]), "AR100": float(s[8])}


def _name_maps(tokenizer, names: Sequence[str], max_text_len: int):
    """Caption of `names`, its tokenisation (1, T) and the (C, max_text_len) token maps of the names."""
    from ..models.grounding_dino import text as T
    from ..models.grounding_dino.targets import positive_map_from_spans
    caption, spans = caption_of_names(names)
    tok = T.tokenize_captions(tokenizer, [caption], max_text_len=None)
    maps = positive_map_from_spans(tok["offset_mapping"][0], spans, max_text_len)
    return caption, tok, maps


@torch.no_grad()
def _predict(model: nn.Module, images: Tensor, masks: Tensor, tok: Dict[str, Tensor], device) -> Dict[str, Tensor]:
    b = images.shape[0]
    out = model(images.to(device), masks=masks.to(device),
                input_ids=tok["input_ids"].expand(b, -1).to(device),
                attention_mask=tok["attention_mask"].expand(b, -1).to(device),
                token_type_ids=tok["token_type_ids"].expand(b, -1).to(device))
    return {"pred_logits": out["pred_logits"].float().cpu(), "pred_boxes": out["pred_boxes"].float().cpu()}


def evaluate_detector(model: nn.Module, tokenizer, dataset: _CaptionedDetection, batch_size: int = 8,
                      device="cpu", top_k: int = 300) -> Dict[str, float]:
    """COCO box AP on `dataset` with one caption of all category names for every image (the official COCO
    evaluation): per-class scores = sigmoid(logits) · normalised name maps, top_k (query, class) pairs per image."""
    from ..models.grounding_dino.postprocess import coco_style_scores, to_coco_detections
    from ..models.grounding_dino.targets import normalize_positive_map
    was_training = model.training
    model.eval()
    max_text_len = model.max_text_len
    _, tok, maps = _name_maps(tokenizer, dataset.category_names, max_text_len)
    maps = normalize_positive_map(maps)
    dets: List[Dict[str, Any]] = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for images, masks, targets in loader:
        out = _predict(model, images, masks, tok, device)
        side = [[dataset.image_size / t["scale"]] * 2 for t in targets]  # canvas size in original pixels
        results = coco_style_scores(out, maps, top_k=top_k, target_sizes=side)
        dets += to_coco_detections(results, [t["image_id"] for t in targets], dataset.category_ids)
    model.train(was_training)
    return coco_evaluate(dataset.coco_ground_truth(), dets)


@torch.no_grad()
def named_unnamed_check(model: nn.Module, tokenizer, dataset: _CaptionedDetection, device="cpu",
                        box_threshold: float = 0.25, max_images: int = 200, seed: int = 0) -> Dict[str, Any]:
    """Does the model find the categories named in the caption and leave the others alone?

    Per image (the first max_images), a seeded random half of the categories (at least one) is named in the
    caption. For each ground-truth box, the queries whose box overlaps it (IoU ≥ 0.5) are scored per named
    category (mean token probability of the name, the COCO-evaluation score):

    * AP50_named: COCOeval over the named categories' boxes only, with detections of the named classes;
    * named_score / unnamed_score: mean over boxes of the best score that an overlapping query gives the box's
      own category (named boxes), or any named category (boxes of categories *not* in the caption): a
      text-blind detector scores unnamed boxes as high as named ones;
    * named_recall / unnamed_detected: fraction of those boxes whose score exceeds box_threshold;
    * the same two fractions with the score `post_process` and `dinokernels detect` threshold (the largest
      probability over all caption tokens, so a "red circle" also lights up on the "red" of "red square"):
      named_recall_any_token / unnamed_detected_any_token.
    """
    from ..ops.boxes import box_cxcywh_to_xyxy, box_iou
    from ..models.grounding_dino.postprocess import coco_style_scores, to_coco_detections
    from ..models.grounding_dino.targets import normalize_positive_map
    was_training = model.training
    model.eval()
    names, ids = dataset.category_names, dataset.category_ids
    rng = np.random.default_rng(np.random.SeedSequence([seed, 104729]))
    n = min(len(dataset), max_images)
    gt = dataset.coco_ground_truth()
    kept_images = set(dataset.image_ids()[:n])
    named_of: Dict[int, set] = {}
    dets: List[Dict[str, Any]] = []
    best: Dict[str, List[float]] = {"named": [], "unnamed": [], "named_any": [], "unnamed_any": []}
    for index in range(n):
        image, mask, target = dataset[index]
        chosen = sorted(rng.choice(len(names), size=max(1, len(names) // 2), replace=False).tolist())
        image_id = target["image_id"]
        named_of[image_id] = {ids[c] for c in chosen}
        _, tok, maps = _name_maps(tokenizer, [names[c] for c in chosen], model.max_text_len)
        out = _predict(model, image[None], mask[None], tok, device)
        side = [[dataset.image_size / target["scale"]] * 2]
        maps = normalize_positive_map(maps)
        result = coco_style_scores(out, maps, top_k=100, target_sizes=side)
        dets += to_coco_detections(result, [image_id], [ids[c] for c in chosen])
        if not len(target["boxes"]):
            continue
        probs = out["pred_logits"][0].sigmoid()                     # (Q, T)
        per_class = probs @ maps.T                                   # (Q, C_named)
        any_token = probs.amax(-1)                                   # (Q,)
        overlap = box_iou(box_cxcywh_to_xyxy(target["boxes"]), box_cxcywh_to_xyxy(out["pred_boxes"][0])) >= 0.5
        for g, label in enumerate(target["labels"].tolist()):
            q = overlap[g]
            key = "named" if label in chosen else "unnamed"
            if key == "named":
                cls = per_class[:, chosen.index(label)]
            else:
                cls = per_class.amax(-1)
            best[key].append(float(cls[q].max()) if q.any() else 0.0)
            best[f"{key}_any"].append(float(any_token[q].max()) if q.any() else 0.0)
    model.train(was_training)
    subset = dict(gt)
    subset["images"] = [im for im in gt["images"] if int(im["id"]) in kept_images]
    subset["annotations"] = [a for a in gt["annotations"] if int(a["image_id"]) in kept_images and
                             int(a["category_id"]) in named_of[int(a["image_id"])] and not a.get("iscrowd", 0)]

    def frac(values: List[float]) -> float:
        return float(np.mean([v > box_threshold for v in values])) if values else float("nan")

    def mean(values: List[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    return {"images": n, "box_threshold": box_threshold, "named_boxes": len(best["named"]),
            "unnamed_boxes": len(best["unnamed"]),
            "AP50_named": coco_evaluate(subset, dets)["AP50"] if subset["annotations"] else float("nan"),
            "named_score": mean(best["named"]), "unnamed_score": mean(best["unnamed"]),
            "named_recall": frac(best["named"]), "unnamed_detected": frac(best["unnamed"]),
            "named_recall_any_token": frac(best["named_any"]),
            "unnamed_detected_any_token": frac(best["unnamed_any"])}


# ---- output folder --------------------------------------------------------------------------------------------

def check_output_folder(config: DetectorConfig, overwrite: bool) -> bool:
    """As the pretraining command: refuses (OutputFolderInUseError) a folder holding another run's files unless
    `overwrite` or the run resumes from a checkpoint in it. Returns True when those files are to be replaced."""
    from .trainer import OutputFolderInUseError, run_files
    existing = run_files(config.out)
    if not existing:
        return False
    if config.resume and os.path.realpath(os.path.dirname(os.path.abspath(config.resume))) == \
            os.path.realpath(config.out):
        return False
    if not overwrite:
        raise OutputFolderInUseError(
            f"output folder {config.out!r} already holds another run's files ({', '.join(existing)}); choose "
            f"another --out, resume that run with --resume {os.path.join(config.out, 'checkpoint.pth')}, or "
            f"replace them with --overwrite")
    return True


class NonFiniteLossError(RuntimeError):
    """The detection loss became NaN or infinite."""


def _say(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


# ---- training -------------------------------------------------------------------------------------------------

def _checkpoint(model, optimizer, config, spec, names, ids, epoch, step_in_epoch, iteration, train_seconds):
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "iteration": iteration, "config": config.to_dict(),
            "model_spec": spec, "category_names": list(names), "category_ids": list(ids),
            "train_seconds": train_seconds, "rng": get_rng_state()}


def train_detector(config: DetectorConfig, overwrite: bool = False) -> Dict[str, Any]:
    """Trains, checkpoints, evaluates; returns the summary (also written to <out>/summary.json on rank 0)."""
    from ..models.grounding_dino import text as T
    from ..models.grounding_dino.criterion import GroundingDINOCriterion
    from ..models.grounding_dino.targets import targets_with_positive_maps

    config.validate()
    t_start = time.time()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    replace = check_output_folder(config, overwrite)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    init_distributed(config.resolved_device())
    device = local_device(config.resolved_device())
    main = is_main_process()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)

    train_set, val_set = build_datasets(config)
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    names, ids = train_set.category_names, train_set.category_ids
    ckpt = None
    if config.resume:
        ckpt = load_checkpoint(config.resume)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"--resume {config.resume!r} is not a train-detector checkpoint")
        if list(ckpt["category_names"]) != list(names):
            raise ValueError(f"--resume {config.resume!r}: it was trained on categories {ckpt['category_names']}, "
                             f"the data has {names}")
        spec = ckpt["model_spec"]
    else:
        spec = model_spec(config, names)
    model, tokenizer = build_detector(spec, config.text_encoder)
    _check_names_tokenize(tokenizer, names)
    _, _, name_maps = _name_maps(tokenizer, names, model.max_text_len)
    cut = [n for n, row in zip(names, name_maps) if not bool(row.any())]
    if cut:  # the official COCO evaluation has the same limit: names past max_text_len tokens get no score
        _say(f"warning: the caption of all {len(names)} category names is longer than {model.max_text_len} tokens; "
             f"{len(cut)} categories ({', '.join(cut[:5])}{', ...' if len(cut) > 5 else ''}) cannot be scored in "
             f"the evaluation")
    if config.weights and ckpt is None:
        _load_initial_weights(model, config.weights)
    for name, p in model.named_parameters():  # BERT's pooler output is never used: no gradient, DDP-safe
        if name.startswith("bert.pooler."):
            p.requires_grad_(False)
    model.to(device)
    groups = param_groups(model, config)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    criterion = GroundingDINOCriterion(weights="open-gd")
    epoch, step_in_epoch, iteration, train_seconds = 0, 0, 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, step_in_epoch = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        iteration, train_seconds = int(ckpt["iteration"]), float(ckpt.get("train_seconds", 0.0))
        set_rng_state(ckpt.get("rng"))
        _say(f"resumed from {config.resume} at epoch {epoch}, iteration {iteration}")
    trained = wrap_ddp(model, device)
    params = [p for p in model.parameters() if p.requires_grad]

    out = config.out
    ckpt_path = os.path.join(out, "checkpoint.pth")
    log = JsonlLog(os.path.join(out, "log.jsonl") if main else None)
    if main:
        os.makedirs(out, exist_ok=True)
        if replace:
            from .trainer import run_files
            for fname in run_files(out):
                os.remove(os.path.join(out, fname))
        log.truncate_after(iteration)

    sampler = ShardedSampler(len(train_set), seed=config.seed)
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    total = config.epochs * steps_per_epoch
    if config.max_iters is not None:
        total = min(total, config.max_iters)
    bar = ProgressBar(total, start_iter=iteration, enabled=config.progress and main)
    _say(f"train-detector: {len(train_set)} training images, {len(names)} categories, model {spec['size']} "
         f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
         f"{sum(p.numel() for p in params) / 1e6:.2f} M trained), {steps_per_epoch} steps per epoch on {device}"
         + (f" × {get_world_size()} processes" if is_distributed() else ""))
    model.train()
    stopped = False
    while epoch < config.epochs and not stopped:
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch)
        sampler.set_start(step_in_epoch * config.batch_size)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * _lr_factor(config, epoch)
        # Own generator: a loader draws its base seed from it, and from the global RNG otherwise, which would
        # make a resumed run's dropout differ from an uninterrupted one.
        loader = torch.utils.data.DataLoader(train_set, batch_size=config.batch_size, sampler=sampler,
                                             collate_fn=collate, num_workers=config.num_workers,
                                             generator=torch.Generator().manual_seed(config.seed + epoch))
        for images, masks, targets in loader:
            t0 = time.perf_counter()
            tok = T.tokenize_captions(tokenizer, [t["caption"] for t in targets], max_text_len=None)
            goals = targets_with_positive_maps(targets, tok["offset_mapping"], model.max_text_len, device)
            outputs = trained(images.to(device), masks=masks.to(device), input_ids=tok["input_ids"].to(device),
                              attention_mask=tok["attention_mask"].to(device),
                              token_type_ids=tok["token_type_ids"].to(device))
            losses = criterion(outputs, goals)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"the loss is {loss.item()} at iteration {iteration + 1} (epoch {epoch}); "
                                         f"the last checkpoint ({ckpt_path}) is from before it. Lower --lr or "
                                         f"keep --clip-max-norm > 0")
            if config.warmup_iters and iteration < config.warmup_iters:
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * _lr_factor(config, epoch) * (iteration + 1) / config.warmup_iters
            elif config.warmup_iters and iteration == config.warmup_iters:
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * _lr_factor(config, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.clip_max_norm) if config.clip_max_norm > 0
                         else None)
            optimizer.step()
            iteration += 1
            step_in_epoch += 1
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            record = {"iteration": iteration, "epoch": epoch, "loss": loss.item(),
                      **{k: losses[k].item() for k in ("loss_ce", "loss_bbox", "loss_giou")},
                      "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 4)}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            log.write(record)
            bar.update(iteration, epoch, config.epochs, {"loss": record["loss"], "lr": record["lr"]})
            if main and config.checkpoint_every and iteration % config.checkpoint_every == 0:
                save_checkpoint(_checkpoint(model, optimizer, config, spec, names, ids, epoch, step_in_epoch,
                                            iteration, train_seconds), ckpt_path)
            if config.max_iters is not None and iteration >= config.max_iters:
                stopped = True
                break
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        if main:
            save_checkpoint(_checkpoint(model, optimizer, config, spec, names, ids, epoch, step_in_epoch,
                                        iteration, train_seconds), ckpt_path)
    bar.close()
    log.close()

    summary: Dict[str, Any] = {}
    if main:
        from .plot import plot_curve
        records = [r for r in JsonlLog.read(os.path.join(out, "log.jsonl")) if "loss" in r]
        plot_curve([r["iteration"] for r in records], [r["loss"] for r in records], os.path.join(out, "loss.png"),
                   title="Grounding DINO detection loss")
        summary = {"data": config.data or "synthetic shapes", "model": spec["size"],
                   "categories": list(names), "train_images": len(train_set), "val_images": len(val_set),
                   "epochs": epoch, "iterations": iteration,
                   "final_loss": records[-1]["loss"] if records else None,
                   "train_seconds": round(train_seconds, 1)}
        if config.evaluate and len(val_set):
            t_eval = time.time()
            summary["coco"] = evaluate_detector(model, tokenizer, val_set, config.batch_size, device)
            summary["named_vs_unnamed"] = named_unnamed_check(model, tokenizer, val_set, device, seed=config.seed)
            summary["eval_seconds"] = round(time.time() - t_eval, 1)
        summary["wall_seconds"] = round(time.time() - t_start, 1)
        summary["load_average"] = {"start": load_start,
                                   "end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        summary["config"] = config.to_dict()
        summary["out"] = out
        with atomic_write(os.path.join(out, "summary.json"), "w") as f:
            json.dump(to_plain(summary), f, indent=2, allow_nan=True)
    return summary


def format_summary(summary: Dict[str, Any]) -> str:
    """The summary as a few lines for the terminal."""
    lines = [f"trained {summary.get('iterations')} iterations ({summary.get('epochs')} epochs) in "
             f"{format_seconds(summary.get('train_seconds', 0))}; wall time "
             f"{format_seconds(summary.get('wall_seconds', 0))}"]
    coco = summary.get("coco")
    if coco:
        lines.append(f"val COCO box AP {coco['AP']:.3f}, AP50 {coco['AP50']:.3f} (caption: all "
                     f"{len(summary.get('categories', []))} category names)")
    check = summary.get("named_vs_unnamed")
    if check:
        lines.append(f"half of the categories named per image: AP50 {check['AP50_named']:.3f}; mean score of "
                     f"named boxes {check['named_score']:.3f}, of unnamed ones {check['unnamed_score']:.3f}; "
                     f"found (score > {check['box_threshold']}): named {check['named_recall']:.1%}, unnamed "
                     f"{check['unnamed_detected']:.1%}")
    lines.append(f"outputs in {summary.get('out')}: checkpoint.pth, log.jsonl, loss.png, summary.json")
    return "\n".join(lines)
