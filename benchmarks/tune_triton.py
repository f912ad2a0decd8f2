"""Tile settings of saekit's Triton kernels, and top-k strategies, timed on the GPU at hand.

For each kernel shape in `saekit.kernels.triton_ops.TILES` and each (tile elements, elements
per thread), the median time of the primitives using it (triton.testing.do_bench) at one
training-step size; then the encoder's top-k:
`torch.topk` against saekit's grouped `row_topk`, on bf16 and fp32 pre-activations.
Pick the defaults from the first table; CUDA only.

    python3 benchmarks/tune_triton.py --d 2304 --m 65536 --k 32 --batch 16384 --tiles 4096 8192 16384
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from saekit.kernels import row_topk, sparse_decode
from saekit.kernels import triton_ops as ops


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--m", type=int, default=65536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--tiles", type=int, nargs="*", help="tile sizes to try (default: only the current TILES)")
    p.add_argument("--elems", type=int, nargs="*", default=[16, 32, 64, 128])
    p.add_argument("--only", nargs="*", choices=["gather", "segment", "segment_dot"], help="kernel shapes to tune")
    p.add_argument("--skip-topk", action="store_true")
    a = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    B, d, m, k = a.batch, a.d, a.m, a.k
    W = torch.randn(m, d, device="cuda", generator=g)
    X = torch.randn(B, d, device="cuda", generator=g)
    vals = torch.rand(B, k, device="cuda", generator=g)
    idx = torch.randint(0, m, (B, k), device="cuda", generator=g)
    Wg, vg = W.clone().requires_grad_(), vals.clone().requires_grad_()

    def decode(fn):  # forward + backward of a squared error, as in bench_decode.py
        def run():
            Wg.grad = vg.grad = None
            (fn(vg, idx, Wg) - X).pow(2).sum().backward()
        return run

    kinds = {  # kernel shape -> the primitives that use it
        "gather": {"gather_sum": lambda: ops.gather_sum(vals, idx, W), "gather_dot": lambda: ops.gather_dot(idx, W, X)},
        "segment": {"scatter_outer": lambda: ops.scatter_outer(vals, idx, X, m)},
        "segment_dot": {"decode_backward": lambda: ops.decode_backward(vals, idx, W, X),
                        "decode fwd+bwd": decode(sparse_decode)},
    }
    kinds = {n: kinds[n] for n in a.only or kinds}
    try:  # the reference: eai-sparsify's Triton decoder, when importable
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_step import import_sparsify

        import_sparsify()
        from sparsify.utils import triton_decode

        t = do_bench(decode(lambda v, i, w: triton_decode(i, v, w.mT)), warmup=25, rep=100, return_mode="median")
        print(f"eai-sparsify Triton decoder, decode fwd+bwd: {t:.3f} ms")
    except ImportError as e:
        print(f"no eai-sparsify reference ({e})")
    gb = B * k * d * 4 / 1e9  # bytes of the gathered fp32 rows: one pass
    print(f"{torch.cuda.get_device_name()}; B {B}, d {d}, m {m}, k {k}, fp32; ms (median); "
          f"one pass over the B*k gathered rows = {gb:.2f} GB; current TILES = {ops.TILES}")
    for kind, prims in kinds.items():
        print(f"\n{kind}\n| TILE | elems/thread |" + "".join(f" {n} |" for n in prims))
        print("|---:|---:|" + "---:|" * len(prims))
        default = ops.TILES[kind]
        for setting in itertools.product(a.tiles, a.elems) if a.tiles else [default]:
            ops.TILES[kind] = setting
            t = [do_bench(f, warmup=25, rep=100, return_mode="median") for f in prims.values()]
            print(f"| {setting[0]} | {setting[1]} |" + "".join(f" {v:.3f} |" for v in t), flush=True)
        ops.TILES[kind] = default

    if a.skip_topk:
        return
    print(f"\ntop-{k} of [{B}, {m}] pre-activations, ms (median)")
    print("| dtype | torch.topk | row_topk (grouped) |\n|---|---:|---:|")
    for dt in (torch.bfloat16, torch.float32):
        t1, t2 = time_topk(torch.randn(B, m, device="cuda", generator=g).to(dt), k)
        print(f"| {str(dt)[6:]} | {t1:.3f} | {t2:.3f} |", flush=True)


def time_topk(pre: torch.Tensor, k: int) -> tuple[float, float]:
    """Median ms of `torch.topk` and of `row_topk` on `pre`, after checking they agree."""
    assert torch.equal(row_topk(pre, k)[0].sort(1).values, pre.topk(k, 1).values.sort(1).values)
    return tuple(do_bench(f, warmup=25, rep=100, return_mode="median")
                 for f in (lambda: pre.topk(k, 1, sorted=False), lambda: row_topk(pre, k)))


if __name__ == "__main__":
    main()
