"""File and text helpers every stage shares: the cache root, atomic writes, markdown tables,
progress lines for long phases."""

import errno
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from saekit.errors import SaekitError


def saekit_cache() -> Path:
    """Root of saekit's caches (dequantised models, activations): $SAEKIT_CACHE, else ~/.cache/saekit."""
    return Path(os.environ.get("SAEKIT_CACHE") or Path.home() / ".cache" / "saekit")


def read_json(file: Path, what: str = "is not valid JSON") -> dict:
    """The JSON object in `file`; text that is not JSON, or JSON that is not an object, raises a
    SaekitError `"{file} {what}: {why}"` (an unreadable file raises its OSError)."""
    try:
        data = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaekitError(f"{file} {what}: {e}") from None
    if not isinstance(data, dict):
        raise SaekitError(f"{file} {what}: not a JSON object")
    return data


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, flush it to disk, then rename onto `path`: readers (and a run
    killed mid-write) never see a partial file. A failed write (a full disk, no permission)
    leaves `path` as it was, removes the temporary file and raises SaekitError naming `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        kept = f"{path} is unchanged" if path.exists() else f"{path} was not written"
        if _no_space(e):
            raise SaekitError(f"no space left on device while writing {path}; free space and rerun "
                              f"(--resume continues a training run from its last checkpoint); {kept}") from None
        if isinstance(e, OSError):
            raise SaekitError(f"cannot write {path}: {e.strerror or e}; {kept}") from None
        raise


def honour_umask(path: Path) -> None:
    """Give the file at `path`, or every file and folder under it, the mode a plain `open` would
    (0666 / 0777 less the umask): safetensors writes 0600, which locks other users out of a cache
    or run folder on a shared disk."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _no_space(e: BaseException) -> bool:
    """A full disk, as an OSError or as the message of a library's own error (safetensors, torch)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    return isinstance(e, Exception) and ("No space left on device" in str(e) or "os error 28" in str(e))


def figure(name: str, value) -> str:
    """`value` as a table or line for people shows it: a share of latents or tokens (a name that
    starts with dead, dense, share or shared) as a percentage to 3 significant digits, another float
    to 4 (JSON files keep full precision)."""
    if isinstance(value, float) and math.isfinite(value) and re.match(r"(dead|dense|shared?)(_|\s|$)", name):
        return f"{100 * value:.3g} %"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def md_table(rows: list[dict]) -> str:
    """A markdown table with the first row's keys as columns, each value as `figure` shows it."""
    if not rows:
        return ""
    keys = list(rows[0])
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      *("| " + " | ".join(figure(k, r.get(k)) for k in keys) + " |" for r in rows)])


class Phases:
    """Lines on stderr for the steps of a long stage that have no progress bar, so none runs
    silently: `step(what)` prints `NAME: what ...` and, at the next step or on leaving the
    `with` block, `NAME: what: 12.3 s`. Nothing when `quiet`."""

    def __init__(self, name: str, quiet: bool = False):
        self.name, self.quiet, self.what, self.t0 = name, quiet, None, 0.0

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(f"{self.name}: {text}", file=sys.stderr, flush=True)

    def step(self, what: str) -> None:
        self.end()
        self.what, self.t0 = what, time.perf_counter()
        self._say(f"{what} ...")

    def end(self) -> None:
        if self.what is not None:
            self._say(f"{self.what}: {time.perf_counter() - self.t0:.1f} s")
        self.what = None

    def __enter__(self) -> "Phases":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.end()
