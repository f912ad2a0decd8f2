"""Held-out quality of saekit vs eai-sparsify trained on identical activations.

Takes a finished saekit run (a TopK SAE), trains eai-sparsify's `SparseCoder` on the same
cached activations, in the same `ShuffledBatches` order (same batch size, epochs, seed), with
the same number of latents and k, and evaluates both on the run's held-out cache with
saekit's `reconstruction_metrics` (FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2 over the
whole held-out set; L0; share of latents that never fire on it).

sparsify is trained by its own `Trainer.fit`, unmodified, with its defaults for everything
but the batch and the width: signum + schedule-free at 5e-3 / sqrt(m / 2^14), b_dec set to
the first batch's mean, decoder rows renormalised and their gradients projected each step,
auxk_alpha 0. A stand-in "model" hands the Trainer one saekit batch per step as the output of
its hooked layer (one 4096-token "sequence" per step). The SAE evaluated is the one the
Trainer saves, i.e. with the schedule-free weights swapped in by `optimizer.eval()`.
`--adam` also trains sparsify's optimizer="adam" path (2e-4 / sqrt(m / 2^14), its linear
warm-up of 1000 steps and linear decay over the run).

The saekit SAE is loaded from the run; its training time comes from the run's metrics.jsonl.
Run in the anchors venv (eai-sparsify 1.3.3, saekit installed with --no-deps):

    benchmarks/.venv/bin/python benchmarks/quality_vs_sparsify.py runs/default [--adam]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer
from torch import nn

import saekit
from saekit.activations import ActivationCache, ShuffledBatches
from saekit.evaluate import reconstruction_metrics


class ActivationStream(nn.Module):
    """Stands in for the language model: the hooked `layer` outputs the next saekit batch."""

    def __init__(self, batches, d_in: int):
        super().__init__()
        self.layer = nn.Identity()
        self.batches, self.d_in = batches, d_in
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}  # probed once for the width

    base_model = property(lambda self: self)
    device = property(lambda self: torch.device("cpu"))

    def forward(self, input_ids):
        probe = input_ids.shape[1] == 1
        return self.layer(torch.zeros(1, 1, self.d_in) if probe else next(self.batches)[None])


class AsSaekit:
    """A SparseCoder behind the interface `reconstruction_metrics` uses."""

    def __init__(self, coder: SparseCoder):
        self.coder, self.W_dec, self.n_latents, self.d_in = coder, coder.W_dec, coder.num_latents, coder.d_in

    def encode(self, x):
        return self.coder.encode(x)[:2]

    def decode(self, values, indices):
        return self.coder.decode(values, indices)


def train_sparsify(cfg, hook: str, train: ActivationCache, n_latents: int, optimizer: str, save_dir: str):
    """sparsify's Trainer on the saekit run's batch stream; returns its saved SAE and the seconds taken."""
    shuffled = ShuffledBatches(train, [hook], cfg.batch_size, cfg.seed, cfg.buffer_tokens)
    steps = cfg.epochs * shuffled.steps_per_epoch
    stream = (b[hook] for b in shuffled.batches(0, cfg.epochs))
    tcfg = TrainConfig(SparseCoderConfig(num_latents=n_latents, k=cfg.k), batch_size=1, optimizer=optimizer,
                       hookpoints=["layer"], init_seeds=[cfg.seed], log_to_wandb=False,
                       save_dir=save_dir, run_name=optimizer)
    dataset = [{"input_ids": torch.zeros(cfg.batch_size, dtype=torch.long)}] * steps
    t0 = time.perf_counter()
    Trainer(tcfg, dataset, ActivationStream(stream, train.dim(hook))).fit()
    seconds = time.perf_counter() - t0
    assert next(stream, None) is None, "sparsify did not consume exactly the saekit batches"
    return SparseCoder.load_from_disk(Path(save_dir) / optimizer / "layer"), seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", default="runs/default")
    ap.add_argument("--adam", action="store_true", help="also train sparsify with optimizer='adam'")
    args = ap.parse_args()

    run = saekit.Run.open(args.run)
    cfg = run.config
    assert cfg.architecture == "topk", "sparsify's SparseCoder is a TopK SAE"
    train, val = run.cache("train"), run.cache("val")
    rows = []
    for hook in cfg.hookpoints:
        sae = saekit.SAE.load(Path(args.run) / hook)
        last = json.loads((Path(args.run) / "metrics.jsonl").read_text().splitlines()[-1])
        steps = cfg.epochs * (train.n_tokens // cfg.batch_size)
        rows.append((hook, f"saekit (Adam, lr {cfg.lr})", sae, steps * cfg.batch_size / last["tokens_per_s"]))
        for opt in ["signum", "adam"] if args.adam else ["signum"]:
            with tempfile.TemporaryDirectory() as tmp:
                coder, seconds = train_sparsify(cfg, hook, train, sae.n_latents, opt, tmp)
            rows.append((hook, f"eai-sparsify {opt}", AsSaekit(coder), seconds))

    print(f"\nheld-out: {val.n_tokens:,} tokens; train: {cfg.epochs} x {train.n_tokens:,} tokens, "
          f"batch {cfg.batch_size}, k {cfg.k}\n")
    print("| hookpoint | trainer | held-out FVU | L0 | dead % | train wall time |")
    print("|---|---|---|---|---|---|")
    for hook, name, model, seconds in rows:
        with torch.no_grad():
            m = reconstruction_metrics(model, val.batches(hook))
        print(f"| {hook} | {name} | {m['fvu']:.4f} | {m['l0']:.1f} | {100 * m['dead_fraction']:.1f} "
              f"| {seconds:.0f} s |")


if __name__ == "__main__":
    main()
