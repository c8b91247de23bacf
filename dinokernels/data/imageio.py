"""Image decoding to 8-bit RGB that keeps the picture for every PIL mode.

PIL's ``convert("RGB")`` clips 16-bit grey ("I;16*", and "I" as older Pillow opens 16-bit PNGs) to 0…255, so an
ordinary 16-bit PNG becomes almost white. Here high-bit-depth grey is scaled to the 8-bit range instead.
"""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

__all__ = ["to_rgb", "open_rgb"]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image → mode "RGB", 8 bits per channel.

    * 16-bit grey ("I;16", "I;16L", "I;16B", "I;16N"): value / 257 (65535 → 255), rounded.
    * 32-bit integer grey ("I"): the same scaling when any value exceeds 255 (a 16-bit image), else as is;
      negative values clip to 0.
    * float grey ("F"): values in [0, 1] are scaled by 255, larger ranges are taken as 0…255; NaN → 0.
    * everything else (L, LA, P, PA, RGBA, CMYK, YCbCr, LAB, HSV, 1): PIL's own conversion.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(img).__name__}")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img).astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(a.max()) if a.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and peak > 255):
            a = a / 257.0
        elif mode == "F" and peak <= 1.0:
            a = a * 255.0
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    with warnings.catch_warnings():
        # Palette images with transparency warn on conversion; harmless here.
        warnings.simplefilter("ignore", UserWarning)
        return img.convert("RGB")


def open_rgb(path) -> Image.Image:
    """Opens and fully decodes an image file as 8-bit RGB (``to_rgb``); the file is closed on return."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)
