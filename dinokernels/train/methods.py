"""Training methods for the shared pretraining loop (dinokernels.train.trainer): each supplies its student and
teacher, the loss of a batch, the optimiser with its parameter groups, the per-iteration schedules, the teacher
update, what is logged and what a checkpoint holds. The loop keeps data loading, autocast and loss scaling,
checkpoints and resume, progress, logs, DDP and the report.

* DINOMethod — DINO v1 (SPEC §2): MultiCropWrapper student/teacher under DDP, the fused centered DINO loss,
  linear lr scaling per 256 images, per-tensor clipping, last layer frozen by epoch.
* With config.fsdp both shard student and teacher with FSDP instead (dinokernels.train.distributed.shard_model):
  per transformer block and per sub-module, the student keeping gathered weights from forward to backward, the
  teacher freeing them after its forward; checkpoints hold the full (unsharded) state dicts.
* DINOv2Method (the `dinov2` method) — DINOv2 (SPEC §3): dinokernels.train.dinov2_method.DINOv2Method (DINO + iBOT +
  KoLeo on the kernels), iBOT block masking in the loop's collate, layer-wise lr decay, per-iteration teacher
  temperature, last layer frozen by iterations, per-sub-module clipping, gradients averaged across processes.
"""
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from .config import PretrainConfig
from .distributed import (broadcast_from_rank0, fsdp_mixed_precision_dtype, full_state_dict, get_world_size,
                          is_distributed, is_main_process, load_full_state_dict, shard_model, wrap_ddp)
from .ema import ema_update, unwrap
from .optim import build_optimizer, cancel_gradients_last_layer, clip_gradients, get_params_groups
from .schedules import cosine_scheduler

__all__ = ["DINOMethod", "DINOv2TrainingMethod", "build_method", "METHODS", "build_dinov2_backbone",
           "load_distillation_teacher", "dinov2_checkpoint_backbone"]


def _has_batchnorms(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class DINOMethod:
    """DINO v1 (facebookresearch/dino main_dino.py semantics)."""

    name = "dino"
    checkpoint_format = "dinokernels.dino.v1"

    def __init__(self, config: PretrainConfig, device: torch.device):
        from ..losses import DINOLoss
        from .trainer import build_student_teacher

        self.config = config
        self.device = device
        self.fsdp = bool(config.fsdp)
        student, teacher, self.embed_dim = build_student_teacher(config)
        if self.fsdp and _has_batchnorms(student):
            raise ValueError(f"--fsdp: {config.arch} has batch-norm layers, which are synchronised under DDP only; "
                             f"train it without --fsdp")
        if is_distributed() and _has_batchnorms(student):
            # torch's SyncBatchNorm refuses CPU tensors, and only at the first forward: say so before training.
            if device.type not in ("cuda", "xpu"):
                raise ValueError(f"{config.arch} with batch-norm layers (use_bn_in_head, or a batch-norm backbone) "
                                 f"needs SyncBatchNorm under multi-process training, which torch runs on GPUs only "
                                 f"(device {device.type}); train in one process, or without batch norm "
                                 f"(for the built-in job: --preset digits)")
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        student, teacher = student.to(device), teacher.to(device)
        if self.fsdp:
            broadcast_from_rank0(student)  # every rank shards the same (rank 0's) weights
            teacher.load_state_dict(student.state_dict())
            dtype = fsdp_mixed_precision_dtype(config.fsdp_mixed_precision, device)
            self.student = shard_model(student, device, dtype, reshard_after_forward=False)
            self.teacher = shard_model(teacher, device, dtype, reshard_after_forward=True)
        else:
            self.student = wrap_ddp(student, device)  # DDP broadcasts rank 0's weights to every rank's student...
            teacher.load_state_dict(unwrap(self.student).state_dict())  # ...and every teacher starts from them too
            self.teacher = teacher
        self.loss_fn = DINOLoss(config.out_dim, config.local_crops_number + 2, config.warmup_teacher_temp,
                                config.teacher_temp, config.warmup_teacher_temp_epochs, config.epochs,
                                student_temp=config.student_temp, center_momentum=config.center_momentum,
                                centering=config.centering).to(device)
        self.optimizer = build_optimizer(config.optimizer, get_params_groups(self.student))

    # ---- schedules ----
    def build_schedules(self, niter_per_ep: int, batch_total: int) -> None:
        c = self.config
        self.lr_schedule = cosine_scheduler(c.lr * batch_total / 256.0, c.min_lr, c.epochs, niter_per_ep,
                                            warmup_epochs=c.warmup_epochs)
        self.wd_schedule = cosine_scheduler(c.weight_decay, c.weight_decay_end, c.epochs, niter_per_ep)
        self.momentum_schedule = cosine_scheduler(c.momentum_teacher, 1, c.epochs, niter_per_ep)

    def set_iteration(self, it: int, epoch: int) -> Dict[str, float]:
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.lr_schedule[it])
            if i == 0:  # only the first group is regularised
                group["weight_decay"] = float(self.wd_schedule[it])
        self.teacher_temp = float(self.loss_fn.teacher_temp_schedule[epoch])
        return {"lr": self.optimizer.param_groups[0]["lr"], "wd": self.optimizer.param_groups[0]["weight_decay"],
                "teacher_temp": self.teacher_temp}

    # ---- one step ----
    def prepare_batch(self, images: List[Tensor], it: int) -> List[Tensor]:
        return images

    def forward(self, images: List[Tensor], epoch: int) -> Tuple[Tensor, Tensor]:
        from . import trainer  # forward_views is looked up at call time (tests wrap it)

        return trainer.forward_views(self.student, self.teacher, images)

    def loss(self, outputs: Tuple[Tensor, ...], epoch: int, it: int) -> Tuple[Tensor, Dict[str, float]]:
        from .trainer import _batch_entropies

        student_output, teacher_output = outputs
        entropies = _batch_entropies(teacher_output, self.loss_fn.center, self.teacher_temp)
        loss = self.loss_fn(student_output, teacher_output, epoch)
        return loss, {"teacher_entropy": entropies[0], "teacher_mean_entropy": entropies[1]}

    def after_backward(self, epoch: int, it: int) -> None:
        if self.config.clip_grad:
            clip_gradients(self.student, self.config.clip_grad)
        cancel_gradients_last_layer(epoch, self.student, self.config.freeze_last_layer)

    def update_teacher(self, it: int) -> float:
        m = float(self.momentum_schedule[it])
        ema_update(self.teacher, self.student, m)
        return m

    def train(self) -> None:
        self.student.train()
        self.teacher.train()

    # ---- checkpoints and evaluation ----
    def state_dict(self) -> Dict[str, Any]:
        """Full (unsharded) state dicts; under FSDP a collective whose tensors only rank 0 keeps."""
        return {"student": full_state_dict(unwrap(self.student)), "teacher": full_state_dict(self.teacher),
                "dino_loss": self.loss_fn.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        load_full_state_dict(unwrap(self.student), state["student"])
        load_full_state_dict(self.teacher, state["teacher"])
        self.loss_fn.load_state_dict(state["dino_loss"])

    def parameter_count(self) -> int:
        return sum(p.numel() for p in unwrap(self.student).parameters())

    def eval_backbone(self) -> nn.Module:
        """The teacher. Under FSDP every rank must call this (its weights are gathered); rank 0 gets an unsharded
        copy, the other ranks None."""
        if not self.fsdp:
            return unwrap(self.teacher)
        from .trainer import build_student_teacher

        state = full_state_dict(self.teacher)
        if not is_main_process():
            return None
        teacher = build_student_teacher(self.config)[1]
        teacher.load_state_dict(state)
        return teacher.to(self.device)

    @property
    def center(self) -> Tensor:
        return self.loss_fn.center


class DINOv2TrainingMethod:
    """DINOv2 (SPEC §3.2–3.8) on dinokernels.train.dinov2_method.DINOv2Method."""

    name = "dinov2"
    checkpoint_format = "dinokernels.dinov2.v1"

    def __init__(self, config: PretrainConfig, device: torch.device):
        from .dinov2_method import dinov2_param_groups

        self.config = config
        self.device = device
        self.fsdp = bool(config.fsdp)
        backbone, embed_dim = build_dinov2_backbone(config, config.drop_path_rate)
        teacher_backbone = None
        if config.distill_teacher:
            teacher_backbone = load_distillation_teacher(config)
        self.method = _dinov2_module(config, backbone, embed_dim, teacher_backbone).to(device)
        if config.distill_teacher:
            self._load_teacher_heads(config.distill_teacher)
        broadcast_from_rank0(self.method)  # every rank starts from rank 0's weights
        if self.fsdp:
            # Each sub-module (backbone per block, DINO head, iBOT head) sharded on its own, as officially; the
            # loss modules (centers) stay whole.
            dtype = fsdp_mixed_precision_dtype(config.fsdp_mixed_precision, device)
            for part in (self.method.student, self.method.teacher, self.method.student_ema):
                for module in (part.values() if part is not None else ()):
                    shard_model(module, device, dtype, reshard_after_forward=part is not self.method.student)
        self.embed_dim = embed_dim
        self.student = self.method.student
        self.teacher = self.method.teacher
        groups = dinov2_param_groups(self.method.student, config.layer_decay, config.patch_embed_lr_mult)
        for g in groups:
            g.pop("names")
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))

    def _load_teacher_heads(self, path: str) -> None:
        """A distillation teacher from a dinokernels DINOv2 checkpoint brings its heads too (the paper distils
        from the whole pretrained model); official and transformers weights hold no heads, so the frozen teacher's
        heads are then random projections of its features."""
        import os

        from .checkpoint import load_checkpoint

        if os.path.isdir(path):
            return
        ckpt = load_checkpoint(path, map_location="cpu")
        if not (isinstance(ckpt, dict) and ckpt.get("format") == self.checkpoint_format):
            return
        state = ckpt["method"]
        source = "student_ema." if any(k.startswith("student_ema.") for k in state) else "teacher."
        for name, head in self.method.teacher.items():
            if name == "backbone":
                continue
            prefix = f"{source}{name}."
            head_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not head_state:
                continue  # e.g. a shared-head teacher for a separate-head student: this head stays random
            try:
                head.load_state_dict(head_state)
            except RuntimeError as e:
                raise ValueError(f"--distill-teacher {path}: its {name} does not fit this run's head sizes "
                                 f"(--out-dim, --ibot-out-dim, --hidden-dim, --bottleneck-dim must be the "
                                 f"teacher's): {str(e).splitlines()[0]}") from None

    # ---- schedules ----
    def build_schedules(self, niter_per_ep: int, batch_total: int) -> None:
        from .dinov2_method import dinov2_schedules

        c = self.config
        self.schedules = dinov2_schedules(
            c.epochs * niter_per_ep, niter_per_ep, lr=c.lr, batch_total=batch_total, scaling=c.lr_scaling,
            min_lr=c.min_lr, warmup_epochs=c.warmup_epochs, weight_decay=c.weight_decay,
            weight_decay_end=c.weight_decay_end, momentum_teacher=c.momentum_teacher,
            teacher_temp=c.teacher_temp, warmup_teacher_temp=c.warmup_teacher_temp,
            warmup_teacher_temp_epochs=c.warmup_teacher_temp_epochs,
            freeze_last_layer_epochs=c.freeze_last_layer)

    def set_iteration(self, it: int, epoch: int) -> Dict[str, float]:
        from .dinov2_method import apply_schedules

        apply_schedules(self.optimizer, self.schedules, it)
        self.teacher_temp = float(self.schedules["teacher_temp"][it])
        return {"lr": float(self.schedules["lr"][it]), "wd": float(self.schedules["wd"][it]),
                "teacher_temp": self.teacher_temp}

    # ---- one step ----
    def prepare_batch(self, images: List[Tensor], it: int) -> Dict[str, Any]:
        """The collated crops → DINOv2's batch with iBOT masks, drawn from a generator seeded by (seed, it) so
        that a resumed run masks as the uninterrupted one."""
        from ..data.masking import collate_ibot
        from .inputs import _mix

        g = torch.Generator().manual_seed(_mix(self.config.seed, 0x1B07, it) % (1 << 62))
        batch = collate_ibot(images[:2], images[2:], self.config.patch_size, self.config.mask_probability,
                             tuple(self.config.mask_ratio), generator=g)
        for key in ("collated_masks", "mask_indices_list", "masks_weight"):
            batch[key] = batch[key].to(self.device)
        return batch

    def forward(self, batch: Dict[str, Any], epoch: int):
        return self.method(batch, self.teacher_temp)

    def loss(self, outputs, epoch: int, it: int) -> Tuple[Tensor, Dict[str, float]]:
        total, parts = outputs
        parts = dict(parts)
        parts.pop("loss", None)
        return total, parts

    def after_backward(self, epoch: int, it: int) -> None:
        if is_distributed() and not self.fsdp:  # the average of the ranks' gradients, as DDP (and FSDP) give
            world = get_world_size()
            for p in self.method.student.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        if self.config.clip_grad:
            self.method.clip_gradients(self.config.clip_grad)

    def update_teacher(self, it: int) -> float:
        m = float(self.schedules["momentum"][it])
        self.method.update_teacher(m)
        return m

    def train(self) -> None:
        self.method.train()

    # ---- checkpoints and evaluation ----
    def state_dict(self) -> Dict[str, Any]:
        """The full (unsharded) state dict; under FSDP a collective whose tensors only rank 0 keeps."""
        return {"method": full_state_dict(self.method)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        load_full_state_dict(self.method, state["method"])

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.method.student.parameters())

    def eval_backbone(self) -> nn.Module:
        """The final model as the report reads it: `.backbone` (the teacher's, or the student EMA's when
        distilling) and `.head` (its DINO head), forward = head(backbone(x)). Under FSDP every rank must call this
        (the weights are gathered); rank 0 gets an unsharded copy, the other ranks None."""
        name = "student_ema" if self.method.distillation else "teacher"
        if not self.fsdp:
            part = getattr(self.method, name)
            return _BackboneWithHead(part["backbone"], part["dino_head"])
        state = full_state_dict(getattr(self.method, name))
        if not is_main_process():
            return None
        # the final model has the student's structure (its teacher copy, or the student EMA)
        backbone, embed_dim = build_dinov2_backbone(self.config, 0.0)
        plain = _dinov2_module(self.config, backbone, embed_dim, None).student
        plain.load_state_dict(state)
        plain.to(self.device).eval()
        return _BackboneWithHead(plain["backbone"], plain["dino_head"])

    @property
    def center(self) -> Tensor:
        return self.method.dino_loss.center


def _dinov2_module(config: PretrainConfig, backbone: nn.Module, embed_dim: int, teacher_backbone=None):
    from .dinov2_method import DINOv2Method

    return DINOv2Method(
        backbone, embed_dim, out_dim=config.out_dim, ibot_out_dim=config.ibot_out_dim,
        separate_ibot_head=config.ibot_separate_head, head_hidden_dim=config.hidden_dim,
        head_bottleneck_dim=config.bottleneck_dim, n_local_crops=config.local_crops_number,
        centering=config.centering, student_temp=config.student_temp, center_momentum=config.center_momentum,
        dino_weight=config.dino_loss_weight, koleo_weight=config.koleo_loss_weight,
        ibot_weight=config.ibot_loss_weight, teacher_backbone=teacher_backbone)


class _BackboneWithHead(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def build_dinov2_backbone(config: PretrainConfig, drop_path_rate: float) -> Tuple[nn.Module, int]:
    """A DinoVisionTransformer for the run: arch vit_nano (ours: embed 128, depth 4) | vit_small | vit_base |
    vit_large | vit_giant2, built at the global crop size with LayerScale (SPEC §3.8 training defaults)."""
    from ..models import dinov2

    archs = {"vit_nano": dict(embed_dim=128, depth=4, num_heads=4), "vit_tiny": dict(embed_dim=192, depth=12,
                                                                                     num_heads=3)}
    kwargs = dict(img_size=config.global_size, patch_size=config.patch_size, drop_path_rate=drop_path_rate,
                  drop_path_uniform=config.drop_path_uniform, init_values=config.layerscale, block_chunks=0,
                  num_register_tokens=config.num_register_tokens,
                  ffn_layer="swiglufused" if config.arch == "vit_giant2" else "mlp")
    if config.arch in archs:
        model = dinov2.DinoVisionTransformer(**archs[config.arch], **kwargs)
    elif config.arch in ("vit_small", "vit_base", "vit_large", "vit_giant2"):
        model = getattr(dinov2, config.arch)(**kwargs)
    else:
        raise ValueError(f"method dinov2: arch must be vit_nano, vit_tiny, vit_small, vit_base, vit_large or "
                         f"vit_giant2, got {config.arch!r}")
    return model, model.embed_dim


def load_distillation_teacher(config: PretrainConfig) -> nn.Module:
    """The frozen teacher of a distillation run: `distill_teacher_arch` (a hub name such as dinov2_vitb14, or an
    arch of build_dinov2_backbone) loaded from `distill_teacher` (official weights, a transformers directory, or a
    dinokernels DINOv2 checkpoint)."""
    import os

    from ..models import dinov2

    path = config.distill_teacher
    if os.path.isdir(path):
        return dinov2.from_transformers(path)
    arch = config.distill_teacher_arch
    if not arch:
        raise ValueError("distillation needs --distill-teacher-arch (e.g. dinov2_vitb14 or vit_base) with "
                         "--distill-teacher FILE")
    if arch in dinov2.HUB_MODELS:
        teacher = dinov2.HUB_MODELS[arch]()
    else:
        teacher, _ = build_dinov2_backbone(config.replace(arch=arch), 0.0)
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location="cpu")
    if isinstance(ckpt, dict) and ckpt.get("format") == DINOv2TrainingMethod.checkpoint_format:
        ckpt = dinov2_checkpoint_backbone(ckpt, "teacher")
    dinov2.load_official_weights(teacher, ckpt)
    return teacher


def dinov2_checkpoint_backbone(ckpt: Dict[str, Any], which: str = "teacher") -> Dict[str, Tensor]:
    """The backbone state dict of a dinokernels DINOv2 training checkpoint: `which` "teacher" is the final model
    (the EMA teacher, or the student EMA of a distillation run: the frozen teacher is the input, not the result),
    "student" the trained student."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    state = ckpt["method"]
    if which == "student":
        prefix = "student.backbone."
    else:
        prefix = "student_ema.backbone." if any(k.startswith("student_ema.") for k in state) else "teacher.backbone."
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not backbone:
        raise ValueError(f"the DINOv2 checkpoint has no {prefix}* weights")
    return backbone


METHODS = {"dino": DINOMethod, "dinov2": DINOv2TrainingMethod}


def build_method(config: PretrainConfig, device: torch.device):
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    return METHODS[config.method](config, device)
