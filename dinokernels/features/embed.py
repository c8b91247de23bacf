"""Embedding a folder of images into resumable shards.

Layout of an output folder (docs/features.md):

* `meta.json` — the settings (checkpoint fingerprint, `which`, kinds, image size, resize, normalisation, shard
  size), the number and a hash of the listed files, the column ranges of each kind, and `complete`.
* `shard_00000.npy` … — float32 or float16 (rows, F): one row per readable image of that shard, the vector kinds
  side by side in the order cls, patch_mean (`columns` in meta.json gives each kind's range).
* `patch_00000.npy` … — (rows, h, w, D) patch tokens in the same dtype, when asked for.
* `manifest.jsonl` — one line per listed file: `path` (relative to the data folder), `shard`, `row`, `status`
  ("ok" or "unreadable") and, for unreadable files, `error`.

Shard k covers files k·S … (k+1)·S − 1 of the sorted listing (S = shard_size). A shard's arrays are written
atomically first, then its manifest lines in one append: the manifest names only finished shards, so a killed run
restarts at the first shard it lacks, and a shard file without manifest lines is simply rewritten.
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .backbone import FEATURE_KINDS, FeatureModel, checkpoint_fingerprint, load_feature_model

__all__ = ["IMAGE_EXTENSIONS", "list_images", "embed_folder", "load_embeddings", "load_patch_tokens",
           "EmbedResult", "EMBEDDINGS_FORMAT", "read_meta", "default_resize", "OutputFolderError"]

EMBEDDINGS_FORMAT = "dinokernels.embeddings.v1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
VECTOR_KINDS = ("cls", "patch_mean")
DEFAULT_SHARD_SIZE = 1024
# Settings that must match when a run resumes (anything else may change between runs).
_RESUME_KEYS = ("checkpoint_fingerprint", "which", "what", "image_size", "resize", "mean", "std", "shard_size",
                "num_files", "files_sha256", "embed_dim", "patch_size", "dtype")
STORAGE_DTYPES = ("float32", "float16")


class OutputFolderError(ValueError):
    """The output folder cannot take this run: another run's settings, or files that are not an embed output."""


@dataclass
class EmbedResult:
    out_dir: str
    num_files: int
    num_embedded: int
    unreadable: List[Tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    shards: int = 0
    resumed_files: int = 0  # files already done by an earlier run
    seconds: float = 0.0


def list_images(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[str]:
    """Image files under `root` (recursive, symlinked folders followed once, hidden names skipped), as sorted
    paths relative to `root` with "/" separators. Extensions are matched case-insensitively."""
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"image folder {root!r}: no such folder")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"image folder {root!r} is a file, not a folder")
    exts = tuple(e.lower() for e in extensions)
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(exts):
                found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(found)


def default_resize(image_size: int) -> int:
    """The shorter side before the centre crop: DINO's evaluation ratio 256/224."""
    return int(round(image_size * 256 / 224))


def read_meta(out_dir: str) -> Dict:
    path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"embeddings folder {out_dir!r} has no meta.json: not an `embed` output")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"embeddings folder {out_dir!r}: meta.json cannot be read ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != EMBEDDINGS_FORMAT:
        raise ValueError(f"embeddings folder {out_dir!r}: meta.json is not a {EMBEDDINGS_FORMAT} file")
    return meta


def _read_manifest(out_dir: str) -> List[Dict]:
    from ..train.progress import JsonlLog

    path = os.path.join(out_dir, "manifest.jsonl")
    return JsonlLog.read(path) if os.path.exists(path) else []


def _shard_name(prefix: str, k: int) -> str:
    return f"{prefix}_{k:05d}.npy"


class _ShardImages(torch.utils.data.Dataset):
    """(image tensor or None, index, error) for files of one shard; decoding failures are returned, never raised."""

    def __init__(self, root: str, files: List[str], transform):
        self.root, self.files, self.transform = root, files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        from ..data.imageio import open_rgb

        try:
            img = open_rgb(os.path.join(self.root, self.files[i]))
            return self.transform(img), i, ""
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as e:
            return None, i, (" ".join(str(e).split()) or type(e).__name__)[:200]


def _collate(items):
    return items


def _write_npy(path: str, array: np.ndarray) -> None:
    from ..train.checkpoint import atomic_write

    with atomic_write(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array))


def embed_folder(checkpoint: str, data: str, out_dir: str, what: Sequence[str] = ("cls",), batch_size: int = 32,
                 image_size: Optional[int] = None, resize: Optional[int] = None, device="cpu",
                 which: str = "teacher", shard_size: int = DEFAULT_SHARD_SIZE, num_workers: int = 0,
                 progress: bool = True, model: Optional[FeatureModel] = None,
                 on_batch: Optional[Callable[[int], None]] = None, log=None, dtype: str = "float32"
                 ) -> EmbedResult:
    """Embeds every image under `data` (list_images) with the checkpoint's FeatureModel into `out_dir` (layout in
    the module docstring), resuming a run found there.

    what: any of "cls", "patch_mean", "patch_tokens". image_size: side of the centre crop (a multiple of the
    patch size; default the model's default_image_size), after resizing the shorter side to `resize` (default
    256/224 of it). `model`: an already loaded FeatureModel for `checkpoint` (the checkpoint path is still
    needed: its fingerprint guards resumes). `on_batch(n)`: called after each batch with the number of batches
    done in this call (tests interrupt a run through it). dtype: "float32" or "float16" (half the disk; the
    features are computed in float32 and rounded when stored). Unreadable files are counted, listed in the manifest
    and skipped. Resuming with other settings (checkpoint, which, kinds, sizes, shard size, file listing) raises
    ValueError naming them."""
    from ..data.transforms import EvalTransform
    from ..train.progress import ProgressBar

    t0 = time.perf_counter()
    what = list(dict.fromkeys(what))
    bad = [w for w in what if w not in FEATURE_KINDS]
    if not what or bad:
        raise ValueError(f"what must be one or more of {list(FEATURE_KINDS)}, got {list(what) if what else []}")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be ≥ 0, got {num_workers!r}")
    files = list_images(data)
    if not files:
        raise ValueError(f"image folder {data!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"output {out_dir!r} is a file, not a folder")
    fingerprint = checkpoint_fingerprint(checkpoint)
    if model is None:
        model = load_feature_model(checkpoint, which=which, device=device)
    device = next(model.parameters()).device
    image_size = int(image_size or model.default_image_size)
    if image_size < model.patch_size or image_size % model.patch_size:
        lower = max(model.patch_size, image_size // model.patch_size * model.patch_size)
        raise ValueError(f"image_size {image_size} is not a multiple of the model's patch size {model.patch_size} "
                         f"(e.g. {lower})")
    resize = int(resize or default_resize(image_size))
    if resize < image_size:
        raise ValueError(f"resize {resize} is smaller than image_size {image_size}: the centre crop would be padded")
    vector_kinds = [k for k in VECTOR_KINDS if k in what]
    D = model.embed_dim
    columns = {k: [i * D, (i + 1) * D] for i, k in enumerate(vector_kinds)}
    meta = {"format": EMBEDDINGS_FORMAT, "checkpoint": os.path.abspath(checkpoint),
            "checkpoint_fingerprint": fingerprint, "which": which, "model": model.source,
            "what": sorted(what), "columns": columns, "patch_tokens": "patch_tokens" in what,
            "image_size": image_size, "resize": resize, "mean": list(model.mean), "std": list(model.std),
            "embed_dim": D, "patch_size": model.patch_size, "shard_size": shard_size,
            "data": os.path.abspath(data), "num_files": len(files),
            "files_sha256": hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest(), "dtype": dtype,
            "complete": False}

    os.makedirs(out_dir, exist_ok=True)
    done_shards = _check_resume(out_dir, meta, files)
    from ..train.checkpoint import atomic_write

    with atomic_write(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)

    transform = EvalTransform(resize, image_size, model.mean, model.std)
    manifest = os.path.join(out_dir, "manifest.jsonl")
    n_shards = (len(files) + shard_size - 1) // shard_size
    resumed_files = sum(min(shard_size, len(files) - k * shard_size) for k in done_shards)
    bar = ProgressBar(len(files), start_iter=resumed_files, enabled=progress)
    done_files, batches, unreadable = resumed_files, 0, []
    for rec in _read_manifest(out_dir):
        if rec.get("status") == "unreadable":
            unreadable.append((rec["path"], rec.get("error", "")))
    try:
        for k in range(n_shards):
            if k in done_shards:
                continue
            shard_files = files[k * shard_size:(k + 1) * shard_size]
            loader = torch.utils.data.DataLoader(_ShardImages(data, shard_files, transform), batch_size=batch_size,
                                                 shuffle=False, num_workers=num_workers, collate_fn=_collate)
            vectors, patches, rows = [], [], {}
            errors: Dict[int, str] = {}
            for items in loader:
                good = [(t, i) for t, i, _ in items if t is not None]
                for t, i, err in items:
                    if t is None:
                        errors[i] = err
                if good:
                    images = torch.stack([t for t, _ in good]).to(device)
                    out = model.forward_features(images)
                    parts = [out[kind].float() for kind in vector_kinds]
                    vectors.append(torch.cat(parts, 1).cpu().numpy() if parts else
                                   np.zeros((len(good), 0), np.float32))
                    if "patch_tokens" in what:
                        patches.append(out["patch_tokens"].float().cpu().numpy())
                    for _, i in good:
                        rows[i] = len(rows)
                done_files += len(items)
                batches += 1
                bar.update(done_files, 0, 1, {"unreadable": len(unreadable) + len(errors)})
                if on_batch is not None:
                    on_batch(batches)
            grid = image_size // model.patch_size
            _write_npy(os.path.join(out_dir, _shard_name("shard", k)),
                       (np.concatenate(vectors) if vectors else np.zeros((0, D * len(vector_kinds)))).astype(dtype))
            if "patch_tokens" in what:
                _write_npy(os.path.join(out_dir, _shard_name("patch", k)),
                           (np.concatenate(patches) if patches else np.zeros((0, grid, grid, D))).astype(dtype))
            lines = []
            for i, rel in enumerate(shard_files):
                if i in rows:
                    lines.append({"path": rel, "shard": k, "row": rows[i], "status": "ok"})
                else:
                    lines.append({"path": rel, "shard": k, "row": None, "status": "unreadable",
                                  "error": errors.get(i, "")})
                    unreadable.append((rel, errors.get(i, "")))
            _append_lines(manifest, lines)
        if done_files > resumed_files:  # the last line, whatever the bar's interval
            bar.update(done_files, 0, 1, {"unreadable": len(unreadable)}, force=True)
    finally:
        bar.close()
    meta["complete"] = True
    with atomic_write(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if unreadable and log is not None:
        log(f"{len(unreadable)} unreadable file(s) skipped, listed in {os.path.join(out_dir, 'manifest.jsonl')}")
    return EmbedResult(out_dir=out_dir, num_files=len(files), num_embedded=len(files) - len(unreadable),
                       unreadable=unreadable, shards=n_shards, resumed_files=resumed_files,
                       seconds=time.perf_counter() - t0)


def _append_lines(path: str, lines: List[Dict]) -> None:
    """All lines of a shard in one O_APPEND write: a kill leaves the shard's lines all there, or a cut last line
    that the reader skips (the shard then counts as unfinished and is redone)."""
    data = "".join(json.dumps(rec) + "\n" for rec in lines).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)


def _check_resume(out_dir: str, meta: Dict, files: List[str]) -> set:
    """The shards an earlier run in `out_dir` finished (their manifest lines all present); the manifest is cut back
    to those. A folder with other contents, or an earlier run with other settings, is an error."""
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.exists(meta_path):
        leftovers = [n for n in os.listdir(out_dir) if not n.startswith(".")]
        if leftovers:
            raise OutputFolderError(f"output folder {out_dir!r} is not empty and holds no meta.json (found "
                             f"{', '.join(sorted(leftovers)[:5])}): give a new or empty folder")
        return set()
    old = read_meta(out_dir)
    diffs = [f"{k}: {_short(old.get(k))} before, {_short(meta[k])} now" for k in _RESUME_KEYS
             if old.get(k) != meta[k]]
    if diffs:
        raise OutputFolderError(f"output folder {out_dir!r} holds embeddings made with other settings ({'; '.join(diffs)}); "
                         f"resume with the same checkpoint and options, or give another output folder")
    shard_size = meta["shard_size"]
    by_shard: Dict[int, List[Dict]] = {}
    for rec in _read_manifest(out_dir):
        if isinstance(rec.get("shard"), int):
            by_shard.setdefault(rec["shard"], []).append(rec)
    done = set()
    for k, recs in by_shard.items():
        expected = files[k * shard_size:(k + 1) * shard_size]
        have_files = os.path.exists(os.path.join(out_dir, _shard_name("shard", k))) and (
            not meta["patch_tokens"] or os.path.exists(os.path.join(out_dir, _shard_name("patch", k))))
        if have_files and sorted(r.get("path") for r in recs) == sorted(expected) and len(recs) == len(expected):
            done.add(k)
    kept = [rec for k in sorted(done) for rec in by_shard[k]]
    from ..train.checkpoint import atomic_write

    with atomic_write(os.path.join(out_dir, "manifest.jsonl"), "w") as f:
        f.write("".join(json.dumps(rec) + "\n" for rec in kept))
    return done


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _ok_records(out_dir: str, allow_partial: bool) -> Tuple[Dict, List[Dict]]:
    meta = read_meta(out_dir)
    if not meta.get("complete") and not allow_partial:
        raise ValueError(f"embeddings folder {out_dir!r} is incomplete (the run was interrupted): run embed again "
                         f"with the same options to finish it")
    recs = [r for r in _read_manifest(out_dir) if r.get("status") == "ok"]
    recs.sort(key=lambda r: (r["shard"], r["row"]))
    return meta, recs


def _stack(out_dir: str, prefix: str, recs: List[Dict]) -> np.ndarray:
    parts = []
    rows_of_shard: Dict[int, List[int]] = {}  # grouped once: a scan of every record per shard is quadratic
    for r in recs:  # recs are sorted by (shard, row)
        rows_of_shard.setdefault(r["shard"], []).append(r["row"])
    for k, rows in sorted(rows_of_shard.items()):
        path = os.path.join(out_dir, _shard_name(prefix, k))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"embeddings folder {out_dir!r}: {_shard_name(prefix, k)} is missing")
        arr = np.load(path, mmap_mode="r")
        if rows and max(rows) >= arr.shape[0]:
            raise ValueError(f"embeddings folder {out_dir!r}: {_shard_name(prefix, k)} has {arr.shape[0]} rows, "
                             f"the manifest names row {max(rows)}")
        parts.append(np.asarray(arr[rows]))
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def load_embeddings(out_dir: str, what: Optional[Union[str, Sequence[str]]] = None, absolute: bool = True,
                    allow_partial: bool = False) -> Tuple[List[str], np.ndarray]:
    """(paths, features (N, F) float32, whatever the stored dtype) of the readable images of an `embed` output
    folder, in listing order.
    paths: absolute (the data folder joined with the manifest path) unless `absolute=False`. what: None for all
    stored vector kinds side by side, or "cls" / "patch_mean" (or a list) for those columns only. An interrupted
    run raises unless allow_partial."""
    meta, recs = _ok_records(out_dir, allow_partial)
    columns = meta["columns"]
    if not columns:
        raise ValueError(f"embeddings folder {out_dir!r} holds patch tokens only (no cls / patch_mean vectors); "
                         f"use load_patch_tokens")
    kinds = list(columns) if what is None else ([what] if isinstance(what, str) else list(what))
    missing = [k for k in kinds if k not in columns]
    if missing:
        raise ValueError(f"embeddings folder {out_dir!r} has no {', '.join(missing)} features (it holds "
                         f"{', '.join(columns)})")
    array = _stack(out_dir, "shard", recs)
    if not recs:
        array = np.zeros((0, sum(columns[k][1] - columns[k][0] for k in kinds)), np.float32)
    elif kinds != list(columns):
        array = np.concatenate([array[:, columns[k][0]:columns[k][1]] for k in kinds], 1)
    return _paths(meta, recs, absolute), np.ascontiguousarray(array, dtype=np.float32)


def load_patch_tokens(out_dir: str, absolute: bool = True, allow_partial: bool = False
                      ) -> Tuple[List[str], np.ndarray]:
    """(paths, patch tokens (N, h, w, D) float32) of an `embed` output made with patch_tokens."""
    meta, recs = _ok_records(out_dir, allow_partial)
    if not meta.get("patch_tokens"):
        raise ValueError(f"embeddings folder {out_dir!r} holds no patch tokens (embed with what patch_tokens)")
    array = _stack(out_dir, "patch", recs)
    if not recs:
        g = meta["image_size"] // meta["patch_size"]
        array = np.zeros((0, g, g, meta["embed_dim"]), np.float32)
    return _paths(meta, recs, absolute), np.ascontiguousarray(array, dtype=np.float32)


def _paths(meta: Dict, recs: List[Dict], absolute: bool) -> List[str]:
    if not absolute:
        return [r["path"] for r in recs]
    return [os.path.join(meta["data"], *r["path"].split("/")) for r in recs]
