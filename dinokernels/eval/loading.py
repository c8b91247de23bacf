"""Backbones from checkpoints: this package's pretraining checkpoints and official DINO weight files."""
import argparse
import contextlib
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["load_backbone", "infer_vit_arch", "read_checkpoint"]

_VIT_SHAPES = {(128, 4): "vit_nano", (192, 12): "vit_tiny", (384, 12): "vit_small", (768, 12): "vit_base"}


def read_checkpoint(path: str) -> Dict[str, Any]:
    """torch.load(weights_only=True) of a checkpoint (argparse.Namespace allowed: official full checkpoints keep
    their arguments as one)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch ≥ 2.5
    with safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext():
        return torch.load(path, map_location="cpu", weights_only=True)


def infer_vit_arch(state_dict: Dict[str, torch.Tensor]) -> Tuple[str, int, int]:
    """(arch, patch_size, img_size) of a ViT backbone state dict with the official keys (prefixes allowed)."""
    from ..models.dino import strip_prefixes

    sd = strip_prefixes({k: v for k, v in state_dict.items() if not k.split(".", 2)[-1].startswith("head.")},
                        ("module.", "backbone."))
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError("cannot infer the architecture: no ViT keys (pos_embed, patch_embed.proj.weight); pass "
                         "--arch and --patch-size")
    dim = sd["pos_embed"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    arch = _VIT_SHAPES.get((dim, depth))
    if arch is None:
        raise ValueError(f"cannot infer the architecture of a ViT with width {dim} and depth {depth}; pass --arch")
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    n = sd["pos_embed"].shape[1] - 1
    return arch, patch, int(round(math.sqrt(n))) * patch


def load_backbone(path: str, which: str = "teacher", arch: Optional[str] = None,
                  patch_size: Optional[int] = None) -> Tuple[nn.Module, Optional[Any], Dict[str, Any]]:
    """(backbone in eval mode, PretrainConfig or None, the checkpoint dict) from `path`: a checkpoint written by
    `dinokernels pretrain` (DINO or DINOv2; its config rebuilds the model; `which` picks teacher or student), or
    an official DINO file (a plain backbone dict, or a full checkpoint whose `which` entry is used), whose
    architecture is inferred from its shapes unless arch / patch_size are given. Loading is strict."""
    from ..models.dino import build_backbone, extract_state_dict, load_official_weights
    from ..train.config import PretrainConfig
    from ..train.methods import DINOv2TrainingMethod, build_dinov2_backbone, dinov2_checkpoint_backbone
    from ..train.trainer import CHECKPOINT_FORMAT

    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    ckpt = read_checkpoint(path)
    config = None
    if isinstance(ckpt, dict) and ckpt.get("format") == DINOv2TrainingMethod.checkpoint_format:
        # a `dinokernels pretrain --method dinov2` checkpoint: "teacher" is the final model (the EMA teacher, or
        # the student EMA of a distillation run), "student" the student
        from ..models import dinov2

        config = PretrainConfig.from_dict(ckpt["config"])
        model, _ = build_dinov2_backbone(config.replace(arch=arch or config.arch,
                                                        patch_size=patch_size or config.patch_size), 0.0)
        dinov2.load_official_weights(model, dinov2_checkpoint_backbone(ckpt, which))
    elif isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        config = PretrainConfig.from_dict(ckpt["config"])
        model, _ = build_backbone(arch or config.arch, patch_size=patch_size or config.patch_size,
                                  img_size=config.global_size)
        load_official_weights(model, ckpt, checkpoint_key=which)
    else:
        key = None if not isinstance(ckpt, dict) or all(isinstance(v, torch.Tensor) for v in ckpt.values()) else which
        sd = extract_state_dict(ckpt, key)
        inferred_arch, inferred_patch, img_size = infer_vit_arch(sd) if arch is None or patch_size is None else \
            (arch, patch_size, 224)
        model, _ = build_backbone(arch or inferred_arch, patch_size=patch_size or inferred_patch, img_size=img_size)
        load_official_weights(model, sd)
    model.eval()
    return model, config, ckpt
