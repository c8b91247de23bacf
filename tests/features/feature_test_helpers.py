"""Tiny models and generated image folders for the features tests (imported by tests/features/test_*.py)."""
import os

import numpy as np
import torch
from PIL import Image

from dinokernels.models.dinov2 import DinoVisionTransformer


def tiny_dinov2(registers: int = 0, ffn: str = "mlp", embed_dim: int = 64, heads: int = 1, patch: int = 4,
                img: int = 16, depth: int = 2, chunks: int = 0, seed: int = 0) -> DinoVisionTransformer:
    """A random DINOv2 with the hub's interpolation settings for its register count (what the loader infers)."""
    torch.manual_seed(seed)
    model = DinoVisionTransformer(img_size=img, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads,
                                  mlp_ratio=4, init_values=1.0, ffn_layer=ffn, block_chunks=chunks,
                                  num_register_tokens=registers, interpolate_offset=0.0 if registers else 0.1,
                                  interpolate_antialias=registers > 0)
    with torch.no_grad():  # LayerScale and tokens away from their init so that the outputs depend on them
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "cls_token", "register_tokens")) or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def write_image_folder(root, classes=("a", "b"), per_class: int = 3, size=(20, 28), seed: int = 0,
                       formats=("png", "jpg")):
    """root/<class>/<i>.<fmt>: random colour images, each class a different mean colour. Returns the paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for ci, name in enumerate(classes):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            h, w = size if i % 2 == 0 else size[::-1]
            arr = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
            fmt = formats[i % len(formats)]
            path = os.path.join(folder, f"{i:03d}.{fmt}")
            Image.fromarray(arr).save(path)
            paths.append(path)
    return paths
