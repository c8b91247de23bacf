"""examples.png of a curation run: a few duplicate groups (kept image first) and a few curated images with the
pool images they retrieved, as rows of thumbnails with their cosine similarity underneath."""
import os
from typing import List, Optional, Tuple

import numpy as np

__all__ = ["draw_examples"]

_THUMB = 96
_CAPTION = 14
_LABEL = 150
_PER_ROW = 6


def _thumb(root: str, rel: str):
    from PIL import Image

    from ..data.imageio import open_rgb

    try:
        image = open_rgb(os.path.join(root, *rel.split("/")))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return Image.new("RGB", (_THUMB, _THUMB), (90, 0, 0))
    image.thumbnail((_THUMB, _THUMB))
    return image


def _rows(pool, curated, dedup, is_eval_copy, selection, examples: int) -> List[Tuple[str, list]]:
    rows = []
    sizes = dedup.sizes
    groups = [c for c in np.argsort(-sizes, kind="stable") if sizes[c] > 1][:examples]
    for c in groups:
        members = np.flatnonzero(dedup.component == c)
        members = sorted(members, key=lambda i: (not dedup.kept[i], i))[:_PER_ROW]
        cells = [(pool.root, pool.paths[i], "kept" if dedup.kept[i] else
                  ("eval copy" if is_eval_copy[i] else f"{dedup.similarity[i]:.3f}")) for i in members]
        rows.append((f"duplicates ({sizes[c]})", cells))
    if selection is not None and curated is not None:
        queries = [q for q in dict.fromkeys(selection.query[selection.selected].tolist())][:examples]
        for q in queries:
            got = np.flatnonzero(selection.selected & (selection.query == q))
            got = got[np.argsort(-selection.similarity[got], kind="stable")][:_PER_ROW - 1]
            cells = [(curated.root, curated.paths[q], "curated")]
            cells += [(pool.root, pool.paths[i], f"{selection.similarity[i]:.3f}") for i in got]
            rows.append(("retrieved", cells))
    return rows


def draw_examples(fileobj, pool, curated, dedup, is_eval_copy, selection, examples: int = 4) -> None:
    """Writes the PNG to `fileobj` (a binary file)."""
    from PIL import Image, ImageDraw

    rows = _rows(pool, curated, dedup, is_eval_copy, selection, examples)
    height = max(1, len(rows)) * (_THUMB + _CAPTION + 6) + 6
    widest = max([len(cells) for _, cells in rows] + [2])
    canvas = Image.new("RGB", (_LABEL + widest * (_THUMB + 6) + 6, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if not rows:
        draw.text((6, 6), "no duplicate groups and nothing retrieved", fill=(0, 0, 0))
    for r, (label, cells) in enumerate(rows):
        y = 6 + r * (_THUMB + _CAPTION + 6)
        draw.text((6, y + _THUMB // 2 - 6), label, fill=(0, 0, 0))
        for c, (root, rel, caption) in enumerate(cells):
            x = _LABEL + c * (_THUMB + 6)
            thumb = _thumb(root, rel)
            canvas.paste(thumb, (x + (_THUMB - thumb.size[0]) // 2, y + (_THUMB - thumb.size[1]) // 2))
            draw.text((x, y + _THUMB + 2), caption[:16], fill=(0, 0, 0))
    canvas.save(fileobj, "PNG")
