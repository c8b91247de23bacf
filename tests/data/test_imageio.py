"""Decoding of high-bit-depth and unusual images to 8-bit RGB (16-bit PNGs used to come out white)."""
import numpy as np
import pytest
from PIL import Image

from dinokernels.data import ImageFolder
from dinokernels.data.imageio import open_rgb, to_rgb


def ramp16(h=16, w=32):
    return np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    a = ramp16()
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # PIL keeps the 16 bits
    rgb = np.asarray(open_rgb(path))
    assert rgb.shape == (16, 32, 3) and rgb.dtype == np.uint8
    expected = np.rint(a / 257.0).astype(np.uint8)
    for c in range(3):
        assert np.array_equal(rgb[..., c], expected)
    assert rgb.min() == 0 and rgb.max() == 255 and abs(rgb.mean() - 127.5) < 1  # PIL's convert gave ~254


def test_image_folder_and_transforms_read_16_bit(tmp_path):
    Image.fromarray(ramp16()).save(tmp_path / "a.png")
    img, _ = ImageFolder(str(tmp_path))[0]
    assert abs(np.asarray(img).mean() - 127.5) < 1


@pytest.mark.parametrize("mode", ["I", "F", "CMYK", "P", "LA", "RGBA", "1", "L"])
def test_other_modes(mode):
    base = Image.fromarray(np.linspace(0, 255, 64).reshape(8, 8).astype(np.uint8))
    if mode == "I":
        img = Image.fromarray(ramp16(8, 8).astype(np.int32), mode="I")
        expected = np.rint(ramp16(8, 8) / 257.0)
    elif mode == "F":
        img = Image.fromarray(np.linspace(0, 1, 64).reshape(8, 8).astype(np.float32), mode="F")
        expected = np.rint(np.linspace(0, 255, 64).reshape(8, 8))
    else:
        img = base.convert(mode)
        expected = None
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 8)
    if expected is not None:
        assert np.abs(np.asarray(out)[..., 0].astype(float) - expected).max() <= 1


def test_not_an_image():
    with pytest.raises(TypeError, match="PIL"):
        to_rgb(np.zeros((2, 2)))
