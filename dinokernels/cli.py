"""Command line: ``dinokernels <command>`` or ``python -m dinokernels <command>``.

`main()` builds the parser; every sub-command registers itself in `add_commands` (info, pretrain, knn,
attention). The `dinokernels` script and ``python -m dinokernels`` (__main__.py) both call `main`."""
import argparse
import json
import os
import sys
from dataclasses import fields
from typing import Any, Dict, Optional

__all__ = ["main", "add_commands", "info_main", "pretrain_main", "knn_main", "attention_main"]


# ---- info ----

def _add_info(commands) -> None:
    p = commands.add_parser("info", help="print build information and whether kernels and the GPU are usable")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(run=info_main)


def info_main(args) -> int:
    from ._build_info import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


# ---- pretrain ----

def _bool(s: str) -> bool:
    """main_dino.py's bool_flag."""
    if s.lower() in ("off", "false", "0", "no"):
        return False
    if s.lower() in ("on", "true", "1", "yes"):
        return True
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {s!r}")


# (field, type, extra argparse kwargs, help). Every flag is spelled with dashes and, as main_dino.py, with
# underscores (--batch-size is also --batch_size_per_gpu). Defaults are None: unset flags take the official value,
# or the digits preset's when no --data is given.
_RECIPE = [
    ("arch", str, {}, "vit_nano | vit_tiny | vit_small | vit_base | timm:<name> (official: vit_small; digits: "
                      "vit_nano)"),
    ("patch_size", int, {}, "ViT patch size (official 16; digits 4)"),
    ("out_dim", int, {}, "K, the head's output width (official 65536; digits 1024)"),
    ("norm_last_layer", _bool, {"metavar": "BOOL"}, "weight-normalise the head's last layer with a frozen scale "
                                                    "(official true)"),
    ("momentum_teacher", float, {}, "base teacher EMA momentum, cosine to 1 (official 0.996)"),
    ("use_bn_in_head", _bool, {"metavar": "BOOL"}, "batch norm in the head (official false)"),
    ("warmup_teacher_temp", float, {}, "initial teacher temperature (official 0.04)"),
    ("teacher_temp", float, {}, "teacher temperature after the warm-up (official 0.04)"),
    ("warmup_teacher_temp_epochs", int, {}, "teacher temperature warm-up epochs (official 0)"),
    ("weight_decay", float, {}, "initial weight decay (official 0.04)"),
    ("weight_decay_end", float, {}, "final weight decay, cosine (official 0.4)"),
    ("clip_grad", float, {}, "per-tensor gradient norm clip, 0 disables (official 3.0)"),
    ("batch_size_per_gpu", int, {"aliases": ["--batch-size"]}, "images per process and step (official 64)"),
    ("epochs", int, {}, "training epochs (official 100)"),
    ("freeze_last_layer", int, {}, "epochs with the head's last layer frozen (official 1)"),
    ("lr", float, {}, "peak learning rate for a total batch of 256, scaled linearly (official 0.0005)"),
    ("warmup_epochs", int, {}, "linear learning-rate warm-up epochs (official 10)"),
    ("min_lr", float, {}, "final learning rate (official 1e-6)"),
    ("optimizer", str, {"choices": ["adamw", "sgd", "lars"]}, "optimiser (official adamw)"),
    ("drop_path_rate", float, {}, "student stochastic depth (official 0.1)"),
    ("global_crops_scale", float, {"nargs": 2, "metavar": ("LO", "HI")}, "global crop area range (official 0.4 1)"),
    ("local_crops_number", int, {}, "local crops per image (official 8)"),
    ("local_crops_scale", float, {"nargs": 2, "metavar": ("LO", "HI")}, "local crop area range (official 0.05 0.4)"),
    ("global_size", int, {}, "global crop side in pixels (official 224; digits 32)"),
    ("local_size", int, {}, "local crop side in pixels (official 96; digits 16)"),
    ("hidden_dim", int, {}, "head hidden width (official 2048)"),
    ("bottleneck_dim", int, {}, "head bottleneck width (official 256)"),
    ("seed", int, {}, "random seed (0)"),
    ("num_workers", int, {}, "data-loading processes (default: min(10, cores − 1); digits 0)"),
    ("saveckp_freq", int, {}, "also keep checkpointNNNN.pth every this many epochs, 0: never (official 20)"),
    ("checkpoint_every", int, {}, "also write checkpoint.pth every this many iterations (0: at epoch ends only)"),
    ("subset", int, {}, "train on the first N images only"),
    ("eval_data", str, {"metavar": "DIR"}, "labelled folder with train/ and val/ sub-folders for the k-NN table "
                                           "after training on --data"),
    ("eval_resize", int, {}, "k-NN preprocessing: resize the shorter side (256 for folders; digits: the crop size)"),
    ("eval_crop", int, {}, "k-NN preprocessing: centre crop (224 for folders; digits: --global-size)"),
    ("knn_k", int, {}, "k of the k-NN evaluation (20)"),
    ("knn_temperature", float, {}, "temperature of the k-NN vote (0.07)"),
]


def _flags(name: str, extra_aliases=()) -> list:
    dashed = "--" + name.replace("_", "-")
    flags = [dashed] + list(extra_aliases)
    if "_" in name:
        flags.append("--" + name)
    return flags


def _add_pretrain(commands) -> None:
    p = commands.add_parser(
        "pretrain", help="DINO self-supervised pretraining (default: the built-in digits on the CPU, ~3 minutes)",
        description="DINO v1 pretraining (facebookresearch/dino main_dino.py) with the dinokernels loss kernels. "
                    "With no arguments: the built-in scikit-learn digits, a small ViT, the CPU, about three minutes "
                    "on two cores, then a k-NN table (learned features vs random initialisation vs raw pixels) and "
                    "<out>/summary.json. With --data DIR: your images, the official recipe's defaults. "
                    "Multi-process: torchrun --nproc_per_node=N -m dinokernels pretrain ...")
    p.add_argument("--data", metavar="DIR", help="folder of images (recursive; jpg/png/webp); default: the built-in "
                                                 "digits")
    p.add_argument("--out", metavar="DIR", help="output folder: checkpoint.pth, log.jsonl, loss.png, summary.json "
                                                "(default: out)")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: <out>/checkpoint.pth), with its settings unless "
                        "flags given here override them (e.g. a larger --epochs)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (default auto: fp16 with loss scaling on CUDA as official, fp32 on CPU)")
    p.add_argument("--use-fp16", "--use_fp16", type=_bool, metavar="BOOL", dest="use_fp16",
                   help="main_dino.py's flag: true = --precision fp16, false = fp32")
    recipe = p.add_argument_group("recipe (main_dino.py's arguments; unset = official default, or the digits "
                                  "preset without --data)")
    for name, typ, extra, help_text in _RECIPE:
        extra = dict(extra)
        aliases = extra.pop("aliases", [])
        recipe.add_argument(*_flags(name, aliases), dest=name, type=typ, help=help_text, **extra)
    p.add_argument("--no-eval", dest="evaluate", action="store_false", default=None,
                   help="skip the k-NN evaluation after training")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    p.set_defaults(run=pretrain_main)


def _pretrain_config(args) -> Any:
    from .train.checkpoint import load_checkpoint
    from .train.config import PretrainConfig, make_config

    given: Dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(PretrainConfig)
                             if getattr(args, f.name, None) is not None and f.name != "resume"}
    if args.use_fp16 is not None and args.precision is None:
        given["precision"] = "fp16" if args.use_fp16 else "fp32"
    for key in ("global_crops_scale", "local_crops_scale"):
        if key in given:
            given[key] = tuple(given[key])
    if args.resume is None:
        return make_config(**given)
    path = args.resume or os.path.join(given.get("out", "out"), "checkpoint.pth")
    if not os.path.isfile(path):
        raise SystemExit(f"dinokernels pretrain: --resume: no checkpoint at {path}")
    stored = load_checkpoint(path).get("config")
    if stored is None:
        raise SystemExit(f"dinokernels pretrain: --resume: {path} is not a dinokernels pretraining checkpoint")
    values = dict(stored)
    values.update(given)
    values["resume"] = path
    return PretrainConfig.from_dict(values)


def pretrain_main(args) -> int:
    from .train.trainer import NonFiniteLossError, train_dino

    try:
        config = _pretrain_config(args)
    except ValueError as e:
        print(f"dinokernels pretrain: {e}", file=sys.stderr)
        return 2
    try:
        result = train_dino(config)
    except NonFiniteLossError as e:
        print(f"dinokernels pretrain: {e}", file=sys.stderr)
        return 1
    from .train.distributed import cleanup_distributed, is_main_process

    if is_main_process():
        lines = [f"wall time {result['wall_seconds']:.1f} s (training {result['train_seconds']:.1f} s)",
                 f"outputs in {result['out']}: checkpoint.pth, log.jsonl, loss.png, summary.json"]
        print("\n".join(lines), flush=True)
    cleanup_distributed()
    return 0


# ---- knn ----

def _add_knn(commands) -> None:
    p = commands.add_parser("knn", help="weighted k-NN accuracy of a checkpoint's features",
                            description="Weighted k-NN (DINO's eval_knn: k=20, T=0.07, L2-normalised CLS features) of "
                                        "a checkpoint written by `dinokernels pretrain` or an official DINO weight "
                                        "file. Data: --data DIR with train/ and val/ (or test/) class sub-folders; "
                                        "default: the built-in digits (train split as the bank, test split as the "
                                        "queries).")
    p.add_argument("--checkpoint", required=True, metavar="PATH")
    p.add_argument("--data", metavar="DIR", help="labelled folder with train/ and val/ (or test/) sub-folders")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher", help="network (default teacher)")
    p.add_argument("--arch", help="architecture of an official weight file (default: inferred from its shapes)")
    p.add_argument("--patch-size", "--patch_size", type=int, dest="patch_size")
    p.add_argument("--k", "--nb_knn", type=int, default=20, dest="k", help="neighbours (20)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature (0.07)")
    p.add_argument("--resize", type=int, help="evaluation resize (default 256 for folders; digits: crop size)")
    p.add_argument("--crop", type=int, help="evaluation centre crop (default 224 for folders; digits: the "
                                            "training size)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                   help="also random initialisation and raw pixels (default: on for digits)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0, dest="num_workers")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=knn_main)


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def knn_main(args) -> int:
    from .eval.loading import load_backbone
    from .eval.report import evaluate_features, format_table, random_init_backbone, summary_keys
    from .train.config import PretrainConfig
    from .train.inputs import build_eval_datasets

    model, config, _ = load_backbone(args.checkpoint, args.which, args.arch, args.patch_size)
    if config is None:
        arch = args.arch or _arch_of(model)
        config = PretrainConfig(arch=arch, patch_size=_patch_of(model), data=args.data or ".")
    if args.data is None and config.data is not None:
        print("dinokernels knn: this checkpoint was not trained on the built-in digits; pass --data DIR (with "
              "train/ and val/ sub-folders)", file=sys.stderr)
        return 2
    config = config.replace(eval_resize=args.resize or config.eval_resize, eval_crop=args.crop or config.eval_crop)
    if args.data is not None:
        config = config.replace(data=args.data)
    sets = build_eval_datasets(config, args.data)
    if sets is None:
        print("dinokernels knn: no labelled data", file=sys.stderr)
        return 2
    train_set, test_set, desc = sets
    baselines = args.baselines if args.baselines is not None else args.data is None
    backbones = {"learned (teacher)" if args.which == "teacher" else "learned (student)": model}
    if baselines:
        backbones["random init"] = random_init_backbone(config)
    device = _device(args.device)
    results = evaluate_features(backbones, train_set, test_set, device=device, k=args.k, T=args.temperature,
                                raw_pixels=baselines, num_workers=args.num_workers)
    if args.json:
        print(json.dumps({"results": results, "data": desc, **summary_keys(results)}, indent=2))
    else:
        print(format_table(results, k=args.k, title=f"k-NN accuracy ({desc})"))
    return 0


def _arch_of(model) -> str:
    from .eval.loading import _VIT_SHAPES

    return _VIT_SHAPES.get((model.embed_dim, len(model.blocks)), "vit_small")


def _patch_of(model) -> int:
    ps = model.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


# ---- attention ----

def _add_attention(commands) -> None:
    p = commands.add_parser("attention", help="per-head CLS self-attention maps of the last block, as a PNG grid",
                            description="Saves the self-attention of the CLS token over the patches in the last "
                                        "block, one map per head, next to the image (DINO's figure).")
    p.add_argument("--checkpoint", required=True, metavar="PATH")
    p.add_argument("--image", metavar="IMG", help="image file (default: the first digits test image, for a "
                                                  "checkpoint trained on the digits)")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--arch", help="architecture of an official weight file (default: inferred)")
    p.add_argument("--patch-size", "--patch_size", type=int, dest="patch_size")
    p.add_argument("--image-size", "--image_size", type=int, dest="image_size",
                   help="resize the image to this square side (default: 480 as the official script; digits "
                        "checkpoints: the training size)")
    p.add_argument("--tile", type=int, default=160, help="side of each tile in the grid, in pixels (160)")
    p.set_defaults(run=attention_main)


def attention_main(args) -> int:
    from .eval.attention import visualize_attention
    from .eval.loading import load_backbone
    from .train.inputs import normalization

    model, config, _ = load_backbone(args.checkpoint, args.which, args.arch, args.patch_size)
    digits = config is not None and config.data is None
    if digits:
        mean, std = normalization(config)
        size = args.image_size or config.global_size
    else:
        from .data import IMAGENET_MEAN, IMAGENET_STD

        mean, std = IMAGENET_MEAN, IMAGENET_STD
        size = args.image_size or 480
    image = args.image
    if image is None:
        if not digits:
            print("dinokernels attention: --image is needed for this checkpoint", file=sys.stderr)
            return 2
        from .data import DigitsDataset

        image = DigitsDataset(size=config.digits_size, split="test")[0][0]
    path = visualize_attention(model, image, args.out, image_size=size, mean=mean, std=std, tile=args.tile)
    print(f"attention maps ({model.num_heads} heads) written to {path}")
    return 0


def add_commands(commands) -> None:
    """Registers every sub-command on the `dinokernels` sub-command parser (add new ones here)."""
    _add_info(commands)
    _add_pretrain(commands)
    _add_knn(commands)
    _add_attention(commands)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="dinokernels", description="dinokernels: build information, DINO "
                                     "pretraining and evaluation")
    commands = parser.add_subparsers(dest="command", required=True)
    add_commands(commands)
    args = parser.parse_args(argv)
    return args.run(args)
