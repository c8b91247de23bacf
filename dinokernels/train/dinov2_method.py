"""DINOv2's self-distillation objective (SPEC §3.2–3.8) as a module: student and teacher (backbone, DINO head,
iBOT head), the loss of one step, parameter groups and schedules. The training loop (dinokernels.train.trainer)
drives it; every loss term runs on the dinokernels kernels (dino_loss, softmax_center / sinkhorn_knopp,
ibot_patch_loss, koleo_loss).

The total is L = w_dino·(L_local + L_global) + w_koleo·Σ_{g=1,2} KoLeo(student CLS of global crop g) + w_ibot·L_ibot:
* the DINO term pairs every student crop with the teacher's global crops except its own view (the teacher CLS is
  used "swapped": student global g against teacher global 1 − g), each pair a batch-mean cross-entropy, divided by
  n_total = max(2·n_local, 1) + 2 (with no local crops the two global pairs are divided by 3, as officially);
* iBOT: Σ over masked tokens of w_j·CE_j / 2B, w_j = 1/(masked count of j's image);
* targets are softmax((z − c)/τ_t) with the center updated after use, or Sinkhorn-Knopp (`centering`).

Distillation (the paper's recipe for the small models; `teacher_backbone=` a frozen, larger pretrained backbone):
the teacher is never updated; the student has no masking and no stochastic depth, the iBOT term runs on every patch
token of the two global crops; an EMA of the student (`student_ema`) is kept and is the model to report.
"""
import copy
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..layers import DINOHead
from ..losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from ..ops import dino_loss

__all__ = ["DINOv2Method", "dinov2_param_groups", "dinov2_schedules", "apply_schedules", "dino_term_normaliser"]


def _loss_dtype(x: Tensor) -> Tensor:
    """Logits for the loss kernels: float64 stays float64 (tests), everything else float32."""
    return x if x.dtype == torch.float64 else x.float()


def dino_term_normaliser(n_local: int) -> int:
    """n_total of the DINO term: max(2·n_local, 1) + 2."""
    return max(2 * n_local, 1) + 2


class DINOv2Method(nn.Module):
    """student / teacher = ModuleDict(backbone, dino_head[, ibot_head]).

    Args:
        backbone: the student backbone (a DinoVisionTransformer or anything with forward_features returning the
            official dict); the teacher is a copy (EMA) unless `teacher_backbone` is given (distillation).
        embed_dim: backbone width. out_dim / ibot_out_dim: K of the DINO / iBOT heads. separate_ibot_head: its own
            head for iBOT (L/g configs) instead of sharing the DINO head.
        head_*: DINOHead sizes (hidden 2048, bottleneck 256 (384 for L/g), 3 layers).
        n_local_crops: local crops per image. centering: "centering" | "sinkhorn_knopp".
        dino_weight / koleo_weight / ibot_weight: 1.0 / 0.1 / 1.0.
        teacher_backbone, teacher_dino_head, teacher_ibot_head: a frozen teacher for distillation.
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, *, out_dim: int = 65536,
                 ibot_out_dim: Optional[int] = None, separate_ibot_head: bool = False, head_hidden_dim: int = 2048,
                 head_bottleneck_dim: int = 256, head_nlayers: int = 3, n_local_crops: int = 8,
                 centering: str = "centering", student_temp: float = 0.1, center_momentum: float = 0.9,
                 dino_weight: float = 1.0, koleo_weight: float = 0.1, ibot_weight: float = 1.0,
                 teacher_backbone: Optional[nn.Module] = None, teacher_dino_head: Optional[nn.Module] = None,
                 teacher_ibot_head: Optional[nn.Module] = None):
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"DINOv2Method: centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        if n_local_crops < 0:
            raise ValueError(f"DINOv2Method: n_local_crops must be ≥ 0, got {n_local_crops}")
        ibot_out_dim = out_dim if ibot_out_dim is None else ibot_out_dim
        if not separate_ibot_head and ibot_out_dim != out_dim:
            raise ValueError("DINOv2Method: a shared head needs ibot_out_dim == out_dim (or separate_ibot_head=True)")

        def head(k, in_dim=embed_dim):
            # DINOv2's weight-normed last layer keeps g trainable (no norm_last_layer freeze, SPEC §3.1).
            return DINOHead(in_dim, k, norm_last_layer=False, nlayers=head_nlayers, hidden_dim=head_hidden_dim,
                            bottleneck_dim=head_bottleneck_dim)

        student = {"backbone": backbone, "dino_head": head(out_dim)}
        if separate_ibot_head:
            student["ibot_head"] = head(ibot_out_dim)
        self.student = nn.ModuleDict(student)
        self.distillation = teacher_backbone is not None
        if self.distillation:
            # the teacher's heads read its own (possibly wider) features
            teacher_dim = int(getattr(teacher_backbone, "embed_dim", embed_dim))
            teacher = {"backbone": teacher_backbone,
                       "dino_head": teacher_dino_head if teacher_dino_head is not None else head(out_dim, teacher_dim)}
            if separate_ibot_head:
                teacher["ibot_head"] = (teacher_ibot_head if teacher_ibot_head is not None
                                        else head(ibot_out_dim, teacher_dim))
            self.teacher = nn.ModuleDict(teacher)
            self.student_ema = copy.deepcopy(self.student)
            for p in self.student_ema.parameters():
                p.requires_grad = False
            for m in self.student.modules():  # no stochastic depth on the distilled student
                if hasattr(m, "drop_path_rate"):
                    m.drop_path_rate = 0.0
                if type(m).__name__ == "DropPath":
                    m.drop_prob = 0.0
        else:
            self.teacher = copy.deepcopy(self.student)
            for m in self.teacher.modules():  # the teacher has no stochastic depth
                if hasattr(m, "drop_path_rate"):
                    m.drop_path_rate = 0.0
                if type(m).__name__ == "DropPath":
                    m.drop_prob = 0.0
            self.student_ema = None
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.teacher.eval()  # the teacher is always in eval mode (SPEC §3.8)

        self.n_local_crops = n_local_crops
        self.centering = centering
        self.separate_ibot_head = separate_ibot_head
        self.weights = {"dino": float(dino_weight), "koleo": float(koleo_weight), "ibot": float(ibot_weight)}
        self.student_temp = float(student_temp)
        self.dino_loss = DINOLoss(out_dim, n_local_crops + 2, student_temp=student_temp,
                                  center_momentum=center_momentum, centering=centering)
        self.ibot_loss = iBOTPatchLoss(ibot_out_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.koleo_loss = KoLeoLoss()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        if self.student_ema is not None:
            self.student_ema.eval()
        return self

    # ---- one step ----

    def _ibot_head(self, part: nn.ModuleDict) -> nn.Module:
        return part["ibot_head"] if self.separate_ibot_head else part["dino_head"]

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, mask_indices: Tensor, teacher_temp: float
                        ) -> Tuple[Tensor, Tensor]:
        """(DINO targets (2, B, K) in crop order, iBOT targets (n_masked, K_ibot)) for global_crops (2B, 3, H, W);
        the centers are updated after use (centering mode)."""
        out = self.teacher["backbone"].forward_features(global_crops)
        cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]
        masked = patches.flatten(0, 1).index_select(0, mask_indices)  # (n_masked, D)
        dino_logits = _loss_dtype(self.teacher["dino_head"](cls))  # (2B, K)
        ibot_logits = _loss_dtype(self._ibot_head(self.teacher)(masked)) if masked.shape[0] else None
        if self.centering == "centering":
            dino_t = self.dino_loss.softmax_center_teacher(dino_logits, teacher_temp)
            self.dino_loss.update_center(dino_logits)
            ibot_t = None
            if ibot_logits is not None:
                ibot_t = self.ibot_loss.softmax_center_teacher(ibot_logits, teacher_temp)
                self.ibot_loss.update_center(ibot_logits)
        else:
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(dino_logits, teacher_temp)
            ibot_t = (self.ibot_loss.sinkhorn_knopp_teacher(ibot_logits, teacher_temp)
                      if ibot_logits is not None else None)
        B = global_crops.shape[0] // 2
        return dino_t.reshape(2, B, -1), ibot_t

    def forward(self, batch: Dict[str, Any], teacher_temp: float) -> Tuple[Tensor, Dict[str, float]]:
        """batch: collate_ibot's dict → (total loss, {"dino_local", "dino_global", "koleo", "ibot", "loss"} floats
        for the log). The teacher step runs without gradients."""
        global_crops = batch["collated_global_crops"]
        local_crops = batch["collated_local_crops"]
        masks = batch["collated_masks"]
        B2 = global_crops.shape[0]
        if B2 % 2:
            raise ValueError(f"DINOv2Method: {B2} global crops; 2 per image are needed")
        B = B2 // 2
        if self.distillation:
            # iBOT on every patch token of the two global crops, no masking of the student.
            masks = torch.ones_like(masks)
            mask_indices = torch.arange(masks.numel(), device=masks.device)
            masks_weight = torch.full((masks.numel(),), 1.0 / masks.shape[1], device=masks.device,
                                      dtype=torch.float64)
            student_masks = None
        else:
            mask_indices = batch["mask_indices_list"].to(global_crops.device)
            masks_weight = batch["masks_weight"].to(global_crops.device)
            student_masks = masks
        n_local = local_crops.shape[0] // B if local_crops.numel() else 0
        if n_local != self.n_local_crops:
            raise ValueError(f"DINOv2Method: the batch has {n_local} local crops per image, the method was built "
                             f"for {self.n_local_crops}")

        dino_targets, ibot_targets = self.teacher_targets(global_crops, mask_indices, teacher_temp)

        backbone = self.student["backbone"]
        if n_local:
            g_out, l_out = backbone.forward_features([global_crops, local_crops], masks=[student_masks, None])
        else:
            g_out, l_out = backbone.forward_features(global_crops, masks=student_masks), None
        g_cls = g_out["x_norm_clstoken"]  # (2B, D)
        cls_all = g_cls if l_out is None else torch.cat([g_cls, l_out["x_norm_clstoken"]])
        student_logits = _loss_dtype(self.student["dino_head"](cls_all))  # ((2 + n_local)·B, K)
        S = 2 + n_local
        n_total = dino_term_normaliser(n_local)
        # dino_loss averages over its 2S − 2 cross-view pairs: rescale to DINOv2's division by n_total.
        dino = dino_loss(student_logits.reshape(S, B, -1), dino_targets, self.student_temp) * ((2 * S - 2) / n_total)
        with torch.no_grad():
            dino_global = float(dino_loss(student_logits[:B2].detach().reshape(2, B, -1), dino_targets,
                                          self.student_temp)) * 2 / n_total

        koleo = sum(self.koleo_loss(g_cls[i * B:(i + 1) * B]) for i in range(2))

        if ibot_targets is not None:
            patches = g_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
            ibot_logits = _loss_dtype(self._ibot_head(self.student)(patches))
            ibot = self.ibot_loss.forward_masked(ibot_logits, ibot_targets, masks, masks_weight=masks_weight)
        else:
            ibot = dino.new_zeros(())

        total = self.weights["dino"] * dino + self.weights["koleo"] * koleo + self.weights["ibot"] * ibot
        parts = {"dino_local": float(dino.detach()) - dino_global, "dino_global": dino_global,
                 "koleo": float(koleo.detach()), "ibot": float(ibot.detach()), "loss": float(total.detach())}
        return total, parts

    # ---- teacher and EMA ----

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of the student into the teacher (self-distillation), or into student_ema (distillation: the
        frozen teacher does not move)."""
        from .ema import local_shards

        target = self.student_ema if self.distillation else self.teacher
        # under FSDP each rank updates its shards: the EMA of the shards is the shard of the EMA
        for p_t, p_s in zip(*local_shards(list(target.parameters()), list(self.student.parameters()),
                                          "update_teacher")):
            p_t.mul_(momentum).add_(p_s.detach(), alpha=1 - momentum)

    def final_backbone(self) -> nn.Module:
        """The backbone to evaluate and release: the teacher's, or the student EMA's when distilling."""
        return (self.student_ema if self.distillation else self.teacher)["backbone"]

    def clip_gradients(self, clip: float) -> Dict[str, float]:
        """Clips each sub-module (backbone, dino_head, ibot_head) to norm `clip` separately (SPEC §3.8); returns
        their norms before clipping. FSDP-sharded gradients are clipped by the norm over every rank's shards (one
        all-reduce for all sub-modules; every rank must call this)."""
        from .distributed import global_grad_norms, is_sharded, local_part

        grads = {name: [p.grad for p in module.parameters() if p.grad is not None]
                 for name, module in self.student.items()}
        grads = {name: g for name, g in grads.items() if g}
        if not any(is_sharded(g) for group in grads.values() for g in group):
            return {name: float(torch.nn.utils.clip_grad_norm_([p for p in self.student[name].parameters()
                                                                 if p.grad is not None], clip))
                    for name in grads}
        totals = global_grad_norms(list(grads.values()))
        norms = {}
        for (name, group), total in zip(grads.items(), totals):
            coef = min(clip / (float(total) + 1e-6), 1.0)  # as clip_grad_norm_: scale when the norm exceeds clip
            for g in group:
                local_part(g).mul_(coef)
            norms[name] = float(total)
        return norms


# ---- optimiser groups and schedules ----

def _layer_id(name: str, n_blocks: int) -> int:
    """0 for the embeddings, i + 1 for block i, n_blocks + 1 for everything after (final norm, heads)."""
    if name.startswith(("patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens")):
        return 0
    if name.startswith("blocks."):
        parts = name.split(".")
        # chunked layout blocks.{chunk}.{index}.…: the global index is the second number
        index = parts[2] if len(parts) > 3 and parts[2].isdigit() else parts[1]
        return int(index) + 1
    return n_blocks + 1


def dinov2_param_groups(student: nn.ModuleDict, layer_decay: float = 0.9, patch_embed_lr_mult: float = 0.2
                        ) -> List[Dict[str, Any]]:
    """AdamW groups with `lr_multiplier` (layer_decay^(n_blocks + 1 − layer id), × patch_embed_lr_mult for the
    patch embedding; heads 1), `wd_multiplier` (0 for biases, norms and LayerScale gammas) and `is_last_layer`
    (the heads' weight-normed last layers, whose lr is 0 while frozen). Parameters sharing all three form one
    group."""
    backbone = student["backbone"]
    n_blocks = getattr(backbone, "n_blocks", None) or len(getattr(backbone, "blocks", []))
    groups: Dict[Tuple[float, float, bool], Dict[str, Any]] = {}
    for part, module in student.items():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if part == "backbone":
                lr_mult = layer_decay ** (n_blocks + 1 - _layer_id(name, n_blocks))
                if name.startswith("patch_embed"):
                    lr_mult *= patch_embed_lr_mult
            else:
                lr_mult = 1.0
            wd_mult = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
            last = "last_layer" in name
            key = (lr_mult, wd_mult, last)
            group = groups.setdefault(key, {"params": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
                                            "is_last_layer": last, "names": []})
            group["params"].append(param)
            group["names"].append(f"{part}.{name}")
    return list(groups.values())


def _warmup_cosine(base: float, final: float, total: int, warmup: int, freeze: int = 0,
                   start_warmup: float = 0.0) -> np.ndarray:
    """[0]·freeze, linear warm-up from start_warmup to base over `warmup` iterations, then cosine to `final`;
    `final` past the end (SPEC §3.8)."""
    freeze = min(freeze, total)
    warmup = min(warmup, total - freeze)
    rest = total - freeze - warmup
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(rest) / max(rest, 1)))
    return np.concatenate([np.zeros(freeze), np.linspace(start_warmup, base, warmup), cos])


def dinov2_schedules(total_iters: int, iters_per_epoch: int, *, lr: float = 4e-3, batch_total: int = 1024,
                     scaling: str = "sqrt_wrt_1024", min_lr: float = 1e-6, warmup_epochs: float = 10,
                     weight_decay: float = 0.04, weight_decay_end: float = 0.4, momentum_teacher: float = 0.992,
                     final_momentum_teacher: float = 1.0, teacher_temp: float = 0.07,
                     warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: float = 30,
                     freeze_last_layer_epochs: float = 1) -> Dict[str, np.ndarray]:
    """Per-iteration arrays lr, last_layer_lr, wd, momentum, teacher_temp (SPEC §3.8). lr is scaled by
    √(batch_total/1024) (`sqrt_wrt_1024`) or batch_total/256 (`linear_wrt_256`); the last layer's lr is 0 for
    the first freeze_last_layer_epochs."""
    if scaling == "sqrt_wrt_1024":
        peak = lr * math.sqrt(batch_total / 1024.0)
    elif scaling == "linear_wrt_256":
        peak = lr * batch_total / 256.0
    else:
        raise ValueError(f"dinov2_schedules: scaling must be 'sqrt_wrt_1024' or 'linear_wrt_256', got {scaling!r}")
    warm = int(round(warmup_epochs * iters_per_epoch))
    temp_warm = min(int(round(warmup_teacher_temp_epochs * iters_per_epoch)), total_iters)
    temps = np.concatenate([np.linspace(warmup_teacher_temp, teacher_temp, temp_warm),
                            np.full(total_iters - temp_warm, teacher_temp)])
    return {
        "lr": _warmup_cosine(peak, min_lr, total_iters, warm),
        "last_layer_lr": _warmup_cosine(peak, min_lr, total_iters, warm,
                                        freeze=int(round(freeze_last_layer_epochs * iters_per_epoch))),
        "wd": _warmup_cosine(weight_decay, weight_decay_end, total_iters, 0),
        "momentum": _warmup_cosine(momentum_teacher, final_momentum_teacher, total_iters, 0),
        "teacher_temp": temps,
    }


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Dict[str, np.ndarray], it: int) -> None:
    """Sets each group's lr (× lr_multiplier; the last-layer schedule for last layers) and weight decay
    (× wd_multiplier) for iteration `it`."""
    lr, last_lr, wd = float(schedules["lr"][it]), float(schedules["last_layer_lr"][it]), float(schedules["wd"][it])
    for group in optimizer.param_groups:
        group["lr"] = (last_lr if group.get("is_last_layer") else lr) * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)
