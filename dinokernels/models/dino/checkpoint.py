"""Loading official DINO weights (SPEC §2.6) into this package's models.

Two kinds of released file:
* backbone files (`dino_deitsmall16_pretrain.pth`, …): a flat state dict `cls_token`, `pos_embed`, `blocks.*`, …
* full checkpoints (`*_full_checkpoint.pth`): a dict with `student`, `teacher`, `optimizer`, `epoch`, `args`,
  `dino_loss`; `student` keys are `module.backbone.*` / `module.head.*` (DDP), `teacher` keys `backbone.*` / `head.*`.

Both load with torch.load(weights_only=True). The official loader (utils.load_pretrained_weights) strips `module.` and
`backbone.` and loads non-strict; this one strips exactly what the target model does not have, loads strict by
default, and names every missing or unexpected key when it fails.
"""
import argparse
import contextlib
import os
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["strip_prefixes", "load_official_weights", "extract_state_dict", "WeightsMismatchError"]

# Where the weights sit inside a checkpoint dict, in the order they are looked for when checkpoint_key is None.
# The teacher comes first: it is the network DINO evaluates (eval_knn.py / eval_linear.py default).
CHECKPOINT_KEYS = ("teacher", "student", "model", "state_dict")


class WeightsMismatchError(RuntimeError):
    """A state dict does not fit a model: missing, unexpected or differently shaped keys."""


def strip_prefixes(state_dict: Mapping[str, Tensor], prefixes: Iterable[str] = ("module.", "backbone.")) -> dict:
    """A new dict (same tensors, same order) with any leading `prefixes` removed from each key, repeatedly
    (so `module.backbone.x` → `x`). Only leading occurrences are removed (the official code replaces them anywhere).
    Raises ValueError if two keys become the same."""
    prefixes = tuple(prefixes)
    out = {}
    for key, value in state_dict.items():
        new = key
        stripped = True
        while stripped:
            stripped = False
            for p in prefixes:
                if p and new.startswith(p):
                    new, stripped = new[len(p):], True
        if new in out:
            raise ValueError(f"dinokernels.strip_prefixes: keys collide after stripping {prefixes}: {new!r}")
        out[new] = value
    return out


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def extract_state_dict(checkpoint: Mapping, checkpoint_key: Optional[str] = None) -> Dict[str, Tensor]:
    """The flat state dict inside `checkpoint`: checkpoint[checkpoint_key] if given, the dict itself if all its
    values are tensors, else the first of CHECKPOINT_KEYS present."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"dinokernels.load_official_weights: expected a state dict or a checkpoint dict, got "
                        f"{type(checkpoint).__name__}")
    if checkpoint_key is not None:
        if checkpoint_key not in checkpoint:
            raise KeyError(f"dinokernels.load_official_weights: checkpoint has no entry {checkpoint_key!r}; its "
                           f"entries are {sorted(map(str, checkpoint))}")
        sd = checkpoint[checkpoint_key]
    elif _is_state_dict(checkpoint):
        sd = checkpoint
    else:
        found = [k for k in CHECKPOINT_KEYS if k in checkpoint and isinstance(checkpoint[k], Mapping)]
        if not found:
            raise KeyError(f"dinokernels.load_official_weights: not a state dict and none of the entries "
                           f"{list(CHECKPOINT_KEYS)} found; its entries are {sorted(map(str, checkpoint))}; "
                           f"pass checkpoint_key")
        sd = checkpoint[found[0]]
    if not _is_state_dict(sd):
        raise TypeError("dinokernels.load_official_weights: the selected entry is not a state dict of tensors")
    return dict(sd)


def _fit_to_model(sd: Dict[str, Tensor], model_keys: List[str]) -> Dict[str, Tensor]:
    """Strip `module.` always; strip `backbone.` and drop `head.*` only when the model has no such keys (a backbone
    loaded from a full checkpoint)."""
    sd = strip_prefixes(sd, ("module.",))
    if any(k.startswith("backbone.") for k in model_keys):
        return sd
    sd = strip_prefixes(sd, ("backbone.",))
    if not any(k.startswith("head.") for k in model_keys):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return sd


def _list(keys: List[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_official_weights(model: nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping],
                          checkpoint_key: Optional[str] = None, strict: bool = True) -> Tuple[List[str], List[str]]:
    """Load an official DINO weight file (or an already loaded dict) into `model`; returns (missing, unexpected).

    * A path is read with torch.load(map_location="cpu", weights_only=True), argparse.Namespace allowed (the
      official full checkpoints store their `args` as one).
    * Plain backbone dicts and full checkpoints are both accepted; in a full checkpoint the entry is
      `checkpoint_key`, by default `teacher` (then `student`, `model`, `state_dict`).
    * `module.` prefixes are removed; `backbone.` prefixes are removed, and `head.*` keys dropped, when the model is
      a bare backbone; a MultiCropWrapper keeps both.
    * Shape mismatches always raise WeightsMismatchError; with strict (the default) so do missing or unexpected keys,
      all of them named in the message.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        # The official full checkpoints keep the run's argparse.Namespace under "args": allow that one class.
        safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch ≥ 2.5
        with safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext():
            checkpoint = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    else:
        checkpoint = path_or_state_dict
    sd = _fit_to_model(extract_state_dict(checkpoint, checkpoint_key), list(model.state_dict().keys()))

    # The head's last layer also loads from the newer parametrization names (WeightNormLinear maps them), so compare
    # against both spellings before calling load_state_dict.
    target = model.state_dict()
    aliases = {}
    for k in target:
        for old, new in (("weight_g", "parametrizations.weight.original0"),
                         ("weight_v", "parametrizations.weight.original1")):
            if k.endswith("." + old):
                aliases[k[: -len(old)] + new] = k
    canonical = {aliases.get(k, k): k for k in sd}
    missing = [k for k in target if k not in canonical]
    unexpected = [k for k, src in canonical.items() if k not in target]
    mismatched = [f"{k}: checkpoint {tuple(sd[src].shape)} vs model {tuple(target[k].shape)}"
                  for k, src in canonical.items() if k in target and sd[src].shape != target[k].shape]
    if mismatched:
        raise WeightsMismatchError("dinokernels.load_official_weights: shape mismatch for " + _list(mismatched)
                                   + " (a different architecture, patch size or img_size?)")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_list(unexpected)}")
        raise WeightsMismatchError("dinokernels.load_official_weights: the weights do not fit the model; "
                                   + "; ".join(parts))
    result = model.load_state_dict(sd, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)
