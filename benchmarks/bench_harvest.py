"""Harvesting activations, side by side in one process: tokens/s of three ways to read the same
hookpoint on the same contexts, interleaved repetitions, medians.

  saekit   `saekit.model.harvest` (what `saekit train` runs: TransformerBridge `run_with_cache`
           with `stop_at_layer`, masked positions dropped, float32 copies on the CPU)
  bridge   the bare TransformerBridge: `run_with_cache(names_filter=..., stop_at_layer=...)`
  hooks    the plain Hugging Face model with a forward hook on the block that raises to stop
           the forward right after it (no TransformerLens at all)

Also checks that the three agree (max |difference| relative to the activations' scale) and,
with `--batches`, sweeps the contexts per forward (the `harvest_batch` config key).

    python3 benchmarks/bench_harvest.py                       # layer 6, 16 x 256-token contexts
    python3 benchmarks/bench_harvest.py --batches 4,8,16,32 --reps 3
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from saekit import data
from saekit import model as lm


class _Stop(Exception):
    pass


def plain_hooks(hf, layer: int):
    """Activations after HF block `layer`, stopping the forward there."""
    def run(toks):
        out = {}

        def grab(module, args, output):
            out["a"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        handle = hf.model.layers[layer].register_forward_hook(grab)
        try:
            with torch.inference_mode():
                hf(toks)
        except _Stop:
            pass
        finally:
            handle.remove()
        return out["a"]
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batches", default="16", help="comma-separated contexts per forward")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    hook = f"blocks.{a.layer}.hook_resid_post"
    bridge = lm.load_model()
    hf = AutoModelForCausalLM.from_pretrained(lm._offline_default(), dtype=torch.float32).eval()
    sizes = [int(b) for b in a.batches.split(",")]
    tokens, mask = data.pack_contexts(data.load_texts("shakespeare"), bridge.tokenizer, a.ctx,
                                      max(sizes) * a.ctx * 2, seed=0)
    hooks = plain_hooks(hf, a.layer)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M {hook}, ctx {a.ctx}; "
          f"median of {a.reps}")
    print("| contexts/forward | saekit tok/s | bridge tok/s | hooks tok/s | saekit / faster | max rel diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in sizes:
        toks, m = tokens[:b], mask[:b]
        n = int(m.sum())
        ways = {
            "saekit": lambda toks=toks, m=m, b=b: next(lm.harvest(bridge, toks, m, [hook], batch_size=b))[hook],
            "bridge": lambda toks=toks: bridge.run_with_cache(toks, names_filter=lambda h: h == hook,
                                                              stop_at_layer=a.layer + 1)[1][hook],
            "hooks": lambda toks=toks: hooks(toks),
        }
        with torch.inference_mode():
            ref = ways["saekit"]()
            scale = ref.abs().max()
            diff = max(float((w()[m] - ref).abs().max() / scale) for k, w in ways.items() if k != "saekit")
            times = {k: [] for k in ways}
            for _ in range(a.reps):
                for k, w in ways.items():
                    t = time.perf_counter()
                    w()
                    times[k].append(time.perf_counter() - t)
        rate = {k: n / statistics.median(t) for k, t in times.items()}
        share = rate["saekit"] / max(rate["bridge"], rate["hooks"])
        print(f"| {b} | {rate['saekit']:,.0f} | {rate['bridge']:,.0f} | {rate['hooks']:,.0f} | {share:.2f} | "
              f"{diff:.1e} |")


if __name__ == "__main__":
    main()
