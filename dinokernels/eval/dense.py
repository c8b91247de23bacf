"""Dense probes on frozen patch tokens (DINOv2 paper, semantic segmentation and monocular depth, "lin." setups).

* Segmentation: a linear layer maps every patch token to class logits (B, C, h, w); the logits are upsampled
  bilinearly to the label size and trained with cross-entropy, ignore index 255. Metric: mIoU, per-class IoU
  accumulated over the whole data set (one confusion matrix), classes absent from both labels and predictions
  left out of the mean; pixel accuracy too.
* Depth: a linear layer maps every patch token (by default with the image's CLS token concatenated, as the paper's
  "lin. 1") to log-depth; upsampled bilinearly (in log space), depth = exp. The paper trains this layer as a
  256-bin classifier; here it is plain regression with the scale-invariant log loss
  sqrt(mean g² − λ·(mean g)²), g = log pred − log gt over the valid pixels of a batch, λ = 0.85 (λ = 0 is the RMSE
  of log-depth). Metrics per image over valid pixels (gt > 0), averaged over images: RMSE, abs rel and
  δ<1.25 (fraction with max(pred/gt, gt/pred) < 1.25).

Bilinear upsampling and the linear layer commute (interpolation weights sum to 1), so the head is linear in the
tokens whatever the resolution it is applied at. No BatchNorm: tokens are standardised with per-channel statistics
of the training tokens, computed once — an affine map that a linear layer could absorb, kept only for the
optimiser's sake. The backbone stays frozen: features are extracted once, held in memory (float16), and the head
trains on them for a few epochs with AdamW and a cosine learning rate.

The feature model is any module with `patch_size` and `forward_features(images) -> {"patch_tokens": (B, h, w, D),
"cls": (B, D), ...}` (`dinokernels.features.backbone.load_feature_model`); images are normalised here with its
`mean` / `std` (ImageNet's when it has none).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.dense_folder import DenseFileError, DenseFolder, read_depth, read_image, read_mask

__all__ = ["IGNORE_INDEX", "DenseFeatures", "LinearDenseHead", "extract_dense_split", "train_segmentation_head",
           "train_depth_head", "predict_segmentation", "predict_depth", "segmentation_confusion",
           "segmentation_metrics", "depth_image_metrics", "depth_metrics", "silog_loss", "segmentation_palette",
           "colorize_segmentation", "colorize_depth", "save_head", "load_head",
           "evaluate_dense_probe", "training_baseline", "read_label", "HEAD_FORMAT"]

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- metrics -------------------------------------------------------------------------------------------------

def segmentation_confusion(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(C, C) int64 confusion matrix, rows = label, columns = prediction, over the pixels whose label is not
    `ignore_index`. pred and target: integer tensors of the same shape; label values must be < num_classes (or the
    ignore index), predictions in [0, num_classes)."""
    if pred.shape != target.shape:
        raise ValueError(f"segmentation_confusion: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("segmentation_confusion: pred and target must be integer class indices")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"segmentation_confusion: label value {int(target.max())} outside 0..{num_classes - 1} "
                         f"(and not the ignore index {ignore_index})")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"segmentation_confusion: prediction outside 0..{num_classes - 1}")
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes).cpu()


def segmentation_metrics(confusion: Tensor) -> Dict[str, object]:
    """mIoU and friends from a (C, C) confusion matrix (rows label, columns prediction): per-class IoU =
    TP / (TP + FP + FN), None for a class absent from both labels and predictions (left out of the mean);
    `miou` (NaN when no class is present), `pixel_accuracy`, `present_classes`."""
    conf = confusion.to(torch.float64)
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    total = conf.sum()
    return {"miou": float(iou[present].mean()) if present.any() else float("nan"),
            "per_class_iou": [float(v) if p else None for v, p in zip(iou.tolist(), present.tolist())],
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
            "present_classes": int(present.sum())}


def depth_image_metrics(pred: Tensor, gt: Tensor) -> Optional[Dict[str, float]]:
    """RMSE (metres), abs rel and δ<1.25 of one image over its valid pixels (gt > 0 and finite), or None when it
    has none. pred: (H, W) positive depth; gt: (H, W) metres."""
    if pred.shape != gt.shape:
        raise ValueError(f"depth_image_metrics: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ")
    gt = gt.to(torch.float64)
    valid = torch.isfinite(gt) & (gt > 0)
    if not valid.any():
        return None
    p, g = pred.to(torch.float64)[valid], gt[valid]
    if not torch.isfinite(p).all() or (p <= 0).any():
        raise ValueError("depth_image_metrics: predictions must be finite and positive on the valid pixels")
    ratio = torch.maximum(p / g, g / p)
    return {"rmse": float(((p - g) ** 2).mean().sqrt()), "abs_rel": float(((p - g).abs() / g).mean()),
            "delta1": float((ratio < 1.25).to(torch.float64).mean()), "valid_pixels": int(valid.sum())}


def depth_metrics(per_image: Sequence[Optional[Dict[str, float]]]) -> Dict[str, float]:
    """Means over images of depth_image_metrics results (images without valid pixels, None, are counted apart)."""
    used = [m for m in per_image if m is not None]
    out = {k: (float(np.mean([m[k] for m in used])) if used else float("nan")) for k in ("rmse", "abs_rel", "delta1")}
    out["images"] = len(used)
    out["images_without_valid_depth"] = len(per_image) - len(used)
    return out


def silog_loss(log_pred: Tensor, gt: Tensor, lam: float = 0.85, eps: float = 1e-8) -> Tensor:
    """Scale-invariant log loss sqrt(mean g² − λ·(mean g)²), g = log_pred − log gt over the valid pixels (gt > 0,
    finite) of the whole batch. log_pred, gt: (B, H, W). λ = 0 gives the RMSE of log-depth. Zero-size valid set →
    0 (with a gradient of zeros)."""
    valid = torch.isfinite(gt) & (gt > 0)
    if not valid.any():
        return log_pred.sum() * 0.0
    g = log_pred[valid] - torch.log(gt[valid])
    return (g.pow(2).mean() - lam * g.mean().pow(2)).clamp_min(0.0).add(eps).sqrt()


# ---- features ------------------------------------------------------------------------------------------------

@dataclass
class DenseFeatures:
    """Frozen features of a split. patch: (N, h, w, D) float16; cls: (N, D) float16; labels: (N, S, S) training
    targets at the label size (uint8 class indices or float32 metres); stems / image / label paths of the N images;
    skipped: (path, reason) of the files left out."""
    patch: Tensor
    cls: Tensor
    labels: Tensor
    stems: List[str]
    images: List[str]
    label_paths: List[str]
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def input_dim(self, with_cls: bool) -> int:
        return self.patch.shape[-1] + (self.cls.shape[-1] if with_cls else 0)

    def tokens(self, index, with_cls: bool) -> Tensor:
        """(B, h, w, D or 2D) float32 head input of the images `index` (a slice or an index tensor)."""
        patch = self.patch[index].float()
        if not with_cls:
            return patch
        cls = self.cls[index].float()[:, None, None, :].expand(-1, patch.shape[1], patch.shape[2], -1)
        return torch.cat([patch, cls], dim=-1)


def _model_mean_std(model) -> Tuple[Tensor, Tensor]:
    mean = getattr(model, "mean", None)
    std = getattr(model, "std", None)
    mean = torch.as_tensor(IMAGENET_MEAN if mean is None else mean, dtype=torch.float32).reshape(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD if std is None else std, dtype=torch.float32).reshape(1, 3, 1, 1)
    return mean, std


def _to_input(image, size: int) -> Tensor:
    """PIL RGB → (3, size, size) float in [0, 1] (bicubic resize to a square)."""
    from PIL import Image

    resized = image.resize((size, size), Image.BICUBIC) if image.size != (size, size) else image
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def _label_to_train_size(label: np.ndarray, size: int, task: str) -> Tensor:
    """Nearest-neighbour resize (so class indices and invalid zeros survive) to (size, size)."""
    from PIL import Image

    if label.shape == (size, size):
        return torch.from_numpy(label.copy())
    img = Image.fromarray(label if task == "seg" else label.astype(np.float32))
    return torch.from_numpy(np.asarray(img.resize((size, size), Image.NEAREST)).copy())


def read_label(path: str, task: str) -> np.ndarray:
    return read_mask(path) if task == "seg" else read_depth(path)


@torch.no_grad()
def extract_dense_split(model, folder: DenseFolder, image_size: int, label_size: Optional[int] = None,
                        batch_size: int = 16, device: str = "cpu",
                        progress: Optional[Callable[[int, int], None]] = None) -> DenseFeatures:
    """Reads every pair of `folder`, resizes the image to image_size² (a multiple of model.patch_size), runs the
    frozen model once, and keeps patch and CLS tokens (float16, CPU) and the label resized (nearest) to
    label_size² (default image_size). Unreadable files are skipped and listed; no usable pair → ValueError."""
    patch_size = int(model.patch_size)
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the model's patch size {patch_size}")
    label_size = label_size or image_size
    mean, std = _model_mean_std(model)
    mean, std = mean.to(device), std.to(device)
    patches, clss, labels, stems, images, label_paths = [], [], [], [], [], []
    skipped = list(folder.skipped)
    batch: List[Tensor] = []

    def flush():
        x = (torch.stack(batch).to(device) - mean) / std
        out = model.forward_features(x)
        tokens = out["patch_tokens"]
        if tokens.dim() != 4 or tokens.shape[1:3] != (image_size // patch_size, image_size // patch_size):
            raise ValueError(f"the feature model returned patch_tokens of shape {tuple(tokens.shape)}; expected "
                             f"(B, {image_size // patch_size}, {image_size // patch_size}, D)")
        patches.append(tokens.detach().to("cpu", torch.float16))
        clss.append(out["cls"].detach().to("cpu", torch.float16))
        batch.clear()

    for n, pair in enumerate(folder.pairs):
        try:
            image = read_image(pair.image)
            label = read_label(pair.label, folder.task)
        except DenseFileError as e:
            skipped.append((pair.image, str(e)))
            continue
        batch.append(_to_input(image, image_size))
        labels.append(_label_to_train_size(label, label_size, folder.task))
        stems.append(pair.stem)
        images.append(pair.image)
        label_paths.append(pair.label)
        if len(batch) == batch_size:
            flush()
        if progress is not None:
            progress(n + 1, len(folder.pairs))
    if batch:
        flush()
    if not stems:
        reasons = "; ".join(f"{os.path.basename(p)}: {r}" for p, r in skipped[:3])
        raise ValueError(f"{folder.directory!r}: no usable image/label pairs ({len(skipped)} skipped"
                         f"{': ' + reasons if reasons else ''})")
    return DenseFeatures(torch.cat(patches), torch.cat(clss), torch.stack(labels), stems, images, label_paths,
                         skipped)


# ---- the heads -----------------------------------------------------------------------------------------------

class LinearDenseHead(nn.Module):
    """A linear map of each token: (B, h, w, D) → (B, out_dim, h, w), after a fixed per-channel standardisation
    (buffers `feature_mean`, `feature_std`, set from training tokens). For depth (out_dim 1) the output is
    log-depth; `min_depth` / `max_depth` (buffers) bound predictions to the training range."""

    def __init__(self, in_dim: int, out_dim: int, with_cls: bool = False):
        super().__init__()
        self.with_cls = with_cls
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.register_buffer("min_depth", torch.tensor(1e-3))
        self.register_buffer("max_depth", torch.tensor(1e4))

    def forward(self, tokens: Tensor) -> Tensor:
        x = (tokens - self.feature_mean) / self.feature_std
        return self.linear(x).permute(0, 3, 1, 2)

    def set_standardization(self, features: DenseFeatures, chunk: int = 256) -> None:
        """Per-channel mean and std of all training tokens (float64 sums, in chunks of images)."""
        total = torch.zeros(self.feature_mean.shape[0], dtype=torch.float64)
        squares = torch.zeros_like(total)
        count = 0
        for start in range(0, features.patch.shape[0], chunk):
            t = features.tokens(slice(start, start + chunk), self.with_cls).reshape(-1, total.shape[0]).double()
            total += t.sum(0)
            squares += (t * t).sum(0)
            count += t.shape[0]
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0)
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(var.sqrt().clamp_min(1e-6).float())


def _check_training_args(features: DenseFeatures, epochs: int, lr: float, batch_size: int) -> None:
    if features.patch.shape[0] == 0:
        raise ValueError("no training images")
    if epochs < 1 or batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"epochs and batch_size must be ≥ 1 and lr > 0, got {epochs}, {batch_size}, {lr}")


def _train(head: LinearDenseHead, features: DenseFeatures, loss_fn, epochs: int, lr: float, weight_decay: float,
           batch_size: int, seed: int, device: str, log: Optional[Callable[[int, float], None]]) -> LinearDenseHead:
    head.to(device).train()
    n = features.patch.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            total, batches = 0.0, 0
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                tokens = features.tokens(idx, head.with_cls).to(device)
                target = features.labels[idx].to(device)
                out = F.interpolate(head(tokens), size=target.shape[-2:], mode="bilinear", align_corners=False)
                loss = loss_fn(out, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
                batches += 1
            if log is not None:
                log(epoch + 1, total / batches)
    return head.eval()


def train_segmentation_head(features: DenseFeatures, num_classes: int, epochs: int = 10, lr: float = 1e-3,
                            weight_decay: float = 1e-4, batch_size: int = 8, with_cls: bool = False, seed: int = 0,
                            device: str = "cpu", ignore_index: int = IGNORE_INDEX,
                            log: Optional[Callable[[int, float], None]] = None) -> LinearDenseHead:
    """Trains the linear segmentation head on frozen features (labels: (N, S, S) uint8 class indices, 255 =
    ignore): logits upsampled bilinearly to S×S, cross-entropy, AdamW, cosine schedule. Deterministic for a seed."""
    _check_training_args(features, epochs, lr, batch_size)
    labels = features.labels
    bad = (labels != ignore_index) & (labels.long() >= num_classes)
    if bad.any():
        raise ValueError(f"training masks hold class {int(labels[bad].max())} but num_classes is {num_classes}")
    torch.manual_seed(seed)
    head = LinearDenseHead(features.input_dim(with_cls), num_classes, with_cls)
    head.set_standardization(features)
    with torch.no_grad():  # start from the class prior: an untrained head predicts the majority class
        counts = torch.bincount(labels[labels != ignore_index].long().reshape(-1), minlength=num_classes)
        head.linear.bias.copy_(torch.log((counts.double() + 1) / (counts.sum() + num_classes)).float())

    def loss_fn(logits, target):
        return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)

    return _train(head, features, loss_fn, epochs, lr, weight_decay, batch_size, seed, device, log)


def train_depth_head(features: DenseFeatures, epochs: int = 10, lr: float = 1e-3, weight_decay: float = 1e-4,
                     batch_size: int = 8, with_cls: bool = True, silog_lambda: float = 0.85, seed: int = 0,
                     device: str = "cpu", log: Optional[Callable[[int, float], None]] = None) -> LinearDenseHead:
    """Trains the linear depth head on frozen features (labels: (N, S, S) float metres, 0 = invalid): log-depth
    upsampled bilinearly to S×S, scale-invariant log loss (silog_lambda; 0 = RMSE of log-depth), AdamW, cosine
    schedule. The bias starts at the mean training log-depth; predictions are bounded to the training depth range."""
    _check_training_args(features, epochs, lr, batch_size)
    if not 0.0 <= silog_lambda < 1.0:
        raise ValueError(f"silog_lambda must be in [0, 1), got {silog_lambda}")
    gt = features.labels.float()
    valid = torch.isfinite(gt) & (gt > 0)
    if not valid.any():
        raise ValueError("the training depth maps have no valid pixel (all 0 or non-finite)")
    torch.manual_seed(seed)
    head = LinearDenseHead(features.input_dim(with_cls), 1, with_cls)
    head.set_standardization(features)
    with torch.no_grad():
        head.linear.bias.fill_(float(torch.log(gt[valid].double()).mean()))
        head.min_depth.fill_(float(gt[valid].min()))
        head.max_depth.fill_(float(gt[valid].max()))

    def loss_fn(log_depth, target):
        return silog_loss(log_depth[:, 0], target.float(), silog_lambda)

    return _train(head, features, loss_fn, epochs, lr, weight_decay, batch_size, seed, device, log)


@torch.no_grad()
def predict_segmentation(head: LinearDenseHead, features: DenseFeatures, index: int,
                         size: Tuple[int, int]) -> Tensor:
    """(H, W) int64 class map of image `index`: logits upsampled bilinearly to `size` = (H, W), argmax."""
    device = head.linear.weight.device
    logits = head(features.tokens(slice(index, index + 1), head.with_cls).to(device))
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0].argmax(0).cpu()


@torch.no_grad()
def predict_depth(head: LinearDenseHead, features: DenseFeatures, index: int, size: Tuple[int, int]) -> Tensor:
    """(H, W) float32 depth in metres of image `index`: log-depth upsampled bilinearly to `size`, exp, bounded to
    the training range."""
    device = head.linear.weight.device
    log_depth = head(features.tokens(slice(index, index + 1), head.with_cls).to(device))
    up = F.interpolate(log_depth, size=size, mode="bilinear", align_corners=False)[0, 0]
    return up.exp().clamp(float(head.min_depth), float(head.max_depth)).float().cpu()


# ---- pictures ------------------------------------------------------------------------------------------------

def segmentation_palette(num_colors: int = 256) -> np.ndarray:
    """(num_colors, 3) uint8: class 0 black, then well-spread hues (golden-ratio steps) at alternating
    brightness; index 255 (ignore) white."""
    import colorsys

    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for c in range(1, num_colors):
        hue = (c * 0.618033988749895) % 1.0
        value = 0.95 if c % 2 else 0.7
        palette[c] = np.rint(np.array(colorsys.hsv_to_rgb(hue, 0.8, value)) * 255)
    if num_colors > IGNORE_INDEX:
        palette[IGNORE_INDEX] = 255
    return palette


def colorize_segmentation(classes: np.ndarray):
    """(H, W) class indices → a palette ("P") PNG-ready PIL image: shows colours, and np.asarray gives the
    indices back."""
    from PIL import Image

    img = Image.fromarray(np.asarray(classes, dtype=np.uint8), mode="P")
    img.putpalette(segmentation_palette().reshape(-1).tolist())
    return img


# colour ramp for depth, near → far: yellow, orange, magenta, blue, dark navy (anchors chosen here)
_DEPTH_RAMP = np.array([[250, 230, 60], [245, 140, 40], [200, 50, 120], [70, 60, 190], [15, 15, 60]], np.float64)


def colorize_depth(depth: np.ndarray, lo: Optional[float] = None, hi: Optional[float] = None):
    """(H, W) metres → an RGB PIL image: near yellow, far navy, log-scaled between lo and hi (default: the valid
    range of `depth`), invalid (≤ 0 or non-finite) black."""
    from PIL import Image

    depth = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    rgb = np.zeros(depth.shape + (3,), dtype=np.uint8)
    if valid.any():
        lo = float(depth[valid].min()) if lo is None else lo
        hi = float(depth[valid].max()) if hi is None else hi
        lo, hi = math.log(max(lo, 1e-6)), math.log(max(hi, lo * (1 + 1e-6), 1e-6))
        t = np.clip((np.log(np.where(valid, depth, 1.0)) - lo) / max(hi - lo, 1e-12), 0, 1) * (len(_DEPTH_RAMP) - 1)
        k = np.minimum(t.astype(np.int64), len(_DEPTH_RAMP) - 2)
        f = (t - k)[..., None]
        colour = _DEPTH_RAMP[k] * (1 - f) + _DEPTH_RAMP[k + 1] * f
        rgb[valid] = np.rint(colour[valid]).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


# ---- a whole run: train (or load) a head, evaluate, write pictures and metrics -----------------------------------

HEAD_FORMAT = "dinokernels-dense-probe-1"
_EXAMPLES = 8  # images in examples.png


def save_head(path: str, head: LinearDenseHead, task: str, info: Dict[str, object]) -> None:
    """Writes the head and what is needed to use it again (task, sizes, the backbone's patch size and width)."""
    from ..train.checkpoint import atomic_write

    payload = {"format": HEAD_FORMAT, "task": task, "in_dim": head.linear.in_features,
               "out_dim": head.linear.out_features, "with_cls": head.with_cls,
               "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}, **info}
    with atomic_write(path) as f:
        torch.save(payload, f)


def load_head(path: str, task: str, embed_dim: int, patch_size: int) -> Tuple[LinearDenseHead, Dict[str, object]]:
    """The head saved by save_head, checked against the task and the feature model (ValueError naming the file)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"head {path!r} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})") \
            from None
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        raise ValueError(f"head {path!r} is not a dense probe head written by `dinokernels probe` (no format "
                         f"{HEAD_FORMAT!r})")
    if payload["task"] != task:
        raise ValueError(f"head {path!r} is a {payload['task']} head, not {task}")
    if payload.get("embed_dim") != embed_dim or payload.get("patch_size") != patch_size:
        raise ValueError(f"head {path!r} was trained on features of width {payload.get('embed_dim')} and patch "
                         f"{payload.get('patch_size')}; this checkpoint has width {embed_dim} and patch {patch_size}")
    head = LinearDenseHead(int(payload["in_dim"]), int(payload["out_dim"]), bool(payload["with_cls"]))
    head.load_state_dict(payload["state_dict"])
    return head.eval(), payload


def _examples_grid(rows: List[Tuple[object, object, object]], cell: int = 160):
    """image | ground truth | prediction per row (PIL images), each resized to `cell` pixels high."""
    from PIL import Image

    scaled = []
    for row in rows:
        scaled.append([im.convert("RGB").resize((max(1, round(im.width * cell / im.height)), cell), Image.NEAREST)
                       for im in row])
    width = max(sum(im.width for im in row) + 4 * (len(row) - 1) for row in scaled)
    grid = Image.new("RGB", (width, len(scaled) * (cell + 4) - 4), (255, 255, 255))
    for r, row in enumerate(scaled):
        x = 0
        for im in row:
            grid.paste(im, (x, r * (cell + 4)))
            x += im.width + 4
    return grid


def evaluate_dense_probe(head: LinearDenseHead, task: str, val: DenseFeatures, out_dir: Optional[str] = None,
                         num_classes: Optional[int] = None, baseline: Optional[float] = None,
                         ignore_index: int = IGNORE_INDEX) -> Dict[str, object]:
    """Predicts every image of `val` at its label's own size (labels re-read from disk), returns the metrics, and
    with `out_dir` writes predictions/<stem>.png (segmentation: palette PNG, colours that read back as class
    indices; depth: colour PNG, plus depth_mm/<stem>.png, 16-bit millimetres) and examples.png. `baseline`: the
    majority training class (segmentation) or the mean training depth (depth), scored alongside."""
    from PIL import Image

    if out_dir is not None:
        os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
        if task == "depth":
            os.makedirs(os.path.join(out_dir, "depth_mm"), exist_ok=True)
    confusion = base_confusion = None
    per_image, per_image_stems, base_per_image, rows, skipped = [], [], [], [], []
    for i, stem in enumerate(val.stems):
        try:
            label = read_label(val.label_paths[i], task)
        except DenseFileError as e:
            skipped.append((val.label_paths[i], str(e)))
            continue
        size = tuple(label.shape)
        if task == "seg":
            pred = predict_segmentation(head, val, i, size)
            target = torch.from_numpy(label)
            try:
                c = segmentation_confusion(pred, target, num_classes, ignore_index)
            except ValueError as e:  # a class the head does not have (the train-size check can miss tiny regions)
                raise ValueError(f"mask {val.label_paths[i]!r}: {e}") from None
            confusion = c if confusion is None else confusion + c
            if baseline is not None:
                b = segmentation_confusion(torch.full_like(pred, int(baseline)), target, num_classes, ignore_index)
                base_confusion = b if base_confusion is None else base_confusion + b
            picture = colorize_segmentation(pred.numpy())
            truth = colorize_segmentation(label)
        else:
            pred = predict_depth(head, val, i, size)
            gt = torch.from_numpy(label)
            m = depth_image_metrics(pred, gt)
            per_image.append(m)
            per_image_stems.append(stem)  # a skipped label leaves no entry: stems paired here, not by position
            if baseline is not None:
                base_per_image.append(depth_image_metrics(torch.full_like(pred, float(baseline)), gt))
            lo, hi = float(head.min_depth), float(head.max_depth)
            picture = colorize_depth(pred.numpy(), lo, hi)
            truth = colorize_depth(label, lo, hi)
        if out_dir is not None:
            picture.save(os.path.join(out_dir, "predictions", f"{stem}.png"))
            if task == "depth":
                mm = np.clip(np.rint(pred.numpy().astype(np.float64) * 1000), 1, 65535).astype(np.uint16)
                Image.fromarray(mm).save(os.path.join(out_dir, "depth_mm", f"{stem}.png"))
            if len(rows) < _EXAMPLES:
                rows.append((read_image(val.images[i]), truth, picture))
    if out_dir is not None and rows:
        _examples_grid(rows).save(os.path.join(out_dir, "examples.png"))
    result: Dict[str, object] = {"images": len(val.stems) - len(skipped),
                                 "skipped": [{"path": p, "reason": r} for p, r in list(val.skipped) + skipped]}
    if task == "seg":
        if confusion is None:
            raise ValueError("no validation image could be evaluated")
        result["metrics"] = segmentation_metrics(confusion)
        if base_confusion is not None:
            result["baseline"] = {"predicts_class": int(baseline), **segmentation_metrics(base_confusion)}
    else:
        if not per_image:
            raise ValueError("no validation image could be evaluated")
        result["metrics"] = depth_metrics(per_image)
        if base_per_image:
            result["baseline"] = {"predicts_depth_m": float(baseline), **depth_metrics(base_per_image)}
        result["per_image"] = [{"stem": s, **(m or {"rmse": None})} for s, m in zip(per_image_stems, per_image)]
    return result


def training_baseline(task: str, train: DenseFeatures, ignore_index: int = IGNORE_INDEX) -> float:
    """The trivial predictor of the training labels: the most frequent class, or the mean valid depth."""
    labels = train.labels
    if task == "seg":
        counts = torch.bincount(labels[labels != ignore_index].long().reshape(-1), minlength=1)
        return float(counts.argmax())
    valid = torch.isfinite(labels) & (labels > 0)
    return float(labels[valid].double().mean())
