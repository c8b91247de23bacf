"""Detection sub-commands of `dinokernels` (Grounding DINO): `train-detector` (fine-tuning or the built-in synthetic
shapes demo) and `detect` (boxes on an image from a checkpoint). `dinokernels.cli.add_commands` calls
`add_detection_commands`; each command registers itself in its own section below and uses cli.py's error
conventions (range-checked argparse types, UsageError → exit 2, other errors → one line, exit 1)."""
import os
from typing import Any, Dict

from .cli import (UsageError, resumed_config, finite_float, finite_positive_float, nonnegative_int, positive_int, probability,
                  removed_if_empty_on_error)

__all__ = ["add_detection_commands", "train_detector_main", "detect_main", "draw_detections"]


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
        help="train Grounding DINO on a COCO-format folder, or the built-in synthetic shapes demo (2 CPU cores: 5-9 min)",
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
    return resumed_config(args.resume, given, "out-detector", DetectorConfig.from_dict,
                          lambda fmt: fmt is not None and "detector" in str(fmt), "a train-detector checkpoint")


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

_OFFICIAL_BACKBONES = {96: "swint", 128: "swinb"}  # Swin embed dim (backbone.0.patch_embed.proj.weight) → model


def _add_detect(commands) -> None:
    from .cli import MAX_IMAGE_SIDE

    p = commands.add_parser(
        "detect", help="Grounding DINO: boxes for a text prompt on images, drawn to PNGs plus a JSON of detections",
        description="Open-set detection with Grounding DINO (the official inference: short side 800, long side at "
                    "most 1333, box threshold 0.35, text threshold 0.25, phrases from the prompt's tokens; no NMS). "
                    "Writes <out>/<image stem>.png with the boxes and labels drawn and <out>/detections.json. "
                    "Everything is checked before anything is written, and files appear whole or not at all.")
    p.add_argument("--checkpoint", required=True, metavar="PTH",
                   help="a released Grounding DINO checkpoint (groundingdino_swint_ogc.pth / "
                        "groundingdino_swinb_cogcoor.pth; needs --text-encoder) or a train-detector checkpoint")
    p.add_argument("--text-encoder", metavar="DIR",
                   help="local bert-base-uncased folder (config.json, weights, vocab.txt); required with a released "
                        "checkpoint; overrides the folder a swint train-detector checkpoint recorded")
    p.add_argument("--image", required=True, nargs="+", metavar="IMG", help="image file(s)")
    p.add_argument("--prompt", required=True,
                   help='what to detect, phrases separated by " . ", e.g. "cat . dog ." (lower-cased; a final "." '
                        'is added when missing)')
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--box-threshold", type=probability(), default=0.35,
                   help="keep a box when its best token probability exceeds this (0.35)")
    p.add_argument("--text-threshold", type=probability(), default=0.25,
                   help="tokens above this probability form the box's phrase (0.25)")
    p.add_argument("--image-size", type=positive_int(MAX_IMAGE_SIDE), nargs="+", metavar="PX",
                   help="short side and optional long-side cap of the resized image (released checkpoints: 800 1333; "
                        "train-detector checkpoints: their training size for both)")
    p.add_argument("--batch-size", type=positive_int(1024), default=4, help="images per forward pass (4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="autocast precision (float16 needs CUDA; default float32)")
    p.set_defaults(run=detect_main)


def _read_detection_checkpoint(path: str):
    """torch.load with weights_only (the released files keep an argparse.Namespace under "args", allowed here);
    missing, empty, truncated or foreign files raise one-line errors naming --checkpoint and the path."""
    import argparse
    import zipfile

    import torch

    from .train.checkpoint import LOAD_ERRORS, check_checkpoint_file, checkpoint_error

    path = check_checkpoint_file(path, "--checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except LOAD_ERRORS as e:
        raise checkpoint_error(path, e, "--checkpoint") from None


def _detect_model(args):
    """(model, tokenizer, image_size (short, cap) default, description) from --checkpoint (+ --text-encoder)."""
    from .models.grounding_dino.convert import load_official_weights
    from .train.detector import CHECKPOINT_FORMAT, build_detector_from_checkpoint

    if args.text_encoder is not None and not os.path.isdir(args.text_encoder):
        raise UsageError(f"--text-encoder {args.text_encoder!r} is not a folder (a local bert-base-uncased folder is "
                         f"needed; nothing is downloaded)")
    ckpt = _read_detection_checkpoint(args.checkpoint)
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        model, tokenizer, _ = build_detector_from_checkpoint(ckpt, text_encoder=args.text_encoder)
        side = int((ckpt.get("config") or {}).get("image_size") or 800)
        return model, tokenizer, (side, side), "train-detector"
    if isinstance(ckpt, dict) and isinstance(ckpt.get("format"), str):
        raise ValueError(f"--checkpoint {args.checkpoint!r} is a {ckpt['format']!r} checkpoint, not a Grounding DINO "
                         f"one (a released .pth or a train-detector checkpoint)")
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    embed = None
    if isinstance(state, dict):
        for key in ("backbone.0.patch_embed.proj.weight", "module.backbone.0.patch_embed.proj.weight"):
            if key in state and hasattr(state[key], "shape"):
                embed = int(state[key].shape[0])
    if embed not in _OFFICIAL_BACKBONES:
        raise ValueError(f"--checkpoint {args.checkpoint!r} is not a Grounding DINO checkpoint: no Swin-T/Swin-B "
                         f"backbone.0.patch_embed weights" + (f" (embed dim {embed})" if embed else ""))
    if args.text_encoder is None:
        raise UsageError("--text-encoder DIR is required with a released checkpoint (a local bert-base-uncased "
                         "folder)")
    from .models.grounding_dino import grounding_dino_swinb_cogcoor, grounding_dino_swint_ogc

    build = grounding_dino_swint_ogc if _OFFICIAL_BACKBONES[embed] == "swint" else grounding_dino_swinb_cogcoor
    model = build(text_encoder=args.text_encoder)
    load_official_weights(model, ckpt)
    return model, model.tokenizer, (800, 1333), f"released ({_OFFICIAL_BACKBONES[embed]})"


def _output_names(paths) -> list:
    """<stem>.png per image, made unique (stem, stem-2, ...) when two images share a stem."""
    names, used = [], set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        name, n = stem, 1
        while name.lower() in used or name.lower() == "detections":
            n += 1
            name = f"{stem}-{n}"
        used.add(name.lower())
        names.append(name + ".png")
    return names


_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def draw_detections(image, boxes, labels, phrases):
    """An RGB PIL image with each box (xyxy pixels) outlined and its label on a filled band; one colour per
    phrase. Returns a new image."""
    from PIL import ImageDraw, ImageFont

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    colours = {}
    width = max(1, round(max(out.size) / 400))
    for (x0, y0, x1, y1), label, phrase in zip(boxes, labels, phrases):
        colour = colours.setdefault(phrase, _PALETTE[len(colours) % len(_PALETTE)])
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((x0, y0), label, font=font)
        ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        left, top, right, bottom = draw.textbbox((x0, ty), label, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
        draw.text((x0, ty), label, fill=(0, 0, 0), font=font)
    return out


def detect_main(args) -> int:
    import json
    import shutil
    import tempfile

    import torch

    from .models.grounding_dino.predictor import GroundingDINOPredictor, load_image

    # 1. Flags that cannot work, before anything is loaded.
    if not args.prompt.strip() or not args.prompt.strip().strip(".").strip():
        raise UsageError("--prompt is empty: give the objects to detect, e.g. --prompt \"cat . dog .\"")
    if len(args.image_size or ()) > 2:
        raise UsageError(f"--image-size takes the short side and an optional long-side cap, got "
                         f"{len(args.image_size)} values")
    if args.image_size and len(args.image_size) == 2 and args.image_size[1] < args.image_size[0]:
        raise UsageError(f"--image-size: the long-side cap {args.image_size[1]} is below the short side "
                         f"{args.image_size[0]}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a folder")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if args.dtype == "float16" and not device.startswith("cuda"):
        raise UsageError("--dtype float16 needs a CUDA device; use bfloat16 or float32 on the CPU")

    # 2. Every image readable.
    images = [load_image(path, f"--image {path!r}") for path in args.image]

    # 3. The model, and the prompt against its tokenizer (transformers' loading bar would break the one-line errors).
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, tokenizer, default_size, kind = _detect_model(args)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    size = tuple(args.image_size) if args.image_size else default_size
    if len(size) == 1:
        size = (size[0], None)
    predictor = GroundingDINOPredictor(model, tokenizer, device=device, box_threshold=args.box_threshold,
                                       text_threshold=args.text_threshold,
                                       autocast_dtype=None if args.dtype == "float32" else args.dtype,
                                       image_size=size, batch_size=args.batch_size)
    try:
        predictor.tokenize(args.prompt, "--prompt")
    except ValueError as e:
        raise UsageError(str(e)) from e

    # 4. Detect, then write: every file to a staging folder first, moved into --out only when all exist.
    results = predictor.predict(images, args.prompt)
    names = _output_names(args.image)
    report = {"checkpoint": os.path.abspath(args.checkpoint), "checkpoint_kind": kind, "prompt": args.prompt,
              "box_threshold": args.box_threshold, "text_threshold": args.text_threshold,
              "image_size": list(size), "images": []}
    with removed_if_empty_on_error(args.out):
        os.makedirs(args.out, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".detect-", dir=args.out)
        try:
            for path, img, name, res in zip(args.image, images, names, results):
                boxes = res["boxes"].tolist()
                scores = res["scores"].tolist()
                labels = [f"{p or '?'} {s:.2f}" for p, s in zip(res["phrases"], scores)]
                draw_detections(img, boxes, labels, res["phrases"]).save(os.path.join(staging, name), format="PNG")
                report["images"].append({
                    "image": os.path.abspath(path), "output": name, "width": img.width, "height": img.height,
                    "detections": [{"phrase": p, "score": round(s, 6), "box_xyxy": [round(v, 3) for v in b]}
                                   for p, s, b in zip(res["phrases"], scores, boxes)]})
            with open(os.path.join(staging, "detections.json"), "w") as f:
                json.dump(report, f, indent=2)
            for name in names + ["detections.json"]:  # the JSON last: its presence means the PNGs are complete
                os.replace(os.path.join(staging, name), os.path.join(args.out, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    found = sum(len(r["scores"]) for r in results)
    print(f"{found} detection(s) in {len(images)} image(s) written to {args.out} (detections.json and "
          f"{len(names)} PNG(s))")
    return 0
