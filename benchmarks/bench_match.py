"""Sparse candidate matching against the exact assignment: wall time, peak memory, agreement.

A is a random dictionary of unit rows in d = 576 (SmolLM2's width); B is A permuted with noise
of `--noise` times the row norm spread over the coordinates (noise 1: matched cosine ~0.7;
noise 6: ~0.16, as between real consecutive layers of an undertrained run, where many
nearest neighbours are wrong). Each (size, solver) runs in a fresh process so peak RSS is its
own. Figures go to benchmarks/RESULTS.md.

    python3 benchmarks/bench_match.py --noise 1
    python3 benchmarks/bench_match.py --noise 6
    python3 benchmarks/bench_match.py --sizes 65536 --solvers sparse
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def one(m: int, d: int, noise: float, solver: str, candidates: int, out: str) -> None:
    from saekit.matching import match
    from saekit.sae import SAE, SAEConfig

    torch.manual_seed(0)
    a, b = SAE(SAEConfig(d, m, 32), device="meta"), SAE(SAEConfig(d, m, 32), device="meta")
    wa = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    perm = torch.randperm(m)
    wb = torch.nn.functional.normalize(wa[perm] + noise / d**0.5 * torch.randn(m, d), dim=1)
    for s, w in ((a, wa), (b, wb)):
        s.load_state_dict({"W_dec": w, "W_enc": w.clone(), "b_enc": torch.zeros(m), "b_dec": torch.zeros(d)},
                          assign=True)
    want = torch.empty(m, dtype=torch.long)
    want[perm] = torch.arange(m)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    r = match(a, b, solver=solver, candidates=candidates)
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(r.b_for_a, out)
    print(json.dumps({"m": m, "solver": solver, "seconds": round(sec, 2), "peak_mib": round(peak / 1024),
                      "added_mib": round((peak - base) / 1024),
                      "planted_recovered": float((r.b_for_a == want).float().mean()),
                      "mean_cosine": float(r.score.nanmean()), "edges": r.info.get("edges"),
                      "n_fallback": r.info.get("n_fallback")}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--solvers", nargs="+", default=["exact", "sparse"])
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        solver = args.solvers[0]
        one(args.sizes[0], args.d, args.noise, solver, args.candidates, f"/tmp/bench_match_{solver}.pt")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d {args.d}, noise {args.noise}, "
          f"candidates {args.candidates}")
    print("| latents | solver | seconds | peak RSS MiB | added MiB | planted recovered | mean cosine | edges "
          "| agreement with exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in args.sizes:
        res = {}
        for solver in args.solvers:
            cmd = [sys.executable, __file__, "--one", "--sizes", str(m), "--solvers", solver,
                   "--noise", str(args.noise), "--d", str(args.d), "--candidates", str(args.candidates)]
            res[solver] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            res[solver]["b_for_a"] = torch.load(f"/tmp/bench_match_{solver}.pt")
        for solver, r in res.items():
            agree = (float((r["b_for_a"] == res["exact"]["b_for_a"]).float().mean())
                     if "exact" in res and solver != "exact" else "")
            print(f"| {m:,} | {solver} | {r['seconds']} | {r['peak_mib']:,} | {r['added_mib']:,} | "
                  f"{r['planted_recovered']:.4f} | "
                  f"{r['mean_cosine']:.4f} | {r['edges'] or ''} | {agree if agree == '' else f'{agree:.4f}'} |",
                  flush=True)


if __name__ == "__main__":
    main()
