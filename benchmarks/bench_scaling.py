"""Scaling over processes on one machine: training from finished caches, and the harvest.

On a 2-core machine the fair comparison is one process using both cores (2 intra-op threads)
against two processes with one core each (`torchrun --standalone --nproc_per_node 2`, run as
`python -m torch.distributed.run`, 1 thread each): the same cores, split by torch threads or by
processes. Every variant runs the real CLI in subprocesses:
  default      configs/default.yaml (one hookpoint): 1 process, 2 processes data parallel
  3 hookpoints blocks.2/4/6 resid_post of the same model, fewer tokens: 1 process,
               2 processes data parallel, 2 processes with shard_hookpoints (the first process
               trains two SAEs, the second one)
  harvest      `saekit cache` into an empty cache_dir: 1 process harvesting every context, or 2
               each harvesting its own half (one model forward per process on its own tokens);
               the time of the same command on the finished cache (start-up, model load,
               tokenising) is subtracted
  all-reduce   one gloo all-reduce of the default SAE's gradients over 2 processes

Training steps/s come from the run's metrics.jsonl (logged every step: step s has taken
s * batch_size / tokens_per_s seconds since the first step began), between step `--warmup` and
the last step: the harvest, start-up, warm-up, the final save and the evaluation are excluded.
speedup = (time with 1 process) / (time with 2 processes) for the same work, i.e. the ratio of
wall-clock times, equal to (steps/s of 2) / (steps/s of 1): 1.0 means splitting the two cores over
processes gains nothing over threads, 2.0 would be perfect scaling.
The environment is passed on: e.g. SAEKIT_ENCODER=fp32 fixes the CPU encoder's precision, which
"auto" otherwise picks by timing in every process (at 1 and at 2 threads it may pick differently).

    python3 benchmarks/bench_scaling.py                 # the measurement (a quiet machine: minutes)
    python3 benchmarks/bench_scaling.py --quick         # a smoke test: tiny runs, numbers meaningless
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from saekit.io import md_table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "default.yaml"
THREE = ["--hookpoints", "[blocks.2.hook_resid_post, blocks.4.hook_resid_post, blocks.6.hook_resid_post]",
         "--n_tokens", "150000", "--epochs", "2"]
QUICK = ["--n_tokens", "6000", "--val_tokens", "600", "--ctx_len", "64", "--epochs", "1", "--batch_size", "500",
         "--expansion", "2", "--dead_tokens", "3000"]
# no checkpoint inside the measured steps, a metrics line every step, a short evaluation
COMMON = ["--checkpoint_every", "1000000", "--log_every", "1", "--eval_contexts", "2", "--quiet"]


def run(procs: int, args: list[str]) -> float:
    """Wall seconds of the saekit CLI with `args` in 1 process (2 threads) or under torchrun (2 x 1 thread)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd = [*([sys.executable] if procs == 1 else torchrun), "-m", "saekit.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // procs), "PYTHONPATH": str(ROOT)}
    print("$ OMP_NUM_THREADS=%d %s" % (2 // procs, shlex.join(cmd)), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def steps_per_s(out: Path, warmup: int) -> tuple[int, float]:
    """Steps after warm-up and their rate, from metrics.jsonl (run_steps' cumulative tokens/s)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    batch = json.loads((out / "config.json").read_text())["batch_size"]
    elapsed = {r["step"]: r["step"] * batch / r["tokens_per_s"] for r in rows}
    last = max(elapsed)
    if last <= warmup:
        sys.exit(f"{out}: {last} steps, not more than --warmup {warmup}")
    return last - warmup, (last - warmup) / (elapsed[last] - elapsed[warmup])


def allreduce_ms(n_floats: int) -> float:
    """Median ms of one gloo all-reduce of `n_floats` floats over 2 processes (1 thread each): the
    gradient exchange of one data-parallel step."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*torchrun, __file__, "--allreduce-worker", str(n_floats)], env=env, capture_output=True,
                          text=True, check=True)
    return float(done.stdout.split()[-1])


def _allreduce_worker(n_floats: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    x, times = torch.randn(n_floats), []
    for _ in range(23):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t)
    if dist.get_rank() == 0:
        print(sorted(times[3:])[10] * 1e3)
    dist.destroy_process_group()


def main() -> None:
    if sys.argv[1:2] == ["--allreduce-worker"]:
        return _allreduce_worker(int(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the rate (default 5)")
    ap.add_argument("--quick", action="store_true", help="tiny runs: a smoke test of the script")
    ap.add_argument("--work", help="folder for caches and runs (default: a temporary one, removed)")
    a = ap.parse_args()
    if a.warmup < 1:
        ap.error("--warmup must be >= 1 (the rate is taken between two logged steps)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        # a tiny harvest first: the measured commands find the files warm (model, corpus, bytecode)
        run(1, ["cache", str(CONFIG), *QUICK, "--cache_dir", str(work / "warm-up"), "--quiet"])
        extra = QUICK if a.quick else []
        rows = []
        for name, cfg_args, variants in [("default", [], [(1, []), (2, [])]),
                                         ("3 hookpoints", THREE, [(1, []), (2, []),
                                                                  (2, ["--shard_hookpoints", "true"])])]:
            base, slug = [str(CONFIG), *cfg_args, *extra], name.replace(" ", "_")
            secs = {}
            for p in (1, 2):
                cache = ["cache", *base, "--cache_dir", str(work / f"{slug}-{p}"), "--quiet"]
                secs[p] = run(p, cache) - run(p, cache)  # the second finds the cache finished
            rows += [{"variant": f"{name}: harvest", "processes x threads": f"{p} x {2 // p}", "steps": "",
                      "steps/s": "", "seconds": secs[p], "speedup": secs[1] / secs[p]} for p in (1, 2)]
            single = None
            for procs, flags in variants:
                label = "sharded hookpoints" if flags else "data parallel" if procs > 1 else "1 process"
                out = work / "runs" / f"{slug}-{procs}-{label}".replace(" ", "_")
                run(procs, ["train", *base, *flags, *COMMON, "--cache_dir", str(work / f"{slug}-2"),
                            "--out", str(out)])
                steps, rate = steps_per_s(out, a.warmup)
                single = single or rate
                rows.append({"variant": f"{name}: train, {label}", "processes x threads": f"{procs} x {2 // procs}",
                             "steps": steps, "steps/s": rate, "seconds": steps / rate, "speedup": rate / single})
    m, d = 16 * 576, 576  # the default SAE: W_enc, W_dec, b_enc, b_dec
    print(f"gradient all-reduce of the default SAE ({2 * m * d + m + d:,} floats, gloo, 2 x 1 thread): "
          f"median {allreduce_ms(2 * m * d + m + d):.1f} ms")
    print(f"\n{md_table(rows)}\n\nspeedup: time with 1 process / time with 2 processes for the same work "
          "(train: the steps after warm-up; harvest: `saekit cache` less its start-up)")
    print(f"command: python3 {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
