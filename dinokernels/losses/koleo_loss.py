"""DINOv2's KoLeo regulariser as an nn.Module (SPEC §3.5, dinov2/loss/koleo_loss.py), backed by
dinokernels.ops.koleo_loss (nearest neighbour by index, fp32 math, no B×B matrix kept for backward)."""
from torch import Tensor, nn

from ..ops import koleo_loss

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator loss: −mean_i log(‖x̂_i − x̂_nn(i) + 1e-8‖ + eps).

    As in DINOv2, apply it per global crop on the rank's batch (no cross-rank gather)."""

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        """student_output (B, D), B ≥ 2 (the student backbone CLS tokens of one global crop) → scalar loss,
        float32 (float64 for float64 input); x̂ = x/max(‖x‖, eps) row-wise, nn(i) = argmax_{j≠i} x̂_i·x̂_j."""
        return koleo_loss(student_output, eps)
