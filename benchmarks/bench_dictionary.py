"""Training steps of every dictionary family side by side in one process, and the SAE step of
saekit before the dictionary generalisation (a git revision, imported as its own package).

Contenders (forward + backward + Adam on one batch of random inputs, `Trainer.train_step`):
  before       TopK SAE of saekit at `--before` (default e33de65, the last commit before the
               SAE became the one-source case of the dictionary model)
  topk, batchtopk, matryoshka (groups 1/16 .. 1), jumprelu (l0_coeff 1e-3): one SAE each
  crosscoder   one TopK crosscoder over `--sources` sources of width d (same latents, k)
  transcoder   one TopK transcoder, d -> d
Every repetition times one step of each in turn (interleaved, so load changes hit all alike);
the table gives medians and the ratios the README claims.

    python3 benchmarks/bench_dictionary.py --threads 2     # d 576, m 9216, k 32, batch 4096
"""

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from sizes import interleaved, size_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def import_before(rev: str):
    """saekit at git revision `rev` as the package `saekit_before` (its imports renamed)."""
    where = Path(tempfile.mkdtemp()) / "saekit_before"
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "saekit"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where.parent)], input=tar, check=True)
    (where.parent / "saekit").rename(where)
    for f in where.rglob("*.py"):
        f.write_text(f.read_text().replace("from saekit", "from saekit_before").replace("import saekit",
                                                                                        "import saekit_before"))
    sys.path.insert(0, str(where.parent))
    import saekit_before.config
    import saekit_before.trainer

    return saekit_before


def step_of(pkg, x, a, **values):
    """A zero-argument training step of `pkg`'s Trainer on the config `values`."""
    names = values.pop("names", ["x"])
    cfg = pkg.config.make_config(pkg.config.TrainConfig, {"n_latents": a.m, "k": a.k, "batch_size": a.batch,
                                                          "log_every": 10**9, "hookpoints": names, **values})
    batch = {n: x if i == 0 else x.roll(i, 1) for i, n in enumerate(names)}
    trainer = pkg.trainer.Trainer(cfg, {n: a.d for n in names}, batch, 10**6, torch.device("cpu"))
    return lambda: trainer.train_step(batch)


def main():
    p = size_parser(__doc__, reps=5, threads=2)
    p.add_argument("--sources", type=int, default=2, help="the crosscoder's sources")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--before", default="e33de65", help="git revision of the SAE step to compare with")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import saekit.config
    import saekit.trainer

    x = torch.randn(a.batch, a.d, generator=torch.Generator().manual_seed(0))
    src = [f"s{i}" for i in range(a.sources)]
    steps = {
        "before": step_of(import_before(a.before), x, a),
        "topk": step_of(saekit, x, a),
        "batchtopk": step_of(saekit, x, a, architecture="batchtopk"),
        "matryoshka": step_of(saekit, x, a, architecture="matryoshka"),
        "jumprelu": step_of(saekit, x, a, architecture="jumprelu"),
        "crosscoder": step_of(saekit, x, a, names=src, sources=src),
        "transcoder": step_of(saekit, x, a, names=["a", "b"], sources=["a"], targets=["b"]),
    }
    times = interleaved(steps, a.reps, a.warmup)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} CPU threads; d {a.d}, m {a.m}, k {a.k}, "
          f"batch {a.batch}; median of {a.reps} after {a.warmup} warm-up")
    print("| step | ms |\n|---|---:|")
    for n, t in med.items():
        print(f"| {n} | {1e3 * t:.0f} |")
    print("\n| ratio | measured | claim |\n|---|---:|---:|")
    for name, r, claim in (
            ("topk / before (SAE step unchanged)", med["topk"] / med["before"], "1.0"),
            ("matryoshka / batchtopk", med["matryoshka"] / med["batchtopk"], "<= 1.3"),
            ("jumprelu / topk", med["jumprelu"] / med["topk"], "<= 1.3"),
            (f"crosscoder / ({a.sources} x topk)", med["crosscoder"] / (a.sources * med["topk"]), "<= 1.2"),
            ("transcoder / topk", med["transcoder"] / med["topk"], "<= 1.1")):
        print(f"| {name} | {r:.2f} | {claim} |")


if __name__ == "__main__":
    main()
