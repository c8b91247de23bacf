"""Grounding DINO inference (SPEC §5.2, §5.7): official resizing, batched prediction with one caption per image,
cached text features, class lists.

Batching. Images of one batch are padded bottom/right and the encoder, query selection and decoder run once for the
whole batch with padding masks. The backbone and the input projections do not: Swin's windows and the GroupNorm
statistics of `input_proj` would see the padding and change the features of the real pixels, so those run once per
distinct image size (images of equal size share one call) and their per-level maps are padded afterwards. Everything
after them is padding-exact (deformable sampling is in pixels of each image's valid extent, attention and query
selection mask the padding) except the decoder's query position embedding, which officially reads the references
scaled to the padded image; the predictor has it read them relative to each image's valid extent (what a lone image
sees). So a batch gives the same detections as the images one by one, up to float rounding and the order of queries
that tie in the encoder's top-k score.

Text. Each distinct caption is encoded once (BERT + feat_map) and kept in a small LRU cache keyed by its token ids;
captions of one batch are padded to the longest with isolated, masked padding tokens, which is what the tokenizer's
padding gives too. Call `clear_cache()` after changing the model's weights.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .postprocess import assign_classes, classes_to_caption, post_process

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "load_image", "resized_shape", "resize_for_grounding_dino",
           "GroundingDINOPredictor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def _check_sizes(fn: str, size, max_size) -> Tuple[int, Optional[int]]:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{fn}: argument 'size' (short side) must be a positive int, got {size!r}")
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < size):
        raise ValueError(f"{fn}: argument 'max_size' (long side cap) must be None or an int >= size ({size}), got "
                         f"{max_size!r}")
    return size, max_size


def resized_shape(height: int, width: int, size: int = 800, max_size: Optional[int] = 1333) -> Tuple[int, int]:
    """(h, w) after the official resize (SPEC §5.2): the short side becomes `size` unless the long side would
    exceed `max_size`, in which case the short side becomes round(max_size · short / long); the long side is then
    int(short_new · long / short) (truncated). An image whose short side already equals the target is unchanged."""
    size, max_size = _check_sizes("resized_shape", size, max_size)
    if height < 1 or width < 1:
        raise ValueError(f"resized_shape: image size must be positive, got {height}x{width}")
    short, long = min(height, width), max(height, width)
    target = size
    if max_size is not None and long / short * size > max_size:
        target = int(round(max_size * short / long))
    if short == target:
        return height, width
    if width < height:
        return int(target * height / width), target
    return target, int(target * width / height)


def load_image(image: ImageLike, name: str = "image"):
    """A path, a PIL image or a uint8 array ((H, W, 3) RGB or (H, W) grey) → an RGB PIL image. Errors name the
    argument (`name`) and say what was wrong (missing file, not an image, wrong array shape or dtype)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: no such image file: {path!r}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{name}: cannot read {path!r} as an image ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    if isinstance(image, Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"{name}: the image is empty ({image.width}x{image.height})")
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{name}: an array image must be uint8 (H, W, 3) RGB or (H, W) grey, got dtype "
                             f"{image.dtype} (scale floats to 0..255 and convert)")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or 0 in image.shape:
            raise ValueError(f"{name}: an array image must be (H, W, 3) RGB or (H, W) grey, got shape {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    raise TypeError(f"{name}: expected a file path, a PIL image or a uint8 numpy array, got {type(image).__name__}")


def resize_for_grounding_dino(image: ImageLike, size: int = 800, max_size: Optional[int] = 1333,
                              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """The official test-time transform (SPEC §5.2): resize (`resized_shape`, bilinear on the PIL image, as the
    official pipeline resizes PIL images), scale to [0, 1], normalise per channel. image: a path, a PIL image or a
    uint8 array → (3, h, w) float32. `size`/`max_size` (800/1333) can be lowered for small models."""
    size, max_size = _check_sizes("resize_for_grounding_dino", size, max_size)
    from PIL import Image

    pil = load_image(image)
    h, w = resized_shape(pil.height, pil.width, size, max_size)
    if (h, w) != (pil.height, pil.width):
        pil = pil.resize((w, h), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) / std_t


_AUTOCAST_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                   "half": torch.float16, "float32": None, "fp32": None, "none": None}


def _autocast_dtype(value, device: torch.device) -> Optional[torch.dtype]:
    """None/float32 → None (no autocast); bfloat16 anywhere; float16 only on CUDA (CPU autocast's float16 support
    is partial and slower than float32 here, so it is refused rather than silently run in another precision)."""
    if value is None or value is torch.float32:
        return None
    if isinstance(value, str):
        key = value.strip().lower().replace("torch.", "")
        if key not in _AUTOCAST_NAMES:
            raise ValueError(f"GroundingDINOPredictor: autocast_dtype must be None, 'float32', 'bfloat16' or "
                             f"'float16', got {value!r}")
        value = _AUTOCAST_NAMES[key]
        if value is None:
            return None
    if value not in (torch.bfloat16, torch.float16):
        raise ValueError(f"GroundingDINOPredictor: autocast_dtype must be None, torch.float32, torch.bfloat16 or "
                         f"torch.float16, got {value!r}")
    if value is torch.float16 and device.type != "cuda":
        raise ValueError(f"GroundingDINOPredictor: autocast_dtype=float16 needs a CUDA device (got {device}); on the "
                         f"CPU use bfloat16 or None (float32)")
    return value


@contextlib.contextmanager
def _valid_extent_query_pos(model):
    """The decoder's query position embedding relative to each image's valid extent for the block (officially it
    reads the padded extent, the one place where padding changes a padded image's detections)."""
    decoder = model.transformer.decoder
    previous = decoder.query_pos_from_valid_extent
    decoder.query_pos_from_valid_extent = True
    try:
        yield
    finally:
        decoder.query_pos_from_valid_extent = previous


def _threshold(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not 0.0 <= value <= 1.0:
        raise ValueError(f"GroundingDINOPredictor: {name} must be a number in [0, 1], got {value!r}")
    return float(value)


class GroundingDINOPredictor:
    """Batched Grounding DINO inference: images and one caption per image → detections per image.

    Args:
        model: a `GroundingDINO` (put in eval mode and moved to `device`).
        tokenizer: its BERT tokenizer (default: `model.tokenizer`).
        device: where to run (default: the model's device).
        box_threshold, text_threshold: official 0.35 / 0.25 (SPEC §5.7).
        autocast_dtype: None (float32), torch.bfloat16 or torch.float16 (or their names); float16 needs CUDA, a
            float16 request on the CPU is refused (ValueError) rather than run in another precision.
        image_size: (short side, long-side cap), official (800, 1333); lower for small models.
        batch_size: images per forward pass.
        remove_combined: keep only the phrase around each detection's best token (SPEC §5.7).
        text_cache_size: captions whose text features are kept (LRU); 0 disables the cache.

    predict(images, captions) → list (one per image) of dicts: "boxes" (N, 4) float32 xyxy in pixels of the original
    image, "scores" (N,) float32, "phrases" (N strings), "query_indices" (N,) int64; in query order, no NMS.
    """

    def __init__(self, model, tokenizer=None, device=None, box_threshold: float = 0.35,
                 text_threshold: float = 0.25, autocast_dtype=None, image_size: Tuple[int, Optional[int]] = (800, 1333),
                 batch_size: int = 4, remove_combined: bool = False, text_cache_size: int = 16):
        from .model import GroundingDINO

        if not isinstance(model, GroundingDINO):
            raise TypeError(f"GroundingDINOPredictor: model must be a GroundingDINO, got {type(model).__name__}")
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is None:
            raise ValueError("GroundingDINOPredictor: no tokenizer: pass tokenizer= or build the model with one")
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"GroundingDINOPredictor: device {device!r} requested but CUDA is not available")
        self.model = model.eval().to(self.device)
        self.box_threshold = _threshold("box_threshold", box_threshold)
        self.text_threshold = _threshold("text_threshold", text_threshold)
        self.autocast_dtype = _autocast_dtype(autocast_dtype, self.device)
        if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
            raise ValueError(f"GroundingDINOPredictor: image_size must be (short side, long-side cap), got "
                             f"{image_size!r}")
        self.image_size = _check_sizes("GroundingDINOPredictor", image_size[0], image_size[1])
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"GroundingDINOPredictor: batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.remove_combined = bool(remove_combined)
        if isinstance(text_cache_size, bool) or not isinstance(text_cache_size, int) or text_cache_size < 0:
            raise ValueError(f"GroundingDINOPredictor: text_cache_size must be an int >= 0, got {text_cache_size!r}")
        self.text_cache_size = text_cache_size
        self._text_cache: "OrderedDict[Tuple[int, ...], Dict[str, Tensor]]" = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # ------------------------------------------------------------------------------------------------ text

    def clear_cache(self) -> None:
        """Forget the cached text features (needed after the model's weights change)."""
        self._text_cache.clear()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def tokenize(self, caption: str, name: str = "caption") -> Tensor:
        """One caption → its input ids (T,) after the official preprocessing; ValueError when it is empty or longer
        than the model's max_text_len tokens (the official code would silently cut it, losing phrases)."""
        from .text import tokenize_captions

        if not isinstance(caption, str):
            raise TypeError(f"{name} must be a string, got {type(caption).__name__}")
        if not caption.strip() or not caption.strip().strip(".").strip():
            raise ValueError(f"{name} is empty: give the objects to detect, e.g. 'cat . dog .'")
        ids = tokenize_captions(self.tokenizer, [caption], max_text_len=None)["input_ids"][0]
        limit = self.model.max_text_len
        if ids.numel() > limit:
            raise ValueError(f"{name} is {ids.numel()} tokens long (with [CLS] and [SEP]); the model reads at most "
                             f"{limit}: shorten it or split the classes over several calls")
        return ids

    def text_features(self, input_ids: Tensor) -> Dict[str, Tensor]:
        """input_ids (T,) of one caption → encode_text's dict for a batch of 1, from the cache when possible."""
        key = tuple(int(i) for i in input_ids.tolist())
        hit = self._text_cache.get(key)
        if hit is not None:
            self._text_cache.move_to_end(key)
            self.cache_hits += 1
            return hit
        self.cache_misses += 1
        ids = input_ids[None].to(self.device)
        with torch.no_grad(), self._autocast():
            feats = self.model.encode_text(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids))
        feats = {k: v.detach() for k, v in feats.items()}
        if self.text_cache_size > 0:
            self._text_cache[key] = feats
            while len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        return feats

    @staticmethod
    def _batch_text(parts: List[Dict[str, Tensor]], pad_id: int) -> Dict[str, Tensor]:
        """Per-caption encode_text dicts (batch 1, lengths T_i) → one batch padded to max T_i. Padding tokens are
        masked and attend only to themselves, as the tokenizer's padding would give."""
        b, t = len(parts), max(p["input_ids"].shape[1] for p in parts)
        first = parts[0]
        text = first["text"].new_zeros((b, t, first["text"].shape[-1]))
        token_mask = torch.zeros((b, t), dtype=torch.bool, device=text.device)
        self_mask = torch.eye(t, dtype=torch.bool, device=text.device).repeat(b, 1, 1)
        position_ids = torch.zeros((b, t), dtype=torch.long, device=text.device)
        input_ids = torch.full((b, t), pad_id, dtype=torch.long, device=text.device)
        for i, p in enumerate(parts):
            n = p["input_ids"].shape[1]
            text[i, :n] = p["text"][0]
            token_mask[i, :n] = p["text_token_mask"][0]
            self_mask[i, :n, :n] = p["text_self_attention_mask"][0]
            position_ids[i, :n] = p["position_ids"][0]
            input_ids[i, :n] = p["input_ids"][0]
        return {"text": text, "text_token_mask": token_mask, "text_self_attention_mask": self_mask,
                "position_ids": position_ids, "input_ids": input_ids}

    # ------------------------------------------------------------------------------------------------ images

    def _image_features(self, images: List[Tensor]):
        """Resized images (3, h_i, w_i) → (srcs, masks, pos) of the padded batch. The backbone and input
        projections run once per distinct size, unpadded (see the module docstring)."""
        model = self.model
        per_image: List[Optional[List[Tensor]]] = [None] * len(images)
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(img.shape[1:]), []).append(i)
        for (h, w), idx in groups.items():
            batch = torch.stack([images[i] for i in idx]).to(self.device)
            masks = torch.zeros((len(idx), h, w), dtype=torch.bool, device=self.device)
            srcs, _, _ = model.image_features(batch, masks)
            for j, i in enumerate(idx):
                per_image[i] = [s[j] for s in srcs]
        n_levels = len(per_image[0])
        srcs, masks, pos = [], [], []
        for lvl in range(n_levels):
            maps = [f[lvl] for f in per_image]
            hl = max(m.shape[1] for m in maps)
            wl = max(m.shape[2] for m in maps)
            src = maps[0].new_zeros((len(maps), maps[0].shape[0], hl, wl))
            mask = torch.ones((len(maps), hl, wl), dtype=torch.bool, device=src.device)
            for i, m in enumerate(maps):
                src[i, :, :m.shape[1], :m.shape[2]] = m
                mask[i, :m.shape[1], :m.shape[2]] = False
            srcs.append(src)
            masks.append(mask)
            pos.append(model.position_embedding(mask).to(src.dtype))
        return srcs, masks, pos

    # ------------------------------------------------------------------------------------------------ predict

    def _prepare(self, images, captions) -> Tuple[list, List[str]]:
        if isinstance(images, (list, tuple)):
            images = list(images)
        else:
            images = [images]
        if not images:
            raise ValueError("GroundingDINOPredictor.predict: images is empty")
        if isinstance(captions, str):
            captions = [captions] * len(images)
        elif isinstance(captions, (list, tuple)):
            captions = list(captions)
            if len(captions) != len(images):
                raise ValueError(f"GroundingDINOPredictor.predict: {len(captions)} captions for {len(images)} images "
                                 f"(give one caption, or one per image)")
        else:
            raise TypeError(f"GroundingDINOPredictor.predict: captions must be a string or a list of strings, got "
                            f"{type(captions).__name__}")
        return images, captions

    def predict(self, images, captions, box_threshold: Optional[float] = None,
                text_threshold: Optional[float] = None) -> List[Dict[str, object]]:
        """images: one image or a list (paths, PIL images, uint8 arrays); captions: one string for all, or one per
        image → one dict per image (see the class docstring). Thresholds default to the predictor's."""
        images, captions = self._prepare(images, captions)
        box_threshold = self.box_threshold if box_threshold is None else _threshold("box_threshold", box_threshold)
        text_threshold = self.text_threshold if text_threshold is None else _threshold("text_threshold",
                                                                                      text_threshold)
        # Validate every caption before any image work.
        ids = [self.tokenize(c, f"captions[{i}]") for i, c in enumerate(captions)]
        results: List[Dict[str, object]] = []
        for start in range(0, len(images), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(images)))
            results += self._predict_batch([images[i] for i in chunk], [ids[i] for i in chunk], box_threshold,
                                           text_threshold, start)
        return results

    def _predict_batch(self, images, ids: List[Tensor], box_threshold: float, text_threshold: float,
                       offset: int) -> List[Dict[str, object]]:
        tensors, sizes = [], []
        for i, img in enumerate(images):
            pil = load_image(img, f"images[{offset + i}]")
            sizes.append((pil.height, pil.width))
            tensors.append(resize_for_grounding_dino(pil, *self.image_size))
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        with torch.no_grad():
            text = self._batch_text([self.text_features(x) for x in ids], pad_id)
            with self._autocast(), _valid_extent_query_pos(self.model):
                srcs, masks, pos = self._image_features(tensors)
                outputs = self.model.forward_features(srcs, masks, pos, text)
            outputs = {"pred_logits": outputs["pred_logits"].float(), "pred_boxes": outputs["pred_boxes"].float()}
            # Boxes are normalised to each image's valid (unpadded) extent, so the original size scales them.
            dets = post_process(outputs, torch.tensor(sizes, dtype=torch.float32), self.tokenizer,
                                input_ids=[x.tolist() for x in ids], box_threshold=box_threshold,
                                text_threshold=text_threshold, remove_combined=self.remove_combined)
        return [{"boxes": d["boxes"].float().cpu(), "scores": d["scores"].float().cpu(), "phrases": d["phrases"],
                 "query_indices": d["query_indices"]} for d in dets]

    def predict_with_classes(self, images, classes: Sequence[str], box_threshold: Optional[float] = None,
                             text_threshold: Optional[float] = None) -> List[Dict[str, object]]:
        """The official predict_with_classes: caption = the classes joined by ". " (classes_to_caption), then each
        phrase's class is the first class contained in it (assign_classes). Returns predict's dicts plus
        "class_ids": a list of N class indices into `classes` (None where no class matches the phrase)."""
        caption = classes_to_caption(classes)
        results = self.predict(images, caption, box_threshold, text_threshold)
        for r in results:
            r["class_ids"] = assign_classes(r["phrases"], classes)
        return results
