"""File and text helpers every stage shares: the cache root, atomic writes, markdown tables."""

import os
from collections.abc import Callable
from pathlib import Path


def saekit_cache() -> Path:
    """Root of saekit's caches (dequantised models, activations): $SAEKIT_CACHE, else ~/.cache/saekit."""
    return Path(os.environ.get("SAEKIT_CACHE") or Path.home() / ".cache" / "saekit")


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, flush it to disk, then rename onto `path`: readers (and a run
    killed mid-write) never see a partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def md_table(rows: list[dict]) -> str:
    """A markdown table with the first row's keys as columns; floats to 4 significant digits."""
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      *("| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows)])
