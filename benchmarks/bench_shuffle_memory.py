"""Peak memory of the training shuffle buffer (`saekit.activations.ShuffledBatches`) over several
hookpoints: a synthetic cache of random activations, one epoch of batches read in a fresh process,
its peak RSS above the RSS before the first batch.

    python3 benchmarks/bench_shuffle_memory.py [--hookpoints 6] [--d 576] [--tokens 32768]
                                               [--shard 8192] [--buffer 32768]

Run it with PYTHONPATH pointing at two checkouts to compare versions of the buffer; the result
goes to stdout (one line of JSON).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def child(path: str, hookpoints: list[str], batch: int, buffer: int) -> None:
    from saekit.activations import ActivationCache, ShuffledBatches

    cache = ActivationCache.open(path)
    batches = ShuffledBatches(cache, hookpoints, batch, 0, buffer)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    n = sum(1 for _ in batches.batches(0, 1))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row_mib = len(hookpoints) * cache.dim(hookpoints[0]) * 4 / 2**20
    print(json.dumps({"batches": n, "shards_per_buffer": batches.per_buffer,
                      "peak_above_start_mib": round(peak - before),
                      "buffer_data_mib": round(batches.per_buffer * max(batches.sizes) * row_mib)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hookpoints", type=int, default=6)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--shard", type=int, default=8192)
    p.add_argument("--buffer", type=int, default=32768)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(a.hookpoints)]
    if a.child:
        child(a.child, hooks, a.batch, a.buffer)
        return
    from saekit.activations import build_cache

    with tempfile.TemporaryDirectory() as tmp:
        g = torch.Generator().manual_seed(0)
        chunks = ({h: torch.randn(a.shard, a.d, generator=g) for h in hooks} for _ in range(a.tokens // a.shard))
        build_cache(Path(tmp) / "cache", chunks, {"model": "synthetic"}, shard_tokens=a.shard)
        args = [sys.executable, __file__, "--child", str(Path(tmp) / "cache"), *sys.argv[1:]]
        subprocess.run(args, check=True, env=os.environ)


if __name__ == "__main__":
    main()
