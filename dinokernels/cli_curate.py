"""`dinokernels curate`: DINOv2-style data curation of a folder of images (dinokernels.curation.pipeline).
`dinokernels.cli.add_commands` calls `add_curate_commands`; errors follow cli.py's conventions (range-checked
argparse types, UsageError → one line and exit code 2, other failures → one line and exit code 1)."""
import json
import os
import sys

from .cli import UsageError, finite_float, nonnegative_int, positive_int, removed_if_empty_on_error

__all__ = ["add_curate_commands", "curate_main"]


def add_curate_commands(commands) -> None:
    """Registers `curate` on the `dinokernels` sub-command parser."""
    from .cli import MAX_IMAGE_SIDE

    p = commands.add_parser(
        "curate", help="deduplicate a pool of images and retrieve the pool images close to a curated set "
                       "(DINOv2's LVD-142M pipeline)",
        description="Embeds --pool, --curated and --eval with the checkpoint (resumable shards in <out>/embeddings), "
                    "removes near-duplicate copies inside the pool (k-NN graph above a cosine threshold, connected "
                    "components, the first path of each kept) and pool images that copy an --eval image, then keeps "
                    "the pool images retrieved by the curated set: --per-image nearest per curated image, or with "
                    "--clusters the pool images of the k-means clusters the curated images fall in. The threshold is "
                    "calibrated per run on synthetic copies of a sample of the pool unless --threshold is given. "
                    "Writes <out>/manifest.jsonl (one line per pool file: path, kept, reason, component, cluster, "
                    "similarity), <out>/summary.json and <out>/examples.png. A killed run started again with the same "
                    "arguments resumes. faiss (pip install faiss-cpu) is used when installed; without it an exact "
                    "torch search (fine up to some 10^5 images).")
    p.add_argument("--pool", required=True, metavar="DIR", help="uncurated images (searched recursively)")
    p.add_argument("--curated", required=True, metavar="DIR", help="curated images that select from the pool")
    p.add_argument("--eval", metavar="DIR", help="evaluation images: pool copies of them are removed")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="backbone: a pretrain checkpoint, official DINO/DINOv2 weights or a transformers folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (not inside an input folder)")
    p.add_argument("--threshold", type=finite_float(-1.0, 1.0),
                   help="duplicate cosine threshold (default: calibrated per run, printed in the summary)")
    p.add_argument("--eval-threshold", type=finite_float(-1.0, 1.0), dest="eval_threshold",
                   help="cosine above which a pool image copies an eval image (default: the duplicate threshold)")
    p.add_argument("--per-image", type=positive_int(1 << 20), dest="per_image",
                   help="pool images retrieved per curated image (default 4; with --clusters: the nearest this many "
                        "of its cluster, default the whole cluster)")
    p.add_argument("--clusters", type=positive_int(1 << 24),
                   help="retrieve through k-means with this many clusters on the deduplicated pool (the paper's way "
                        "for small curated sets)")
    p.add_argument("--feature", choices=["cls", "patch_mean"], default="cls",
                   help="the embedding compared: the CLS token or the mean patch token (default cls)")
    p.add_argument("--neighbors", type=positive_int(4096), default=16,
                   help="k of the deduplication k-NN graph (16; the paper: 64)")
    p.add_argument("--calibration-images", type=positive_int(1 << 20), default=64, dest="calibration_images",
                   help="pool images copied synthetically to calibrate the threshold (64)")
    p.add_argument("--image-size", type=positive_int(MAX_IMAGE_SIDE), dest="image_size",
                   help="centre-crop side for embedding (default: the checkpoint's)")
    p.add_argument("--batch-size", type=positive_int(1 << 16), default=32, dest="batch_size")
    p.add_argument("--shard-size", type=positive_int(1 << 24), default=1024, dest="shard_size",
                   help="images per embedding shard: the unit a killed run redoes (1024)")
    p.add_argument("--num-workers", type=nonnegative_int(1024), default=0, dest="num_workers",
                   help="image-decoding processes (0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (embedding)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto",
                   help="search and k-means: faiss, or the exact torch fallback (default: faiss when installed)")
    p.add_argument("--exact-max", type=positive_int(), dest="exact_max",
                   help="largest pool searched exactly (20000; also any search of at most 2e9 query x pool pairs); above: "
                        "a faiss IVF index with its recall reported")
    p.add_argument("--nprobe", type=positive_int(1 << 20),
                   help="IVF lists probed (default 16; raise it when the reported recall is low)")
    p.add_argument("--pq-bytes", type=positive_int(4096), dest="pq_bytes",
                   help="compress the IVF index with product quantisation, this many bytes per vector")
    p.add_argument("--seed", type=nonnegative_int(2**31 - 1), default=0,
                   help="seed of the index training and k-means (0)")
    p.add_argument("--dry-run", action="store_true", dest="dry_run",
                   help="count the image files and print the plan; read no image, write nothing")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(run=curate_main)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_args(args) -> None:
    from .features.embed import list_images

    for flag, folder in (("--pool", args.pool), ("--curated", args.curated), ("--eval", args.eval)):
        if folder is None:
            continue
        if not os.path.exists(folder):
            raise UsageError(f"{flag} {folder!r}: no such folder")
        if not os.path.isdir(folder):
            raise UsageError(f"{flag} {folder!r} is a file, not a folder")
        if not list_images(folder):
            raise UsageError(f"{flag} {folder!r} holds no image files")
        if _inside(args.out, folder):
            raise UsageError(f"--out {args.out!r} is inside {flag} {folder!r}: its files would be taken for images")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file, not a folder")
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint!r}: no such file or folder")


def _config(args):
    from .curation.pipeline import CurateConfig
    from .curation.search import EXACT_MAX

    return CurateConfig(pool=args.pool, curated=args.curated, eval=args.eval, checkpoint=args.checkpoint,
                        out=args.out, threshold=args.threshold, eval_threshold=args.eval_threshold,
                        per_image=args.per_image, clusters=args.clusters, feature=args.feature,
                        neighbors=args.neighbors, calibration_images=args.calibration_images,
                        image_size=args.image_size, batch_size=args.batch_size, device=args.device,
                        which=args.which, shard_size=args.shard_size, num_workers=args.num_workers,
                        backend=args.backend, exact_max=args.exact_max or EXACT_MAX, nprobe=args.nprobe,
                        pq_bytes=args.pq_bytes, seed=args.seed, progress=args.progress)


def curate_main(args) -> int:
    from .curation.pipeline import curate, dry_run, format_summary

    _check_args(args)
    config = _config(args)
    if args.backend == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise UsageError("--backend faiss: faiss is not installed (pip install faiss-cpu)") from None
    if args.dry_run:
        summary = dry_run(config)
    else:
        from .features.backbone import load_feature_model

        try:
            model = load_feature_model(args.checkpoint, which=args.which, device=args.device)
        except (ValueError, OSError) as e:
            raise UsageError(f"--checkpoint: {' '.join(str(e).split())}") from e
        if args.image_size is not None and args.image_size % model.patch_size:
            raise UsageError(f"--image-size {args.image_size} is not a multiple of the model's patch size "
                             f"{model.patch_size}")
        with removed_if_empty_on_error(args.out):
            summary = curate(config, log=lambda m: print(m, file=sys.stderr, flush=True), model=model)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary), flush=True)
    return 0
