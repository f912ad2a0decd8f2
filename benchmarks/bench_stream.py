"""Streaming training against its bound, side by side in one process on the same contexts (the
default config: SmolLM2-135M layer 6, 16x, k 32, batch 4,096):

  harvest   the model forward alone (`saekit.model.harvest`, what a harvest or a stream runs)
  stream    `activations: stream` training: forward, shuffle buffer, SAE steps (serial)
  thread    the same with the next buffer forwarded by a producer thread while the SAE steps
  cached    training from an activation cache on disk (`activations: cache`, after its harvest)

tokens/s are trained (or forwarded) tokens over the wall time of reading the batches (the trainer's
set-up not counted); tokens per CPU s over the process's CPU time (all its threads) in the same span,
which other processes on the machine disturb far less than the wall time; cores busy is CPU time over
wall time. Each way runs `--reps` times, interleaved, and the medians are printed.

    python3 benchmarks/bench_stream.py --tokens 65536 --reps 2
"""

import argparse
import os
import queue
import statistics
import tempfile
import threading
import time

import torch

from saekit import data
from saekit import model as lm
from saekit.activations import ActivationCache, ShuffledBatches, build_cache
from saekit.config import TrainConfig, load_config
from saekit.stream import StreamedBatches
from saekit.trainer import INIT_SAMPLE, Trainer


def threaded(batches, depth: int = 8):
    """`batches` produced by a background thread, at most `depth` ahead."""
    q, end = queue.Queue(depth), object()

    def produce():
        for b in batches:
            q.put(b)
        q.put(end)

    threading.Thread(target=produce, daemon=True).start()
    while (b := q.get()) is not end:
        yield b


def timed(batches, step=None) -> tuple[int, float, float]:
    """(rows, wall seconds, CPU seconds of the whole process) of reading `batches` (and stepping on
    each); set-up before the first is timed too."""
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for b in batches:
        if step:
            step(b)
        n += len(next(iter(b.values())))
    return n, time.perf_counter() - t0, time.process_time() - c0


def train(cfg: TrainConfig, batches, sample, total: int) -> tuple[int, float, float]:
    tr = Trainer(cfg, {h: sample[h].shape[1] for h in sample}, sample, total, torch.device("cpu"))  # not timed
    return timed(batches, tr.train_step)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=65_536)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--buffer_tokens", type=int, default=16_384, help="rows per shuffle buffer (the stream's)")
    a = p.parse_args()
    load0 = os.getloadavg()[0]  # the 1-minute load: other processes share the cores the timing runs on
    cfg = load_config("configs/default.yaml", ["--n_tokens", str(a.tokens), "--val_tokens", "1",
                                               "--buffer_tokens", str(a.buffer_tokens)])
    model = lm.load_model(cfg.model)
    hooks = cfg.hookpoints
    tokens, mask = data.pack_contexts(data.load_texts(cfg.dataset), model.tokenizer, cfg.ctx_len, a.tokens,
                                      cfg.data_seed)
    ctx = list(zip(tokens, mask, strict=True))

    def stream():
        return StreamedBatches(lambda: iter(ctx), lambda t, m: next(lm.harvest(model, t, m, hooks, len(t))), hooks,
                               a.tokens, cfg.batch_size, cfg.seed, cfg.buffer_tokens, cfg.harvest_batch)

    sample = stream().sample(INIT_SAMPLE)
    steps = a.tokens // cfg.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        build_cache(tmp, lm.harvest(model, tokens, mask, hooks, cfg.harvest_batch), {"model": cfg.model})
        ways = {
            "harvest": lambda: timed(lm.harvest(model, tokens, mask, hooks, cfg.harvest_batch)),
            "stream": lambda: train(cfg, stream().batches(0, 1), sample, steps),
            "thread": lambda: train(cfg, threaded(stream().batches(0, 1)), sample, steps),
            "cached": lambda: train(cfg, ShuffledBatches(ActivationCache.open(tmp), hooks, cfg.batch_size, cfg.seed,
                                                         cfg.buffer_tokens).batches(0, 1), sample, steps),
        }
        rates, cpu_rates, busy = {k: [] for k in ways}, {k: [] for k in ways}, {k: [] for k in ways}
        for _ in range(a.reps):
            for k, fn in ways.items():
                n, secs, cpu = fn()
                rates[k].append(n / secs)
                cpu_rates[k].append(n / cpu)
                busy[k].append(cpu / secs)
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_rates.items()}
    print(f"{a.tokens} tokens, buffer {cfg.buffer_tokens}, {torch.get_num_threads()} threads, {a.reps} reps, "
          f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| way | tokens/s (median) | runs | vs harvest | tokens per CPU s | vs harvest (CPU) | cores busy |\n"
          "|---|---|---|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:,.0f} | {', '.join(f'{x:,.0f}' for x in rates[k])} | {v / med['harvest']:.2f} | "
              f"{cpu_med[k]:,.0f} | {cpu_med[k] / cpu_med['harvest']:.2f} | {statistics.median(busy[k]):.2f} |")


if __name__ == "__main__":
    main()
