"""DINO v1 self-supervised pretraining (facebookresearch/dino main_dino.py, SPEC §2), on one process or under
torchrun.

The loop is the official one — per-iteration learning-rate (linear scaling rule, warm-up, cosine) and weight-decay
schedules, the teacher-temperature warm-up inside DINOLoss, per-tensor gradient clipping, the head's last layer
frozen during the first epoch, the EMA teacher with a cosine momentum schedule, optional bfloat16/float16 autocast
(float16 with loss scaling) — with these additions:

* the loss is dinokernels.DINOLoss (the fused kernel; the center is all-reduced when distributed);
* checkpoints are written atomically, hold only tensors and plain data, and carry every RNG state and the position
  inside the epoch, so a resumed run continues the same curve (bit for bit on the CPU);
* augmentations are seeded per (seed, epoch, image), so the crops do not depend on workers, processes or resuming;
* a non-finite loss stops every process with a clear message before the optimiser step, leaving the last
  checkpoint (written after a finite step) untouched;
* a progress bar on stderr, log.jsonl (one line per iteration and per epoch) and loss.png at the end.
"""
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .checkpoint import (atomic_write, get_rng_state, load_checkpoint, save_checkpoint, set_rng_state,
                         temporary_files, to_plain)
from .config import PretrainConfig
from .distributed import (ShardedSampler, cleanup_distributed, fsdp_mixed_precision_dtype, full_optimizer_state_dict,
                          get_rank, get_world_size, init_distributed, init_single_process_group, is_distributed,
                          is_main_process, load_full_optimizer_state_dict, local_device)
from .inputs import SeededTransform, build_pretrain_dataset, normalization
from .progress import JsonlLog, ProgressBar, format_seconds

__all__ = ["train_dino", "build_student_teacher", "NonFiniteLossError", "OutputFolderInUseError", "CHECKPOINT_FORMAT",
           "forward_views", "run_files"]

CHECKPOINT_FORMAT = "dinokernels.dino.v1"
RUN_FILE_NAMES = ("checkpoint.pth", "log.jsonl", "summary.json", "loss.png")
_EPOCH_CHECKPOINT = re.compile(r"checkpoint\d{4,}\.pth")


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss (or the network outputs it is computed from) was NaN or infinite."""


class OutputFolderInUseError(FileExistsError):
    """The output folder holds another run's files (checkpoint, log, summary, plot) and overwriting was not asked
    for."""


def run_files(folder: str) -> List[str]:
    """Names of the files a pretraining run writes that exist in `folder` (sorted; [] for a missing folder)."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    return sorted(e for e in entries if e in RUN_FILE_NAMES or _EPOCH_CHECKPOINT.fullmatch(e))


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_output_folder(config: PretrainConfig, overwrite: bool) -> bool:
    """Refuses (OutputFolderInUseError) to write into a folder holding another run's files unless `overwrite`;
    resuming from a checkpoint inside the folder continues that run and is allowed. Returns True when the folder's
    previous run files are to be replaced (a fresh run, or a resume from elsewhere, with overwrite)."""
    existing = run_files(config.out)
    if not existing:
        return False
    if config.resume and _same_folder(os.path.dirname(os.path.abspath(config.resume)), config.out):
        return False
    if not overwrite:
        raise OutputFolderInUseError(
            f"output folder {config.out!r} already holds another run's files ({', '.join(existing)}); choose "
            f"another --out, resume that run with --resume {os.path.join(config.out, 'checkpoint.pth')}, or "
            f"replace them with --overwrite")
    return True


def _remove_run_files(out: str) -> None:
    for name in run_files(out):
        os.remove(os.path.join(out, name))


def _say(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


# ---- model ----

def build_student_teacher(config: PretrainConfig) -> Tuple[nn.Module, nn.Module, int]:
    """(student, teacher, embed_dim): MultiCropWrapper(backbone, DINOHead) each, as main_dino.py builds them
    (stochastic depth in the student only; the teacher head with the default norm_last_layer=True), the teacher
    a copy of the student's weights with requires_grad off."""
    from ..models.dino import DINOHead, MultiCropWrapper, build_backbone

    student_backbone, embed_dim = build_backbone(config.arch, patch_size=config.patch_size,
                                                 drop_path_rate=config.drop_path_rate, img_size=config.global_size)
    teacher_backbone, _ = build_backbone(config.arch, patch_size=config.patch_size, drop_path_rate=0.0,
                                         img_size=config.global_size)
    student = MultiCropWrapper(student_backbone, DINOHead(embed_dim, config.out_dim, use_bn=config.use_bn_in_head,
                                                          norm_last_layer=config.norm_last_layer,
                                                          hidden_dim=config.hidden_dim,
                                                          bottleneck_dim=config.bottleneck_dim))
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(embed_dim, config.out_dim, use_bn=config.use_bn_in_head,
                                                          hidden_dim=config.hidden_dim,
                                                          bottleneck_dim=config.bottleneck_dim))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, embed_dim


def forward_views(student: nn.Module, teacher: nn.Module, images: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """(student logits (V·B, K) over all crops, teacher logits (2B, K) over the 2 global crops). A module-level
    function so that tests can wrap it (fault injection)."""
    with torch.no_grad():
        teacher_output = teacher(images[:2])
    student_output = student(images)
    return student_output, teacher_output


# ---- helpers ----

def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _make_scaler(device: torch.device, precision: str):
    if precision != "fp16":
        return None
    try:
        return torch.amp.GradScaler(device.type)
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.3 has only the CUDA scaler
        if device.type == "cuda":
            return torch.cuda.amp.GradScaler()
        raise ValueError("precision fp16 on the CPU needs torch ≥ 2.3 (torch.amp.GradScaler('cpu')); use bf16 or "
                         "fp32")


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _augmentation(config: PretrainConfig, high_resolution: bool):
    """The multi-crop augmentation of the run. DINOv2: global/local crop sizes of the high-resolution phase
    (local crops scaled like the global ones, rounded to the patch size), and the blur probabilities as the
    released checkpoints were trained when blur_semantics is "released" (global crops 1 − p, SPEC §3.7)."""
    from ..data import DataAugmentationDINO

    mean, std = normalization(config)
    global_size, local_size = config.global_size, config.local_size
    if high_resolution:
        scale = config.highres_global_size / config.global_size
        global_size = config.highres_global_size
        p = config.patch_size if config.method == "dinov2" else 1
        local_size = max(p, int(round(config.local_size * scale / p)) * p)
    transform = DataAugmentationDINO(config.global_crops_scale, config.local_crops_scale, config.local_crops_number,
                                     global_size, local_size, mean, std, blur_radius=config.blur_radius)
    transform.flip_p, transform.color_jitter_p, transform.grayscale_p = (config.flip_p, config.color_jitter_p,
                                                                         config.grayscale_p)
    transform.jitter = tuple(config.color_jitter)
    blur = tuple(config.blur_p)
    if config.method == "dinov2" and config.blur_semantics == "released":
        blur = (1.0 - blur[0], 1.0 - blur[1], blur[2])
    transform.blur_p, transform.solarize_p = blur, tuple(config.solarize_p)
    return transform


def _all_finite(*tensors: Tensor) -> bool:
    """True when every tensor is finite on every process (one all-reduce when distributed, so that all processes
    stop together instead of some waiting forever in a collective)."""
    bad = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    for t in tensors:
        bad = bad + (~torch.isfinite(t.detach())).any().float()
    if is_distributed():
        flag = bad.reshape(1).to("cpu" if torch.distributed.get_backend() == "gloo" else bad.device)
        torch.distributed.all_reduce(flag)
        bad = flag
    return float(bad.sum()) == 0.0


def _gather_rng_states() -> List[Dict[str, Any]]:
    state = get_rng_state()
    if not is_distributed():
        return [state]
    states: List[Any] = [None] * get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def _state(method, scaler, config, epoch, epoch_iteration, iteration, niter_per_ep, rng_states,
           extra) -> Dict[str, Any]:
    return {
        "format": method.checkpoint_format,
        "method": method.name,
        **method.state_dict(),  # DINO: student, teacher, dino_loss; DINOv2: the method's whole state
        "optimizer": full_optimizer_state_dict(method.optimizer),
        "fp16_scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),  # the epoch to (re)start from
        "epoch_iteration": int(epoch_iteration),  # iterations of that epoch already done
        "iteration": int(iteration),  # global iterations done
        "niter_per_ep": int(niter_per_ep),
        "world_size": get_world_size(),
        "config": to_plain(config.to_dict()),
        "rng": rng_states,
        "torch_version": str(torch.__version__),
        **to_plain(extra),
    }


def _save(path: str, *args) -> None:
    rng_states = _gather_rng_states()  # collective: every rank calls _save
    # Under FSDP the state is gathered from every rank's shards (collectives); rank 0 holds and writes it.
    if is_main_process() or getattr(args[0], "fsdp", False):
        state = _state(*args[:-1], rng_states, args[-1])
        if is_main_process():
            save_checkpoint(state, path)


def _check_resume_config(ckpt_cfg: Dict[str, Any], config: PretrainConfig) -> None:
    fields = ("method", "arch", "patch_size", "out_dim", "hidden_dim", "bottleneck_dim", "use_bn_in_head",
              "norm_last_layer", "local_crops_number", "optimizer", "ibot_separate_head", "ibot_out_dim",
              "num_register_tokens")
    diff = [f"{f}: checkpoint {ckpt_cfg.get(f)!r}, now {getattr(config, f)!r}" for f in fields
            if f in ckpt_cfg and ckpt_cfg[f] != (list(getattr(config, f)) if isinstance(getattr(config, f), tuple)
                                                 else getattr(config, f))]
    if diff:
        raise ValueError("cannot resume: the checkpoint was trained with a different model or recipe (" +
                         "; ".join(diff) + "). Resume with the checkpoint's settings (the CLI does this by default).")


# ---- training ----

def train_dino(config: PretrainConfig, *, evaluate: Optional[bool] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Pretrains DINO as `config` says; returns a result dict (paths, iterations, first/last loss, timings and, when
    evaluated, the k-NN results) that is also written to <out>/summary.json by the main process.

    Outputs go to config.out only. A folder that holds another run's files is refused (OutputFolderInUseError)
    unless `overwrite` (then those files are removed when training starts) or the run resumes from a checkpoint in
    that folder. Every output is written atomically (checkpoint, summary.json, loss.png: temporary file + rename;
    log.jsonl: whole-line appends), and an output folder this call created is removed again if it fails before
    writing anything into it.

    Raises NonFiniteLossError when the loss is not finite (after the last good checkpoint, nothing is written).
    Under torchrun (WORLD_SIZE > 1) each process calls this; the process group is created if needed."""
    replace_previous = _check_output_folder(config, overwrite)  # every rank: all refuse together
    created = not os.path.exists(config.out)
    # FSDP in a process started without torchrun: a process group of one, ended again when training ends.
    own_group = config.fsdp and not is_distributed() and int(os.environ.get("WORLD_SIZE", "1")) <= 1
    try:
        if own_group:
            init_single_process_group(config.resolved_device())
        return _train(config, evaluate, replace_previous)
    except BaseException:
        if created and is_main_process():
            try:
                os.rmdir(config.out)  # only when empty: nothing of this run to keep
            except OSError:
                pass
        raise
    finally:
        if own_group:
            cleanup_distributed()


def _train(config: PretrainConfig, evaluate: Optional[bool], replace_previous: bool) -> Dict[str, Any]:
    wall0 = time.perf_counter()
    device_name = config.resolved_device()
    init_distributed(device_name)
    rank, world = get_rank(), get_world_size()
    device = local_device(device_name)
    precision = config.resolved_precision()
    fsdp_dtype = fsdp_mixed_precision_dtype(config.fsdp_mixed_precision, device) if config.fsdp else None
    if config.fsdp and device.type == "cpu" and fsdp_dtype == torch.float16:
        _say("note: float16 on the CPU is slow and only useful for testing; bf16 is the CPU's 16-bit type")
    if device.type == "cpu" and precision == "fp16":
        _say("note: float16 autocast on the CPU is slow and only useful for testing; bf16 is the CPU's 16-bit type")
    out = config.out
    if is_main_process():
        os.makedirs(out, exist_ok=True)
        for name in RUN_FILE_NAMES:  # leftovers of atomic writes interrupted by a kill
            for tmp in temporary_files(out, name):
                os.remove(tmp)
    _seed_everything(config.seed + rank)

    # ---- data ----
    from ..data import collate_multicrop

    base, data_desc = build_pretrain_dataset(config)
    dataset = SeededTransform(base, _augmentation(config, high_resolution=False), seed=config.seed)
    sampler = ShardedSampler(len(dataset), seed=config.seed)
    batch = config.batch_size_per_gpu
    niter_per_ep = sampler.num_samples // batch
    if niter_per_ep == 0:
        raise ValueError(f"batch_size_per_gpu = {batch} is larger than the {sampler.num_samples} images each of the "
                         f"{world} process(es) gets per epoch ({data_desc}); lower --batch-size")
    num_workers = config.resolved_num_workers()
    loader_gen = torch.Generator()
    loader_gen.manual_seed(config.seed)  # the loader's own draws (worker seeds) leave the global RNG alone
    loader = DataLoader(dataset, sampler=sampler, batch_size=batch, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=True, collate_fn=collate_multicrop,
                        generator=loader_gen, persistent_workers=False)

    # ---- method (student, teacher, loss, optimiser, schedules) ----
    from .methods import build_method

    method = build_method(config, device)
    optimizer = method.optimizer
    scaler = _make_scaler(device, precision)
    if fsdp_dtype == torch.float16:  # float16 gradients need loss scaling; inf checks agree across the shards
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device.type)
    method.build_schedules(niter_per_ep, batch * world)

    # ---- resume ----
    start_epoch, start_it, resumed_from = 0, 0, None
    history: Dict[str, Any] = {"first_loss": None}
    if config.resume:
        if not os.path.isfile(config.resume):
            raise FileNotFoundError(f"--resume {config.resume!r}: no such checkpoint")
        ckpt = load_checkpoint(config.resume, map_location="cpu")
        if ckpt.get("format") != method.checkpoint_format:
            raise ValueError(f"{config.resume} is not a dinokernels {method.name} pretraining checkpoint (format "
                             f"{ckpt.get('format')!r}); official weights are loaded with "
                             f"dinokernels.models.dino(v2).load_official_weights")
        _check_resume_config(ckpt.get("config", {}), config)
        if int(ckpt["niter_per_ep"]) != niter_per_ep:
            raise ValueError(f"cannot resume: the checkpoint has {ckpt['niter_per_ep']} iterations per epoch, this "
                             f"run {niter_per_ep} (same data, batch size and number of processes are needed)")
        method.load_state_dict(ckpt)
        load_full_optimizer_state_dict(optimizer, ckpt["optimizer"])
        if scaler is not None and ckpt.get("fp16_scaler") is not None:
            scaler.load_state_dict(ckpt["fp16_scaler"])
        start_epoch, start_it = int(ckpt["epoch"]), int(ckpt["epoch_iteration"])
        history["first_loss"] = ckpt.get("first_loss")
        rng = ckpt.get("rng") or []
        if len(rng) == world:
            set_rng_state(rng[rank])
        else:
            _say(f"note: the checkpoint was written by {len(rng)} process(es), this run has {world}: RNG states are "
                 f"re-seeded, so the continuation is not bit-identical")
            _seed_everything(config.seed + rank + 1000003 * (start_epoch + 1))
        resumed_from = os.path.abspath(config.resume)

    total_iters = config.epochs * niter_per_ep
    iteration = start_epoch * niter_per_ep + start_it
    ckpt_path = os.path.join(out, "checkpoint.pth")
    log = JsonlLog(os.path.join(out, "log.jsonl") if is_main_process() else None)
    if is_main_process() and replace_previous:
        _remove_run_files(out)
    if resumed_from is not None:
        log.truncate_after(iteration)
    elif is_main_process() and os.path.exists(os.path.join(out, "log.jsonl")):
        os.remove(os.path.join(out, "log.jsonl"))
    n_params = method.parameter_count()
    highres_from = config.epochs - config.highres_epochs if config.highres_epochs else None
    _say(f"{'DINOv2' if method.name == 'dinov2' else 'DINO'} pretraining: {config.arch}/{config.patch_size} "
         f"({n_params / 1e6:.2f}M parameters with the heads, K = {config.out_dim}) on {device}"
         f"{f' × {world} processes' if world > 1 else ''}, "
         + (f"FSDP ({'float32' if fsdp_dtype is None else str(fsdp_dtype).replace('torch.', '')} compute); "
            if config.fsdp else f"{precision}; ")
         + f"{data_desc}; {config.epochs} epochs × {niter_per_ep} iterations of {batch}"
         f"{f'×{world}' if world > 1 else ''} images, 2×{config.global_size}px"
         + (f" + {config.local_crops_number}×{config.local_size}px" if config.local_crops_number else "")
         + " crops"
         + (f" (from epoch {highres_from}: 2×{config.highres_global_size}px)" if highres_from is not None else "")
         + (f"; resuming at epoch {start_epoch}, iteration {iteration}" if resumed_from else ""))

    progress = ProgressBar(total_iters, start_iter=iteration, enabled=config.progress and is_main_process())
    extra = lambda: {"first_loss": history["first_loss"]}  # noqa: E731
    ckpt_args = lambda e, ei: (method, scaler, config, e, ei, iteration, niter_per_ep, extra())  # noqa: E731
    train_t0 = time.perf_counter()
    images_seen = 0
    last_loss = None
    epoch_losses: List[float] = []
    method.train()
    try:
        for epoch in range(start_epoch, config.epochs):
            # The high-resolution phase: larger global (and proportionally larger local) crops for the last epochs;
            # chosen by epoch, so a resumed run switches at the same point.
            dataset.transform = _augmentation(config, high_resolution=highres_from is not None and
                                              epoch >= highres_from)
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            first = start_it if epoch == start_epoch else 0
            sampler.set_start(first * batch)
            loss_sum, loss_n = 0.0, 0
            rate_t0, rate_imgs = time.perf_counter(), 0
            for it_in_epoch, (images, _) in enumerate(loader, start=first):
                it = epoch * niter_per_ep + it_in_epoch
                scheduled = method.set_iteration(it, epoch)
                images = [im.to(device, non_blocking=True) for im in images]
                inputs = method.prepare_batch(images, it)
                with _autocast(device, precision):
                    outputs = method.forward(inputs, epoch)
                if method.name == "dino":
                    if device.type == "cpu":  # the CPU loss kernels take float32/float64
                        outputs = tuple(o.float() for o in outputs)
                    if not _all_finite(*outputs):
                        raise NonFiniteLossError(_nonfinite_message("the network outputs are", epoch, it, ckpt_path,
                                                                    precision))
                loss, parts = method.loss(outputs, epoch, it)
                loss_value = loss.item()
                finite = _all_finite(loss)  # collective: every rank stops together
                if not finite or not math.isfinite(loss_value):
                    raise NonFiniteLossError(_nonfinite_message(f"the loss is {loss_value}", epoch, it, ckpt_path,
                                                                precision))

                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    method.after_backward(epoch, it)
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)  # clip the true gradients
                    method.after_backward(epoch, it)
                    scaler.step(optimizer)
                    scaler.update()
                m = method.update_teacher(it)

                iteration = it + 1
                if history["first_loss"] is None:
                    history["first_loss"] = loss_value
                last_loss = loss_value
                loss_sum += loss_value
                loss_n += 1
                images_seen += batch * world
                rate_imgs += batch * world
                now = time.perf_counter()
                rate = rate_imgs / max(now - rate_t0, 1e-9)
                log.write({"kind": "iter", "iteration": iteration, "epoch": epoch, "loss": loss_value,
                           "lr": scheduled["lr"], "wd": scheduled["wd"], "momentum": m,
                           "teacher_temp": scheduled["teacher_temp"], **parts, "images_per_s": rate,
                           "time": now - train_t0})
                progress.update(iteration, epoch, config.epochs,
                                {"loss": loss_value, "lr": scheduled["lr"], "m": m, "img/s": rate},
                                force=it_in_epoch == niter_per_ep - 1)
                if (config.checkpoint_every and iteration % config.checkpoint_every == 0
                        and it_in_epoch + 1 < niter_per_ep):
                    _save(ckpt_path, *ckpt_args(epoch, it_in_epoch + 1))

            # ---- end of epoch ----
            epoch_loss = _mean_over_processes(loss_sum, loss_n, device)
            epoch_losses.append(epoch_loss)
            log.write({"kind": "epoch", "iteration": iteration, "epoch": epoch, "epoch_loss": epoch_loss,
                       "time": time.perf_counter() - train_t0})
            _save(ckpt_path, *ckpt_args(epoch + 1, 0))
            if config.saveckp_freq and epoch % config.saveckp_freq == 0:
                _save(os.path.join(out, f"checkpoint{epoch:04}.pth"), *ckpt_args(epoch + 1, 0))
    finally:
        progress.close()
        log.close()
    train_seconds = time.perf_counter() - train_t0

    result: Dict[str, Any] = {
        "out": os.path.abspath(out), "checkpoint": os.path.abspath(ckpt_path),
        "log": os.path.abspath(os.path.join(out, "log.jsonl")), "loss_png": None,
        "iterations": iteration, "epochs": config.epochs, "niter_per_ep": niter_per_ep, "world_size": world,
        "device": str(device), "precision": precision, "resumed_from": resumed_from, "fsdp": bool(config.fsdp),
        "fsdp_compute_dtype": (None if fsdp_dtype is None else str(fsdp_dtype).replace("torch.", "")
                               ) if config.fsdp else None,
        "first_loss": history["first_loss"], "final_loss": last_loss, "epoch_losses": epoch_losses,
        "train_seconds": train_seconds, "images_per_s": images_seen / train_seconds if images_seen else None,
        "config": to_plain(config.to_dict()),
    }
    if is_main_process():
        result["loss_png"] = _loss_png(out, method.name)
        _say(f"trained {iteration - (start_epoch * niter_per_ep + start_it)} iterations in "
             f"{format_seconds(train_seconds)}; loss {history['first_loss']:.4f} → {last_loss:.4f}"
             if last_loss is not None else "nothing to train: the checkpoint is at the last epoch")

    do_eval = config.evaluate if evaluate is None else evaluate
    if do_eval:
        from ..eval.report import evaluate_pretraining

        backbone = method.eval_backbone()  # under FSDP a collective: every rank gathers, rank 0 keeps a copy
        if is_main_process():
            result.update(evaluate_pretraining(config, backbone, method.center, device))
    result["wall_seconds"] = time.perf_counter() - wall0
    if is_main_process():
        with atomic_write(os.path.join(out, "summary.json"), "w") as f:
            json.dump(_jsonable(result), f, indent=2)
    if is_distributed():
        torch.distributed.barrier()
    return result


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@torch.no_grad()
def _batch_entropies(teacher_output: Tensor, center: Tensor, temp: float) -> Tuple[float, float]:
    """(mean entropy of this batch's teacher targets, entropy of their mean) in nats — the collapse monitor
    (ln K: uniform targets; H(mean) → 0: one prototype for everything). Targets by the softmax_center kernel."""
    from ..ops import softmax_center

    z = teacher_output.detach().float().contiguous()
    p = softmax_center(z, center.detach().float().reshape(1, -1).contiguous(), temp)
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(1).mean()
    mean_p = p.mean(0)
    hm = -(mean_p * torch.log(mean_p.clamp_min(1e-30))).sum()
    return float(h), float(hm)


def _mean_over_processes(total: float, n: int, device: torch.device) -> float:
    if is_distributed():
        t = torch.tensor([total, float(n)], dtype=torch.float64,
                         device="cpu" if torch.distributed.get_backend() == "gloo" else device)
        torch.distributed.all_reduce(t)
        total, n = float(t[0]), int(t[1])
    return total / n if n else float("nan")


def _nonfinite_message(what: str, epoch: int, it: int, ckpt_path: str, precision: str) -> str:
    have = os.path.isfile(ckpt_path)
    advice = ["lower --lr", "keep --clip-grad on (3.0)"]
    if precision == "fp16":
        advice.insert(0, "use --precision bf16 or fp32 (float16 overflows are the usual cause: dino#58)")
    return (f"{what} not finite at epoch {epoch}, iteration {it}: training stopped before the optimiser step. "
            + (f"The last good checkpoint is {ckpt_path} (resume with --resume {ckpt_path}). " if have else
               "No checkpoint had been written yet. ") + "Try: " + "; ".join(advice) + ".")


def _loss_png(out: str, method: str = "dino") -> Optional[str]:
    from .plot import plot_curve, plot_panels

    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return None
    records = [r for r in JsonlLog.read(path) if r.get("kind") == "iter"]
    if not records:
        return None
    png = os.path.join(out, "loss.png")
    xs = [r["iteration"] for r in records]
    if method == "dinov2":  # the total and each of its terms
        names = ["loss", "dino_local", "dino_global", "ibot", "koleo"]
        plot_panels(xs, {n: [r.get(n, float("nan")) for r in records] for n in names}, png,
                    title=f"DINOv2 ({len(records)} iterations)")
    else:
        plot_curve(xs, [r["loss"] for r in records], png, title=f"DINO loss ({len(records)} iterations)")
    return os.path.abspath(png)

