"""Sparse decode forward + backward against a dense decode, and how a training step scales.

decode: `x_hat = sum_j vals[b,j] W_dec[idx[b,j]]`, then backward of a squared error into
vals and W_dec. Compared, in one process, interleaved, median of --reps:
  triton   saekit's Triton kernels (CUDA only)
  sparse   saekit's torch kernels (embedding-bag, latent-sorted backward); SAEKIT_KERNELS=torch
  dense    z = scatter(vals) into [B, m], then z @ W_dec (what a dense TopK SAE does)
CPU default: m in {4608, 9216, 18432}, k in {32, 64}; CUDA: m in {16k, 65k, 262k}, k in
{32, 64, 128} (peak CUDA memory per contender too).

scaling (CPU): saekit `Trainer.train_step` time over m at fixed batch and over batch at
fixed m; a linear step has constant time per (m * batch).

    python3 benchmarks/bench_decode.py               # decode table, then the scaling sweep
    python3 benchmarks/bench_decode.py --skip-scaling --batch 2048
"""

import argparse
import os
import statistics
import time

import torch

from saekit.kernels import sparse_decode


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def decode_fns(B: int, d: int, m: int, k: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(m, d, device=device, dtype=dtype, generator=g).requires_grad_()
    vals = torch.rand(B, k, device=device, dtype=dtype, generator=g).requires_grad_()
    idx = torch.randint(0, m, (B, k), device=device, generator=g)
    target = torch.randn(B, d, device=device, dtype=dtype, generator=g)

    def sparse(kernels: str):
        def run():
            os.environ["SAEKIT_KERNELS"] = kernels
            (sparse_decode(vals, idx, W) - target).pow(2).sum().backward()
        return run

    def dense():
        z = torch.zeros(B, m, device=device, dtype=dtype).scatter_add(1, idx, vals)  # [B, m]
        (z @ W - target).pow(2).sum().backward()

    fns = {"sparse": sparse("torch"), "dense": dense}
    if device == "cuda":
        fns = {"triton": sparse("auto"), **fns}
    return fns


def bench_decode(a, device: str) -> None:
    dtype = getattr(torch, a.dtype)
    ms = a.m or ([16_384, 65_536, 262_144] if device == "cuda" else [4608, 9216, 18432])
    ks = a.k or ([32, 64, 128] if device == "cuda" else [32, 64])
    print(f"\ndecode fwd+bwd, {device}, batch {a.batch}, d {a.d}, {a.dtype}, median of {a.reps} (ms)")
    names = (["triton"] if device == "cuda" else []) + ["sparse", "dense"]
    mem_cols = "".join(f" {n} MiB |" for n in names) if device == "cuda" else ""
    print("| m | k |" + "".join(f" {n} |" for n in names) + " dense/sparse |" + mem_cols)
    print("|---:|---:|" + "---:|" * (len(names) + 1 + (len(names) if device == "cuda" else 0)))
    for m in ms:
        for k in ks:
            fns = decode_fns(a.batch, a.d, m, k, device, dtype)
            mem = {}
            for n, f in fns.items():  # warm-up, and the peak memory of each alone
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                f()
                if device == "cuda":
                    mem[n] = torch.cuda.max_memory_allocated() / 2**20
            times = {n: [] for n in fns}
            for _ in range(a.reps):
                for n, f in fns.items():
                    times[n].append(timed(f, device))
            med = {n: 1e3 * statistics.median(t) for n, t in times.items()}
            row = "".join(f" {med[n]:.1f} |" for n in names) + f" {med['dense'] / med['sparse']:.1f}x |"
            row += "".join(f" {mem[n]:.0f} |" for n in names) if device == "cuda" else ""
            print(f"| {m} | {k} |" + row)
    os.environ.pop("SAEKIT_KERNELS", None)


def bench_scaling(a) -> None:
    from saekit.config import TrainConfig, make_config
    from saekit.trainer import Trainer

    def step_time(m: int, B: int) -> float:
        cfg = make_config(TrainConfig, {"n_latents": m, "k": 32, "hookpoints": ["x"], "batch_size": B,
                                        "log_every": 10**9})
        x = torch.randn(B, a.d, generator=torch.Generator().manual_seed(0))
        trainer = Trainer(cfg, {"x": a.d}, {"x": x}, 10**6, torch.device("cpu"))
        trainer.train_step({"x": x})
        return statistics.median(timed(lambda: trainer.train_step({"x": x}), "cpu") for _ in range(a.reps))

    print(f"\nsaekit train_step on CPU, d {a.d}, k 32, fp32, median of {a.reps}")
    print("| m | batch | step s | ns per (m x batch) |")
    print("|---:|---:|---:|---:|")
    for m, B in [(2304, 4096), (4608, 4096), (9216, 4096), (18432, 4096), (9216, 1024), (9216, 2048), (9216, 8192)]:
        t = step_time(m, B)
        print(f"| {m} | {B} | {t:.3f} | {1e9 * t / (m * B):.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--m", type=int, nargs="*", help="latent counts (default depends on the device)")
    p.add_argument("--k", type=int, nargs="*", help="active latents per token (default depends on the device)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, one per core)")
    p.add_argument("--skip-scaling", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, cuda: {torch.cuda.is_available()}")
    bench_decode(a, "cpu")
    if torch.cuda.is_available():
        bench_decode(a, "cuda")
    if not a.skip_scaling:
        bench_scaling(a)


if __name__ == "__main__":
    main()
