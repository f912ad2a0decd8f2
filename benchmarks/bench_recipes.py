"""Step-time cost of each training recipe relative to TopK, interleaved in one process.

Recipes (as in configs/): TopK, BatchTopK, OrtSAE (BatchTopK + penalty every step and every
5th step, the paper's cheap variant), TopK with subspace init. Each repetition runs one
`Trainer.train_step` of every recipe in turn on the same batch, so load changes on a shared
machine hit all alike; the table gives mean step times (amortised: the every-5th variant
pays its penalty on one step in five) and ratios to TopK. Inputs are low-rank random
activations (rank d/2) and `dead_tokens` is out of reach, so AuxK never runs: the figures are
each recipe's own overhead.

    python3 benchmarks/bench_recipes.py                  # d_in 576, m 9216, k 32, batch 4096
    python3 benchmarks/bench_recipes.py --m 65536 --reps 5
"""

import argparse
import statistics
import time

import torch

from saekit.config import TrainConfig, make_config
from saekit.trainer import Trainer

RECIPES = {
    "TopK": {},
    "BatchTopK": {"architecture": "batchtopk"},
    "OrtSAE (every step)": {"architecture": "batchtopk", "ortho_penalty": 0.25, "ortho_every": 1},
    "OrtSAE (every 5th)": {"architecture": "batchtopk", "ortho_penalty": 0.25, "ortho_every": 5},
    "TopK + subspace init": {"init": "subspace"},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--m", type=int, default=9216)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10, help="timed steps per recipe after 2 warm-up (a multiple of 5)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(args.d // 2, args.d, generator=g)  # activations in a d/2-dim subspace
    batches = [torch.randn(args.batch, args.d // 2, generator=g) @ mix for _ in range(4)]  # [B, d]
    trainers = {}
    for name, opts in RECIPES.items():
        cfg = make_config(TrainConfig, {"n_latents": args.m, "k": args.k, "hookpoints": ["x"],
                                        "batch_size": args.batch, "dead_tokens": 10**12, **opts})
        trainers[name] = Trainer(cfg, {"x": args.d}, {"x": batches[0]}, None, torch.device("cpu"))
    times = {name: [] for name in RECIPES}
    for rep in range(args.reps + 2):
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            tr.train_step({"x": batches[rep % len(batches)]})
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    base = statistics.mean(times["TopK"])
    print(f"d_in {args.d}, m {args.m}, k {args.k}, batch {args.batch}, fp32, {torch.get_num_threads()} threads, "
          f"mean of {args.reps} interleaved steps\n")
    print("| recipe | step s | / TopK |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.mean(t):.3f} | {statistics.mean(t) / base:.2f} |")


if __name__ == "__main__":
    main()
