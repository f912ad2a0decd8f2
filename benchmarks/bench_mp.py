"""Matching-pursuit SAE training step against saekit's TopK step and the plain unrolled pursuit.

Contenders (forward + backward + Adam on one batch of random inputs, in one process):
  topk      saekit `Trainer.train_step`, architecture topk
  mp        saekit `Trainer.train_step`, architecture mp (Gram-updated selection without grad,
            then the coefficients' triangular solve with its sparse backward)
  plain     the unrolled loop (`saekit.kernels.pursuit.mp_reference`): k dense [B, m]
            correlation matmuls with autograd through each, dense decode, torch Adam; the way
            SAELens's matching_pursuit SAE trains (one dense matmul per pursuit step)
  matmul    one encoder matmul x [B, d] @ W.T [d, m] in fp32: the unit of the table
and the parts of the mp step: `gram` (W W^T) and `select` (the pursuit without grad), against
`select-dense`, the same selection by k dense correlation matmuls (the plain loop without grad).
Every repetition times one step of each in turn (interleaved, so load changes hit all alike),
after one warm-up step each; the table gives medians and the ratios benchmarks/RESULTS.md quotes.

    python3 benchmarks/bench_mp.py --threads 2                    # d 576, m 9216, k 32, batch 4096
    python3 benchmarks/bench_mp.py --device cuda --reps 10        # the same on a GPU
    python3 benchmarks/bench_mp.py --device cuda --d 2304 --m 65536 --batch 16384 --skip plain
"""

import statistics
import sys
import time
from pathlib import Path

import torch
from sizes import size_parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit.config import TrainConfig, make_config  # noqa: E402
from saekit.kernels.pursuit import gram, mp_pursue, mp_reference  # noqa: E402
from saekit.trainer import Trainer  # noqa: E402


def make_trainer_step(x, a, arch):
    cfg = make_config(TrainConfig, {"n_latents": a.m, "k": a.k, "hookpoints": ["x"], "batch_size": a.batch,
                                    "log_every": 10**9, "architecture": arch})
    trainer = Trainer(cfg, {"x": a.d}, {"x": x}, 10**6, torch.device(a.device))
    return lambda: trainer.train_step({"x": x})


def make_plain(x, a):
    g = torch.Generator(device=a.device).manual_seed(0)
    W = torch.randn(a.m, a.d, generator=g, device=a.device)
    W = torch.nn.Parameter(W / W.norm(dim=1, keepdim=True))
    b_dec = torch.nn.Parameter(x.mean(0).clone())
    opt = torch.optim.Adam([W, b_dec], lr=1e-4)
    denom = (x - x.mean(0)).pow(2).sum()

    def step():
        z, _ = mp_reference(x - b_dec, W, a.k)
        loss = (z @ W + b_dec - x).pow(2).sum() / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W.grad -= torch.linalg.vecdot(W.grad, W)[:, None] * W
        opt.step()
        with torch.no_grad():
            W.div_(W.norm(dim=1, keepdim=True))
    return step


def main():
    p = size_parser(__doc__, reps=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip", default="", help="comma-separated contenders to leave out (e.g. plain)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.d, device=a.device) * 2 + 0.5
    W = torch.randn(a.m, a.d, device=a.device)
    W /= W.norm(dim=1, keepdim=True)
    G = gram(W)
    makers = {  # built only when timed
        "topk": lambda: make_trainer_step(x, a, "topk"),
        "mp": lambda: make_trainer_step(x, a, "mp"),
        "plain": lambda: make_plain(x, a),
        "matmul": lambda: lambda: x @ W.T,
        "gram": lambda: lambda: gram(W),
        "select": lambda: lambda: mp_pursue(x, W, a.k, G=G),
        "select-dense": lambda: torch.no_grad()(lambda: mp_reference(x, W, a.k)),
    }
    steps = {n: make() for n, make in makers.items() if n not in a.skip.split(",")}
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    times = {n: [] for n in steps}
    print(f"d {a.d}, m {a.m}, k {a.k}, batch {a.batch}, {a.device}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}", flush=True)
    for rep in range(a.reps + 1):
        for name, f in steps.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            if rep:  # rep 0 warms up
                times[name].append(time.perf_counter() - t)
        if rep:
            print(f"rep {rep}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in steps), flush=True)
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    unit = med.get("matmul")
    print("\n| step | median ms | / matmul |\n|---|---:|---:|")
    for n, ms in med.items():
        print(f"| {n} | {ms:.1f} | {ms / unit:.2f} |" if unit else f"| {n} | {ms:.1f} | |")
    if "mp" in med and "topk" in med:
        print(f"\nmp / topk step: {med['mp'] / med['topk']:.2f}x (goal <= 4)")
    if "mp" in med and "plain" in med:
        print(f"plain / mp step: {med['plain'] / med['mp']:.2f}x (goal >= 5)")
    if "select" in med and "select-dense" in med:
        print(f"select-dense / gram + select: {med['select-dense'] / (med['select'] + med.get('gram', 0)):.2f}x")


if __name__ == "__main__":
    main()
