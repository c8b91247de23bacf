"""DINO self-supervised pretraining (SPEC §2): configuration, schedules, optimiser pieces, EMA teacher, atomic
checkpoints, torchrun/DDP plumbing and the training loop (`train_dino`). Shared with DINOv2 later.

Imports are light: the trainer (and with it the models and data) loads on first use of `train_dino`."""
from .checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from .config import DIGITS_PRESET, PretrainConfig, make_config
from .ema import ema_update
from .optim import build_optimizer, cancel_gradients_last_layer, clip_gradients, get_params_groups
from .schedules import cosine_scheduler

__all__ = ["PretrainConfig", "DIGITS_PRESET", "make_config", "cosine_scheduler", "get_params_groups",
           "clip_gradients", "cancel_gradients_last_layer", "build_optimizer", "ema_update", "save_checkpoint",
           "load_checkpoint", "get_rng_state", "set_rng_state", "train_dino", "NonFiniteLossError"]


def __getattr__(name):
    if name in ("train_dino", "NonFiniteLossError", "build_student_teacher"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
