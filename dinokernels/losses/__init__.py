"""Loss modules built on the ops (DESIGN §2: losses → ops): DINO's CLS loss with centering or Sinkhorn-Knopp,
DINOv2's iBOT patch loss and KoLeo regulariser."""
from .dino_loss import DINOLoss, teacher_temp_schedule
from .ibot_patch_loss import iBOTPatchLoss
from .koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "teacher_temp_schedule"]
