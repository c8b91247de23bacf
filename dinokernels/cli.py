"""Command line: ``dinokernels <command>`` or ``python -m dinokernels <command>``.

`main()` builds the parser; every sub-command registers itself in `add_commands` (info, pretrain, knn,
attention). The `dinokernels` script and ``python -m dinokernels`` (__main__.py) both call `main`.

Errors (docs/reliability.md): a bad flag value is one line naming the flag, the value and the accepted range, exit
code 2, before any work starts (the range-checked argparse types below, `UsageError` for checks after parsing);
any other failure is one line and exit code 1 (`run_command`; the traceback only with --debug or
DINOKERNELS_DEBUG=1). New sub-commands get both by registering in `add_commands` and using these types."""
import argparse
import contextlib
import json
import math
import os
import sys
import traceback
from dataclasses import fields
from typing import Any, Callable, Dict, Iterator, Optional

__all__ = ["main", "add_commands", "info_main", "pretrain_main", "knn_main", "attention_main", "run_command",
           "UsageError", "positive_int", "nonnegative_int", "finite_float", "finite_positive_float", "probability",
           "available_memory_bytes", "vit_memory_bytes", "check_memory", "removed_if_empty_on_error"]

DEBUG_ENV = "DINOKERNELS_DEBUG"
MAX_IMAGE_SIDE = 8192  # pixels: crops, resizes and attention images (a 16384² float image alone is 3 GiB)
MAX_TILE = 2048  # pixels: one tile of the attention grid


# ---- errors and argument types (reusable by every sub-command) ----

class UsageError(ValueError):
    """A flag value (or a combination of flags) that cannot work, found after parsing: exit code 2, one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`<prog>: error: <message> (see <prog> --help)`, exit code 2) instead of
    the usage block; sub-command parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '≥'} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '≤'} {hi}"
    return "finite"


def positive_int(max: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer in [1, max]."""
    return _int_type(1, max)


def nonnegative_int(max: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer in [0, max]."""
    return _int_type(0, max)


def _int_type(lo: Optional[int], hi: Optional[int]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer (accepted: {_range_text(lo, hi, 0, 0)})")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range (accepted: {_range_text(lo, hi, 0, 0)})")
        return value

    parse.__name__ = "integer"
    return parse


def finite_float(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
                 hi_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in the range [lo, hi] (open ends with lo_open / hi_open); nan and ±inf are
    refused."""
    accepted = _range_text(lo, hi, lo_open, hi_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number (accepted: {accepted})")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not finite (accepted: {accepted})")
        if lo is not None and (value < lo or (lo_open and value == lo)) or \
                hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"{text} is out of range (accepted: {accepted})")
        return value

    parse.__name__ = "number"
    return parse


def finite_positive_float(max: Optional[float] = None) -> Callable[[str], float]:
    """argparse type: a finite float > 0 (and ≤ max)."""
    return finite_float(0.0, max, lo_open=True)


def probability() -> Callable[[str], float]:
    """argparse type: a float in [0, 1]."""
    return finite_float(0.0, 1.0)


def _debug_enabled(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def _one_line(exc: BaseException) -> str:
    """The exception as one line: its message (the type name too when that says more than the message)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = f"missing key {exc.args[0]!r}"
    plain = (ValueError, OSError, RuntimeError)
    if not text or not isinstance(exc, plain) or type(exc).__module__ not in ("builtins",) and \
            not type(exc).__module__.startswith("dinokernels"):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def run_command(args) -> int:
    """Runs `args.run(args)` (a sub-command) and turns failures into one line on stderr: UsageError → exit code 2,
    any other exception → exit code 1, Ctrl-C → 130. With --debug or DINOKERNELS_DEBUG=1 the traceback is printed
    too."""
    prog = f"dinokernels {args.command}" if getattr(args, "command", None) else "dinokernels"
    try:
        return int(args.run(args) or 0)
    except UsageError as e:
        if _debug_enabled(args):
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 — the one place that turns every failure into one line
        if _debug_enabled(args):
            traceback.print_exc()
            hint = ""
        else:
            hint = f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"{prog}: error: {_one_line(e)}{hint}", file=sys.stderr, flush=True)
        return 1


@contextlib.contextmanager
def removed_if_empty_on_error(folder: Optional[str]) -> Iterator[None]:
    """On an exception inside the block, removes `folder` and the parents of it that did not exist before the block
    and are empty afterwards (a failed command leaves no empty output folders behind)."""
    new = []
    if folder:
        path = os.path.abspath(folder)
        while path and not os.path.exists(path):
            new.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
    try:
        yield
    except BaseException:
        for path in new:  # deepest first
            try:
                os.rmdir(path)
            except OSError:
                break
        raise


@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator[str]:
    """A temporary path next to `path`, renamed onto it when the block succeeds and removed when it fails."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---- memory estimates ----

def available_memory_bytes(device: str = "cpu") -> Optional[int]:
    """Free memory of `device`: the GPU's free memory for cuda[:N], else the machine's MemAvailable
    (/proc/meminfo, or available pages × page size). None when it cannot be told."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = torch.device(device).index
            return int(torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())[0])
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def vit_memory_bytes(images: int, side: int, patch: int, width: int, depth: int, heads: int,
                     training: bool, element_bytes: int = 4) -> int:
    """A lower estimate of the activation memory of a ViT forward on `images` square images of `side` pixels
    (T = (side // patch)² + 1 tokens of `width`): per block and image 15·T·width values (layer norms, q/k/v,
    attention output and projection, the 4×-wide MLP twice) plus 2·heads·T² (attention scores and weights). Training
    keeps every block's activations for the backward pass (× depth); inference needs one block at a time plus the
    input."""
    tokens = (side // max(1, patch)) ** 2 + 1
    per_block = 15 * tokens * width + 2 * heads * tokens * tokens
    blocks = depth if training else 1
    return int(images * (blocks * per_block + 3 * side * side) * element_bytes)


_VIT_DIMS = {"vit_nano": (128, 4, 4), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
             "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16),
             "vit_giant2": (1536, 40, 24)}  # (width, depth, heads)


def check_memory(estimate: int, what: str, device: str = "cpu") -> None:
    """UsageError when `estimate` bytes exceed the free memory of `device` (skipped when that is unknown)."""
    available = available_memory_bytes(device)
    if available is not None and estimate > available:
        raise UsageError(f"{what} needs about {_gib(estimate)} of memory (estimate), more than the "
                         f"{_gib(available)} available on {device}; use smaller sizes or a smaller batch")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _pretrain_memory_bytes(config) -> Optional[int]:
    """Lower estimate for one training step: the student's activations over all crops (kept for the backward
    pass), the teacher's over the global crops (one block at a time), the head's outputs, and the weights with
    their gradients and two AdamW moments (student) plus the teacher's weights."""
    dims = _VIT_DIMS.get(config.arch)
    if dims is None:
        return None
    width, depth, heads = dims
    e = 2 if config.resolved_precision() in ("bf16", "fp16") else 4
    b = config.batch_size_per_gpu
    student = (vit_memory_bytes(2 * b, config.global_size, config.patch_size, width, depth, heads, True, e)
               + vit_memory_bytes(config.local_crops_number * b, config.local_size, config.patch_size, width, depth,
                                  heads, True, e))
    teacher = vit_memory_bytes(2 * b, config.global_size, config.patch_size, width, depth, heads, False, e)
    crops = (2 + config.local_crops_number) * b
    head_out = crops * (3 * config.hidden_dim + config.bottleneck_dim + 3 * config.out_dim) * e
    params = (12 * depth * width * width + width * config.hidden_dim + config.hidden_dim ** 2
              + config.hidden_dim * config.bottleneck_dim + config.bottleneck_dim * config.out_dim)
    return int(student + teacher + head_out + params * 4 * 5)


def _model_dims(model):
    return int(model.embed_dim), len(model.blocks), int(model.num_heads)


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
    raise argparse.ArgumentTypeError(f"{s!r} is not a boolean (accepted: true/false, on/off, yes/no, 1/0)")


_EPOCHS_MAX = 100_000
_WIDTH_MAX = 1 << 20
_crop_side = positive_int(MAX_IMAGE_SIDE)


# (field, type, extra argparse kwargs, help). Every flag is spelled with dashes and, as main_dino.py, with
# underscores (--batch-size is also --batch_size_per_gpu). Defaults are None: unset flags take the official value,
# or the digits preset's when no --data is given.
_RECIPE = [
    ("arch", str, {}, "vit_nano | vit_tiny | vit_small | vit_base | timm:<name> (official: vit_small; digits: "
                      "vit_nano)"),
    ("patch_size", positive_int(MAX_IMAGE_SIDE), {}, "ViT patch size (official 16; digits 4)"),
    ("out_dim", positive_int(_WIDTH_MAX), {}, "K, the head's output width (official 65536; digits 1024)"),
    ("norm_last_layer", _bool, {"metavar": "BOOL"}, "weight-normalise the head's last layer with a frozen scale "
                                                    "(official true)"),
    ("momentum_teacher", probability(), {}, "base teacher EMA momentum, cosine to 1 (official 0.996)"),
    ("use_bn_in_head", _bool, {"metavar": "BOOL"}, "batch norm in the head (official false)"),
    ("warmup_teacher_temp", finite_positive_float(), {}, "initial teacher temperature (official 0.04)"),
    ("teacher_temp", finite_positive_float(), {}, "teacher temperature after the warm-up (official 0.04)"),
    ("warmup_teacher_temp_epochs", nonnegative_int(_EPOCHS_MAX), {}, "teacher temperature warm-up epochs (official 0)"),
    ("weight_decay", finite_float(0.0), {}, "initial weight decay (official 0.04)"),
    ("weight_decay_end", finite_float(0.0), {}, "final weight decay, cosine (official 0.4)"),
    ("clip_grad", finite_float(0.0), {}, "per-tensor gradient norm clip, 0 disables (official 3.0)"),
    ("batch_size_per_gpu", positive_int(1 << 20), {"aliases": ["--batch-size"]}, "images per process and step (official 64)"),
    ("epochs", positive_int(_EPOCHS_MAX), {}, "training epochs (official 100)"),
    ("freeze_last_layer", nonnegative_int(_EPOCHS_MAX), {}, "epochs with the head's last layer frozen (official 1)"),
    ("lr", finite_positive_float(), {}, "peak learning rate for a total batch of 256, scaled linearly (official 0.0005)"),
    ("warmup_epochs", nonnegative_int(_EPOCHS_MAX), {}, "linear learning-rate warm-up epochs (official 10)"),
    ("min_lr", finite_float(0.0), {}, "final learning rate (official 1e-6)"),
    ("optimizer", str, {"choices": ["adamw", "sgd", "lars"]}, "optimiser (official adamw)"),
    ("drop_path_rate", finite_float(0.0, 1.0, hi_open=True), {}, "student stochastic depth (official 0.1)"),
    ("global_crops_scale", finite_float(0.0, 1.0, lo_open=True), {"nargs": 2, "metavar": ("LO", "HI")}, "global crop area range (official 0.4 1)"),
    ("local_crops_number", nonnegative_int(64), {}, "local crops per image (official 8)"),
    ("local_crops_scale", finite_float(0.0, 1.0, lo_open=True), {"nargs": 2, "metavar": ("LO", "HI")}, "local crop area range (official 0.05 0.4)"),
    ("global_size", _crop_side, {}, "global crop side in pixels (official 224; digits 32)"),
    ("local_size", _crop_side, {}, "local crop side in pixels (official 96; digits 16)"),
    ("hidden_dim", positive_int(_WIDTH_MAX), {}, "head hidden width (official 2048)"),
    ("bottleneck_dim", positive_int(_WIDTH_MAX), {}, "head bottleneck width (official 256)"),
    ("seed", nonnegative_int(2**63 - 1), {}, "random seed (0)"),
    ("num_workers", nonnegative_int(1024), {}, "data-loading processes (default: min(10, cores − 1); digits 0)"),
    ("saveckp_freq", nonnegative_int(_EPOCHS_MAX), {}, "also keep checkpointNNNN.pth every this many epochs, 0: never (official 20)"),
    ("checkpoint_every", nonnegative_int(), {}, "also write checkpoint.pth every this many iterations (0: at epoch ends only)"),
    ("subset", positive_int(), {}, "train on the first N images only"),
    ("eval_data", str, {"metavar": "DIR"}, "labelled folder with train/ and val/ sub-folders for the k-NN table "
                                           "after training on --data"),
    ("eval_resize", _crop_side, {}, "k-NN preprocessing: resize the shorter side (256 for folders; digits: the crop size)"),
    ("eval_crop", _crop_side, {}, "k-NN preprocessing: centre crop (224 for folders; digits: --global-size)"),
    ("knn_k", positive_int(1 << 20), {}, "k of the k-NN evaluation (20)"),
    ("knn_temperature", finite_positive_float(), {}, "temperature of the k-NN vote (0.07)"),
    # ---- method and DINOv2's recipe (SPEC §3.2–3.9; unset = DINOv2's default, or the dinov2-digits preset's) ----
    ("method", str, {"choices": ["dino", "dinov2"]}, "dino (DINO v1, default) | dinov2 (DINO + iBOT + KoLeo; "
                                                      "DINOv2's defaults apply to unset flags)"),
    ("centering", str, {"choices": ["centering", "sinkhorn_knopp"]}, "teacher targets: softmax centering "
                                                                      "(default) or Sinkhorn-Knopp"),
    ("lr_scaling", str, {"choices": ["linear_wrt_256", "sqrt_wrt_1024"]}, "lr × batch/256 (DINO) or "
                                                                           "× √(batch/1024) (dinov2)"),
    ("layer_decay", finite_float(0.0, 1.0, lo_open=True), {}, "dinov2: layer-wise lr decay (0.9)"),
    ("patch_embed_lr_mult", finite_float(0.0), {}, "dinov2: lr multiplier of the patch embedding (0.2)"),
    ("dino_loss_weight", finite_float(0.0), {}, "dinov2: weight of the DINO CLS term (1.0)"),
    ("koleo_loss_weight", finite_float(0.0), {}, "dinov2: weight of the KoLeo term (0.1)"),
    ("ibot_loss_weight", finite_float(0.0), {}, "dinov2: weight of the iBOT term (1.0)"),
    ("mask_probability", probability(), {}, "dinov2: fraction of global crops with iBOT masks (0.5)"),
    ("mask_ratio", probability(), {"nargs": 2, "metavar": ("LO", "HI")}, "dinov2: masked fraction range of "
                                                                          "those crops' patches (0.1 0.5)"),
    ("ibot_separate_head", _bool, {"metavar": "BOOL"}, "dinov2: a separate iBOT head (false: shared with DINO)"),
    ("ibot_out_dim", positive_int(_WIDTH_MAX), {}, "dinov2: K of a separate iBOT head (default: --out-dim)"),
    ("layerscale", finite_float(0.0), {}, "dinov2: LayerScale init (1e-5; the dinov2-digits preset 1.0)"),
    ("num_register_tokens", nonnegative_int(64), {}, "dinov2: register tokens (0)"),
    ("drop_path_uniform", _bool, {"metavar": "BOOL"}, "dinov2: the same stochastic depth in every block (true)"),
    ("blur_semantics", str, {"choices": ["released", "nominal"]}, "dinov2: blur with 1 − p on the global crops as "
                                                                   "the released models were trained (released, "
                                                                   "default), or with p (nominal)"),
    ("highres_epochs", nonnegative_int(_EPOCHS_MAX), {}, "dinov2: the last N epochs at --highres-global-size "
                                                          "(local crops scaled alike; 0: none)"),
    ("highres_global_size", _crop_side, {}, "dinov2: global crop side of the high-resolution phase (518)"),
    ("distill_teacher", str, {"metavar": "PATH"}, "dinov2 distillation: frozen teacher weights (official file, "
                                                   "dinov2 checkpoint or transformers folder)"),
    ("distill_teacher_arch", str, {}, "its architecture: a hub name (dinov2_vitb14 ...) or vit_nano ... "
                                      "vit_giant2 (not needed for a transformers folder)"),
]


def _flags(name: str, extra_aliases=()) -> list:
    dashed = "--" + name.replace("_", "-")
    flags = [dashed] + list(extra_aliases)
    if "_" in name:
        flags.append("--" + name)
    return flags


def _add_pretrain(commands) -> None:
    p = commands.add_parser(
        "pretrain", help="DINO self-supervised pretraining (default: the built-in coloured digits on the CPU, "
                         "~3 minutes)",
        description="DINO v1 pretraining (facebookresearch/dino main_dino.py) with the dinokernels loss kernels. "
                    "With no arguments: scikit-learn's digits in random colours and zooms (preset coloured-digits), a "
                    "small ViT, the CPU, about three minutes on two cores, then a k-NN table (learned features vs "
                    "random initialisation vs raw pixels) and "
                    "<out>/summary.json. With --data DIR: your images, the official recipe's defaults. "
                    "--method dinov2: DINOv2 (DINO + iBOT + KoLeo) with its defaults, built-in job dinov2-digits. "
                    "Multi-process: torchrun --nproc_per_node=N -m dinokernels pretrain ...")
    p.add_argument("--data", metavar="DIR", help="folder of images (recursive; jpg/png/webp); default: the built-in "
                                                 "coloured digits")
    from .train.config import DEFAULT_PRESET, PRESETS

    p.add_argument("--preset", choices=list(PRESETS), help=f"named built-in job: data set and recipe (default without "
                                                           f"--data: {DEFAULT_PRESET}; 'digits' is the plain digits "
                                                           f"job); with --data only its recipe applies")
    p.add_argument("--out", metavar="DIR", help="output folder: checkpoint.pth, log.jsonl, loss.png, summary.json "
                                                "(default: out; with --resume CHECKPOINT: the checkpoint's folder)")
    p.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: <out>/checkpoint.pth), with its settings unless "
                        "flags given here override them (e.g. a larger --epochs); outputs go to --out, else to the "
                        "checkpoint's folder")
    p.add_argument("--overwrite", action="store_true",
                   help="allow writing into a folder that holds another run's files (they are replaced)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (default auto: fp16 with loss scaling on CUDA as official, fp32 on CPU)")
    p.add_argument("--use-fp16", "--use_fp16", type=_bool, metavar="BOOL", dest="use_fp16",
                   help="main_dino.py's flag: true = --precision fp16, false = fp32")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="shard student and teacher with FSDP (torch fully_shard, per transformer block) instead of "
                        "DDP; under torchrun, or in one process")
    p.add_argument("--no-fsdp", dest="fsdp", action="store_false", help="resume an --fsdp run without FSDP")
    p.add_argument("--fsdp-mixed-precision", choices=["auto", "none", "bf16", "fp16"],
                   help="with --fsdp: compute dtype of the gathered weights (default auto: bf16 on CUDA, none on "
                        "the CPU); weights, optimiser state and gradient reduction stay float32")
    recipe = p.add_argument_group("recipe (main_dino.py's arguments; unset = official default, or the built-in "
                                  "preset's without --data)")
    for name, typ, extra, help_text in _RECIPE:
        extra = dict(extra)
        aliases = extra.pop("aliases", [])
        recipe.add_argument(*_flags(name, aliases), dest=name, type=typ, help=help_text, **extra)
    p.add_argument("--no-eval", dest="evaluate", action="store_false", default=None,
                   help="skip the k-NN evaluation after training")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    p.set_defaults(run=pretrain_main)


_DINOV2_ONLY = ("layer_decay", "patch_embed_lr_mult", "dino_loss_weight", "koleo_loss_weight", "ibot_loss_weight",
                "mask_probability", "mask_ratio", "ibot_separate_head", "ibot_out_dim", "layerscale",
                "num_register_tokens", "drop_path_uniform", "blur_semantics", "highres_epochs", "highres_global_size",
                "distill_teacher", "distill_teacher_arch")


def _check_method_flags(given: Dict[str, Any], args) -> None:
    """DINOv2-only flags on a fresh --method dino run (given, or the default) would be ignored: refused. On
    --resume the checkpoint's method decides."""
    from .train.config import PRESETS

    method = given.get("method") or PRESETS.get(given.get("preset", ""), {}).get("method")
    if args.resume is None and method in (None, "dino"):
        wrong = [n for n in _DINOV2_ONLY if n in given]
        if wrong:
            raise UsageError(f"{', '.join('--' + n.replace('_', '-') for n in wrong)}: for --method dinov2 only")
    if "distill_teacher" in given and not os.path.exists(given["distill_teacher"]):
        raise UsageError(f"--distill-teacher {given['distill_teacher']!r}: no such file or folder")


def _pretrain_config(args) -> Any:
    from .train.config import PretrainConfig, make_config

    given: Dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(PretrainConfig)
                             if getattr(args, f.name, None) is not None and f.name != "resume"}
    if args.use_fp16 is not None and args.precision is None:
        given["precision"] = "fp16" if args.use_fp16 else "fp32"
    if given.get("fsdp") is False and "fsdp_mixed_precision" not in given:
        given["fsdp_mixed_precision"] = "auto"  # --no-fsdp on resume drops the stored FSDP setting too
    for key in ("global_crops_scale", "local_crops_scale", "mask_ratio"):
        if key in given:
            given[key] = tuple(given[key])
    _check_method_flags(given, args)
    if args.resume is None:
        try:
            return make_config(**given)
        except ValueError as e:
            raise UsageError(str(e)) from e
    if "preset" in given:
        raise UsageError("--preset cannot be combined with --resume (the checkpoint's settings apply)")
    return resumed_config(args.resume, given, "out", PretrainConfig.from_dict, lambda fmt: True,
                          "a dinokernels pretraining checkpoint")


def resumed_config(resume: str, given: Dict[str, Any], default_out: str, from_dict, format_ok,
                   what: str) -> Any:
    """The configuration of a resumed run: the checkpoint's stored settings, overridden by the flags given.
    `resume` "" means <out>/checkpoint.pth. Outputs go to --out, else next to the checkpoint given: never to a
    folder named inside the file. `format_ok(format)` says whether the checkpoint is of the expected kind."""
    from .train.checkpoint import load_checkpoint

    path = resume or os.path.join(given.get("out", default_out), "checkpoint.pth")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    ckpt = load_checkpoint(path)
    stored = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(stored, dict) or not format_ok(ckpt.get("format")):
        raise ValueError(f"--resume: {path} is not {what} (no stored settings)")
    values = dict(stored)
    values.update(given)
    values["resume"] = path
    values["out"] = given["out"] if "out" in given else (os.path.dirname(path) or ".")
    try:
        return from_dict(values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--resume {path}: {' '.join(str(e).split())}") from e


def pretrain_main(args) -> int:
    from .train.trainer import OutputFolderInUseError, _check_output_folder, train_dino

    config = _pretrain_config(args)  # combinations that cannot train: PretrainConfig's checks (UsageError)
    try:
        _check_output_folder(config, bool(getattr(args, "overwrite", False)))
    except OutputFolderInUseError as e:
        raise UsageError(str(e)) from e
    estimate = _pretrain_memory_bytes(config)
    if estimate is not None:
        check_memory(estimate, f"training {config.arch}/{config.patch_size} on {config.batch_size_per_gpu} images "
                               f"× (2 × {config.global_size}px + {config.local_crops_number} × "
                               f"{config.local_size}px crops)", config.resolved_device())
    with removed_if_empty_on_error(config.out):
        result = train_dino(config, overwrite=bool(getattr(args, "overwrite", False)))
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
    p.add_argument("--patch-size", "--patch_size", type=positive_int(MAX_IMAGE_SIDE), dest="patch_size")
    p.add_argument("--k", "--nb_knn", type=positive_int(1 << 20), default=20, dest="k", help="neighbours (20)")
    p.add_argument("--temperature", type=finite_positive_float(), default=0.07, help="vote temperature (0.07)")
    p.add_argument("--resize", type=positive_int(MAX_IMAGE_SIDE),
                   help="evaluation resize (default 256 for folders; digits: crop size)")
    p.add_argument("--crop", type=positive_int(MAX_IMAGE_SIDE),
                   help="evaluation centre crop (default 224 for folders; digits: the training size)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                   help="also random initialisation and raw pixels (default: on for digits)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=nonnegative_int(1024), default=0, dest="num_workers")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=knn_main)


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _load_backbone(args):
    """load_backbone for --checkpoint, with a missing, empty, truncated or foreign file as one clear error."""
    from .eval.loading import load_backbone
    from .train.checkpoint import ACCESS_ERRORS, LOAD_ERRORS, check_checkpoint_file, checkpoint_error

    path = check_checkpoint_file(args.checkpoint, "--checkpoint")
    try:
        from .eval.loading import read_checkpoint

        read_checkpoint(path)
    except ACCESS_ERRORS:
        raise
    except LOAD_ERRORS as e:
        raise checkpoint_error(path, e, "--checkpoint") from e
    try:
        return load_backbone(path, args.which, args.arch, args.patch_size)
    except (KeyError, TypeError, AttributeError) as e:  # a readable file without the expected contents
        raise ValueError(f"--checkpoint {path!r} is not a DINO checkpoint or backbone weight file "
                         f"({type(e).__name__}: {e})") from e


def knn_main(args) -> int:
    from .eval.report import evaluate_features, format_table, random_init_backbone, summary_keys
    from .train.config import PretrainConfig
    from .train.inputs import build_eval_datasets

    if args.data is not None and not os.path.isdir(args.data):
        raise UsageError(f"--data {args.data!r} is not a folder")
    model, config, _ = _load_backbone(args)
    if config is None:
        arch = args.arch or _arch_of(model)
        config = PretrainConfig(arch=arch, patch_size=_patch_of(model), data=args.data or ".")
    if args.data is None and config.data is not None:
        print("dinokernels knn: this checkpoint was not trained on the built-in digits; pass --data DIR (with "
              "train/ and val/ sub-folders)", file=sys.stderr)
        return 2
    config = config.replace(eval_resize=args.resize or config.eval_resize, eval_crop=args.crop or config.eval_crop)
    device = _device(args.device)
    width, depth, heads = _model_dims(model)
    side = config.eval_crop or (config.global_size if args.data is None else 224)
    n_cached = 1797 if args.data is None else 0  # the digits' evaluation images are kept in memory
    check_memory(vit_memory_bytes(256, side, _patch_of(model), width, depth, heads, False)
                 + n_cached * 3 * side * side * 4 * 2,
                 f"k-NN features of {side}px crops (batches of 256)", device)
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
    p.add_argument("--patch-size", "--patch_size", type=positive_int(MAX_IMAGE_SIDE), dest="patch_size")
    p.add_argument("--image-size", "--image_size", type=positive_int(MAX_IMAGE_SIDE), dest="image_size",
                   help="resize the image to this square side (default: 480 as the official script; digits "
                        "checkpoints: the training size)")
    p.add_argument("--tile", type=positive_int(MAX_TILE), default=160,
                   help="side of each tile in the grid, in pixels (160)")
    p.set_defaults(run=attention_main)


def _open_image(path: str, flag: str):
    """The image at `path` as RGB (dinokernels.data.imageio.open_rgb, fully decoded), or one error naming the
    flag and the file: missing, a folder, empty, truncated, not an image, too many pixels."""
    from PIL import Image

    from .data.imageio import open_rgb

    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path!r} is a folder, not an image file")
    try:
        image = open_rgb(path)
        image.load()
        return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{flag} {path!r} cannot be read as an image: {reason}") from e


def attention_main(args) -> int:
    from .eval.attention import visualize_attention
    from .train.inputs import normalization

    if args.image is not None:
        image = _open_image(args.image, "--image")  # before the checkpoint: a bad image fails fast
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a folder; give the PNG file to write")
    model, config, _ = _load_backbone(args)
    digits = config is not None and config.data is None
    if digits:
        mean, std = normalization(config)
        size = args.image_size or config.global_size
    else:
        from .data import IMAGENET_MEAN, IMAGENET_STD

        mean, std = IMAGENET_MEAN, IMAGENET_STD
        size = args.image_size or 480
    if args.image is None:
        if not digits:
            print("dinokernels attention: --image is needed for this checkpoint", file=sys.stderr)
            return 2
        from .data import builtin_dataset

        image = builtin_dataset(getattr(config, "builtin_data", "digits"), "test", config.digits_size)[0][0]
    width, depth, heads = _model_dims(model)
    patch = _patch_of(model)
    if size < patch:
        raise UsageError(f"--image-size {size} is smaller than the model's {patch}-pixel patch")
    check_memory(vit_memory_bytes(1, size, patch, width, depth, heads, False)
                 + 2 * heads * size * size * 4 + 3 * (heads + 1) * args.tile * args.tile,
                 f"attention maps of a {size}px image ({heads} heads, {args.tile}px tiles)", "cpu")
    with removed_if_empty_on_error(os.path.dirname(os.path.abspath(args.out))), _atomic_output(args.out) as tmp:
        visualize_attention(model, image, tmp, image_size=size, mean=mean, std=std, tile=args.tile)
    print(f"attention maps ({model.num_heads} heads) written to {args.out}")
    return 0


def add_commands(commands) -> None:
    """Registers every sub-command on the `dinokernels` sub-command parser (add new ones here)."""
    _add_info(commands)
    _add_pretrain(commands)
    _add_knn(commands)
    _add_attention(commands)
    from .cli_detection import add_detection_commands  # train-detector, detect (imported here: it imports cli)
    add_detection_commands(commands)
    from .cli_curate import add_curate_commands; add_curate_commands(commands)  # curate (imports cli too)
    from .cli_features import add_feature_commands; add_feature_commands(commands)  # embed, retrieve
    from .cli_probes import add_probe_commands; add_probe_commands(commands)  # probe seg / depth (dense probes)


def build_parser() -> argparse.ArgumentParser:
    """The `dinokernels` parser: every sub-command of add_commands, each with --debug."""
    parser = ArgumentParser(prog="dinokernels", description="dinokernels: build information, DINO pretraining and "
                                                            "evaluation")
    parser.add_argument("--debug", action="store_true", help=f"print the traceback of an error (or {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    add_commands(commands)
    for sub in commands.choices.values():
        if not any("--debug" in a.option_strings for a in sub._actions):
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=f"print the traceback of an error (or {DEBUG_ENV}=1)")
    return parser


def main(argv: Optional[list] = None) -> int:
    """Parses `argv` (usage errors: one line, exit code 2) and runs the sub-command through run_command (other
    errors: one line, exit code 1)."""
    args = build_parser().parse_args(argv)
    return run_command(args)
