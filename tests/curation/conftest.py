"""Planted-duplicate image folders and a feature checkpoint for the curation tests.

The checkpoint is an official-format DINOv2 weight file (loaded by features.load_feature_model like any released
one) whose weights are set, not trained: one 16×16 patch per 16-pixel image, the patch embedding the identity on
its 768 pixel values, zero position embedding, every block's LayerScale 0 (the blocks pass tokens through) and the
final LayerNorm plain. Its `patch_mean` feature is then the layer-normalised 16×16 thumbnail of the image — a
classic near-duplicate descriptor (invariant to brightness and contrast, tolerant of resizing, re-encoding and
small crops). A random-weight ViT is no substitute: measured on the scikit-image samples, distinct images reach
cosine 0.99 with its features, as high as cropped copies.
"""
import io
import os
import shutil

import numpy as np
import pytest

SKIMAGE_NAMES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "horse", "moon", "page", "clock", "coins",
                 "immunohistochemistry", "hubble_deep_field", "retina", "brick", "grass", "gravel", "colorwheel",
                 "logo", "binary_blobs", "checkerboard")
# Planted copies: (original, copy kind) → the pool file name of the copy.
COPY_KINDS = ("exact", "resized", "jpeg", "cropped", "jitter")


def skimage_images():
    """name → PIL RGB image of the scikit-image samples above (8-bit)."""
    import skimage.data as data
    from PIL import Image

    out = {}
    for name in SKIMAGE_NAMES:
        a = getattr(data, name)()
        a = np.asarray(a)
        if a.dtype != np.uint8:
            a = a.astype(np.float64)
            a = (255 * (a - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
        img = Image.fromarray(a)
        out[name] = img.convert("RGB")
    return out


def generated_images(count: int, seed: int = 0, size: int = 96):
    """Distinct generated images: a colour gradient under a few random ellipses and rectangles."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        y, x = np.mgrid[0:size, 0:size] / size
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * x + np.sin(angle) * y + 1) / 2
        base = (c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]).astype(np.uint8)
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.integers(0, size - 20, 2)
            w, h = rng.integers(12, size // 2, 2)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
        out[f"gen{i:02d}"] = img
    return out


def planted_copy(img, kind: str):
    """(image, format) of a copy of img: exact, resized (0.6×), jpeg (quality 30), cropped (centre 88% of each
    side), jitter (brightness 0.85, contrast 1.2, saturation 0.8)."""
    from PIL import Image, ImageEnhance

    w, h = img.size
    if kind == "exact":
        return img, "PNG"
    if kind == "resized":
        return img.resize((max(1, int(w * 0.6)), max(1, int(h * 0.6))), Image.LANCZOS), "PNG"
    if kind == "jpeg":
        return img, "JPEG"
    if kind == "cropped":
        dx, dy = int(w * 0.06), int(h * 0.06)
        return img.crop((dx, dy, w - dx, h - dy)), "PNG"
    if kind == "jitter":
        out = ImageEnhance.Brightness(img).enhance(0.85)
        out = ImageEnhance.Contrast(out).enhance(1.2)
        return ImageEnhance.Color(out).enhance(0.8), "PNG"
    raise ValueError(kind)


def save(img, fmt: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fmt == "JPEG":
        img.save(path, "JPEG", quality=30)
    else:
        img.save(path, "PNG")


def write_thumbnail_checkpoint(path: str) -> str:
    """The designed DINOv2 weight file of the module docstring."""
    import torch

    from dinokernels.models.dinov2 import DinoVisionTransformer

    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=16, patch_size=16, embed_dim=768, depth=1, num_heads=12,
                                  mlp_ratio=0.25, init_values=1.0, block_chunks=0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    eye = torch.zeros(768, 3, 16, 16)
    eye.view(768, -1)[torch.arange(768), torch.arange(768)] = 1.0
    sd["patch_embed.proj.weight"] = eye
    sd["patch_embed.proj.bias"] = torch.zeros(768)
    for key in sd:
        if key.endswith(("ls1.gamma", "ls2.gamma")) or key in ("pos_embed", "cls_token", "mask_token"):
            sd[key] = torch.zeros_like(sd[key])
    sd["norm.weight"], sd["norm.bias"] = torch.ones(768), torch.zeros(768)
    torch.save(sd, path)
    return path


@pytest.fixture(scope="session")
def thumbnail_checkpoint(tmp_path_factory):
    return write_thumbnail_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "thumbnail_dinov2.pth"))


@pytest.fixture(scope="session")
def planted_folders(tmp_path_factory):
    """pool/, curated/, eval/ with planted copies. Returns (root, expectations dict):

    duplicates: {copy file: original file} — the copies that must be removed (exactly these);
    eval_copies: {pool file: eval file}; retrieved: {curated file: planted pool neighbour}; unreadable: [files]."""
    root = str(tmp_path_factory.mktemp("planted"))
    sk = skimage_images()
    gen = generated_images(10)
    pool, curated, evals = (os.path.join(root, d) for d in ("pool", "curated", "eval"))
    expect = {"duplicates": {}, "eval_copies": {}, "retrieved": {}, "unreadable": []}
    # Originals in the pool: every scikit-image sample but two, and 8 generated images.
    for name in list(sk)[:-2]:
        save(sk[name], "PNG", os.path.join(pool, f"{name}.png"))
    for name in list(gen)[:8]:
        save(gen[name], "PNG", os.path.join(pool, f"{name}.png"))
    # Planted copies (names sort after their originals, so the original is the one kept).
    plants = [("astronaut", "exact"), ("astronaut", "jpeg"), ("camera", "resized"), ("coffee", "cropped"),
              ("chelsea", "jitter"), ("rocket", "jpeg"), ("gen00", "resized"), ("gen01", "cropped"),
              ("gen02", "jitter"), ("horse", "exact")]
    images = {**sk, **gen}
    for name, kind in plants:
        img, fmt = planted_copy(images[name], kind)
        rel = f"{name}_{kind}.{'jpg' if fmt == 'JPEG' else 'png'}"
        save(img, fmt, os.path.join(pool, rel))
        expect["duplicates"][rel] = f"{name}.png"
    # Evaluation set: two images not otherwise in the pool, each planted in the pool as a re-encoded copy.
    for name in list(sk)[-2:]:
        save(sk[name], "PNG", os.path.join(evals, f"{name}.png"))
        img, fmt = planted_copy(sk[name], "jpeg")
        save(img, fmt, os.path.join(pool, f"zz_{name}_evalcopy.jpg"))
        expect["eval_copies"][f"zz_{name}_evalcopy.jpg"] = f"{name}.png"
    save(gen["gen08"], "PNG", os.path.join(evals, "gen08.png"))  # an eval image with no copy in the pool
    # Curated set: two images whose only copy in the pool is a planted near neighbour.
    for name in ("gen09",):
        save(gen[name], "PNG", os.path.join(curated, f"{name}.png"))
        img, fmt = planted_copy(gen[name], "cropped")
        save(img, fmt, os.path.join(pool, f"{name}_neighbour.png"))
        expect["retrieved"][f"{name}.png"] = f"{name}_neighbour.png"
    img, fmt = planted_copy(sk["moon"], "resized")
    save(img, fmt, os.path.join(curated, "moon_small.png"))
    expect["retrieved"]["moon_small.png"] = "moon.png"
    # Unreadable files in the pool: an empty file and a truncated PNG.
    open(os.path.join(pool, "broken_empty.png"), "wb").close()
    buf = io.BytesIO()
    gen["gen07"].save(buf, "PNG")
    with open(os.path.join(pool, "broken_truncated.png"), "wb") as f:
        f.write(buf.getvalue()[:200])
    expect["unreadable"] = ["broken_empty.png", "broken_truncated.png"]
    return root, expect


def copy_tree(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst
