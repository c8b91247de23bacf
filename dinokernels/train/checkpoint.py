"""Checkpoints: atomic writes, plain contents (tensors and Python data only, so `torch.load(weights_only=True)`
reads them), and the RNG states needed for a resumed run to continue the same curve. `atomic_write` is the same
temporary-file-and-rename write for any output (summary.json, loss.png, log rewrites); `load_checkpoint` turns an
empty, truncated or foreign file into one CheckpointError naming the file."""
import contextlib
import os
import pickle
import random
import tempfile
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "get_rng_state", "set_rng_state", "to_plain", "atomic_write",
           "CheckpointError", "check_checkpoint_file", "checkpoint_error", "temporary_files", "LOAD_ERRORS",
           "ACCESS_ERRORS"]


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint: empty, truncated, not a torch file, or holding objects that
    weights_only loading refuses to build. The message is one line naming the file."""


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[Any]:
    """`with atomic_write(path, "w") as f: ...` writes to a temporary file in the same folder, flushes and fsyncs
    it, then renames it over `path` (os.replace, atomic on POSIX and Windows). A crash or kill at any point leaves
    the previous file or the new one, never a partial file; an exception removes the temporary file. The folder is
    fsync'ed too (where the OS allows) so that the rename itself survives a power cut."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_files(folder: str, name: str) -> list:
    """Paths of the temporary files atomic_write(<folder>/<name>) leaves behind when the process is killed."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    prefix = "." + name + "."
    return [os.path.join(folder, e) for e in entries if e.startswith(prefix) and e.endswith(".tmp")]


def save_checkpoint(obj: Dict[str, Any], path: str) -> None:
    """torch.save(obj, path) atomically (atomic_write): a crash at any point leaves either the previous file or
    the new one, never a partial file."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


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


def check_checkpoint_file(path: str, what: str = "checkpoint") -> str:
    """`path` as a string after checking that it names a non-empty regular file: FileNotFoundError,
    IsADirectoryError or CheckpointError (empty) otherwise, each naming `what` and the path."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} {path!r} is empty (0 bytes): not a checkpoint")
    return path


# What torch.load raises for bytes that are not a readable checkpoint (EOFError: empty or cut pickle; RuntimeError:
# a broken zip archive; UnpicklingError: unknown bytes or objects weights_only refuses; KeyError/ValueError/
# IndexError: garbage that the legacy pickle reader trips over; OSError EINVAL: an archive cut at some offsets).
# Access errors (permissions, a file gone meanwhile) are caught first and passed through unchanged.
LOAD_ERRORS = (EOFError, pickle.UnpicklingError, RuntimeError, KeyError, ValueError, IndexError, TypeError,
               UnicodeDecodeError, OverflowError, MemoryError, AttributeError, ImportError, OSError)
ACCESS_ERRORS = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


def checkpoint_error(path: str, exc: BaseException, what: str = "checkpoint") -> CheckpointError:
    """A one-line CheckpointError for `exc`, raised by torch.load on `path`, saying what is wrong with the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
        reason = ("it holds objects other than tensors and plain data, which safe loading (weights_only) refuses"
                  if head[:2] == b"PK" or head[:1] == b"\x80" else "not a torch checkpoint (unrecognised bytes)")
    elif head[:2] == b"PK" and ("zip" in first.lower() or "streamreader" in first.lower()
                                or isinstance(exc, OSError)):
        reason = f"a torch archive that is truncated or corrupt ({first.split('. ')[0]})"
    elif isinstance(exc, EOFError):
        reason = "truncated (the file ends early)"
    else:
        reason = f"not a torch checkpoint ({type(exc).__name__}: {first})"
    return CheckpointError(f"{what} {path!r} cannot be read: {reason}")


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """torch.load(path, weights_only=True): checkpoints written here, and official DINO weight files, hold only
    tensors and plain data, so nothing in them can run code when loaded. A missing path raises FileNotFoundError; an
    empty, truncated or foreign file a CheckpointError (a ValueError) naming the file."""
    path = check_checkpoint_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except ACCESS_ERRORS:
        raise
    except LOAD_ERRORS as e:
        raise checkpoint_error(path, e) from e


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
