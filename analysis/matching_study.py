"""Cross-layer matching study on the multi-layer run (`configs/layers.yaml`).

Matches every pair of the run's six residual-stream SAEs (SAE Match, decoder folding), then
sets the numbers between two nulls: a second SAE on the middle layer trained from another
seed on the same activations (the ceiling: the same features, learned twice) and shuffled
pairs (the floor). Writes RUN/analysis/matching.* and analysis/results/matching.{md,json}.

    saekit train configs/layers.yaml
    python3 analysis/matching_study.py --run runs/layers
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


def ceiling(run: Run, hookpoint: str, tokens: int) -> dict:
    """The run's SAE at `hookpoint` against one trained from seed 1 on the same activations."""
    cfg = run.config
    a = run.sae(hookpoint)
    train = run.cache("train").tensor(hookpoint)
    b = fit(train, a.n_latents, cfg.k, seed=cfg.seed + 1, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs,
            architecture=cfg.architecture)
    acts = run.activations(hookpoint)
    ca, cb = encode_all(a, acts, tokens), encode_all(b, acts, tokens)
    m = match(a, b, codes=(ca, cb))
    u = universality(a, b, m.b_for_a)
    return {"hookpoint": hookpoint, "cos_match": float(m.score.nanmean()),
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
    args = p.parse_args()
    run = Run.open(args.run)
    chain = chain_report(run, max_tokens=args.tokens, n_contexts=args.contexts, quiet=True)
    mid = run.hookpoints[len(run.hookpoints) // 2 - 1]
    top = ceiling(run, mid, args.tokens)
    f = lambda v: f"{v:.4g}" if isinstance(v, float) else v  # noqa: E731
    OUT.mkdir(exist_ok=True)
    if (run.analysis_dir / "matching.png").is_file():
        shutil.copy(run.analysis_dir / "matching.png", OUT / "matching.png")
    md = ((run.analysis_dir / "matching.md").read_text() + "\n## Nulls\n\n"
          f"Ceiling: `{mid}` against an SAE trained on the same activations from another seed. "
          f"Floor: shuffled pairs, mean decoder cosine {chain['shuffled_cosine']:.4g}.\n\n"
          + md_table([{k: f(v) for k, v in top.items()}]) + "\n")
    atomic_write(OUT / "matching.md", lambda q: q.write_text(md))
    atomic_write(OUT / "matching.json", lambda q: q.write_text(json.dumps({"chain": chain, "ceiling": top}, indent=1)))
    print(md)


if __name__ == "__main__":
    main()
