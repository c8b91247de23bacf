"""The curation run on folders of images (`dinokernels curate`, SPEC §3.12).

1. Embed the pool, the curated set and the optional evaluation set with the checkpoint (features.embed_folder:
   resumable shards under <out>/embeddings/<set>/; unreadable files are counted and listed, never fatal).
2. Threshold: `threshold` if given, else calibrated (dedup.calibrate_threshold) on synthetic copies of a sample
   of the pool written to <out>/calibration/images/ and embedded like the rest.
3. Pool images that copy an evaluation image are removed; the pool is deduplicated (k-NN graph above the
   threshold, connected components, the first path of each component kept).
4. Retrieval among the remaining pool images: `per_image` nearest per curated image, or with `clusters` the
   pool images of the k-means clusters the curated images fall in (`per_image` nearest of each, or all).
5. Outputs: manifest.jsonl (one line per pool file, sorted by path), summary.json, examples.png.

Everything after the embeddings is a deterministic function of them, so a killed run started again with the same
arguments reuses the finished shards and writes the same manifest. Outputs are written atomically at the end.
"""
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .dedup import calibrate_threshold, duplicate_components, eval_copies
from .search import EXACT_MAX, EXACT_PAIRS_MAX, available_backend, normalize_rows
from .select import retrieve_by_clusters, retrieve_nearest

__all__ = ["CurateConfig", "curate", "dry_run", "format_summary", "make_copies", "COPY_KINDS"]

COPY_KINDS = ("resize", "jpeg", "crop", "jitter", "combined")
FEATURES = ("cls", "patch_mean")


@dataclass
class CurateConfig:
    """Settings of one run (see `dinokernels curate --help`)."""
    pool: str
    curated: Optional[str]
    checkpoint: str
    out: str
    eval: Optional[str] = None
    threshold: Optional[float] = None
    eval_threshold: Optional[float] = None
    per_image: Optional[int] = None  # default 4 (nearest); all of the cluster (clusters)
    clusters: Optional[int] = None
    feature: str = "cls"
    neighbors: int = 16  # k of the deduplication graph
    calibration_images: int = 64
    image_size: Optional[int] = None
    batch_size: int = 32
    device: str = "cpu"
    which: str = "teacher"
    shard_size: int = 1024
    num_workers: int = 0
    backend: str = "auto"
    exact_max: int = EXACT_MAX
    nprobe: Optional[int] = None
    pq_bytes: Optional[int] = None
    seed: int = 0
    progress: bool = True
    examples: int = 4


@dataclass
class _Set:
    root: str
    files: List[str]  # every listed file, relative
    paths: List[str]  # embedded (readable) files, relative, listing order
    vectors: np.ndarray
    unreadable: List[Tuple[str, str]] = field(default_factory=list)


# ---- synthetic copies -----------------------------------------------------------------------------------------

def make_copies(image) -> Dict[str, Tuple[Any, str]]:
    """Copies of a PIL RGB image as a copy-detection benchmark would plant them: kind → (image, file format).
    resize: half size; jpeg: re-encoded at quality 40; crop: the centre 84% of each side; jitter: brightness
    ×1.15, contrast ×0.85, saturation ×1.2; combined: crop 90%, 0.6× size, mild jitter, JPEG quality 60."""
    from PIL import Image, ImageEnhance

    w, h = image.size

    def crop(img, keep):
        dx, dy = int(round(img.size[0] * (1 - keep) / 2)), int(round(img.size[1] * (1 - keep) / 2))
        return img.crop((dx, dy, img.size[0] - dx, img.size[1] - dy)) if dx or dy else img

    def jitter(img, b, c, s):
        img = ImageEnhance.Brightness(img).enhance(b)
        img = ImageEnhance.Contrast(img).enhance(c)
        return ImageEnhance.Color(img).enhance(s)

    half = image.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR)
    combined = crop(image, 0.9)
    combined = combined.resize((max(1, int(combined.size[0] * 0.6)), max(1, int(combined.size[1] * 0.6))),
                               Image.BILINEAR)
    return {"resize": (half, "PNG"), "jpeg": (image, "JPEG40"), "crop": (crop(image, 0.84), "PNG"),
            "jitter": (jitter(image, 1.15, 0.85, 1.2), "PNG"), "combined": (jitter(combined, 1.08, 0.92, 1.1),
                                                                            "JPEG60")}


def _save(image, fmt: str, path: str) -> None:
    # Written whole to a temporary name and renamed: a killed run never leaves half a copy (no fsync: the copies
    # are made again if lost).
    buf = io.BytesIO()
    if fmt.startswith("JPEG"):
        image.save(buf, "JPEG", quality=int(fmt[4:]))
    else:
        image.save(buf, "PNG", compress_level=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def _write_calibration_copies(pool: _Set, sample: np.ndarray, folder: str) -> List[Tuple[str, int, str]]:
    """Writes the copies of pool rows `sample` (skipping files already there: a resumed run) → [(relative file,
    sample position, kind)]."""
    from ..data.imageio import open_rgb

    out = []
    for pos, row in enumerate(sample):
        made = None
        for kind in COPY_KINDS:
            ext = ".jpg" if kind in ("jpeg", "combined") else ".png"
            rel = f"{kind}/{pos:05d}{ext}"
            path = os.path.join(folder, kind, f"{pos:05d}{ext}")
            if not os.path.isfile(path):
                if made is None:
                    made = make_copies(open_rgb(os.path.join(pool.root, *pool.paths[row].split("/"))))
                _save(*made[kind], path)
            out.append((rel, pos, kind))
    return out


def _forget_other_calibration(out: str, sample_paths: List[str]) -> None:
    """Copies are named by their position in the sample: a resumed run whose sample differs (another
    --calibration-images, a changed pool) must not compare old copies with new originals, so the calibration
    folder (copies and their embeddings) is made again. The sample's pool paths are kept beside it."""
    folder = os.path.join(out, "calibration")
    record = os.path.join(folder, "sample.json")
    previous = None
    if os.path.isfile(record):
        with open(record) as f:
            previous = json.load(f)
    if previous != sample_paths:
        for sub in (folder, os.path.join(out, "embeddings", "calibration")):
            if os.path.isdir(sub):
                shutil.rmtree(sub)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{record}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(sample_paths, f)
        os.replace(tmp, record)


# ---- the run --------------------------------------------------------------------------------------------------

def _embed(config: CurateConfig, model, root: str, name: str, log, on_batch=None) -> _Set:
    from ..features.embed import embed_folder, list_images, load_embeddings

    folder = os.path.join(config.out, "embeddings", name)
    result = embed_folder(config.checkpoint, root, folder, what=FEATURES, batch_size=config.batch_size,
                          image_size=config.image_size, device=config.device, which=config.which,
                          shard_size=config.shard_size, num_workers=config.num_workers, progress=config.progress,
                          model=model, on_batch=None if on_batch is None else (lambda n: on_batch(name, n)))
    paths, vectors = load_embeddings(folder, what=config.feature, absolute=False)
    log(f"{name}: {result.num_embedded} of {result.num_files} images embedded"
        + (f" ({result.resumed_files} from an earlier run)" if result.resumed_files else "")
        + (f", {len(result.unreadable)} unreadable" if result.unreadable else ""))
    return _Set(root, list_images(root), paths, normalize_rows(vectors, name), list(result.unreadable))


def _search_kwargs(config: CurateConfig) -> Dict[str, Any]:
    return {"backend": config.backend, "exact_max": config.exact_max, "nprobe": config.nprobe,
            "pq_bytes": config.pq_bytes, "seed": config.seed}


def _sample_rows(n: int, count: int) -> np.ndarray:
    """`count` rows spread evenly over 0..n-1 (deterministic)."""
    count = min(n, count)
    return np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))


def _check_config(config: CurateConfig) -> None:
    for name in ("pool", "curated", "eval"):
        root = getattr(config, name)
        if root is None:
            continue
        if not os.path.isdir(root):
            raise ValueError(f"{name} {root!r} is not a folder")
    if config.feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {config.feature!r}")
    for name in ("threshold", "eval_threshold"):
        value = getattr(config, name)
        if value is not None and not (np.isfinite(value) and -1.0 <= value <= 1.0):
            raise ValueError(f"{name} must be a cosine in [-1, 1], got {value!r}")
    for name in ("per_image", "clusters"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    available_backend(config.backend)


def curate(config: CurateConfig, log: Callable[[str], None] = print, model=None,
           on_batch: Optional[Callable[[str, int], None]] = None) -> Dict[str, Any]:
    """Runs the pipeline (module docstring) and returns the summary (also written to <out>/summary.json).
    model: the checkpoint's FeatureModel when already loaded; on_batch(set name, batches done): called during
    embedding (tests interrupt a run through it)."""
    from ..features.backbone import load_feature_model
    from ..train.checkpoint import atomic_write

    _check_config(config)
    t0 = time.perf_counter()
    timings: Dict[str, float] = {}
    if model is None:
        model = load_feature_model(config.checkpoint, which=config.which, device=config.device)
    pool = _embed(config, model, config.pool, "pool", log, on_batch)
    curated = _embed(config, model, config.curated, "curated", log, on_batch) if config.curated else None
    evals = _embed(config, model, config.eval, "eval", log, on_batch) if config.eval else None
    if curated is not None and not curated.paths:
        raise ValueError(f"curated {config.curated!r}: none of its {len(curated.files)} image files could be read")
    timings["embed_s"] = time.perf_counter() - t0
    n = len(pool.paths)
    if n == 0:
        raise ValueError(f"pool {config.pool!r}: none of its {len(pool.files)} image files could be read")
    search = _search_kwargs(config)

    t = time.perf_counter()
    calibration = None
    if config.threshold is not None:
        threshold, source = float(config.threshold), "--threshold"
    elif n < 2:
        threshold, source = 1.0, "single image (nothing to compare)"
    else:
        sample = _sample_rows(n, config.calibration_images)
        copy_dir = os.path.join(config.out, "calibration", "images")
        _forget_other_calibration(config.out, [pool.paths[row] for row in sample])
        copies = _write_calibration_copies(pool, sample, copy_dir)
        cal_set = _embed(config, model, copy_dir, "calibration", log, on_batch)
        where = {p: i for i, p in enumerate(cal_set.paths)}
        have = [(where[rel], pos, kind) for rel, pos, kind in copies if rel in where]
        if not have:
            raise ValueError("none of the calibration copies could be embedded")
        rows, owner, kinds = (list(x) for x in zip(*have))
        calibration = calibrate_threshold(pool.vectors, sample, cal_set.vectors[rows], owner, kinds,
                                          k=config.neighbors, **search)
        threshold, source = calibration.threshold, "calibrated"
    eval_threshold = float(config.eval_threshold) if config.eval_threshold is not None else threshold
    timings["calibrate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if evals is not None and len(evals.paths):
        is_eval_copy, eval_row, eval_sim = eval_copies(pool.vectors, evals.vectors, eval_threshold, **search)
    else:
        is_eval_copy, eval_row, eval_sim = np.zeros(n, bool), np.full(n, -1), np.full(n, np.nan, np.float32)
    dedup = duplicate_components(pool.vectors, threshold, k=config.neighbors, eligible=~is_eval_copy, **search)
    candidates = dedup.kept & ~is_eval_copy
    timings["dedup_s"] = time.perf_counter() - t

    t = time.perf_counter()
    selection = None
    if curated is not None and len(curated.paths):
        if config.clusters is not None:
            selection = retrieve_by_clusters(pool.vectors, curated.vectors, int(config.clusters), config.per_image,
                                             candidates, seed=config.seed, backend=config.backend)
        else:
            selection = retrieve_nearest(pool.vectors, curated.vectors, config.per_image or 4, candidates,
                                         **search)
    timings["retrieve_s"] = time.perf_counter() - t

    records = _manifest(pool, curated, evals, dedup, is_eval_copy, eval_row, eval_sim, selection)
    sizes = dedup.sizes
    summary = {
        "out": os.path.abspath(config.out), "pool": os.path.abspath(config.pool),
        "curated": config.curated and os.path.abspath(config.curated),
        "eval": config.eval and os.path.abspath(config.eval), "checkpoint": os.path.abspath(config.checkpoint),
        "model": getattr(model, "source", ""), "feature": config.feature,
        "threshold": round(threshold, 6), "threshold_source": source, "eval_threshold": round(eval_threshold, 6),
        "calibration": calibration.to_dict() if calibration is not None else None,
        "counts": {
            "pool_files": len(pool.files), "pool_unreadable": len(pool.unreadable), "pool_embedded": n,
            "curated_files": len(curated.files) if curated else 0,
            "curated_unreadable": len(curated.unreadable) if curated else 0,
            "eval_files": len(evals.files) if evals else 0, "eval_unreadable": len(evals.unreadable) if evals else 0,
            "eval_copies_removed": int(is_eval_copy.sum()),
            "duplicates_removed": int((~dedup.kept & ~is_eval_copy).sum()),
            "duplicate_groups": int((sizes > 1).sum()), "after_dedup": int(candidates.sum()),
            "retrieved": int(sum(r["reason"] == "retrieved" for r in records)),
            "kept": int(sum(r["kept"] for r in records)),
        },
        "dedup": {"neighbors": config.neighbors, "pairs_above_threshold": dedup.edges,
                  "search": _jsonable(dedup.info)},
        "retrieval": None if selection is None else _jsonable({k: v for k, v in selection.info.items()
                                                               if k != "query_cluster"}),
        "unreadable": {name: [{"path": p, "error": e} for p, e in s.unreadable]
                       for name, s in (("pool", pool), ("curated", curated), ("eval", evals)) if s and s.unreadable},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    os.makedirs(config.out, exist_ok=True)
    with atomic_write(os.path.join(config.out, "manifest.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    try:
        from .figure import draw_examples

        with atomic_write(os.path.join(config.out, "examples.png"), "wb") as f:
            draw_examples(f, pool, curated, dedup, is_eval_copy, selection, config.examples)
        summary["examples_png"] = os.path.join(config.out, "examples.png")
    except (OSError, ValueError) as e:  # a figure never fails the run
        summary["examples_png"] = None
        log(f"examples.png not written: {e}")
    summary["timings_s"]["total_s"] = round(time.perf_counter() - t0, 3)
    with atomic_write(os.path.join(config.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _round(x) -> Optional[float]:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def _manifest(pool: _Set, curated, evals, dedup, is_eval_copy, eval_row, eval_sim, selection) -> List[Dict]:
    sizes = dedup.sizes
    by_path: Dict[str, Dict] = {}
    for i, path in enumerate(pool.paths):
        comp = int(dedup.component[i])
        rec = {"path": path, "kept": False, "reason": "", "component": comp, "component_size": int(sizes[comp]),
               "cluster": None, "similarity": None}
        if selection is not None and selection.cluster[i] >= 0:
            rec["cluster"] = int(selection.cluster[i])
        if is_eval_copy[i]:
            rec["reason"] = f"copy of eval {evals.paths[eval_row[i]]}"
            rec["similarity"] = _round(eval_sim[i])
        elif not dedup.kept[i]:
            rec["reason"] = f"duplicate of {pool.paths[dedup.representative[i]]}"
            rec["similarity"] = _round(dedup.similarity[i])
        elif selection is None:
            rec["kept"], rec["reason"] = True, "unique"
        elif selection.selected[i]:
            rec["kept"], rec["reason"] = True, "retrieved"
            rec["similarity"] = _round(selection.similarity[i])
            rec["query"] = curated.paths[selection.query[i]]
        else:
            rec["reason"] = "not retrieved"
        by_path[path] = rec
    for path, error in pool.unreadable:
        by_path[path] = {"path": path, "kept": False, "reason": f"unreadable: {error}", "component": None,
                         "component_size": None, "cluster": None, "similarity": None}
    return [by_path[p] for p in sorted(by_path)]


# ---- dry run and the printed summary --------------------------------------------------------------------------

def dry_run(config: CurateConfig) -> Dict[str, Any]:
    """Counts only: the image files of each folder and what the run would do; reads no image, writes nothing."""
    from ..features.embed import list_images

    _check_config(config)
    counts = {name: len(list_images(root)) for name, root in (("pool", config.pool), ("curated", config.curated),
                                                              ("eval", config.eval)) if root}
    n = counts["pool"]
    backend = available_backend(config.backend)
    # The rule of search.knn_search for the deduplication (pool against itself).
    exact = backend == "torch" or n <= config.exact_max or n * n <= EXACT_PAIRS_MAX
    index = "exact" if exact else "IVF" + ("PQ" if config.pq_bytes else "")
    return {"dry_run": True, "files": counts, "search_backend": backend, "dedup_index": index,
            "threshold": config.threshold if config.threshold is not None else
            f"calibrated on {min(n, config.calibration_images)} images × {len(COPY_KINDS)} synthetic copies",
            "retrieval": (f"k-means, {config.clusters} clusters" if config.clusters else
                          f"{config.per_image or 4} nearest per curated image")}


def format_summary(summary: Dict[str, Any]) -> str:
    if summary.get("dry_run"):
        files = ", ".join(f"{k} {v}" for k, v in summary["files"].items())
        return (f"dry run: image files: {files}; search: {summary['search_backend']} ({summary['dedup_index']} "
                f"index for the pool); threshold: {summary['threshold']}; retrieval: {summary['retrieval']}")
    c = summary["counts"]
    lines = [f"pool: {c['pool_files']} files, {c['pool_embedded']} embedded, {c['pool_unreadable']} unreadable"]
    if c["curated_files"]:
        lines.append(f"curated: {c['curated_files']} files, {c['curated_unreadable']} unreadable")
    if c["eval_files"]:
        lines.append(f"eval: {c['eval_files']} files, {c['eval_unreadable']} unreadable")
    cal = summary.get("calibration")
    text = f"threshold used: {summary['threshold']:.4f} ({summary['threshold_source']})"
    if cal:
        text += (f": copies ≥ {cal['copy_low']:.4f} (5%), nearest distinct ≤ {cal['distinct_high']:.4f} (95%)")
        if not cal["separated"]:
            text += " — WARNING: copies and distinct images overlap for these features; consider --threshold"
    lines.append(text)
    search = summary["dedup"]["search"]
    index = f"{search.get('backend')} {search.get('index', '')}".strip()
    if search.get("recall") is not None:
        index += (f", recall@{search['k']} {search['recall']:.3f} vs exact on {search.get('recall_queries')} "
                  f"queries")
        if search.get("recall_above_threshold") is not None:
            index += f", above-threshold pairs found {search['recall_above_threshold']:.3f}"
    lines.append(f"dedup: {c['duplicates_removed']} duplicates removed in {c['duplicate_groups']} groups, "
                 f"{c['eval_copies_removed']} copies of eval images removed, {c['after_dedup']} left ({index})")
    if summary.get("retrieval"):
        r = summary["retrieval"]
        how = (f"{r['clusters']} k-means clusters, {r.get('curated_clusters', 0)} holding curated images"
               if r["mode"] == "clusters" else f"{r['per_image']} nearest per curated image")
        lines.append(f"retrieval: {c['retrieved']} retrieved ({how})")
    lines.append(f"kept: {c['kept']} of {c['pool_files']} pool files; manifest, summary and examples in "
                 f"{summary['out']}")
    return "\n".join(lines)
