"""What the step benchmarks share: the command line (problem size d, m, k, batch; threads; reps)
and the interleaved timing of several contenders."""

import argparse
import time
from collections.abc import Callable


def size_parser(doc: str, reps: int, threads: int = 0) -> argparse.ArgumentParser:
    """A parser with `--d --m --k --batch` (default: d 576, m 9,216, k 32, batch 4,096, the CPU
    anchor size), `--threads` (0: torch's default) and `--reps`; a benchmark adds its own flags."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--m", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=threads, help="torch threads (0: torch's default, one per core)")
    p.add_argument("--reps", type=int, default=reps)
    return p


def interleaved(steps: dict[str, Callable[[], object]], reps: int, warmup: int,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each step per repetition; every repetition times each step once, in turn, so a
    change of load hits all contenders alike. `sync` waits for the device around each timing."""
    for _ in range(warmup):
        for f in steps.values():
            f()
    times = {n: [] for n in steps}
    for _ in range(reps):
        for n, f in steps.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[n].append(time.perf_counter() - t)
    return times
