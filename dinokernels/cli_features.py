"""Feature sub-commands of `dinokernels`: `embed` (a folder of images → resumable feature shards) and `retrieve`
(rank a gallery for each query image by cosine similarity; mAP / recall@k with labels; a PNG grid).
`dinokernels.cli.add_commands` calls `add_feature_commands`; the commands use cli.py's error conventions
(range-checked argparse types, UsageError → one line, exit 2; other failures → one line, exit 1)."""
import json
import os
import sys
import tempfile

from .cli import MAX_IMAGE_SIDE, UsageError, nonnegative_int, positive_int, removed_if_empty_on_error

__all__ = ["add_feature_commands", "embed_main", "retrieve_main"]

_KINDS = ["cls", "patch_mean", "patch_tokens"]


def add_feature_commands(commands) -> None:
    """Registers `embed` and `retrieve` on the `dinokernels` sub-command parser."""
    _add_embed(commands)
    _add_retrieve(commands)


def _model_flags(p, required: bool = True) -> None:
    p.add_argument("--checkpoint", required=required, metavar="CKPT",
                   help="a `dinokernels pretrain` checkpoint, an official DINO / DINOv2 weight file, or a "
                        "transformers Dinov2 model folder")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="network of a checkpoint that holds both (default teacher)")
    p.add_argument("--num-heads", type=positive_int(4096), dest="num_heads",
                   help="attention heads of DINOv2 weights whose width is no multiple of 64 (not stored in files)")
    p.add_argument("--image-size", type=positive_int(MAX_IMAGE_SIDE), dest="image_size",
                   help="side of the centre crop, a multiple of the patch size (default: the model's, 224 for "
                        "released weights)")
    p.add_argument("--resize", type=positive_int(MAX_IMAGE_SIDE),
                   help="shorter side before the crop (default: image size × 256/224)")
    p.add_argument("--batch-size", type=positive_int(1 << 16), default=32, dest="batch_size",
                   help="images per forward pass (32)")
    p.add_argument("--shard-size", type=positive_int(1 << 24), default=1024, dest="shard_size",
                   help="images per shard file, the unit of resumption (1024)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--num-workers", type=nonnegative_int(256), default=0, dest="num_workers",
                   help="image decoding processes (0: in the main process)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="storage of the features (float16: half the disk; loaded back as float32)")
    p.add_argument("--no-progress", action="store_false", dest="progress", help="no progress bar")


# ---- shared checks ---------------------------------------------------------------------------------------------

def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    return name


def _folder(path: str, flag: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path!r}: no such folder")
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file, not a folder of images")
    return path


def _load_model(args, device: str):
    from .features import load_feature_model

    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint!r}: no such file or folder")
    model = load_feature_model(args.checkpoint, which=args.which, device=device, num_heads=args.num_heads)
    size = args.image_size or model.default_image_size
    if size % model.patch_size:
        lower = max(model.patch_size, size // model.patch_size * model.patch_size)
        raise UsageError(f"--image-size {size} is not a multiple of the model's patch size {model.patch_size} "
                         f"(e.g. {lower} or {lower + model.patch_size})")
    if args.resize is not None and args.resize < size:
        raise UsageError(f"--resize {args.resize} is smaller than the crop (--image-size {size})")
    return model


def _embed(args, model, data: str, out: str, what):
    from .features.embed import OutputFolderError, embed_folder

    try:
        return embed_folder(args.checkpoint, data, out, what=what, batch_size=args.batch_size,
                            image_size=args.image_size, resize=args.resize, which=args.which,
                            shard_size=args.shard_size, num_workers=args.num_workers, progress=args.progress,
                            model=model, dtype=args.dtype)
    except OutputFolderError as e:
        raise UsageError(str(e)) from None


def _report_embedding(result, label: str = "") -> str:
    text = (f"{label}embedded {result.num_embedded} of {result.num_files} images into {result.out_dir} "
            f"({result.shards} shard{'s' if result.shards != 1 else ''}")
    if result.resumed_files:
        text += f"; resumed after {result.resumed_files} files done earlier"
    text += ")"
    if result.unreadable:
        shown = ", ".join(p for p, _ in result.unreadable[:3])
        more = f", … ({len(result.unreadable) - 3} more)" if len(result.unreadable) > 3 else ""
        text += f"; {len(result.unreadable)} unreadable skipped: {shown}{more} (listed in manifest.jsonl)"
    return text


# ---- embed -----------------------------------------------------------------------------------------------------

def _add_embed(commands) -> None:
    p = commands.add_parser(
        "embed", help="features of a folder of images (CLS / mean patch / patch tokens) in resumable shards",
        description="Embeds every image under --data (recursive; unreadable files are listed, never fatal) with a "
                    "frozen backbone: resize the shorter side, centre-crop to a multiple of the patch size, "
                    "normalise as the checkpoint expects. Writes shard_NNNNN.npy (the vector kinds side by side), "
                    "patch_NNNNN.npy with --what patch_tokens, manifest.jsonl (path, shard, row, status) and "
                    "meta.json. Run the same command again to resume an interrupted run (docs/features.md).")
    _model_flags(p)
    p.add_argument("--data", required=True, metavar="DIR", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumed when it holds this run)")
    p.add_argument("--what", nargs="+", choices=_KINDS, default=["cls"],
                   help="features to store: cls, patch_mean (mean of the patch tokens), patch_tokens (default cls)")
    p.set_defaults(run=embed_main)


def embed_main(args) -> int:
    _folder(args.data, "--data")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file; give a folder")
    from .features.embed import list_images

    if not list_images(args.data):
        raise UsageError(f"--data {args.data!r} holds no image files")
    device = _device(args.device)
    model = _load_model(args, device)
    with removed_if_empty_on_error(args.out):
        result = _embed(args, model, args.data, args.out, args.what)
    print(_report_embedding(result))
    return 0


# ---- retrieve --------------------------------------------------------------------------------------------------

def _add_retrieve(commands) -> None:
    p = commands.add_parser(
        "retrieve", help="rank a gallery for each query image by cosine similarity; mAP and recall@k with labels",
        description="For each image under --query, the gallery images under --gallery ranked by the cosine "
                    "similarity of their features (a query that is also in the gallery is left out of its own "
                    "ranking). Labels (the parent folder's name by default, or --labels CSV) give mAP and "
                    "recall@k. --embeddings reuses `dinokernels embed` outputs instead of a checkpoint.")
    _model_flags(p, required=False)
    p.add_argument("--query", metavar="DIR", help="folder of query images")
    p.add_argument("--gallery", metavar="DIR", help="folder of gallery images (may be the query folder)")
    p.add_argument("--embeddings", nargs="+", metavar="DIR",
                   help="precomputed `embed` outputs: QUERY_DIR [GALLERY_DIR] (one: the same set for both)")
    p.add_argument("--cache", metavar="DIR",
                   help="keep the computed embeddings here (query/ and gallery/; resumable); default: a temporary "
                        "folder removed at the end")
    p.add_argument("--feature", choices=["cls", "patch_mean"], default="cls",
                   help="which vector to compare (default cls)")
    p.add_argument("--k", nargs="+", type=positive_int(1 << 20), default=[1, 5, 10], dest="ks",
                   help="recall@k values; the largest is the number of results kept per query (1 5 10)")
    p.add_argument("--labels", default="folder", metavar="folder|none|CSV",
                   help="folder: the parent folder's name (default); none: no metrics; or a CSV of path,label "
                        "rows (paths relative to the query / gallery folder, or absolute)")
    p.add_argument("--grid", metavar="PNG", help="write a grid of the top results of a few queries")
    p.add_argument("--grid-queries", type=positive_int(64), default=4, dest="grid_queries",
                   help="queries in the grid (4)")
    p.add_argument("--out", metavar="JSON", help="write the metrics and every query's top results")
    p.set_defaults(run=retrieve_main)


def _embedded_sets(args):
    """((query paths, features), (gallery paths, features), the folders) from --embeddings or by embedding."""
    from .features.embed import load_embeddings, read_meta

    if args.embeddings:
        if len(args.embeddings) > 2:
            raise UsageError(f"--embeddings takes QUERY_DIR [GALLERY_DIR], got {len(args.embeddings)} folders")
        dirs = list(args.embeddings) * (2 if len(args.embeddings) == 1 else 1)
        for d in dirs:
            _folder(d, "--embeddings")
            if not os.path.isfile(os.path.join(d, "meta.json")):
                raise UsageError(f"--embeddings {d!r} holds no meta.json: not a `dinokernels embed` output")
        metas = [read_meta(d) for d in dirs]
        if metas[0]["checkpoint_fingerprint"] != metas[1]["checkpoint_fingerprint"] or \
                metas[0]["which"] != metas[1]["which"]:
            raise UsageError("--embeddings: the query and gallery folders were embedded with different checkpoints")
        for d, m in zip(dirs, metas):
            if args.feature not in m["columns"]:
                raise UsageError(f"--embeddings {d!r} holds no {args.feature} features (it has "
                                 f"{', '.join(m['columns']) or 'patch tokens only'}); pass --feature")
        sets = [load_embeddings(d, args.feature) for d in dirs]
        return sets[0], sets[1], metas[0]["data"], metas[1]["data"]
    missing = [flag for flag, v in (("--checkpoint", args.checkpoint), ("--query", args.query),
                                    ("--gallery", args.gallery)) if not v]
    if missing:
        raise UsageError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} needed without --embeddings")
    _folder(args.query, "--query")
    _folder(args.gallery, "--gallery")
    from .features.embed import list_images

    for flag, d in (("--query", args.query), ("--gallery", args.gallery)):
        if not list_images(d):
            raise UsageError(f"{flag} {d!r} holds no image files")
    if args.cache is not None and os.path.exists(args.cache) and not os.path.isdir(args.cache):
        raise UsageError(f"--cache {args.cache!r} is a file; give a folder")
    model = _load_model(args, _device(args.device))
    same = os.path.realpath(args.query) == os.path.realpath(args.gallery)
    temp = tempfile.TemporaryDirectory(prefix="dinokernels-retrieve-") if args.cache is None else None
    root = temp.name if temp is not None else args.cache
    try:
        out = []
        for name, folder in (("query", args.query),) + ((("gallery", args.gallery),) if not same else ()):
            target = os.path.join(root, name)
            with removed_if_empty_on_error(target):
                result = _embed(args, model, folder, target, [args.feature])
            print(_report_embedding(result, f"{name}: "), file=sys.stderr)
            out.append(load_embeddings(target, args.feature))
        if same:
            out.append(out[0])
    finally:
        if temp is not None:
            temp.cleanup()
    return out[0], out[1], os.path.abspath(args.query), os.path.abspath(args.gallery)


def _labels(spec: str, paths, root):
    from .features.retrieve import labels_from_csv, labels_from_folders

    if spec == "none":
        return None
    if spec == "folder":
        return labels_from_folders(paths, root)
    if not os.path.isfile(spec):
        raise UsageError(f"--labels {spec!r}: not 'folder', 'none' or an existing CSV file")
    return labels_from_csv(spec, paths, root)


def retrieve_main(args) -> int:
    from .features.retrieve import retrieve, save_retrieval_grid

    for flag, path in (("--out", args.out), ("--grid", args.grid)):
        if path is not None and os.path.isdir(path):
            raise UsageError(f"{flag} {path!r} is a folder; give the file to write")
    if args.labels not in ("folder", "none") and not os.path.isfile(args.labels):
        raise UsageError(f"--labels {args.labels!r}: not 'folder', 'none' or an existing CSV file")
    (q_paths, q_feats), (g_paths, g_feats), q_root, g_root = _embedded_sets(args)
    if len(q_paths) == 0 or len(g_paths) == 0:
        raise UsageError(f"no readable {'query' if not q_paths else 'gallery'} image: nothing to rank")
    q_labels = _labels(args.labels, q_paths, q_root)
    g_labels = _labels(args.labels, g_paths, g_root)
    if q_labels is not None and (all(x is None for x in q_labels) or all(x is None for x in g_labels)):
        q_labels = g_labels = None  # no labelled image on one side: no metrics
    device = _device(args.device)
    result = retrieve(q_feats, g_feats, k=max(args.ks), query_labels=q_labels, gallery_labels=g_labels,
                      ks=args.ks, query_paths=q_paths, gallery_paths=g_paths, device=device)
    if result.metrics is not None and not result.metrics.get("scored_queries"):
        # Labels, but no query has a labelled positive in the gallery: no metric is defined (not NaN in the JSON).
        print(f"ranked {len(g_paths)} gallery images for {len(q_paths)} queries (no query has a labelled positive "
              f"in the gallery: no metrics)")
        result.metrics = None
    elif result.metrics is not None:
        m = result.metrics
        parts = [f"mAP {m['mAP']:.4f}"] + [f"recall@{k} {m[f'recall@{k}']:.4f}" for k in sorted(set(args.ks))]
        print("  ".join(parts) + f"  ({m['scored_queries']} queries scored, {m['skipped_queries']} without a "
                                 f"labelled positive)")
    else:
        print(f"ranked {len(g_paths)} gallery images for {len(q_paths)} queries (no labels: no metrics)")
    if args.out is not None:
        from .cli import _atomic_output

        report = {"metrics": result.metrics, "feature": args.feature, "ks": sorted(set(args.ks)),
                  "query_folder": q_root, "gallery_folder": g_root,
                  "queries": [{"path": q_paths[i], "label": q_labels[i] if q_labels else None,
                               "results": [{"path": g_paths[int(j)], "score": float(s),
                                            "label": g_labels[int(j)] if g_labels else None}
                                           for j, s in zip(result.indices[i], result.scores[i])]}
                              for i in range(len(q_paths))]}
        with removed_if_empty_on_error(os.path.dirname(os.path.abspath(args.out))), _atomic_output(args.out) as tmp:
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
        print(f"results written to {args.out}")
    if args.grid is not None:
        from .cli import _atomic_output

        with removed_if_empty_on_error(os.path.dirname(os.path.abspath(args.grid))), \
                _atomic_output(args.grid) as tmp:
            save_retrieval_grid(tmp, q_paths, g_paths, result.indices, result.scores, q_labels, g_labels,
                                rows=args.grid_queries, k=min(max(args.ks), 8))
        print(f"grid written to {args.grid}")
    return 0
