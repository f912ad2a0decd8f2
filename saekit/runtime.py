"""Process-level settings, all opt-in: the device, torch's thread count (always restored) and
the allocator tuning that only the CLI applies. Library calls change nothing process-wide."""

import contextlib
import ctypes
import os
import re
from importlib.metadata import PackageNotFoundError, version

import torch

from saekit.errors import SaekitError

try:
    VERSION = version("saekit")
except PackageNotFoundError:  # a source tree that was never installed
    VERSION = "0+unknown"

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


ENCODER_CHOICES = ("auto", "fp32", "bf16")
# The numeric paths of a CPU fp32 SAE's encoder: an fp32 matmul, or a bf16 matmul whose top
# k + sae.RESCORE_MARGIN candidates per row are rescored in fp32. Each SAE records the path its run
# used (cfg.json `encoder_path`), and so do eval.json, metrics.jsonl and the atlas.
FP32, BF16_RESCORE = "fp32", "bf16+fp32-rescore"
ENCODER_PATHS = (FP32, BF16_RESCORE)


def machine_encoder_path() -> str:
    """This CPU's encoder path, from its capabilities: bf16 where it has native bf16 dot
    products (AVX512-BF16; AMX CPUs have them too), fp32 elsewhere, where torch emulates bf16
    and runs it slower than fp32. A flag, not a timing: a timed probe flips under load, and the
    same command must give the same numbers (measurements: benchmarks/RESULTS.md)."""
    return BF16_RESCORE if torch.cpu._is_avx512_bf16_supported() else FP32


def cpu_encoder_path(recorded: str | None = None) -> str:
    """The path a CPU fp32 encoder takes: `SAEKIT_ENCODER` = fp32 | bf16 when set, else
    `recorded` (the path the SAE's run used, so later commands on a run reproduce its numbers),
    else this machine's (`machine_encoder_path`)."""
    choice = os.environ.get("SAEKIT_ENCODER", "auto")
    if choice not in ENCODER_CHOICES:
        raise SaekitError(f"SAEKIT_ENCODER must be one of {ENCODER_CHOICES}, got {choice!r}")
    if choice != "auto":
        return BF16_RESCORE if choice == "bf16" else FP32
    return recorded or machine_encoder_path()
