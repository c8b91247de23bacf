"""The evaluation that ends `dinokernels pretrain` and makes `dinokernels knn`: weighted k-NN (and a linear probe)
of the learned teacher features, of the same architecture at random initialisation and of raw pixels, plus the
teacher-output entropy that tells a healthy run from a collapsed one."""
import math
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .knn import extract_features, knn_classifier
from .linear import linear_probe

__all__ = ["evaluate_features", "evaluate_pretraining", "teacher_entropy", "format_table", "collapse_verdict",
           "summary_keys", "random_init_backbone", "dataset_name", "run_description"]

_MAX_CACHED_VALUES = 200_000_000  # images kept in memory for the raw-pixel baseline (≈ 800 MB of float32) at most


def _loader(dataset, batch_size: int = 256, num_workers: int = 0, device: str = "cpu") -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=str(device).startswith("cuda"), drop_last=False)


def _images_and_labels(dataset, num_workers: int = 0):
    images, labels = [], []
    for x, y in _loader(dataset, num_workers=num_workers):
        images.append(x)
        labels.append(torch.as_tensor(y).view(-1))
    return torch.cat(images), torch.cat(labels).long()


def _batches(images: Tensor, labels: Tensor, batch_size: int = 256):
    for i in range(0, images.shape[0], batch_size):
        yield images[i:i + batch_size], labels[i:i + batch_size]


def _small(dataset) -> bool:
    x, _ = dataset[0]
    return len(dataset) * x.numel() <= _MAX_CACHED_VALUES


@torch.no_grad()
def teacher_entropy(teacher: nn.Module, data, center: Optional[Tensor], teacher_temp: float,
                    device="cpu") -> Dict[str, float]:
    """The teacher's target distribution p = softmax((z − center)/τ_t) over the images of `data` (batches of
    (images, labels)): mean per-image entropy H(p) and entropy of the mean distribution H(p̄), in nats, with ln K.
    A healthy run has H(p) well below ln K (confident targets) and H(p̄) well above 0 (many prototypes in use);
    collapse to one prototype gives H(p̄) ≈ 0, collapse to the uniform distribution gives H(p) ≈ ln K."""
    from ..ops import softmax_center

    was_training = teacher.training
    teacher.eval()
    total_h, n, mean_p = 0.0, 0, None
    try:
        for images, _ in data:
            z = teacher(images.to(device)).float()
            c = torch.zeros(1, z.shape[1], device=z.device) if center is None else center.to(z.device).float()
            p = softmax_center(z.contiguous(), c.reshape(1, -1).contiguous(), float(teacher_temp))
            h = -(p * torch.log(p.clamp_min(1e-30))).sum(1)
            total_h += float(h.sum())
            n += p.shape[0]
            s = p.sum(0).double()
            mean_p = s if mean_p is None else mean_p + s
    finally:
        teacher.train(was_training)
    mean_p = (mean_p / n).clamp_min(1e-300)
    k = mean_p.shape[0]
    return {"teacher_entropy": total_h / n, "teacher_mean_entropy": float(-(mean_p * mean_p.log()).sum()),
            "ln_K": math.log(k), "teacher_temp": float(teacher_temp)}


def collapse_verdict(entropy: Dict[str, float]) -> str:
    """'ok', 'collapsed to one prototype' or 'collapsed to uniform' from teacher_entropy's numbers."""
    ln_k = entropy["ln_K"]
    if entropy["teacher_mean_entropy"] < 0.1 * ln_k:
        return "collapsed to one prototype"
    if entropy["teacher_entropy"] > 0.9 * ln_k:
        return "collapsed to uniform"
    return "ok"


def evaluate_features(backbones: Dict[str, nn.Module], train_set, test_set, device="cpu", k: int = 20,
                      T: float = 0.07, raw_pixels: bool = True, linear: bool = True,
                      num_workers: int = 0) -> Dict[str, Dict[str, float]]:
    """{name: {"knn": top-1 in [0, 1], "knn_top5": ..., "linear": ...}} for each backbone (features of the test
    set classified against those of the train set) and, when `raw_pixels` and the images fit in memory, for
    "raw pixels" (the flattened, normalised evaluation images)."""
    cached = _small(train_set) and _small(test_set)
    if cached:
        train_x, train_y = _images_and_labels(train_set, num_workers)
        test_x, test_y = _images_and_labels(test_set, num_workers)
    results: Dict[str, Dict[str, float]] = {}
    items = list(backbones.items())
    for name, model in items:
        model = model.to(device)
        if cached:
            ftr, ltr = extract_features(model, _batches(train_x, train_y), device)
            fte, lte = extract_features(model, _batches(test_x, test_y), device)
        else:
            ftr, ltr = extract_features(model, _loader(train_set, num_workers=num_workers, device=device), device)
            fte, lte = extract_features(model, _loader(test_set, num_workers=num_workers, device=device), device)
        results[name] = _scores(ftr, ltr, fte, lte, k, T, linear)
    if raw_pixels and cached:
        ftr = torch.nn.functional.normalize(train_x.flatten(1).float(), dim=1)
        fte = torch.nn.functional.normalize(test_x.flatten(1).float(), dim=1)
        results["raw pixels"] = _scores(ftr, train_y, fte, test_y, k, T, linear)
    return results


def _scores(ftr, ltr, fte, lte, k, T, linear) -> Dict[str, float]:
    top1, top5 = knn_classifier(ftr, ltr, fte, lte, k=k, T=T)
    out = {"knn": top1 / 100.0, "knn_top5": top5 / 100.0}
    if linear:
        out["linear"] = linear_probe(ftr, ltr, fte, lte)
    return out


def format_table(results: Dict[str, Dict[str, float]], entropy: Optional[Dict[str, float]] = None,
                 k: int = 20, title: Optional[str] = None) -> str:
    """The table printed at the end of pretraining (plain text, aligned)."""
    has_linear = any("linear" in r for r in results.values())
    head = ["features", f"k-NN top-1 (k={k})"] + (["linear probe"] if has_linear else [])
    rows = [[name, f"{r['knn'] * 100:.1f}%"] + ([f"{r['linear'] * 100:.1f}%" if "linear" in r else "-"]
                                                if has_linear else []) for name, r in results.items()]
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [title] if title else []
    out += [line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    if entropy is not None:
        out.append("")
        out.append(f"teacher output entropy (collapse check, K = {int(round(math.exp(entropy['ln_K'])))}, "
                   f"ln K = {entropy['ln_K']:.3f}, τ_t = {entropy['teacher_temp']:g}):")
        out.append(f"  mean per-image entropy H(p)       {entropy['teacher_entropy']:.3f}   "
                   f"(ln K would mean uniform targets)")
        out.append(f"  entropy of the mean target H(p̄)   {entropy['teacher_mean_entropy']:.3f}   "
                   f"(0 would mean one prototype for every image)")
        out.append(f"  verdict: {collapse_verdict(entropy)}")
    return "\n".join(out)


def summary_keys(results: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    """summary.json's accuracy keys: knn_learned, knn_random_init, knn_raw_pixels (and linear_*)."""
    names = {"learned (teacher)": "learned", "random init": "random_init", "raw pixels": "raw_pixels"}
    out: Dict[str, Any] = {}
    for name, key in names.items():
        if name in results:
            out[f"knn_{key}"] = results[name]["knn"]
            if "linear" in results[name]:
                out[f"linear_{key}"] = results[name]["linear"]
    return out


def dataset_name(config) -> str:
    """What the run trained on: the built-in data set's name ("digits", "cluttered-digits") or the image folder."""
    if config.data is None:
        return getattr(config, "builtin_data", "digits")
    return str(config.data)


def run_description(config) -> str:
    """'preset P, trained on D' for the table's title (summary.json has both as "preset" and "dataset")."""
    preset = getattr(config, "preset", None)
    return f"preset {preset or 'none'}, trained on {dataset_name(config)}"


def random_init_backbone(config, seed_offset: int = 1):
    """The same architecture as `config` at random initialisation (seeded; the global RNG is left as it was)."""
    from ..models.dino import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.seed) + seed_offset)
        if getattr(config, "method", "dino") == "dinov2":
            from ..train.methods import build_dinov2_backbone

            model, _ = build_dinov2_backbone(config, 0.0)
        else:
            model, _ = build_backbone(config.arch, patch_size=config.patch_size, drop_path_rate=0.0,
                                      img_size=config.global_size)
    return model


def evaluate_pretraining(config, teacher: nn.Module, center: Optional[Tensor], device="cpu",
                         eval_data: Optional[str] = None, print_table: bool = True) -> Dict[str, Any]:
    """k-NN (and linear-probe) accuracy of the teacher backbone's features, of a random-initialised one and of raw
    pixels on the labelled evaluation data (`build_eval_datasets`), and the teacher-output entropy; prints the table
    (stdout) and returns summary.json's evaluation entries. `teacher` is the teacher MultiCropWrapper (backbone +
    head); `center` the DINO loss center."""
    import sys
    import time

    from ..train.inputs import build_eval_datasets

    t0 = time.perf_counter()
    sets = build_eval_datasets(config, eval_data)
    if sets is None:
        note = ("no labelled evaluation data (pass --eval-data DIR with train/ and val/ sub-folders for a k-NN "
                "table)")
        print(note, file=sys.stderr)
        return {"eval_note": note}
    train_set, test_set, desc = sets
    backbone = getattr(teacher, "backbone", teacher)
    results = evaluate_features({"learned (teacher)": backbone, "random init": random_init_backbone(config)},
                                train_set, test_set, device=device, k=config.knn_k, T=config.knn_temperature)
    entropy = None
    if hasattr(teacher, "head"):
        entropy = teacher_entropy(teacher, _loader(train_set, device=device), center, config.teacher_temp, device)
    run = run_description(config)
    table = format_table(results, entropy, k=config.knn_k,
                         title=f"k-NN accuracy, test split vs train-split features ({desc}; {run})")
    if print_table:
        print(table, flush=True)
    out: Dict[str, Any] = {**summary_keys(results), "eval_results": results, "eval_data": desc, "table": table,
                           "eval_seconds": time.perf_counter() - t0, "preset": getattr(config, "preset", None),
                           "dataset": dataset_name(config)}
    if entropy is not None:
        out.update(entropy)
        out["collapse"] = collapse_verdict(entropy)
    return out
