"""Pre-train a small Llama-architecture transformer on the bundled Shakespeare corpus and keep
a series of snapshots, the offline stand-in for Pythia's public checkpoints (Ge et al. 2026,
"Evolution of Concepts in Language Model Pre-Training", read 32 of those).

    python training/pretrain.py --out runs/pretrain            # ~10 min of 2 idle cores
    python training/pretrain.py --out runs/pretrain            # again after a kill: resumes

Writes into `--out`:
  step0/, step1/, ..., step<N>/  snapshots on a log-spaced schedule (HF format: weights, config and
                                 tokenizer), loadable by saekit as `--out@step<N>` (the revision of a
                                 local series is the snapshot folder name, as Pythia's are on the hub)
  loss.json, loss.png            training loss per step and held-out loss at every snapshot (the PNG
                                 needs the plots extra, matplotlib; without it only loss.json)
  pretrain.json                  the settings, the schedule, tokens seen and wall time
  tokenizer/                     the byte-level BPE trained on the corpus (vocabulary `--vocab`)
  state.pt                       the training state, refreshed every minute and at every snapshot

The tokenizer is a small BPE trained on the corpus, not SmolLM2's 49k vocabulary, whose
unembedding would cost more than the rest of a model this size. The batch of step s is a pure
function of (seed, s), so a resumed run sees exactly the batches an uninterrupted one would.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from saekit import data
from saekit.io import atomic_write, honour_umask

SPECIAL = "<|endoftext|>"  # BOS and EOS, as in GPT-NeoX/Pythia


def schedule(steps: int, n: int) -> list[int]:
    """Snapshot steps: 0 and about `n - 1` log-spaced steps from 1 to `steps` (at least `n` in all
    when `steps` allows), so early training, where most changes happen, is sampled densely."""
    m = n - 1
    while True:
        got = sorted({0, *(round(steps ** (i / max(1, m - 1))) for i in range(m))})
        if len(got) >= min(n, steps + 1) or m > 4 * n:
            return got
        m += 1


def train_tokenizer(texts: list[str], vocab: int, out: Path):
    """A byte-level BPE of `vocab` tokens trained on `texts`, saved to `out` (reused if present)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not (out / "tokenizer.json").exists():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[SPECIAL],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(texts, trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=SPECIAL, eos_token=SPECIAL)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    return PreTrainedTokenizerFast.from_pretrained(out)


def build_model(args, vocab: int):
    """A freshly initialised LlamaForCausalLM of the configured size (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=args.ctx_len,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def batch_rows(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """Context indices of `step`'s batch: epochs are seeded permutations of the `n` contexts."""
    first = step * batch
    idx = []
    while len(idx) < batch:
        epoch, offset = divmod(first + len(idx), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx.extend(perm[offset : offset + batch - len(idx)].tolist())
    return torch.tensor(idx)


def lr_at(step: int, args) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the contexts `tokens [b, ctx]`."""
    logits = model(tokens, use_cache=False).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def val_loss(model, tokens: torch.Tensor, batch: int) -> float:
    model.eval()
    out = sum(float(lm_loss(model, tokens[s : s + batch])) * len(tokens[s : s + batch])
              for s in range(0, len(tokens), batch)) / len(tokens)
    model.train()
    return out


def save_snapshot(model, tok, path: Path) -> None:
    """One snapshot in HF format (weights, config, tokenizer), written whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    honour_umask(tmp)
    os.replace(tmp, path)


def plot_loss(log: dict, path: Path, refs: dict[str, float] | None = None) -> None:
    """Training loss (mean of each 1 % of the run) and held-out loss at the snapshots, log-x, with
    horizontal reference lines `refs` (label -> loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = log["train"]
    w = max(1, len(train) // 100)
    xs = [i + (w - 1) / 2 for i in range(0, len(train) - w + 1, w)]  # window centres, in steps
    ys = [sum(train[i : i + w]) / w for i in range(0, len(train) - w + 1, w)]
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    ax.plot([x + 1 for x in xs], ys, lw=1, label="train")
    snaps = sorted(log["val"].items(), key=lambda kv: int(kv[0]))
    ax.plot([int(s) + 1 for s, _ in snaps], [v for _, v in snaps], "o", ms=4, label="held out, at each snapshot")
    for (label, y), style in zip((refs or {}).items(), ("--", ":", "-."), strict=False):
        ax.axhline(y, color="grey", ls=style, lw=1, label=f"{label} {y:.2f}")
    ax.set_xscale("log")
    ax.set(xlabel="step + 1", ylabel="next-token loss (nats)", title="Pre-training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1)))


SETTINGS = ("steps", "snapshots", "batch", "ctx_len", "d_model", "layers", "heads", "vocab", "lr", "warmup",
            "seed", "docs", "val_contexts")


def pretrain(args) -> Path:
    """Train (or resume) the series in `args.out`; returns the folder."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in SETTINGS}
    info_path = out / "pretrain.json"
    if info_path.exists():
        old = json.loads(info_path.read_text())["settings"]
        if old != settings:
            diff = ", ".join(f"{k}: {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v)
            sys.exit(f"{out} holds a series with other settings ({diff}); use another --out")
    torch.set_num_threads(args.threads)
    try:  # the plots extra draws loss.png at the very end: say now if it cannot
        import matplotlib  # noqa: F401

        plot = True
    except ImportError:
        plot = False
        print("matplotlib is missing (pip install 'saekit[plots]'): loss.png will not be drawn; "
              "loss.json holds the curves", file=sys.stderr, flush=True)

    texts = list(data.load_texts("shakespeare"))[: args.docs]
    tok = train_tokenizer(texts, args.vocab, out / "tokenizer")
    tokens, _ = data.pack_contexts(texts, tok, args.ctx_len, seed=args.seed)
    (train, _), (val, _) = data.split_contexts(tokens, torch.ones_like(tokens, dtype=torch.bool),
                                               args.val_contexts, args.seed)
    model = build_model(args, len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    snaps = schedule(args.steps, args.snapshots)
    log = {"train": [], "val": {}}
    step, wall = 0, 0.0
    if (out / "state.pt").exists():
        state = torch.load(out / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log, wall = state["step"], state["log"], state["wall"]
        print(f"resuming at step {step}")
    info = {"settings": settings, "schedule": snaps, "snapshots": [f"step{s}" for s in snaps],
            "train_contexts": len(train), "tokens_per_step": args.batch * args.ctx_len,
            "n_params": sum(p.numel() for p in model.parameters())}
    write_json(info_path, info)  # the settings, for a resume to check; wall_s is added at the end

    def checkpoint():
        atomic_write(out / "state.pt", lambda p: torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log, "wall": wall}, p))

    model.train()
    t0, last_save = time.perf_counter() - wall, time.perf_counter()
    while step <= args.steps:
        if step in snaps and not (out / f"step{step}").exists():
            log["val"][str(step)] = val_loss(model, val, args.batch)
            save_snapshot(model, tok, out / f"step{step}")
            wall = time.perf_counter() - t0
            checkpoint()
            last_save = time.perf_counter()
            print(f"step {step}: held-out loss {log['val'][str(step)]:.3f}, {wall:.0f} s", flush=True)
        if step == args.steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        loss = lm_loss(model, train[batch_rows(step, args.batch, len(train), args.seed)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["train"].append(loss.item())
        step += 1
        if time.perf_counter() - last_save > 60:
            wall = time.perf_counter() - t0
            checkpoint()
            last_save = time.perf_counter()
    wall = time.perf_counter() - t0
    write_json(out / "loss.json", log)
    if plot:
        plot_loss(log, out / "loss.png")
    write_json(info_path, {**info, "tokens_seen": args.steps * args.batch * args.ctx_len,
                           "wall_s": round(wall, 1), "final_val_loss": log["val"][str(args.steps)]})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/pretrain")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--snapshots", type=int, default=16, help="at least this many, step 0 and the last included")
    p.add_argument("--batch", type=int, default=16, help="contexts per step")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", type=int, default=None, help="use only the first N scenes (tests)")
    p.add_argument("--val-contexts", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.snapshots < 2 or args.steps < 1:
        p.error("--steps must be at least 1 and --snapshots at least 2")
    # the info file is written last: a finished series says so and is not retrained
    done = Path(args.out) / "pretrain.json"
    if done.exists() and json.loads(done.read_text()).get("wall_s") is not None:
        print(f"{args.out}: done")
        return
    pretrain(args)


if __name__ == "__main__":
    main()
