"""Sparse decode forward + backward against a dense decode, and how a training step scales.

decode: `x_hat = sum_j vals[b,j] W_dec[idx[b,j]]`, then backward of a squared error into
vals and W_dec. Compared, in one process, interleaved, median of --reps:
  triton   saekit's Triton kernels (CUDA only)
  sparsify eai-sparsify's Triton decoder (xformers embedding-bag; CUDA, when importable)
  sparse   saekit's torch kernels (embedding-bag, latent-sorted backward); SAEKIT_KERNELS=torch
  dense    z = scatter(vals) into [B, m], then z @ W_dec (what a dense TopK SAE does)
CPU default: m in {4608, 9216, 18432}, k in {32, 64}; CUDA: m in {16k, 65k, 262k}, k in
{32, 64, 128} (peak CUDA memory per contender too). `--device` defaults to CUDA when present.

scaling (CPU): saekit `Trainer.train_step` time over m at fixed batch and over batch at
fixed m; a linear step has constant time per (m * batch).

    python3 benchmarks/bench_decode.py               # decode table, then the scaling sweep
    python3 benchmarks/bench_decode.py --skip-scaling --batch 2048
    PYTHONPATH=<eai-sparsify> python3 benchmarks/bench_decode.py --skip-scaling --d 2304 --dtype bfloat16
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

    def sparsify():
        (sparsify_decode(idx, vals, W.mT) - target).pow(2).sum().backward()

    fns = {"sparse": sparse("torch"), "dense": dense}
    if device == "cuda":
        fns = {"triton": sparse("auto"), **({"sparsify": sparsify} if sparsify_decode else {}), **fns}

    def reset():  # new gradient buffers each call: every contender pays for its own
        W.grad = vals.grad = None

    return fns, reset


def _sparsify_decoder():
    """eai-sparsify's Triton decoder `(indices, values, W_dec.mT) -> [B, d]`, or None."""
    try:
        from bench_step import import_sparsify

        import_sparsify()
        from sparsify.utils import triton_decode
    except ImportError as e:
        print(f"skipping sparsify: cannot import it ({e})")
        return None
    return triton_decode


sparsify_decode = None


def bench_decode(a, device: str) -> None:
    dtype = getattr(torch, a.dtype)
    ms = a.m or ([16_384, 65_536, 262_144] if device == "cuda" else [4608, 9216, 18432])
    ks = a.k or ([32, 64, 128] if device == "cuda" else [32, 64])
    print(f"\ndecode fwd+bwd, {device}, batch {a.batch}, d {a.d}, {a.dtype}, median of {a.reps} (ms)", flush=True)
    names = (["triton"] + (["sparsify"] if sparsify_decode else []) if device == "cuda" else []) + ["sparse", "dense"]
    mem_cols = "".join(f" {n} MiB |" for n in names) if device == "cuda" else ""  # beyond the inputs
    ours = "triton" if device == "cuda" else "sparse"
    ratios = [("dense", ours)] + ([("sparsify", "triton")] if "sparsify" in names else [])
    print("| m | k |" + "".join(f" {n} |" for n in names)
          + "".join(f" {num}/{den} |" for num, den in ratios) + mem_cols)
    print("|---:|---:|" + "---:|" * (len(names) + len(ratios) + (len(names) if device == "cuda" else 0)))
    for m in ms:
        for k in ks:
            fns, reset = decode_fns(a.batch, a.d, m, k, device, dtype)
            mem = {}
            for n, f in fns.items():  # warm-up, and the memory each needs beyond its inputs
                reset()
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                f()
                if device == "cuda":
                    mem[n] = (torch.cuda.max_memory_allocated() - base) / 2**20
            times = {n: [] for n in fns}
            for _ in range(a.reps):
                for n, f in fns.items():
                    reset()
                    times[n].append(timed(f, device))
            med = {n: 1e3 * statistics.median(t) for n, t in times.items()}
            if a.profile:
                profile_fns(fns, reset, device)
            row = "".join(f" {med[n]:.2f} |" for n in names) \
                + "".join(f" {med[num] / med[den]:.1f}x |" for num, den in ratios)
            row += "".join(f" {mem[n]:.0f} |" for n in names) if device == "cuda" else ""
            print(f"| {m} | {k} |" + row)
    os.environ.pop("SAEKIT_KERNELS", None)


def profile_fns(fns: dict, reset, device: str) -> None:
    """Where each contender's time goes (torch.profiler over 5 calls, by self device time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    for n, f in fns.items():
        with profile(activities=acts) as prof:
            for _ in range(5):
                reset()
                f()
            sync(device)
        print(f"\n{n}: 5 calls")
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=50))


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
    p.add_argument("--skip-scaling", action="store_true", help="skip the CPU step-scaling sweep")
    p.add_argument("--profile", action="store_true", help="also profile each contender at every size")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}")
    if a.device == "cuda":
        global sparsify_decode
        sparsify_decode = _sparsify_decoder()
    bench_decode(a, a.device)
    if not a.skip_scaling:
        bench_scaling(a)


if __name__ == "__main__":
    main()
