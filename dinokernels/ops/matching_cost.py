"""matching_cost: the Hungarian matching cost of DETR-family detectors with Grounding DINO's token-level focal
class cost, fused in one kernel (csrc/matching_cost). Registered op: dinokernels::matching_cost."""
import math

import torch
from torch import Tensor

from .. import _ext
from . import _dispatch as D
from .matching_cost_ref import counts_tensor, matching_cost_flat, matching_cost_ref

__all__ = ["matching_cost", "matching_cost_ref", "matching_cost_flat"]


@torch.library.custom_op("dinokernels::matching_cost", mutates_args=())
def matching_cost_op(pred_logits: Tensor, pred_boxes: Tensor, tgt_boxes: Tensor, tgt_counts: Tensor,
                     positive_map: Tensor, cost_class: float, cost_bbox: float, cost_giou: float, alpha: float,
                     gamma: float, pad_value: float) -> Tensor:
    """Contiguous inputs in the kernel's dtypes (CPU: one of float32/float64 for all; CUDA: pred_logits
    float32/float16/bfloat16, the rest float32), tgt_counts (B,) int64 on the device, validated → (B, Q, G)."""
    op = "matching_cost"
    B, Q, T = pred_logits.shape
    G = tgt_boxes.shape[1]
    for name, t in (("pred_logits", pred_logits), ("pred_boxes", pred_boxes), ("tgt_boxes", tgt_boxes),
                    ("tgt_counts", tgt_counts), ("positive_map", positive_map)):
        D.check_contiguous(op, name, t)
    cpu = pred_logits.device.type == "cpu"
    if not cpu and B and (tgt_counts.shape != (B,) or int(tgt_counts.min()) < 0 or int(tgt_counts.max()) > G):
        # The CUDA kernel trusts the counts (the CPU one checks them itself).
        raise D.arg_error(op, "tgt_counts", f"must be (B={B},) with entries in [0, G={G}], got "
                                            f"{tgt_counts.tolist()}")
    out = pred_logits.new_empty((B, Q, G), dtype=pred_logits.dtype if cpu else torch.float32)
    args = (pred_logits.data_ptr(), pred_boxes.data_ptr(), tgt_boxes.data_ptr(), tgt_counts.data_ptr(),
            positive_map.data_ptr(), D.dtype_code(pred_logits.dtype), B, Q, T, G, float(cost_class),
            float(cost_bbox), float(cost_giou), float(alpha), float(gamma), float(pad_value), out.data_ptr())
    if cpu:
        _ext.kernel(op, "cpu")(*args, D.cpu_threads())
    else:
        device, stream = D.cuda_device_and_stream(pred_logits)
        with torch.cuda.device(device):
            _ext.kernel(op, "cuda")(*args, device, stream)
    return out


@matching_cost_op.register_fake
def _(pred_logits, pred_boxes, tgt_boxes, tgt_counts, positive_map, cost_class, cost_bbox, cost_giou, alpha,
      gamma, pad_value):
    B, Q, _ = pred_logits.shape
    dtype = pred_logits.dtype if pred_logits.device.type == "cpu" else torch.float32
    return pred_logits.new_empty((B, Q, tgt_boxes.shape[1]), dtype=dtype)


def _check(op, pred_logits, pred_boxes, tgt_boxes, positive_map, tgt_counts, weights, alpha, gamma):
    D.check_tensor(op, "pred_logits", pred_logits, 3, "(B, Q, T)")
    B, Q, T = pred_logits.shape
    if T < 1:
        raise D.arg_error(op, "pred_logits", f"needs at least one token, got shape {tuple(pred_logits.shape)}")
    D.check_tensor(op, "pred_boxes", pred_boxes, 3, "(B, Q, 4) cxcywh")
    if tuple(pred_boxes.shape) != (B, Q, 4):
        raise D.arg_error(op, "pred_boxes", f"must have shape (B, Q, 4) = {(B, Q, 4)}, got {tuple(pred_boxes.shape)}")
    D.check_tensor(op, "tgt_boxes", tgt_boxes, 3, "(B, G, 4) cxcywh")
    if tgt_boxes.shape[0] != B or tgt_boxes.shape[2] != 4:
        raise D.arg_error(op, "tgt_boxes", f"must have shape (B={B}, G, 4), got {tuple(tgt_boxes.shape)}")
    G = tgt_boxes.shape[1]
    if not isinstance(positive_map, torch.Tensor):
        raise D.arg_error(op, "positive_map", f"must be a torch.Tensor, got {type(positive_map).__name__}", TypeError)
    if tuple(positive_map.shape) != (B, G, T):
        raise D.arg_error(op, "positive_map", f"must have shape (B, G, T) = {(B, G, T)}, got "
                                              f"{tuple(positive_map.shape)}")
    if not (positive_map.is_floating_point() or positive_map.dtype == torch.bool):
        raise D.arg_error(op, "positive_map", f"must be bool or floating point, got {positive_map.dtype}", TypeError)
    if positive_map.is_floating_point() and positive_map.numel() and \
            not bool(((positive_map >= 0) & torch.isfinite(positive_map)).all()):
        raise D.arg_error(op, "positive_map", "must hold nonnegative finite token weights (a negative weight could "
                                              "cancel a positive one and zero the class cost)")
    for name, t in (("pred_boxes", pred_boxes), ("tgt_boxes", tgt_boxes), ("positive_map", positive_map)):
        if t.device != pred_logits.device:
            raise D.arg_error(op, name, f"must be on {pred_logits.device}, got {t.device}")
    counts = counts_tensor(tgt_counts, B, G) if not isinstance(tgt_counts, torch.Tensor) or \
        tgt_counts.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8) else None
    if counts is None:
        raise D.arg_error(op, "tgt_counts", f"must hold integers, got {tgt_counts.dtype}", TypeError)
    if counts.shape != (B,):
        raise D.arg_error(op, "tgt_counts", f"must have B={B} entries, got shape {tuple(counts.shape)}")
    if B and (int(counts.min()) < 0 or int(counts.max()) > G):
        raise D.arg_error(op, "tgt_counts", f"entries must be in [0, G={G}], got {counts.tolist()}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise D.arg_error(op, name, f"must be a finite number, got {w!r}")
    if not 0 <= alpha <= 1:
        raise D.arg_error(op, "alpha", f"must be in [0, 1], got {alpha!r}")
    if not (math.isfinite(gamma) and gamma >= 0):
        raise D.arg_error(op, "gamma", f"must be a nonnegative finite number, got {gamma!r}")
    return counts


def _check_finite(op, pred_logits, pred_boxes, tgt_boxes, counts):
    """A NaN logit, or NaN/inf in a predicted box or a valid target box (padding past tgt_counts is never read),
    has no cost a matching could use: the same error on every backend, before dispatch (the kernels do not check).
    ±inf logits are defined (probability 1 or 0, a finite focal cost)."""
    nan_logits = int(torch.isnan(pred_logits.detach()).sum()) if pred_logits.numel() else 0
    if nan_logits:
        raise D.arg_error(op, "pred_logits", f"contains {nan_logits} NaN value(s)")
    D.check_finite_inputs(op, {"pred_boxes": pred_boxes, "tgt_boxes": tgt_boxes[_valid_targets(tgt_boxes, counts)]})


def _largest_box(pred_boxes, tgt_boxes, valid) -> float:
    sizes = [float(t.detach().abs().max()) for t in (pred_boxes, tgt_boxes[valid]) if t.numel()]
    return max(sizes, default=0.0)


def _check_cost(op, cost, valid, pred_boxes, tgt_boxes, weights: dict):
    """Every backend, on finite input: a non-finite cost of a valid pair is an overflow of the result's dtype (its
    exact value is not representable, and +inf would read as a forbidden pair), blamed on the largest of the box
    coordinates and the cost weights."""
    if cost.numel() and not bool(torch.isfinite(cost[valid[:, None, :].expand_as(cost)]).all()):
        size = {"pred_boxes": float(pred_boxes.detach().abs().max()),
                "tgt_boxes": float(tgt_boxes[valid].detach().abs().max()) if bool(valid.any()) else 0.0,
                **{name: abs(float(w)) for name, w in weights.items()}}
        blame = max(size, key=size.get)
        raise D.arg_error(op, blame, f"gives a non-finite cost (overflow of {str(cost.dtype)[6:]}: entries up to "
                                     f"{size[blame]:.3g})")


def _valid_targets(tgt_boxes, counts):
    """(B, G) bool: g < tgt_counts[b]."""
    return torch.arange(tgt_boxes.shape[1], device=tgt_boxes.device) < counts.to(tgt_boxes.device)[:, None]


def matching_cost(pred_logits: Tensor, pred_boxes: Tensor, tgt_boxes: Tensor, positive_map: Tensor,
                  tgt_counts=None, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                  alpha: float = 0.25, gamma: float = 2.0, pad_value: float = math.inf) -> Tensor:
    """Hungarian matching cost with Grounding DINO's token-level focal class cost, per image, in one kernel.

    pred_logits (B, Q, T) token logits, pred_boxes (B, Q, 4) cxcywh, tgt_boxes (B, G, 4) cxcywh padded to G,
    positive_map (B, G, T) bool or nonnegative float token weights of each target, tgt_counts (B,) valid targets
    per image (list or int tensor; None = all G) → cost (B, Q, G)::

        C[b,q,g] = cost_bbox·‖b̂_q − b_g‖₁ + cost_class·Σ_t (pos − neg)[q,t]·m_g[t] / Σ_t m_g[t] − cost_giou·GIoU

    with p = σ(logit), pos = α(1−p)^γ(−log(p + 1e-8)), neg = (1−α)p^γ(−log(1 − p + 1e-8)): the Open-GroundingDino
    / HF cost (SPEC §6.2), whose class weight is 1.0 (mmdetection's summed variant uses 2.0; pass cost_class).
    A target with an all-zero map has class cost 0. GIoU as dinokernels.ops.generalized_box_iou (no eps, 0/0 := 0).
    Columns g ≥ tgt_counts[b] hold pad_value (+inf: never a valid choice). ±inf logits are probabilities 1 and 0;
    a NaN logit, and NaN/inf in pred_boxes or a valid target box, raise ValueError naming the argument on every
    backend (DINOKERNELS_CHECK_FINITE: on the CPU by default, on CUDA only with =1, as it costs a sync; unchecked, a
    NaN logit can make its query's row NaN). No gradient (matching runs under no_grad; the
    inputs are detached). CPU: float32/float64 (result in float64 for float64 logits, else float32; 16-bit
    input upcast); CUDA: float32/float16/bfloat16 logits, float32 arithmetic and result (float64 is downcast).
    """
    op = "matching_cost"
    weights = {"cost_class": cost_class, "cost_bbox": cost_bbox, "cost_giou": cost_giou, "pad_value": 0.0}
    counts = _check(op, pred_logits, pred_boxes, tgt_boxes, positive_map, tgt_counts, weights, alpha, gamma)
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)) or math.isnan(pad_value):
        raise D.arg_error(op, "pad_value", f"must be a number (inf allowed), got {pad_value!r}")
    checked = D.checks_values(pred_logits.device)
    if checked:
        _check_finite(op, pred_logits, pred_boxes, tgt_boxes, counts)
    valid = _valid_targets(tgt_boxes, counts)
    if D.use_reference(op, pred_logits.device):
        # Padding past tgt_counts is never read by the kernels: zero boxes there, so that garbage cannot raise.
        tgt_boxes = torch.where(valid[..., None], tgt_boxes, torch.zeros_like(tgt_boxes))
        # The kernels return float64 for float64 input and float32 otherwise (16-bit input is computed in float32,
        # which torch.cdist needs anyway): the reference does the same.
        on_cpu64 = pred_logits.device.type == "cpu" and pred_logits.dtype == torch.float64
        dtype = torch.float64 if on_cpu64 else torch.float32
        args = tuple(t.to(dtype) for t in (pred_logits, pred_boxes, tgt_boxes))
        if checked and dtype != torch.float64 and _largest_box(pred_boxes, tgt_boxes, valid) > 2.0 ** 60:
            # the reference's float32 box conversion would overflow first: exact in float64, then rounded
            args = tuple(t.double() for t in args)
        cost = matching_cost_ref(*args, positive_map, counts, cost_class, cost_bbox, cost_giou, alpha, gamma,
                                 pad_value).to(dtype)
    else:
        device = pred_logits.device
        z = pred_logits.detach()
        if device.type == "cpu":
            dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
            z = z.to(dtype)
            other = dtype
        else:
            if z.dtype == torch.float64:
                z = z.float()
            other = torch.float32
        cost = matching_cost_op(z.contiguous(), pred_boxes.detach().to(other).contiguous(),
                                tgt_boxes.detach().to(other).contiguous(), counts.to(device).contiguous(),
                                positive_map.detach().to(other).contiguous(), float(cost_class), float(cost_bbox),
                                float(cost_giou), float(alpha), float(gamma), float(pad_value))
    if checked:
        _check_cost(op, cost, valid, pred_boxes, tgt_boxes, {k: weights[k] for k in ("cost_bbox", "cost_giou",
                                                                                     "cost_class")})
    return cost
