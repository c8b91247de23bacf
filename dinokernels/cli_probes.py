"""Dense-probe sub-commands of `dinokernels` (issue 14): `probe seg` and `probe depth` train a linear head on the
frozen patch tokens of a checkpoint (or evaluate a saved head) and write metrics and coloured predictions
(docs/dense_probes.md). `dinokernels.cli.add_commands` calls `add_probe_commands`; errors follow cli.py's
conventions (flag values checked by argparse types, bad input → UsageError: one line, exit code 2)."""
import argparse
import json
import os
import sys
import time

from .cli import UsageError, check_memory, finite_float, finite_positive_float, nonnegative_int, positive_int

__all__ = ["add_probe_commands", "probe_main", "random_demo_model"]

_DEBUG_HELP = "print the traceback of an error (or DINOKERNELS_DEBUG=1)"


def add_probe_commands(commands) -> None:
    """Registers `probe` (with its tasks `seg` and `depth`) on the `dinokernels` sub-command parser."""
    p = commands.add_parser(
        "probe", help="linear dense probes on frozen patch tokens: semantic segmentation (mIoU) and depth (RMSE)",
        description="Dense probes as the DINOv2 paper evaluates them: a linear layer on the frozen patch tokens, "
                    "its output upsampled bilinearly to the label size. `seg`: class logits, cross-entropy with "
                    "ignore index 255, mIoU. `depth`: log-depth (patch token + CLS token), scale-invariant log loss, "
                    "RMSE / abs rel / δ<1.25. Data: DIR/images/<stem>.png|jpg with DIR/masks/<stem>.png (class "
                    "indices, 255 = ignore) or DIR/depth/<stem>.png (16-bit millimetres, 0 = invalid) or .npy "
                    "(float metres). See docs/dense_probes.md.")
    tasks = p.add_subparsers(dest="task", required=True, metavar="{seg,depth}")
    for task, help_text in (("seg", "linear semantic segmentation probe (mIoU)"),
                            ("depth", "linear monocular depth probe (RMSE, δ<1.25)")):
        t = tasks.add_parser(task, help=help_text, description=help_text + "; see `dinokernels probe --help`.")
        _add_common(t, task)
        t.set_defaults(run=probe_main)


def _add_common(p, task: str) -> None:
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="backbone: a `dinokernels pretrain` checkpoint, official DINO / DINOv2 weights or a "
                        "transformers Dinov2 folder (with --synthetic and no checkpoint: a random-weight tiny ViT)")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher",
                   help="network of a checkpoint that holds both (teacher)")
    p.add_argument("--train", metavar="DIR", help="training folder (images/ and "
                                                  f"{'masks' if task == 'seg' else 'depth'}/)")
    p.add_argument("--val", metavar="DIR", help="evaluation folder, same layout")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: metrics.json, head.pth, predictions/<stem>.png, examples.png"
                        + (", depth_mm/<stem>.png" if task == "depth" else ""))
    p.add_argument("--head", metavar="PTH", help="evaluate this saved head (an earlier run's head.pth) instead of "
                                                 "training one; --train is then not needed")
    p.add_argument("--synthetic", action="store_true",
                   help="demo: generate training and evaluation data into OUT/synthetic/ ("
                        + ("shapes with masks" if task == "seg" else "tilted planes and boxes with depth")
                        + ") instead of --train / --val")
    p.add_argument("--num-train", type=positive_int(100_000), default=96, help="synthetic training images (96)")
    p.add_argument("--num-val", type=positive_int(100_000), default=32, help="synthetic evaluation images (32)")
    p.add_argument("--epochs", type=positive_int(10_000),
                   help="training epochs over the cached features (10; synthetic demo: 30)")
    p.add_argument("--lr", type=finite_positive_float(10.0), help="AdamW learning rate (1e-3; synthetic demo: 3e-3)")
    p.add_argument("--weight-decay", type=finite_float(0.0, 10.0), default=1e-4, help="AdamW weight decay (1e-4)")
    p.add_argument("--batch-size", type=positive_int(100_000), default=8, help="images per training step (8)")
    p.add_argument("--feature-batch-size", type=positive_int(4096), default=16,
                   help="images per backbone forward pass when extracting features (16)")
    p.add_argument("--image-size", type=positive_int(8192),
                   help="images are resized to this square side, a multiple of the patch size (default: the "
                        "checkpoint's default side; synthetic demo without checkpoint: 64)")
    p.add_argument("--label-size", type=positive_int(8192),
                   help="side of the training labels (nearest resize; default: --image-size). Evaluation is always "
                        "at each label's own size")
    cls_default = task == "depth"
    p.add_argument("--with-cls", dest="with_cls", action="store_true", default=cls_default,
                   help="concatenate the CLS token to every patch token" + (" (default)" if cls_default else ""))
    p.add_argument("--no-cls", dest="with_cls", action="store_false",
                   help="patch tokens only" + ("" if cls_default else " (default)"))
    if task == "seg":
        p.add_argument("--num-classes", type=positive_int(255),
                       help="classes (default: 1 + the largest index in the training masks, 255 excluded)")
    else:
        p.add_argument("--silog-lambda", type=finite_float(0.0, 1.0, hi_open=True), default=0.85,
                       help="λ of the scale-invariant log loss (0.85; 0 = RMSE of log-depth)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    p.add_argument("--seed", type=nonnegative_int(2**31 - 1), default=0, help="random seed (0)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)


def random_demo_model(seed: int = 0):
    """A random-weight tiny DINOv2-style ViT (patch 8, width 128, 2 blocks) as a FeatureModel, for the synthetic
    demo without a checkpoint: it shows the pipeline works; its tokens carry local colour and brightness only."""
    import torch

    from .features import FeatureModel
    from .models.dinov2 import DinoVisionTransformer

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = DinoVisionTransformer(img_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=2,
                                         init_values=1.0)
    return FeatureModel(backbone, "dinov2", 8, 128, default_image_size=64,
                        source=f"random-weight tiny ViT (seed {seed})")


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (name == "cpu" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return name


def _check_flags(args) -> None:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a folder")
    if args.synthetic:
        if args.train or args.val:
            raise UsageError("--synthetic generates its own data: leave out --train and --val")
        return
    if args.checkpoint is None:
        raise UsageError("--checkpoint is required (only the --synthetic demo runs without one)")
    if args.val is None:
        raise UsageError("--val is required: the folder to evaluate on (or --synthetic)")
    if args.head is None and args.train is None:
        raise UsageError("--train is required to train a head (or pass --head to evaluate a saved one)")
    if args.head is not None and not os.path.isfile(args.head):
        raise UsageError(f"--head {args.head!r}: no such file")


def _load_model(args, device: str):
    from .features import load_feature_model

    if args.checkpoint is None:
        return random_demo_model(args.seed).to(device)
    try:
        return load_feature_model(args.checkpoint, args.which, device)
    except (ValueError, OSError) as e:  # missing, empty, foreign file: bad input
        raise UsageError(f"--checkpoint: {' '.join(str(e).split())}") from e


def _folder(path: str, task: str, flag: str):
    from .data.dense_folder import find_dense_pairs

    try:
        folder = find_dense_pairs(path, task, flag)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if not folder.pairs:
        raise UsageError(f"{flag} {path!r}: no image/label pairs ({len(folder.skipped)} unpaired file(s); expected "
                         f"images/<stem>.png|jpg with {'masks' if task == 'seg' else 'depth'}/<stem>.*)")
    return folder


def probe_main(args) -> int:

    from .eval import dense

    task = args.task
    say = (lambda *a: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))

    # 1. Flags, the model and the folders, before any long work.
    _check_flags(args)
    if args.epochs is None:  # the demo's small sets need more steps than a real training set's 10 epochs
        args.epochs = 30 if args.synthetic else 10
    if args.lr is None:
        args.lr = 3e-3 if args.synthetic else 1e-3
    device = _resolve_device(args.device)
    model = _load_model(args, device)
    patch, width = int(model.patch_size), int(model.embed_dim)
    size = args.image_size or int(model.default_image_size)
    if size % patch:
        lower = max(patch, size // patch * patch)
        raise UsageError(f"--image-size {size} is not a multiple of the patch size {patch} (try {lower} or "
                         f"{lower + patch})")
    label_size = args.label_size or size
    head_info = None
    if args.head is not None:
        try:
            head, head_info = dense.load_head(args.head, task, width, patch)
        except ValueError as e:
            raise UsageError(f"--head: {e}") from e
        if head_info.get("image_size") != size and args.image_size is None:
            size = int(head_info["image_size"])  # the head was trained at this side
    os.makedirs(args.out, exist_ok=True)
    if args.synthetic:
        from .data.synthetic_dense import write_dense_dataset

        root = os.path.join(args.out, "synthetic")
        say(f"generating {args.num_train} + {args.num_val} synthetic {task} images of {size}px in {root}")
        train_dir = write_dense_dataset(os.path.join(root, "train"), task, args.num_train, size, args.seed)
        val_dir = write_dense_dataset(os.path.join(root, "val"), task, args.num_val, size, args.seed + 1)
    else:
        train_dir, val_dir = args.train, args.val
    train_folder = _folder(train_dir, task, "--train") if args.head is None else None
    val_folder = _folder(val_dir, task, "--val")
    tokens = (size // patch) ** 2
    n_images = len(val_folder.pairs) + (len(train_folder.pairs) if train_folder else 0)
    check_memory(n_images * (tokens + 1) * width * 2 + n_images * label_size ** 2 * 4,
                 f"cached features of {n_images} images ({tokens} tokens × {width})", "cpu")

    # 2. Features, once.
    started = time.time()
    say(f"features: {model.source or 'backbone'} (patch {patch}, width {width}) at {size}px on {device}")
    def progress(done, total, state={"shown": 0}):  # about ten lines per split, none for small ones
        if total >= 200 and done * 10 // total > state["shown"]:
            state["shown"] = done * 10 // total
            say(f"  {done}/{total} images")
        if done == total:
            state["shown"] = 0

    extract = dict(image_size=size, label_size=label_size, batch_size=args.feature_batch_size, device=device,
                   progress=progress)
    try:
        train = dense.extract_dense_split(model, train_folder, **extract) if train_folder else None
        val = dense.extract_dense_split(model, val_folder, **extract)
    except ValueError as e:
        raise UsageError(str(e)) from e
    say(f"features of {val.patch.shape[0] + (train.patch.shape[0] if train else 0)} images in "
        f"{time.time() - started:.1f} s")

    # 3. The head: trained here, or the saved one.
    losses = []

    def log(epoch, loss):
        losses.append(round(loss, 6))
        say(f"epoch {epoch}/{args.epochs} loss {loss:.4f}")

    num_classes = None
    if task == "seg":
        if head_info is not None:
            num_classes = int(head_info["num_classes"])
        else:
            labels = train.labels
            present = labels[labels != dense.IGNORE_INDEX]
            num_classes = args.num_classes or (int(present.max()) + 1 if present.numel() else 1)
            if present.numel() and int(present.max()) >= num_classes:
                raise UsageError(f"--num-classes {num_classes}: the training masks hold class {int(present.max())}")
        val_labels = val.labels[val.labels != dense.IGNORE_INDEX]
        if val_labels.numel() and int(val_labels.max()) >= num_classes:
            raise UsageError(f"--val masks hold class {int(val_labels.max())}, but the head has {num_classes} "
                             f"classes (0..{num_classes - 1})")
    if head_info is None:
        common = dict(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                      with_cls=args.with_cls, seed=args.seed, device=device, log=log)
        try:
            if task == "seg":
                head = dense.train_segmentation_head(train, num_classes, **common)
            else:
                head = dense.train_depth_head(train, silog_lambda=args.silog_lambda, **common)
        except ValueError as e:  # labels that cannot train a head (e.g. no valid depth at all)
            raise UsageError(f"--train {train_dir!r}: {e}") from e
        baseline = dense.training_baseline(task, train)
        head_info = {"image_size": size, "label_size": label_size, "patch_size": patch, "embed_dim": width,
                     "num_classes": num_classes, "baseline": baseline, "checkpoint": args.checkpoint,
                     "backbone": model.source}
        dense.save_head(os.path.join(args.out, "head.pth"), head, task, head_info)
    head = head.to(device)

    # 4. Evaluation, pictures, metrics.
    try:
        result = dense.evaluate_dense_probe(head, task, val, args.out, num_classes=num_classes,
                                            baseline=head_info.get("baseline"))
    except ValueError as e:  # a class the head lacks in a full-size mask, or no evaluable image
        raise UsageError(f"--val {val_dir!r}: {e}") from e
    report = {"task": task, "checkpoint": args.checkpoint, "backbone": model.source, "which": args.which,
              "train": None if train is None else {"folder": train_dir, "images": train.patch.shape[0],
                                                   "skipped": [{"path": p, "reason": r} for p, r in train.skipped]},
              "val": {"folder": val_dir, "images": result["images"], "skipped": result["skipped"]},
              "head": args.head or os.path.join(args.out, "head.pth"),
              "settings": {"image_size": size, "label_size": label_size, "patch_size": patch, "epochs": args.epochs,
                           "lr": args.lr, "weight_decay": args.weight_decay, "batch_size": args.batch_size,
                           "with_cls": head.with_cls, "seed": args.seed,
                           **({"silog_lambda": args.silog_lambda} if task == "depth" else
                              {"num_classes": num_classes})},
              "train_loss": losses, "metrics": result["metrics"], "baseline": result.get("baseline"),
              "seconds": round(time.time() - started, 2)}
    if task == "depth":
        report["per_image"] = result["per_image"]
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2, allow_nan=True)
    m = result["metrics"]
    skipped = len(result["skipped"]) + (len(train.skipped) if train is not None else 0)
    summary = (f"mIoU {m['miou']:.4f}, pixel accuracy {m['pixel_accuracy']:.4f}" if task == "seg" else
               f"RMSE {m['rmse']:.4f} m, δ<1.25 {m['delta1']:.4f}, abs rel {m['abs_rel']:.4f}")
    print(f"probe {task}: {summary} on {result['images']} image(s)"
          f"{f', {skipped} file(s) skipped (see metrics.json)' if skipped else ''}; written to {args.out}")
    return 0
