"""Process-level settings, all opt-in: the device, torch's thread count (always restored) and
the allocator tuning that only the CLI applies. Library calls change nothing process-wide."""

import contextlib
import ctypes
import functools
import os
import re
import time

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


ENCODER_CHOICES = ("auto", "fp32", "bf16")


def cpu_encoder_bf16() -> bool:
    """Whether CPU encoder matmuls run in bf16: `SAEKIT_ENCODER` = fp32 | bf16 | auto (default).

    "auto" measures once per process (`bf16_matmul_pays`) rather than trusting CPU flags:
    without native bf16 dot products (AVX512-BF16, AMX) torch emulates bf16 and runs slower.
    """
    choice = os.environ.get("SAEKIT_ENCODER", "auto")
    if choice not in ENCODER_CHOICES:
        raise SaekitError(f"SAEKIT_ENCODER must be one of {ENCODER_CHOICES}, got {choice!r}")
    return choice == "bf16" or (choice == "auto" and bf16_matmul_pays())


@functools.cache
def bf16_matmul_pays(min_speedup: float = 1.5) -> bool:
    """Time a [256, 576] @ [576, 4096] matmul in fp32 and bf16 (best of 3, ~0.1 s in all) and
    say whether bf16 is at least `min_speedup` times faster on this CPU."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 576, generator=g), torch.randn(4096, 576, generator=g)

    def best(dt: torch.dtype) -> float:
        a, b = x.to(dt), w.to(dt).T
        a @ b  # warm-up (first call allocates and may pick a kernel)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16) * min_speedup <= best(torch.float32)
