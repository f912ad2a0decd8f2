"""Recipe study: TopK vs BatchTopK vs OrtSAE vs subspace init on the same cached SmolLM2
activations (layer-6 residual stream and attention output).

    python analysis/recipes_study.py [--n_tokens 350000 --epochs 3 --out analysis/results/recipes.md]

Harvests (or reuses) the activation cache of configs/subspace.yaml's hookpoints, trains every
recipe with identical data order, and writes one markdown table: held-out FVU, L0, dead %,
mean max decoder cosine, decoder effective rank, and step time relative to TopK. Step times
are measured after training, interleaved (one step of each recipe in turn on the same batch,
so load on a shared machine hits all alike), as the mean of `--reps` steps: the amortised
cost, which for OrtSAE's every-5th-step penalty includes its penalty steps.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from saekit.activations import ShuffledBatches
from saekit.config import TrainConfig, load_config, make_config
from saekit.evaluate import reconstruction_metrics
from saekit.linalg import effective_dimension
from saekit.ortho import max_cosine
from saekit.pipeline import prepare
from saekit.trainer import INIT_SAMPLE, Trainer

RECIPES = {
    "TopK": {},
    "BatchTopK": {"architecture": "batchtopk"},
    "OrtSAE (BatchTopK, gamma .25, every 5)": {"architecture": "batchtopk", "ortho_penalty": 0.25, "ortho_every": 5},
    "TopK + subspace init": {"init": "subspace"},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n_tokens", type=int, default=350_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10, help="interleaved timed steps per recipe (a multiple of 5)")
    ap.add_argument("--out", default="analysis/results/recipes.md")
    args = ap.parse_args()
    base = load_config("configs/subspace.yaml", ["--n_tokens", str(args.n_tokens), "--epochs", str(args.epochs)])
    _, _, caches = prepare(base)
    train, val = caches["train"], caches["val"]
    rows = []
    for h in base.hookpoints:
        dims = effective_dimension(train.tensor(h, INIT_SAMPLE))
        print(f"{h}: 90 % variance in {dims['dims_90']} dims, 99 % in {dims['dims_99']} of {dims['d']}")
        trainers, stats = {}, {}
        for name, opts in RECIPES.items():
            values = {k: v for k, v in vars(base).items() if k not in ("hookpoints", "init")}
            cfg = make_config(TrainConfig, {**values, "hookpoints": [h], **opts})
            batches = ShuffledBatches(train, [h], cfg.batch_size, cfg.seed, cfg.buffer_tokens)
            total = cfg.epochs * batches.steps_per_epoch
            tr = Trainer(cfg, {h: train.dim(h)}, {h: train.tensor(h, INIT_SAMPLE)}, total, torch.device("cpu"))
            for batch in batches.batches(0, cfg.epochs):
                tr.train_step(batch)
            sae = tr.final_sae(h)
            ev = reconstruction_metrics(sae, val.batches(h))
            stats[name] = (ev["fvu"], ev["l0"], 100 * ev["dead_fraction"], float(max_cosine(sae.W_dec)[0].mean()),
                           effective_dimension(sae.W_dec, center=False)["effective_rank"])
            trainers[name] = tr
            print(h, name, stats[name], flush=True)
        timing = [{h: b[h]} for b, _ in zip(batches.batches(0, 1), range(3), strict=False)]
        times = {name: [] for name in trainers}
        for rep in range(args.reps + 2):  # 2 warm-up rounds
            for name, tr in trainers.items():
                t0 = time.perf_counter()
                tr.train_step(timing[rep % len(timing)])
                if rep >= 2:
                    times[name].append(time.perf_counter() - t0)
        base_time = statistics.mean(times["TopK"])
        rows += [(h, name, *stats[name], statistics.mean(times[name]) / base_time) for name in trainers]
    lines = [f"Command: `python analysis/recipes_study.py --n_tokens {args.n_tokens} --epochs {args.epochs}` "
             f"(SmolLM2-135M, Shakespeare, 16x expansion, k=32, batch 4096, Adam lr {base.lr:g}, 2-core CPU; "
             "step times: "
             f"mean of {args.reps} interleaved steps after training)", "",
             "| hookpoint | recipe | FVU (held out) | L0 | dead % | mean max dec cos | dec eff. rank "
             "| step time / TopK |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {h} | {n} | {f:.4f} | {l0:.1f} | {d:.2f} | {c:.3f} | {r:.0f} | {t:.2f} |"
              for h, n, f, l0, d, c, r, t in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
