"""The loss curve as a PNG, drawn with Pillow's ImageDraw (no matplotlib)."""
import math
from typing import Dict, Optional, Sequence

__all__ = ["plot_curve", "plot_panels"]


def _nice_ticks(lo: float, hi: float, n: int = 5):
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-12 * abs(hi):
        ticks.append(t)
        t += step
    return ticks


def _label(v: float) -> str:
    if v == 0:
        return "0"
    if float(v).is_integer() and abs(v) < 1e7:
        return str(int(v))
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.1e}"
    return f"{v:.3g}"


def plot_curve(xs: Sequence[float], ys: Sequence[float], path: str, title: str = "DINO loss",
               xlabel: str = "iteration", ylabel: str = "loss", smooth: Optional[int] = None,
               size=(800, 480)) -> str:
    """Line plot of ys against xs (raw in light grey, a moving average of `smooth` points in blue; default
    ~2% of the points), with axes, ticks and labels; saved as PNG at `path` (atomically). Non-finite points are
    skipped."""
    return _save_png(_draw_curve(xs, ys, title, xlabel, ylabel, smooth, size), path)


def plot_panels(xs: Sequence[float], series: Dict[str, Sequence[float]], path: str, title: str = "loss",
                xlabel: str = "iteration", size=(800, 260)) -> str:
    """One panel per named series (e.g. the total loss and each of its terms), stacked vertically, each drawn as
    plot_curve draws; saved as PNG at `path` (atomically)."""
    from PIL import Image

    panels = [_draw_curve(xs, ys, f"{title}: {name}" if name != title else name, xlabel, name, None, size)
              for name, ys in series.items()]
    sheet = Image.new("RGB", (size[0], size[1] * max(1, len(panels))), (255, 255, 255))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (0, i * size[1]))
    return _save_png(sheet, path)


def _save_png(img, path: str) -> str:
    from .checkpoint import atomic_write

    with atomic_write(path, "wb") as f:  # a kill mid-save leaves the previous picture, never a torn one
        img.save(f, format="PNG")
    return path


def _draw_curve(xs: Sequence[float], ys: Sequence[float], title: str, xlabel: str, ylabel: str,
                smooth: Optional[int], size):
    from PIL import Image, ImageDraw

    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(x)) and math.isfinite(float(y))]
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 70, 20, 36, 50
    d.text((left, 10), title, fill=(0, 0, 0))
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        if x1 == x0:
            x1 = x0 + 1
        if y1 == y0:
            y0, y1 = y0 - 0.5, y1 + 0.5
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad

        def px(x, y):
            return (left + (x - x0) / (x1 - x0) * (w - left - right),
                    h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

        for t in _nice_ticks(y0, y1):
            _, yy = px(x0, t)
            d.line([left - 4, yy, left, yy], fill=(0, 0, 0))
            d.line([left + 1, yy, w - right - 1, yy], fill=(235, 235, 235))
            d.text((4, yy - 6), _label(t), fill=(0, 0, 0))
        for t in _nice_ticks(x0, x1):
            xx, _ = px(t, y0)
            d.line([xx, h - bottom, xx, h - bottom + 4], fill=(0, 0, 0))
            d.text((xx - 10, h - bottom + 8), _label(t), fill=(0, 0, 0))
        d.text(((left + w - right) // 2 - 20, h - 18), xlabel, fill=(0, 0, 0))
        d.text((4, top - 16), ylabel, fill=(0, 0, 0))
        if len(pts) > 1:
            d.line([px(x, y) for x, y in pts], fill=(190, 190, 190), width=1)
        k = smooth if smooth is not None else max(1, len(pts) // 50)
        if k > 1 and len(pts) > k:
            avg, acc = [], 0.0
            for i, (_, y) in enumerate(pts):
                acc += y
                if i >= k:
                    acc -= pts[i - k][1]
                avg.append(acc / min(i + 1, k))
            d.line([px(pts[i][0], avg[i]) for i in range(len(pts))], fill=(31, 119, 180), width=2)
        elif len(pts) > 1:
            d.line([px(x, y) for x, y in pts], fill=(31, 119, 180), width=2)
        else:
            x, y = px(*pts[0])
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
    else:
        d.text((left + 10, top + 10), "no finite points", fill=(200, 0, 0))
    return img
