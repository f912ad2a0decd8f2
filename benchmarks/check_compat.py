"""Runs trained by another checkout load and evaluate to the same numbers with this one.

    git worktree add /tmp/old <commit>        # e.g. the commit before a restructure
    python3 benchmarks/check_compat.py --against /tmp/old [--out /tmp/compat]

Trains one tiny run per dictionary family, a crosscoder and a transcoder (layer 2 of the offline
SmolLM2, 6k tokens: seconds each) with the checkout in `--against`, evaluated there; then
evaluates each run again with this checkout and compares every figure of eval.json the two
share. Prints the largest relative difference per run; exits 1 if any run fails to load or a
figure differs by more than `--tol` (default 0: the same numbers).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
TINY = ["--n_tokens", "6000", "--val_tokens", "600", "--ctx_len", "64", "--epochs", "2", "--expansion", "2",
        "--k", "16", "--batch_size", "500", "--checkpoint_every", "4", "--eval_contexts", "2", "--dead_tokens", "3000"]
L2 = "blocks.2.hook_resid_post"
RUNS = {**{a: ["--hookpoints", L2, "--architecture", a] for a in ("topk", "batchtopk", "jumprelu", "matryoshka")},
        "mp": ["--hookpoints", L2, "--architecture", "mp", "--k", "8"],
        "crosscoder": ["--sources", f"[{L2}, blocks.3.hook_resid_post]"],
        "transcoder": ["--sources", "[blocks.2.mlp.hook_in]", "--targets", "[blocks.2.hook_mlp_out]"]}


def saekit(checkout: Path, *args: str) -> None:
    """`saekit ARGS` with the package of `checkout` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = [sys.executable, "-c", "import sys; from saekit.cli import main; sys.exit(main())", *args, "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"check_compat: `saekit {' '.join(args)}` with {checkout} failed:\n{done.stderr[-2000:]}")


def largest_difference(old: dict, new: dict) -> tuple[int, float, list[str]]:
    """(figures compared, largest relative difference, keys whose non-numeric values differ)."""
    n, worst, other = 0, 0.0, []
    for h, figures in old.items():
        for k, v in figures.items():
            if k not in new.get(h, {}):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                n += 1
                worst = max(worst, abs(new[h][k] - v) / max(abs(v), 1e-12))
            elif new[h][k] != v:
                other.append(f"{h}.{k}")
    return n, worst, other


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, type=Path, help="the checkout that trains the runs")
    ap.add_argument("--out", type=Path, default=Path("/tmp/saekit_compat"), help="where the runs go")
    ap.add_argument("--tol", type=float, default=0.0, help="largest relative difference allowed")
    a = ap.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    failed = False
    for name, args in RUNS.items():
        run = a.out / name
        saekit(a.against, "train", *TINY, *args, "--cache_dir", str(a.out / "cache"), "--out", str(run))
        old = json.loads((run / "eval.json").read_text())
        saekit(HERE, "eval", str(run))
        n, worst, other = largest_difference(old, json.loads((run / "eval.json").read_text()))
        failed |= worst > a.tol or bool(other) or n == 0
        print(f"{name:11s} {n:3d} figures, largest relative difference {worst:.3g}"
              + (f"; differ: {', '.join(other)}" if other else ""))
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
