"""Cross-layer matching study on the multi-layer run (`configs/layers.yaml`).

Matches every pair of the run's residual-stream SAEs (SAE Match, decoder folding), then
sets the numbers between two nulls: a second SAE trained from another seed on the same
activations (the ceiling: the same features, learned twice) and shuffled pairs (the floor).
The ceiling is the middle layer's, fit here, or with `--ceiling-run` (the same config trained
with another `--seed`) every layer's it shares; its shared fractions count all latents and, apart,
pairs of latents that both fire on the held-out tokens (dead rows can collapse onto each other).
Writes RUN/analysis/matching.* and analysis/results/matching{_NAME}.{md,json}.

    saekit train configs/layers.yaml
    python3 analysis/matching_study.py --run runs/layers
    saekit train configs/depth.yaml && saekit train configs/depth.yaml --seed 1 --out runs/depth-seed1
    python3 analysis/matching_study.py --run runs/depth --ceiling-run runs/depth-seed1 --name depth
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

from saekit import Run, fit
from saekit.analyze import universality
from saekit.analyze.crosslayer import chain_report, cofiring, layer_skip
from saekit.codes import encode_all
from saekit.io import atomic_write, md_table
from saekit.matching import match, nearest, pair_scores

OUT = Path(__file__).parent / "results"


def ceiling(run: Run, hookpoint: str, tokens: int, other: Run | None = None) -> dict:
    """The run's SAE at `hookpoint` against `other`'s there, or one fit from seed + 1 on the same
    activations."""
    cfg = run.config
    a = run.sae(hookpoint)
    if other is not None:
        b = other.sae(hookpoint)
    else:
        train = run.cache("train").tensor(hookpoint)
        b = fit(train, a.n_latents, cfg.k, seed=cfg.seed + 1, lr=cfg.lr, batch_size=cfg.batch_size,
                epochs=cfg.epochs, architecture=cfg.architecture)
    acts = run.activations(hookpoint)
    ca, cb = encode_all(a, acts, tokens), encode_all(b, acts, tokens)
    m = match(a, b, codes=(ca, cb))
    u = universality(a, b, m.b_for_a)
    live_a, live_b = ca.counts() > 0, cb.counts() > 0
    both = live_a & (m.b_for_a >= 0) & live_b[m.b_for_a.clamp_min(0)]  # dead rows can collapse onto each other
    n_live = max(1, min(int(live_a.sum()), int(live_b.sum())))
    return {"hookpoint": hookpoint, "cos_match": float(m.score.nanmean()), "shared_0.7": m.shared(0.7),
            "shared_0.9": m.shared(0.9), "live_a": int(live_a.sum()), "live_b": int(live_b.sum()),
            "live_shared_0.7": float((both & (m.score >= 0.7)).sum()) / n_live,
            "cos_top1": float(pair_scores(a, b, nearest(a, b).b_for_a).nanmean()),
            "ev_match": layer_skip(a, b, m.b_for_a, ca, acts, tokens),
            "ev_own": layer_skip(a, a, torch.arange(a.n_latents), ca, acts, tokens),
            "cofire_match": cofiring(ca, cb, m.b_for_a)["mean_jaccard"], "svcca": u.svcca, "svcca_null": u.svcca_null,
            "svcca_p": u.svcca_p, "rsa": u.rsa, "rsa_null": u.rsa_null, "rsa_p": u.rsa_p}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/layers")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--contexts", type=int, default=None, help="contexts for Δloss (default: the run's)")
    p.add_argument("--ceiling-run", default=None, help="the same config from another seed: a ceiling per layer")
    p.add_argument("--name", default=None, help="results as matching_NAME.* (default: matching.*)")
    p.add_argument("--reuse-chain", action="store_true",
                   help="read the layer matching from RUN/analysis/matching.json (an earlier run) and redo the nulls")
    args = p.parse_args()
    run = Run.open(args.run)
    done = run.analysis_dir / "matching.json"
    chain = (json.loads(done.read_text()) if args.reuse_chain and done.is_file()
             else chain_report(run, max_tokens=args.tokens, n_contexts=args.contexts, quiet=True))
    other = Run.open(args.ceiling_run) if args.ceiling_run else None
    mid = [run.hookpoints[len(run.hookpoints) // 2 - 1]]
    hooks = [h for h in run.hookpoints if h in other.hookpoints] if other else mid
    tops = [ceiling(run, h, args.tokens, other) for h in hooks]
    f = lambda v: f"{v:.4g}" if isinstance(v, float) else v  # noqa: E731
    stem = f"matching_{args.name}" if args.name else "matching"
    OUT.mkdir(exist_ok=True)
    if (run.analysis_dir / "matching.png").is_file():
        shutil.copy(run.analysis_dir / "matching.png", OUT / f"{stem}.png")
    seeds = f"`{args.ceiling_run}` (another seed, same config)" if other else "an SAE fit here from another seed"
    md = ((run.analysis_dir / "matching.md").read_text().replace("(matching.png)", f"({stem}.png)")
          + "\n## Nulls\n\n"
          f"One seed per layer. Ceiling: each SAE against {seeds} on the same activations (one seed pair per "
          "layer, so no figure here has a seed spread). "
          f"Floor: shuffled pairs, mean decoder cosine {chain['shuffled_cosine']:.4g}.\n\n"
          + md_table([{k: f(v) for k, v in top.items()} for top in tops]) + "\n")
    atomic_write(OUT / f"{stem}.md", lambda q: q.write_text(md))
    atomic_write(OUT / f"{stem}.json", lambda q: q.write_text(json.dumps({"chain": chain, "ceiling": tops}, indent=1)))
    print(md)


if __name__ == "__main__":
    main()
