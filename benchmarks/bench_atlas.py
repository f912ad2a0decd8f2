"""Feature atlas: build time and size per latent for a run, then query latency (p50, p95) of
`card`, `token`, `search` and `features` over random queries, and of `text` on 64-token inputs
(the model loaded once). Figures go to benchmarks/RESULTS.md.

    saekit train configs/default.yaml
    python3 benchmarks/bench_atlas.py --run runs/default [--tokens N] [--queries 200]
"""

import argparse
import random
import re
import time
from pathlib import Path

import numpy as np

from saekit import Atlas, Run, SaekitError
from saekit.atlas import build_atlas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/default")
    p.add_argument("--tokens", type=int, default=None, help="tokens for the build (default: all of the split)")
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--out", default=None, help="atlas file (default: RUN/atlas.sqlite)")
    p.add_argument("--reuse", action="store_true", help="time the queries of an atlas already built")
    args = p.parse_args()
    run = Run.open(args.run)
    t0 = time.perf_counter()
    if args.reuse:
        path = Path(args.out or run.path / "atlas.sqlite")
    else:
        path = Path(build_atlas(run, args.tokens, args.out, split=args.split, quiet=False))
    build = time.perf_counter() - t0
    atlas = Atlas.open(path)
    feats = atlas.features()
    n = len(feats)
    what = "opened" if args.reuse else "build"
    print(f"{what}: {build:.1f} s for {n:,} latents ({build / n * 1e3:.2f} ms per latent), "
          f"{path.stat().st_size / 1e6:.1f} MB = {path.stat().st_size / n / 1e3:.1f} kB per latent")
    rng = random.Random(0)
    live = feats[feats.density > 0]
    labels = []
    for x in dict.fromkeys(live.label.dropna().tolist()):
        try:  # labels are tokens, or short n-grams that `token` refuses
            atlas.token(x)
            labels.append(x)
        except SaekitError:
            pass
    queries = {
        "card": lambda: atlas.card(int(rng.choice(live.latent.tolist()))),
        "token": lambda: atlas.token(rng.choice(labels)),
        "search": lambda: atlas.search(re.escape(rng.choice(labels).strip()[:3]) or "e"),
        "features": lambda: atlas.features(),
    }
    from saekit.model import load_model

    model = load_model(run.model_name)
    vocab = len(model.tokenizer)
    queries["text (64 tokens)"] = lambda: atlas.text([rng.randrange(vocab) for _ in range(64)], model=model)
    print("| query | p50 ms | p95 ms |\n|---|---:|---:|")
    for name, q in queries.items():
        times = []
        for _ in range(args.queries if name[:4] != "text" else max(1, args.queries // 4)):
            t = time.perf_counter()
            q()
            times.append((time.perf_counter() - t) * 1e3)
        print(f"| {name} | {np.percentile(times, 50):.2f} | {np.percentile(times, 95):.2f} |", flush=True)


if __name__ == "__main__":
    main()
