"""Detection sub-commands of `dinokernels` (Grounding DINO): `train-detector` (fine-tuning or the built-in synthetic
shapes demo) and `detect` (boxes on an image from a checkpoint). `dinokernels.cli.add_commands` calls
`add_detection_commands`; each command registers itself in its own section below and uses cli.py's error
conventions (range-checked argparse types, UsageError → exit 2, other errors → one line, exit 1)."""
import os
from typing import Any, Dict

from .cli import (UsageError, finite_float, finite_positive_float, nonnegative_int, positive_int,
                  removed_if_empty_on_error)

__all__ = ["add_detection_commands", "train_detector_main"]


def add_detection_commands(commands) -> None:
    """Registers the detection sub-commands on the `dinokernels` sub-command parser."""
    _add_train_detector(commands)
    add_detect = globals().get("_add_detect")
    if add_detect is not None:
        add_detect(commands)


# ---- train-detector -------------------------------------------------------------------------------------------

_EPOCHS_MAX = 100_000


def _add_train_detector(commands) -> None:
    from .train.detector import DEMO_SHAPES, MODEL_SIZES

    p = commands.add_parser(
        "train-detector",
        help="train Grounding DINO on a COCO-format folder, or the built-in synthetic shapes demo (CPU, ~10 min)",
        description="Grounding DINO training (Open-GroundingDino's recipe, SPEC §5.8): captions of the present "
                    "category names plus random negatives, token-level focal + L1 + GIoU losses on every decoder "
                    "layer and the encoder proposals, AdamW with separate backbone / text-encoder learning rates, "
                    "gradient clipping, a learning-rate drop; then COCO box AP (pycocotools) on the val split and a "
                    "named-vs-unnamed check. Without --data: the built-in synthetic shapes ('red circle . blue "
                    "square .') and the small model from scratch. Multi-process: torchrun --nproc_per_node=N -m "
                    "dinokernels train-detector ...")
    p.add_argument("--data", metavar="DIR",
                   help="COCO folder: annotations/instances_{train,val}.json (or instances_{train,val}2017.json) and "
                        "the images in {train,val}/ ({train,val}2017/, images/{train,val}/); default: the built-in "
                        "synthetic shapes")
    p.add_argument("--out", metavar="DIR", help="output folder: checkpoint.pth, log.jsonl, loss.png, summary.json "
                                                "(default: out-detector; with --resume: the checkpoint's folder)")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: <out>/checkpoint.pth) with its settings; --epochs may "
                        "be raised")
    p.add_argument("--overwrite", action="store_true",
                   help="allow writing into a folder that holds another run's files (they are replaced)")
    p.add_argument("--model", choices=list(MODEL_SIZES),
                   help="small: a small Swin + tiny BERT trained from scratch (default without --text-encoder); "
                        "swint: Grounding DINO-T (Swin-T, bert-base; needs --text-encoder)")
    p.add_argument("--text-encoder", metavar="DIR",
                   help="local BERT folder (config.json, weights, vocab) for --model swint")
    p.add_argument("--weights", metavar="PTH",
                   help="initial weights: a released Grounding DINO checkpoint (groundingdino_swint_ogc.pth) or a "
                        "train-detector checkpoint")
    p.add_argument("--epochs", type=positive_int(_EPOCHS_MAX), help="training epochs (default: 15; demo: its own)")
    p.add_argument("--batch-size", type=positive_int(4096), help="images per process and step (4; demo: 8)")
    p.add_argument("--lr", type=finite_positive_float(), help="learning rate of the transformer and heads (1e-4)")
    p.add_argument("--lr-backbone", type=finite_float(0.0),
                   help="backbone learning rate (1e-5; 0 freezes it; small from scratch: = --lr)")
    p.add_argument("--lr-text", type=finite_float(0.0),
                   help="text encoder learning rate (0 = frozen, the default for a pretrained BERT; small from "
                        "scratch: = --lr)")
    p.add_argument("--weight-decay", type=finite_float(0.0), help="AdamW weight decay (1e-4)")
    p.add_argument("--clip-max-norm", type=finite_float(0.0), help="gradient norm clip, 0 disables (0.1)")
    p.add_argument("--lr-drop", type=nonnegative_int(_EPOCHS_MAX),
                   help="epoch after which learning rates are multiplied by 0.1 (0: never; default 11 of 15)")
    p.add_argument("--warmup-iters", type=nonnegative_int(),
                   help="linear learning-rate warm-up iterations (0; Open-GD has none)")
    p.add_argument("--image-size", type=positive_int(4096),
                   help="longer image side in pixels (COCO images are resized and padded to a square; default 800; "
                        "synthetic: the image side)")
    p.add_argument("--max-names", type=positive_int(1024),
                   help="names per training caption, positives + random negatives (Open-GD: 50)")
    p.add_argument("--num-train", type=positive_int(1 << 24), help="synthetic training images")
    p.add_argument("--num-val", type=positive_int(1 << 24), help="synthetic validation images")
    p.add_argument("--colors", nargs="+", metavar="COLOUR",
                   help=f"synthetic colours (demo: {' '.join(DEMO_SHAPES['colors'])})")
    p.add_argument("--shapes", nargs="+", metavar="SHAPE",
                   help=f"synthetic shapes (demo: {' '.join(DEMO_SHAPES['shapes'])})")
    p.add_argument("--seed", type=nonnegative_int(2**63 - 1), help="random seed (0)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--num-workers", type=nonnegative_int(1024), help="data-loading processes (0)")
    p.add_argument("--threads", type=positive_int(4096),
                   help="torch CPU threads (default: torch's; demo: 1, far faster on a shared, busy machine)")
    p.add_argument("--num-queries", type=positive_int(100_000), help="object queries (small 30, swint 900)")
    p.add_argument("--checkpoint-every", type=nonnegative_int(),
                   help="also write checkpoint.pth every this many iterations (0: at epoch ends only)")
    p.add_argument("--max-iters", type=positive_int(), help="stop after this many iterations in all (smoke runs)")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", default=None,
                   help="skip the COCO evaluation after training")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(run=train_detector_main)


def _train_detector_config(args):
    from .train.checkpoint import load_checkpoint
    from .train.detector import DetectorConfig, make_detector_config

    names = ("data", "out", "model", "text_encoder", "weights", "epochs", "batch_size", "lr", "lr_backbone",
             "lr_text", "weight_decay", "clip_max_norm", "lr_drop", "warmup_iters", "image_size", "max_names",
             "num_train", "num_val", "colors", "shapes", "seed", "device", "num_workers", "threads", "num_queries",
             "checkpoint_every", "max_iters", "evaluate", "progress")
    given: Dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if args.resume is None:
        try:
            return make_detector_config(**given)
        except ValueError as e:
            raise UsageError(str(e)) from e
    path = args.resume or os.path.join(given.get("out", "out-detector"), "checkpoint.pth")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    ckpt = load_checkpoint(path)
    stored = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(stored, dict) or ckpt.get("format") is None or "detector" not in str(ckpt.get("format")):
        raise ValueError(f"--resume: {path} is not a train-detector checkpoint")
    values = dict(stored)
    values.update(given)
    values["resume"] = path
    values["out"] = given["out"] if "out" in given else (os.path.dirname(path) or ".")
    try:
        return DetectorConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--resume {path}: {' '.join(str(e).split())}") from e


def train_detector_main(args) -> int:
    from .train.detector import check_output_folder, format_summary, train_detector
    from .train.distributed import cleanup_distributed, is_main_process
    from .train.trainer import OutputFolderInUseError

    config = _train_detector_config(args)
    overwrite = bool(getattr(args, "overwrite", False))
    try:
        check_output_folder(config, overwrite)
    except OutputFolderInUseError as e:
        raise UsageError(str(e)) from e
    with removed_if_empty_on_error(config.out):
        summary = train_detector(config, overwrite=overwrite)
    if is_main_process():
        print(format_summary(summary), flush=True)
    cleanup_distributed()
    return 0


# ---- detect ---------------------------------------------------------------------------------------------------
# (the `detect` command: `_add_detect(commands)` and its helpers go below this line)
