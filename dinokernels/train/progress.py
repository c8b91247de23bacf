"""Plain-text progress bar on stderr and a JSON-lines log (no dependency: tqdm is not needed)."""
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

__all__ = ["ProgressBar", "JsonlLog", "format_seconds"]


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """One line per update on a terminal (rewritten in place with \\r, at most every `min_interval` seconds), or a
    plain line every `line_interval` seconds and at the end of each epoch when stderr is not a terminal (logs, CI).
    """

    def __init__(self, total_iters: int, start_iter: int = 0, stream=None, enabled: bool = True,
                 min_interval: float = 0.2, line_interval: float = 10.0, width: int = 24):
        self.total = max(1, int(total_iters))
        self.start_iter = int(start_iter)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval if self.tty else line_interval
        self.width = width
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.dirty = False

    def update(self, iteration: int, epoch: int, epochs: int, fields: Dict[str, Any], force: bool = False) -> None:
        """iteration: global iterations done so far (1-based count)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < self.min_interval:
            return
        self.last = now
        done = iteration - self.start_iter
        frac = iteration / self.total
        elapsed = now - self.t0
        eta = elapsed / done * (self.total - iteration) if done > 0 else float("nan")
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        parts = [f"epoch {epoch + 1}/{epochs}", f"[{bar}]", f"{iteration}/{self.total}"]
        parts += [self._fmt(k, v) for k, v in fields.items()]
        parts.append(f"{format_seconds(elapsed)}<{format_seconds(eta) if eta == eta else '?'}")
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.dirty = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    @staticmethod
    def _fmt(key: str, value: Any) -> str:
        if isinstance(value, float):
            if key in ("lr", "wd"):
                return f"{key} {value:.2e}"
            if key in ("momentum", "m"):
                return f"{key} {value:.5f}"
            if key.endswith("/s"):
                return f"{value:.1f} {key}"
            return f"{key} {value:.4f}"
        return f"{key} {value}"

    def close(self) -> None:
        if self.enabled and self.tty and self.dirty:
            self.stream.write("\n")
            self.stream.flush()
            self.dirty = False


class JsonlLog:
    """Appends one JSON object per line; `truncate_after(iteration)` drops the lines of iterations that a resumed
    run will redo (they were logged after the checkpoint it resumes from).

    Kill-safety: each record is appended by one write(2) call on an O_APPEND descriptor, so a killed process leaves
    whole lines (a power cut can still cut the last one: `read` skips a line that does not parse, and the next
    append starts on a fresh line); `truncate_after` rewrites the file atomically (temporary file + rename)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self._fd: Optional[int] = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate_after(self, iteration: int) -> None:
        if self.path is None or not os.path.exists(self.path):
            return
        from .checkpoint import atomic_write

        kept = [rec for rec in self.read(self.path) if rec.get("iteration", 0) <= iteration]
        with atomic_write(self.path, "w") as f:
            f.write("".join(json.dumps(rec) + "\n" for rec in kept))

    def write(self, record: Dict[str, Any]) -> None:
        if self.path is None:
            return
        data = (json.dumps(record) + "\n").encode()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self._fd).st_size
            if size:  # a line cut by a crash must not swallow this record
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        data = b"\n" + data
        written = os.write(self._fd, data)
        while written < len(data):  # short writes only happen on full disks / signals; finish the line
            written += os.write(self._fd, data[written:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def read(path: str) -> List[Dict[str, Any]]:
        """The records of `path`; a line that does not parse (cut by a crash) is skipped."""
        out = []
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
        return out
