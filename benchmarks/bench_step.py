"""One SAE training step (forward + backward + optimizer), side by side in one process.

Contenders at the same d_in, n_latents, k, batch, fp32, on random inputs:
  saekit    `Trainer.train_step` (TopK, sparse kernels, decoder-gradient projection, fused Adam)
  sparsify  eai-sparsify `SparseCoder` stepped as its `Trainer.fit` does with optimizer="adam"
  sae-lens  `TopKTrainingSAE` stepped by `SAETrainer._train_step` (its own per-step routine)
  dense     a textbook TopK SAE: dense [B, m] latents, dense decode, torch Adam
  matmul    the encoder matmul alone, x [B, d] @ W_enc.T [d, m]: the bound on a step

Timing: every repetition times one step of each contender in turn (interleaved, so load
changes hit all alike), after warm-up; the table gives medians. Memory: each contender also
runs alone in a fresh subprocess; "peak MiB" is that process's peak resident set size over
building the SAE and a few steps (VmHWM, reset just before the build via /proc/self/clear_refs)
minus its resident size at that moment (after imports and inputs): parameters, optimizer
state, activations, gradients and what the allocators keep cached.

The anchors come from PyPI in `benchmarks/.venv`, which this script creates on first use
(CPU torch pinned first, then eai-sparsify and sae-lens, then saekit itself with --no-deps)
and re-runs itself in. An anchor that cannot be imported is skipped with a message.

    python3 benchmarks/bench_step.py                 # d_in 576, m 9216, k 32, batch 4096
    python3 benchmarks/bench_step.py --m 4608 --reps 5 --only saekit,matmul
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "benchmarks" / ".venv"
VENV_PY = VENV / "bin" / "python"
TORCH_PIN = "torch==2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA build
CONTENDERS = ("saekit", "sparsify", "sae-lens", "dense", "matmul")


def ensure_venv() -> None:
    """Create benchmarks/.venv with the anchors (once) and re-execute this script in it."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not VENV_PY.exists():
        print(f"creating {VENV} (torch, eai-sparsify, sae-lens, saekit) ...", flush=True)
        pip = [str(VENV_PY), "-m", "pip", "install", "-q"]
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(pip + [TORCH_PIN], check=True)
        for pkg in ("eai-sparsify", "sae-lens"):  # each may fail alone; then it is skipped
            if subprocess.run(pip + [pkg, TORCH_PIN]).returncode:
                print(f"could not install {pkg}; it will be skipped", flush=True)
        subprocess.run(pip + ["--no-deps", "-e", str(ROOT)], check=True)
        subprocess.run(pip + ["safetensors", "pyyaml", "tqdm", TORCH_PIN], check=True)
    os.execv(str(VENV_PY), [str(VENV_PY), __file__, *sys.argv[1:]])


# -- contenders: each returns a zero-argument step function --------------------------------
def make_saekit(x, a):
    from saekit.config import TrainConfig, make_config
    from saekit.trainer import Trainer

    cfg = make_config(TrainConfig, {"n_latents": a.m, "k": a.k, "hookpoints": ["x"], "batch_size": a.batch,
                                    "log_every": 10**9})
    trainer = Trainer(cfg, {"x": a.d}, {"x": x}, 10**6, torch.device("cpu"))
    return lambda: trainer.train_step({"x": x})


def make_sparsify(x, a):
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its CPU decoder (embedding_bag)
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(a.d, SparseCoderConfig(num_latents=a.m, k=a.k), device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (a.m / 2**14) ** 0.5)  # as its trainer
    total_variance = (x - x.mean(0)).pow(2).sum()

    def step():  # Trainer.fit, optimizer="adam", loss_fn="fvu", auxk_alpha=0 (its defaults)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        (out.fvu + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return step


def make_sae_lens(x, a):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.d, d_sae=a.m, k=a.k, dtype="float32", device="cpu"))
    lr = 2e-4 / (a.m / 2**14) ** 0.5
    cfg = SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=a.batch, lr=lr, lr_end=lr,
                           logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    return lambda: trainer._train_step(sae, x)


def make_dense(x, a):
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(a.m, a.d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = [W_dec.clone().requires_grad_(), torch.zeros(a.m, requires_grad=True),
              W_dec.requires_grad_(), torch.zeros(a.d, requires_grad=True)]
    W_enc, b_enc, W_dec, b_dec = params
    opt = torch.optim.Adam(params, lr=2e-4 / (a.m / 2**14) ** 0.5)

    def step():
        pre = (x - b_dec) @ W_enc.T + b_enc  # [B, m]
        vals, idx = pre.topk(a.k, dim=1)
        z = torch.zeros_like(pre).scatter(1, idx, vals.relu())  # [B, m] dense latents
        fvu = (z @ W_dec + b_dec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        fvu.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    return step


def make_matmul(x, a):
    W = torch.randn(a.m, a.d)
    return lambda: torch.mm(x, W.T)


MAKERS = dict(zip(CONTENDERS, (make_saekit, make_sparsify, make_sae_lens, make_dense, make_matmul)))


def build(names, x, a):
    steps = {}
    for name in names:
        try:
            steps[name] = MAKERS[name](x, a)
        except ImportError as e:
            print(f"skipping {name}: cannot import it ({e})", flush=True)
    return steps


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_mib(name: str, a) -> float | None:
    """Peak RSS growth of a fresh process that builds `name` and runs warm-up + 3 steps."""
    argv = [sys.executable, __file__, "--memory-of", name, *(f"--{k}={v}" for k, v in
            (("d", a.d), ("m", a.m), ("k", a.k), ("batch", a.batch), ("threads", a.threads)))]
    out = subprocess.run(argv, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    return float(lines[-1]) if out.returncode == 0 and lines else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--m", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    p.add_argument("--no-memory", action="store_true", help="skip the per-contender memory subprocesses")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    a = p.parse_args()
    names = [n for n in a.only.split(",") if n]
    if unknown := set(names) - set(CONTENDERS):
        p.error(f"unknown contenders {sorted(unknown)}; choose from {CONTENDERS}")
    if any(n in ("sparsify", "sae-lens") for n in names):
        ensure_venv()

    if a.threads:
        torch.set_num_threads(a.threads)
    x = torch.randn(a.batch, a.d, generator=torch.Generator().manual_seed(0))
    if a.memory_of:  # child: print the peak RSS growth in MiB
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
        base = _status_kib("VmRSS")
        step = build([a.memory_of], x, a)[a.memory_of]
        for _ in range(a.warmup + 3):
            step()
        print((_status_kib("VmHWM") - base) / 1024)
        return

    steps = build(names, x, a)
    times = {n: [] for n in steps}
    for _ in range(a.warmup):
        for f in steps.values():
            f()
    for _ in range(a.reps):
        for n, f in steps.items():
            t = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(t) for n, t in times.items()}
    mem = {} if a.no_memory else {n: peak_mib(n, a) for n in steps}

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; d_in {a.d}, m {a.m}, k {a.k}, "
          f"batch {a.batch}, fp32; median of {a.reps} after {a.warmup} warm-up")
    print(f"| {'contender':9} | step s | tokens/s | matmul/step | peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for n, t in med.items():
        bound = f"{med['matmul'] / t:.2f}" if "matmul" in med else "-"
        mb = f"{mem[n]:.0f}" if mem.get(n) is not None else "-"
        print(f"| {n:9} | {t:.3f} | {a.batch / t:,.0f} | {bound} | {mb} |")
    if "saekit" in med:
        for n in ("sparsify", "sae-lens", "dense"):
            if n in med:
                print(f"saekit speed-up over {n}: {med[n] / med['saekit']:.2f}x")


if __name__ == "__main__":
    main()
