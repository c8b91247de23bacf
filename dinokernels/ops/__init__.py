"""Kernel-backed ops (torch.library custom ops in namespace ``dinokernels``) and their pure-PyTorch references.

| op                 | CPU kernel       | CUDA kernel                | backward |
|--------------------|------------------|----------------------------|----------|
| koleo_loss         | float32, float64 | float32, float16, bfloat16 | yes      |
| nearest_neighbors  | float32, float64 | float32, float16, bfloat16 | yes (similarity) |
| softmax_center     | float32, float64 | float32, float16, bfloat16 | no (teacher targets) |
| sinkhorn_knopp     | float32, float64 | float32, float16, bfloat16 | no (teacher targets) |
| dino_loss          | float32, float64 | float32, float16, bfloat16 | yes (student) |
| dino_loss_centered | float32, float64 | float32, float16, bfloat16 | yes (student) |
| ibot_patch_loss    | float32, float64 | float32, float16, bfloat16 | yes (student) |
| matching_cost      | float32, float64 | float32, float16, bfloat16 (logits) | no (matching) |
| linear_sum_assignment | float32, float64 | float32, float64, float16, bfloat16 | no (indices) |
| box_iou, generalized_box_iou | plain PyTorch, any float dtype | same | yes (autograd) |
| ms_deform_attn     | float32, float64 | float32, float16, bfloat16 | yes (value, locations, weights) |
"""
from .dino_loss import dino_loss, dino_loss_centered, dino_loss_centered_ref, dino_loss_ref
from .ibot_patch_loss import ibot_patch_loss, ibot_patch_loss_ref
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_gather_ref, ms_deform_attn_ref
from .koleo import koleo_loss, koleo_loss_ref, nearest_neighbors, nearest_neighbors_ref
from .sinkhorn_knopp import sinkhorn_knopp, sinkhorn_knopp_plain, sinkhorn_knopp_ref
from .softmax_center import softmax_center, softmax_center_ref
from .boxes import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from .matching_cost import matching_cost, matching_cost_flat, matching_cost_ref
from .linear_sum_assignment import linear_sum_assignment, linear_sum_assignment_padded

__all__ = ["koleo_loss", "koleo_loss_ref", "nearest_neighbors", "nearest_neighbors_ref", "softmax_center",
           "softmax_center_ref", "sinkhorn_knopp", "sinkhorn_knopp_ref", "sinkhorn_knopp_plain", "dino_loss",
           "dino_loss_ref", "dino_loss_centered", "dino_loss_centered_ref", "ibot_patch_loss",
           "ibot_patch_loss_ref", "box_iou", "generalized_box_iou", "box_cxcywh_to_xyxy", "matching_cost",
           "matching_cost_ref", "matching_cost_flat", "linear_sum_assignment", "linear_sum_assignment_padded",
           "ms_deform_attn", "ms_deform_attn_ref", "ms_deform_attn_gather_ref"]
