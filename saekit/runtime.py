"""Process-level settings, all opt-in: the device, torch's thread count (always restored) and
the allocator tuning that only the CLI applies. Library calls change nothing process-wide."""

import contextlib
import ctypes
import re

import torch

from saekit.errors import SaekitError

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available else cpu; refuses cuda where there is none."""
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise SaekitError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SaekitError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return torch.device(name)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with `n` intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def keep_freed_memory() -> None:
    """Stop glibc from returning large freed blocks to the OS: each CPU step allocates several
    [m, d] gradient buffers, and re-faulting their pages costs ~10 % of a step. Process-wide,
    so only the `saekit` command calls it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
