"""Frozen feature extractors from any checkpoint the package understands.

`load_feature_model(ckpt)` accepts

* a checkpoint written by `dinokernels pretrain` (DINO or DINOv2; its config rebuilds the model, `which` picks
  teacher or student; `eval.loading.load_backbone` does the work);
* an official DINOv2 weight file (`dinov2_vits14_pretrain.pth`, `_reg4_`, ViT-g with SwiGLU; block-chunked layouts,
  the `{"teacher": {"backbone.*", "dino_head.*"}}` layout of teacher_checkpoint.pth and the
  `{"model": {"student.backbone.*", "teacher.backbone.*", …}}` layout of training checkpoints too): the
  architecture is read off the tensor shapes, the interpolation settings are the hub's (SPEC §3.1);
* an official DINO weight file (backbone or full checkpoint), architecture inferred as `eval.loading` does;
* a transformers Dinov2Model / Dinov2WithRegistersModel directory (config.json + weights, never downloaded), or a
  transformers Dinov2 state dict saved as .pth / .safetensors.

The result is a `FeatureModel`: the backbone in eval mode plus what a caller needs to feed it (patch size, width,
the normalisation mean/std, a default image side) and one output contract for every backbone:
`forward_features(images (B, 3, H, W)) -> {"cls": (B, D), "patch_mean": (B, D), "patch_tokens": (B, h, w, D)}`,
all from the final LayerNorm (DINOv2's x_norm_clstoken / x_norm_patchtokens; DINO's normed last block).
"""
import hashlib
import json
import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["FeatureModel", "load_feature_model", "dinov2_kwargs_from_shapes", "checkpoint_fingerprint",
           "FEATURE_KINDS"]

FEATURE_KINDS = ("cls", "patch_mean", "patch_tokens")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WRAPPERS = ("teacher", "student", "model", "state_dict")
_HF_MARK = "embeddings.patch_embeddings.projection.weight"


class FeatureModel(nn.Module):
    """A frozen backbone with one feature contract.

    Attributes: `backbone` (nn.Module, eval mode), `kind` ("dinov2" or "dino"), `patch_size`, `embed_dim`,
    `num_register_tokens`, `mean` / `std` (3-tuples in [0, 1] units: the normalisation the backbone was trained
    with), `default_image_size` (a multiple of patch_size), `source` (a short description of the checkpoint).
    """

    def __init__(self, backbone: nn.Module, kind: str, patch_size: int, embed_dim: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 default_image_size: int = 224, source: str = "", num_register_tokens: int = 0,
                 in_chans: int = 3):
        super().__init__()
        if kind not in ("dinov2", "dino"):
            raise ValueError(f"FeatureModel: kind must be 'dinov2' or 'dino', got {kind!r}")
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.kind = kind
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.num_register_tokens = int(num_register_tokens)
        self.in_chans = int(in_chans)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"FeatureModel: mean and std must be 3 values, std > 0; got {self.mean}, {self.std}")
        # the default side is a multiple of the patch (rounded down, at least one patch)
        self.default_image_size = max(self.patch_size, int(default_image_size) // self.patch_size * self.patch_size)
        self.source = source

    def train(self, mode: bool = True) -> "FeatureModel":
        # frozen: the backbone stays in eval mode (no dropout / drop path), whatever a caller asks
        super().train(False)
        return self

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, patch_size={self.patch_size}, embed_dim={self.embed_dim}, "
                f"registers={self.num_register_tokens}, source={self.source!r}")

    def _check(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"FeatureModel.forward_features: images must be a tensor (B, 3, H, W), got "
                            f"{type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"FeatureModel.forward_features: images must be (B, {self.in_chans}, H, W), got "
                             f"{tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("FeatureModel.forward_features: images is an empty batch (B = 0)")
        if not images.is_floating_point():
            raise TypeError(f"FeatureModel.forward_features: images must be a float tensor (normalised), got "
                            f"{images.dtype}")
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p or h < p or w < p:
            raise ValueError(f"FeatureModel.forward_features: images of {h}×{w} pixels are not a multiple of the "
                             f"patch size {p}; resize or crop to multiples of {p}")
        first = next(self.backbone.parameters())
        if images.device != first.device:
            raise ValueError(f"FeatureModel.forward_features: images are on {images.device}, the model on "
                             f"{first.device}")

    @torch.no_grad()
    def forward_features(self, images: Tensor) -> Dict[str, Tensor]:
        """images (B, 3, H, W), normalised with `mean`/`std`, H and W multiples of patch_size →
        {"cls": (B, D), "patch_mean": (B, D), "patch_tokens": (B, H/p, W/p, D)} in the model's dtype."""
        self._check(images)
        images = images.to(next(self.backbone.parameters()).dtype)
        B, _, H, W = images.shape
        p = self.patch_size
        if self.kind == "dinov2":
            out = self.backbone.forward_features(images)
            cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]
        else:
            tokens = self.backbone.get_intermediate_layers(images, 1)[0]  # normed (B, 1 + N, D)
            cls, patches = tokens[:, 0], tokens[:, 1:]
        patch_tokens = patches.reshape(B, H // p, W // p, patches.shape[-1])
        return {"cls": cls, "patch_mean": patches.mean(dim=1), "patch_tokens": patch_tokens}

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        return self.forward_features(images)


# ---- fingerprints (resume checks) ------------------------------------------------------------------------------

def checkpoint_fingerprint(path: str) -> str:
    """A cheap identity of a checkpoint file or model directory: sha256 over size and the first and last MiB of
    each weight file (a moved or copied file keeps it; a retrained one changes it)."""
    path = os.fspath(path)
    digest = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f))
                       and (f.endswith((".json", ".safetensors", ".bin", ".pth", ".pt"))))
    else:
        files = [""]
    for name in files:
        full = os.path.join(path, name) if name else path
        size = os.path.getsize(full)
        digest.update(f"{name}:{size}:".encode())
        with open(full, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


# ---- DINOv2 architecture from shapes ---------------------------------------------------------------------------

def _depth(shapes: Mapping[str, Sequence[int]]) -> int:
    indices = {int(m.group(1)) for m in (re.match(r"^blocks\.(\d+)\.", k) for k in shapes) if m}
    if not indices or sorted(indices) != list(range(len(indices))):
        raise ValueError(f"cannot infer the DINOv2 depth: block indices {sorted(indices)} are not 0..n-1")
    return len(indices)


def dinov2_kwargs_from_shapes(shapes: Mapping[str, Sequence[int]], num_heads: Optional[int] = None
                              ) -> Dict[str, Any]:
    """DinoVisionTransformer constructor arguments for a flat DINOv2 backbone state dict given as key → shape
    (official names, `blocks.{i}.*`). Width, depth, patch, channels, grid (img_size), registers, FFN kind and
    ratio, biases and LayerScale are read off the shapes; the head count is not stored in a checkpoint: it is
    width / 64 as in every released model (SPEC §3.1) unless `num_heads` is given. Interpolation follows the hub
    (SPEC §3.1): with registers offset 0 and antialias, without offset 0.1 and no antialias."""
    from ..layers import swiglu_hidden_features

    need = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    absent = [k for k in need if k not in shapes]
    if absent:
        raise ValueError(f"not a DINOv2 backbone: keys {', '.join(absent)} are missing")
    dim = int(shapes["cls_token"][-1])
    proj = [int(s) for s in shapes["patch_embed.proj.weight"]]
    if len(proj) != 4 or proj[2] != proj[3]:
        raise ValueError(f"patch_embed.proj.weight has shape {proj}; expected (D, C, p, p)")
    patch, in_chans = proj[2], proj[1]
    grid_tokens = int(shapes["pos_embed"][1]) - 1
    side = int(round(math.sqrt(grid_tokens)))
    if side * side != grid_tokens:
        raise ValueError(f"pos_embed holds {grid_tokens} patch positions, not a square grid")
    depth = _depth(shapes)
    if num_heads is None:
        if dim % 64:
            raise ValueError(f"cannot infer the head count of a width-{dim} DINOv2 (released models use 64 "
                             f"channels per head; {dim} is no multiple of 64): pass num_heads")
        num_heads = dim // 64
    if dim % num_heads:
        raise ValueError(f"num_heads {num_heads} does not divide the width {dim}")
    b0 = "blocks.0."
    if b0 + "mlp.w12.weight" in shapes:
        ffn = "swiglufused"
        hidden = int(shapes[b0 + "mlp.w12.weight"][0]) // 2
        ratios = [r for r in range(1, 33) if swiglu_hidden_features(dim * r) == hidden]
        if not ratios:
            raise ValueError(f"the SwiGLU width {hidden} is no integer mlp_ratio of width {dim}")
        mlp_ratio = float(ratios[0])
        ffn_bias = b0 + "mlp.w12.bias" in shapes
    elif b0 + "mlp.fc1.weight" in shapes:
        ffn = "mlp"
        mlp_ratio = int(shapes[b0 + "mlp.fc1.weight"][0]) / dim
        ffn_bias = b0 + "mlp.fc1.bias" in shapes
    else:
        raise ValueError("cannot infer the DINOv2 feed-forward layer: no blocks.0.mlp.fc1 or blocks.0.mlp.w12 keys")
    registers = int(shapes["register_tokens"][1]) if "register_tokens" in shapes else 0
    return dict(img_size=side * patch, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
                num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=b0 + "attn.qkv.bias" in shapes,
                proj_bias=b0 + "attn.proj.bias" in shapes, ffn_bias=ffn_bias, ffn_layer=ffn,
                init_values=1.0 if b0 + "ls1.gamma" in shapes else None, block_chunks=0,
                num_register_tokens=registers, interpolate_offset=0.0 if registers else 0.1,
                interpolate_antialias=registers > 0)


# ---- loading ---------------------------------------------------------------------------------------------------

def _strip(key: str) -> str:
    for prefix in ("module.", "backbone."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _inner_state_dict(obj: Any, which: str) -> Tuple[Optional[Mapping[str, Any]], Optional[str]]:
    """(state dict, the wrapper entry it came from) inside a loaded file: the dict itself when all its values are
    tensors, else obj[which], else the first of teacher / student / model / state_dict that is a mapping."""
    if not isinstance(obj, Mapping):
        return None, None
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj, None
    for key in (which,) + _WRAPPERS:
        if isinstance(obj.get(key), Mapping):
            return obj[key], key
    return None, None


def _read_file(path: str) -> Any:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"checkpoint {path!r} is a .safetensors file, which needs the safetensors package") \
                from e
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 — any parse failure is "not readable"
            raise ValueError(f"checkpoint {path!r} cannot be read as safetensors: "
                             f"{' '.join(str(e).split()) or type(e).__name__}") from None
    from ..eval.loading import read_checkpoint
    from ..train.checkpoint import ACCESS_ERRORS, LOAD_ERRORS, checkpoint_error

    try:
        return read_checkpoint(path)
    except ACCESS_ERRORS:
        raise
    except LOAD_ERRORS as e:
        raise checkpoint_error(path, e, "checkpoint") from None


def _hf_preprocessing(folder: str) -> Tuple[Tuple[float, ...], Tuple[float, ...], int]:
    """(mean, std, crop side) from a transformers preprocessor_config.json, ImageNet's / 224 when absent."""
    mean, std, side = IMAGENET_MEAN, IMAGENET_STD, 224
    cfg_path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"checkpoint {folder!r}: preprocessor_config.json is not valid JSON ({e})") from None
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
        crop = cfg.get("crop_size")
        if isinstance(crop, Mapping):
            crop = crop.get("height")
        if isinstance(crop, int) and crop > 0:
            side = crop
    return mean, std, side


def _from_transformers_dir(path: str) -> FeatureModel:
    from ..models.dinov2 import from_transformers

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"checkpoint {path!r} is a folder without config.json: not a transformers model directory "
                         f"(give a weight file or a transformers Dinov2 model folder)")
    try:
        with open(os.path.join(path, "config.json")) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path!r}: config.json is not valid JSON ({e})") from None
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(f"checkpoint {path!r} is a transformers {model_type!r} model; only Dinov2Model and "
                         f"Dinov2WithRegistersModel folders are supported")
    try:
        backbone = from_transformers(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"checkpoint {path!r}: the transformers model cannot be loaded "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    mean, std, side = _hf_preprocessing(path)
    return FeatureModel(backbone, "dinov2", backbone.patch_size, backbone.embed_dim, mean, std, side,
                        source=f"transformers {model_type} folder {path}",
                        num_register_tokens=backbone.num_register_tokens,
                        in_chans=backbone.patch_embed.proj.in_channels)


def _dinov2_from_flat(flat: Mapping[str, Tensor], source: str, num_heads: Optional[int],
                      transformers_interpolation: bool = False) -> FeatureModel:
    from ..models.dinov2 import DinoVisionTransformer, load_official_weights

    kwargs = dinov2_kwargs_from_shapes({k: tuple(v.shape) for k, v in flat.items()}, num_heads)
    if transformers_interpolation:  # transformers resizes to an explicit size, antialiased with registers only
        kwargs.update(interpolate_offset=0.0, interpolate_antialias=kwargs["num_register_tokens"] > 0)
    model = DinoVisionTransformer(**kwargs)
    load_official_weights(model, dict(flat))
    model.eval()
    return FeatureModel(model, "dinov2", kwargs["patch_size"], kwargs["embed_dim"], IMAGENET_MEAN, IMAGENET_STD,
                        224 // kwargs["patch_size"] * kwargs["patch_size"], source=source,
                        num_register_tokens=kwargs["num_register_tokens"], in_chans=kwargs["in_chans"])


def _pretrain_default_size(config) -> int:
    if config.eval_crop:
        return int(config.eval_crop)
    return int(config.global_size) if config.data is None else 224


def load_feature_model(ckpt: str, which: str = "teacher", device="cpu", num_heads: Optional[int] = None
                       ) -> FeatureModel:
    """A FeatureModel (eval mode, frozen, on `device`) from a checkpoint file or transformers model folder (see the
    module docstring for the formats). `which`: "teacher" or "student" for checkpoints that hold both (DINO full
    checkpoints, `dinokernels pretrain` checkpoints); `num_heads` only for DINOv2 weights whose width is no
    multiple of 64 (the head count is not stored). Every failure is one line naming the path: missing file,
    empty or unreadable file, unknown format, weights that do not fit."""
    from ..models.dinov2 import canonical_backbone_state_dict, state_dict_from_transformers

    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine")
    path = os.fspath(ckpt)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r}: no such file or folder")
    if os.path.isdir(path):
        return _finish(_from_transformers_dir(path), device)
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path!r} is empty (0 bytes)")
    obj = _read_file(path)

    from ..train.methods import DINOv2TrainingMethod
    from ..train.trainer import CHECKPOINT_FORMAT

    fmt = obj.get("format") if isinstance(obj, Mapping) else None
    if fmt in (CHECKPOINT_FORMAT, DINOv2TrainingMethod.checkpoint_format):
        from ..eval.loading import load_backbone
        from ..train.inputs import normalization

        try:
            backbone, config, _ = load_backbone(path, which)
        except (KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise ValueError(f"checkpoint {path!r}: a {fmt} checkpoint that cannot be loaded "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
        mean, std = normalization(config)
        kind = "dinov2" if fmt == DINOv2TrainingMethod.checkpoint_format else "dino"
        return _finish(FeatureModel(backbone, kind, _patch_size(backbone), backbone.embed_dim, mean, std,
                                    _pretrain_default_size(config),
                                    source=f"dinokernels pretrain checkpoint ({config.method}, {config.arch}, "
                                           f"{which}) {path}",
                                    num_register_tokens=getattr(backbone, "num_register_tokens", 0)), device)
    if isinstance(obj, Mapping) and obj.get("format") is not None:
        raise ValueError(f"checkpoint {path!r} has format {obj.get('format')!r}, not a backbone checkpoint (DINO, "
                         f"DINOv2 pretraining, official weights or a transformers Dinov2 folder)")
    sd, entry = _inner_state_dict(obj, which)
    if sd is None:
        entries = sorted(map(str, obj))[:12] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"checkpoint {path!r}: unknown format (not a state dict, nor a checkpoint with a teacher/"
                         f"student/model/state_dict entry; found {entries})")
    if entry == "teacher" and which == "student" or entry == "student" and which == "teacher":
        raise ValueError(f"checkpoint {path!r} has no {which!r} entry (only {entry!r})")
    if any(k.startswith(which + ".backbone.") for k in sd):
        # one dict holding both networks as `student.backbone.*` / `teacher.backbone.*` (DINOv2's training
        # checkpoints model_*.rank_0.pth): keep the asked one
        sd = {k[len(which) + 1:]: v for k, v in sd.items() if k.startswith(which + ".")}
    elif any(k.startswith(("teacher.backbone.", "student.backbone.")) for k in sd):
        raise ValueError(f"checkpoint {path!r} holds no {which}.backbone.* weights")
    keys = {_strip(k) for k in sd}
    try:
        if any(k.startswith(("dinov2." + _HF_MARK, _HF_MARK)) for k in keys):
            flat = state_dict_from_transformers({k: v for k, v in sd.items() if not k.startswith("classifier.")})
            return _finish(_dinov2_from_flat(flat, f"transformers Dinov2 state dict {path}", num_heads, True), device)
        if "mask_token" in keys:
            flat, _ = canonical_backbone_state_dict(sd)
            return _finish(_dinov2_from_flat(flat, f"DINOv2 weights {path}", num_heads), device)
        if "pos_embed" in keys and "patch_embed.proj.weight" in keys:
            return _finish(_dino_v1(sd, path), device)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"checkpoint {path!r}: the weights do not fit the inferred model "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    shown = ", ".join(sorted(keys)[:6])
    raise ValueError(f"checkpoint {path!r}: unknown format (a state dict without ViT keys such as pos_embed, "
                     f"patch_embed.proj.weight or {_HF_MARK}; first keys: {shown})")


def _dino_v1(sd: Mapping[str, Tensor], path: str) -> FeatureModel:
    from ..eval.loading import infer_vit_arch
    from ..models.dino import build_backbone, load_official_weights

    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    arch, patch, img_size = infer_vit_arch(sd)
    model, dim = build_backbone(arch, patch_size=patch, img_size=img_size)
    load_official_weights(model, sd)
    model.eval()
    return FeatureModel(model, "dino", patch, dim, IMAGENET_MEAN, IMAGENET_STD, 224 // patch * patch,
                        source=f"DINO weights ({arch}/{patch}) {path}")


def _patch_size(model: nn.Module) -> int:
    p = getattr(model, "patch_size", None) or model.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def _finish(model: FeatureModel, device: torch.device) -> FeatureModel:
    return model.to(device).eval()
