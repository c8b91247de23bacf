"""Checkpoints: atomic writes, plain contents (tensors and Python data only, so `torch.load(weights_only=True)`
reads them), and the RNG states needed for a resumed run to continue the same curve."""
import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "get_rng_state", "set_rng_state", "to_plain"]


def save_checkpoint(obj: Dict[str, Any], path: str) -> None:
    """torch.save(obj, path) atomically: the bytes go to a temporary file in the same folder, which is flushed and
    fsync'ed and then renamed over `path` (os.replace, atomic on POSIX and Windows). A crash at any point leaves
    either the previous file or the new one, never a partial file; the folder is fsync'ed too (where the OS allows)
    so that the rename itself survives a power cut."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """torch.load(path, weights_only=True): checkpoints written here, and official DINO weight files, hold only
    tensors and plain data, so nothing in them can run code when loaded."""
    return torch.load(os.fspath(path), map_location=map_location, weights_only=True)


def to_plain(value: Any) -> Any:
    """A config value made safe for weights_only loading: tuples → lists, numpy scalars → Python numbers, paths →
    strings; dicts and lists recursively; tensors kept."""
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    return str(value)


# ---- RNG state ----

def get_rng_state() -> Dict[str, Any]:
    """The torch (CPU and, when initialised, every CUDA device), Python `random` and numpy global RNG states, as
    tensors and plain data."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Restore what get_rng_state returned (missing parts are left alone)."""
    if not state:
        return
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "numpy" in state:
        npst = state["numpy"]
        np.random.set_state({"bit_generator": npst["bit_generator"],
                             "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
                             "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
