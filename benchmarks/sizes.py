"""The command line every step benchmark shares: the problem size (d, m, k, batch), threads, reps."""

import argparse


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
