"""Kernel-backed ops (torch.library custom ops in namespace ``dinokernels``) and their pure-PyTorch references.

| op                | CPU kernel        | CUDA kernel                | backward |
|-------------------|-------------------|----------------------------|----------|
| koleo_loss        | float32, float64  | float32, float16, bfloat16 | yes      |
| nearest_neighbors | float32, float64  | float32, float16, bfloat16 | yes (similarity) |
"""
from .koleo import koleo_loss, koleo_loss_ref, nearest_neighbors, nearest_neighbors_ref

__all__ = ["koleo_loss", "koleo_loss_ref", "nearest_neighbors", "nearest_neighbors_ref"]
