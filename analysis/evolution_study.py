"""Evolution of concepts across pre-training, on the offline series of training/pretrain.py
(after Ge et al. 2026, "Evolution of Concepts in Language Model Pre-Training").

One hookpoint (the residual stream after the middle block) of every snapshot is harvested on
the same token ids; one crosscoder (TopK codes) reads and writes all of them, each snapshot
scaled to unit mean square (as Ge et al. normalise each snapshot) so that decoder norms compare
across snapshots; `saekit.analyze.evolution` reads when each latent forms, which
initialisation latents fade, and how token-level each latent is (the held-out R^2 of a
per-token predictor of its activation). Every stage keeps its output under --work and is
skipped when rerun, so a killed study continues where it stopped.

    python3 analysis/evolution_study.py     # trains the series first if runs/pretrain is not done

Writes analysis/results/evolution.{md,json} and evolution_{loss,emergence,trajectories}.png.
"""

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import spearmanr

import saekit
from saekit import data
from saekit import model as lm
from saekit.analyze.evolution import evolution, plot_emergence, plot_trajectories, summary
from saekit.codes import encode_all
from saekit.io import atomic_write, md_table
from saekit.runtime import torch_threads

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"


def _load_script(path: Path):
    """A script of this repository (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(times: dict, name: str, fn):
    t = time.perf_counter()
    out = fn()
    times[name] = round(time.perf_counter() - t, 1)
    return out


def ensure_series(series: Path) -> dict:
    """The series' pretrain.json, training it first (resumably) when it is not finished."""
    info = series / "pretrain.json"
    if not (info.exists() and "wall_s" in json.loads(info.read_text())):
        subprocess.run([sys.executable, str(ROOT / "training/pretrain.py"), "--out", str(series)], check=True)
    return json.loads(info.read_text())


def token_split(series: Path, args) -> dict[str, torch.Tensor]:
    """Contexts for the crosscoder: `tokens`/`mask` of train and val, the same for every snapshot
    (all snapshots share the series' tokenizer). Seed 1: another shuffle than pre-training's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(series / "tokenizer")
    tokens, mask = data.pack_contexts(data.load_texts("shakespeare"), tok, args.ctx_len,
                                      args.tokens + args.val_tokens, seed=1)
    n_val = max(1, math.ceil(args.val_tokens / (float(mask.sum()) / len(mask))))
    (tt, tm), (vt, vm) = data.split_contexts(tokens, mask, n_val, seed=1)
    return {"train_tokens": tt, "train_mask": tm, "val_tokens": vt, "val_mask": vm}


def harvest(series: Path, rev: str, hook: str, toks: dict, path: Path) -> None:
    """`hook` of snapshot `rev` on the train and val contexts, saved to `path`."""
    m = lm.load_model(str(series), revision=rev)
    out = {}
    for split in ("train", "val"):
        out[split] = torch.cat([b[hook] for b in lm.harvest(m, toks[f"{split}_tokens"], toks[f"{split}_mask"],
                                                             [hook], batch_size=32)])
    atomic_write(path, lambda p: save_file(out, str(p)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", default="runs/pretrain")
    p.add_argument("--work", default="runs/evolution_study")
    p.add_argument("--results", default=str(OUT), help="where the report and plots go")
    p.add_argument("--layer", type=int, default=None, help="block whose resid_post is read (default: middle)")
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--val-tokens", type=int, default=8192)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--n-latents", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=4e-3, help="short runs want several times fit's long-run default")
    p.add_argument("--dead-tokens", type=int, default=32768, help="AuxK revives latents silent this long")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on 2 cores shared with other jobs, 2 threads ran 3.6x slower than 1)")
    args = p.parse_args()
    with torch_threads(args.threads):
        study(args)


def study(args) -> None:
    t_all = time.perf_counter()
    series, work = Path(args.series), Path(args.work)
    (work / "acts").mkdir(parents=True, exist_ok=True)
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}

    fixed = {k: getattr(args, k) for k in ("series", "layer", "tokens", "val_tokens", "ctx_len")}
    if (work / "settings.json").exists() and json.loads((work / "settings.json").read_text()) != fixed:
        sys.exit(f"{work} holds activations harvested with other settings "
                 f"({(work / 'settings.json').read_text().strip()}); use another --work")
    atomic_write(work / "settings.json", lambda q: q.write_text(json.dumps(fixed)))
    info = ensure_series(series)
    revs = lm.snapshots(series)
    n_layers = info["settings"]["layers"]
    layer = args.layer if args.layer is not None else n_layers // 2 - 1
    hook = f"blocks.{layer}.hook_resid_post"

    tok_path = work / "tokens.safetensors"
    if not tok_path.exists():
        toks = token_split(series, args)
        atomic_write(tok_path, lambda q: save_file(toks, str(q)))
    toks = load_file(tok_path)
    for rev in revs:
        path = work / "acts" / f"{rev}.safetensors"
        if not path.exists():
            timed(times, f"harvest {rev}", lambda rev=rev, path=path: harvest(series, rev, hook, toks, path))
            atomic_write(times_path, lambda q: q.write_text(json.dumps(times, indent=1)))

    # fit scales each snapshot to unit mean square; the analysis reads the norms in those units
    # (units="normalised"): they compare across snapshots whatever each snapshot's activation scale
    acts = {r: load_file(work / "acts" / f"{r}.safetensors") for r in revs}
    train = {r: a["train"] for r, a in acts.items()}
    val = {r: a["val"] for r, a in acts.items()}
    cc_path = work / "crosscoder"
    if (cc_path / "cfg.json").exists():
        cc = saekit.Crosscoder.load(cc_path)
    else:
        cc = timed(times, "crosscoder", lambda: saekit.fit(train, n_latents=args.n_latents, k=args.k,
                                                            epochs=args.epochs, batch_size=args.batch_size,
                                                            lr=args.lr, dead_tokens=args.dead_tokens, quiet=False))
        cc.save(cc_path)
        atomic_write(times_path, lambda q: q.write_text(json.dumps(times, indent=1)))

    with torch.no_grad():
        x_hat = cc.forward(val)
    fvu = {r: float(((val[r] - x_hat[r]) ** 2).sum() / ((val[r] - val[r].mean(0)) ** 2).sum()) for r in revs}
    codes = encode_all(cc, cc.concat(train))
    row_tokens = toks["train_tokens"][toks["train_mask"]]
    df = evolution(cc, names=revs, codes=codes, tokens=row_tokens, units="normalised")
    df = df[df["frequency"] > 0].reset_index(drop=True)  # latents that never fire say nothing
    s = summary(df)
    report(args, info, revs, hook, df, s, fvu, row_tokens, times, time.perf_counter() - t_all)


def unigram_entropy(row_tokens: torch.Tensor) -> float:
    """Entropy (nats) of the study's token frequencies: the loss of the best model that ignores
    the context, where Ge et al.'s statistical-learning phase ends."""
    counts = torch.bincount(row_tokens).double()
    prob = counts[counts > 0] / counts.sum()
    return float(-(prob * prob.log()).sum())


def report(args, info, revs, hook, df, s, fvu, row_tokens, times, wall) -> None:
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    steps = info["schedule"]
    loss = json.loads((Path(args.series) / "loss.json").read_text())
    h1 = unigram_entropy(row_tokens)
    pretrain = _load_script(ROOT / "training/pretrain.py")
    pretrain.plot_loss(loss, res / "evolution_loss.png",
                       {"unigram entropy": h1})
    plot_emergence(df, res / "evolution_emergence.png", labels=[str(x) for x in steps])
    plot_trajectories(df, res / "evolution_trajectories.png", x=steps, xlabel="step")
    emerged = df[df["emergence"] >= 0]
    rows = []
    for i, (r, step) in enumerate(zip(revs, steps, strict=True)):
        here = emerged[emerged["emergence"] == i]
        rows.append({"snapshot": r, "held-out loss": loss["val"][str(step)], "crosscoder FVU": fvu[r],
                     "emerge here": len(here), "median unigram R2": float(here["unigram"].median())
                     if len(here) else float("nan"), "present": int((df[f"norm:{r}"] >= 0.5 * df["max_norm"]).sum())})
    first = lambda h: next((r for r, st in zip(revs, steps, strict=True) if loss["val"][str(st)] <= h), None)  # noqa: E731
    out = {"command": " ".join(["python3", *sys.argv]), "hookpoint": hook, "series": info, "summary": s,
           "per_snapshot": rows, "unigram_entropy": h1,
           "first_below_unigram": first(h1), "times_s": times,
           "wall_s": round(wall, 1), "settings": vars(args)}
    later = emerged[emerged["emergence"] > 0]  # formed in training, not present from step 0
    cut = np.quantile(later["emergence"], [1 / 3, 2 / 3]) if len(later) else [0, 0]
    e = emerged["emergence"]
    groups = [("present from step 0", e == 0), ("early", (e > 0) & (e <= cut[0])),
              ("middle", (e > cut[0]) & (e <= cut[1])), ("late", e > cut[1])]
    complexity = [{"emergence": f"{name} ({revs[int(e[m].min())]}–{revs[int(e[m].max())]})",
                   "latents": int(m.sum()), "median unigram R2": float(emerged["unigram"][m].median()),
                   "median frequency": float(emerged["frequency"][m].median())}
                  for name, m in groups if m.any()]
    ok = later[later["unigram"].notna()]
    out["spearman_later_emergence_unigram"] = float(spearmanr(ok["emergence"], ok["unigram"]).statistic) \
        if len(ok) > 2 else math.nan
    atomic_write(res / "evolution.json", lambda q: q.write_text(json.dumps(out, indent=1, default=float)))
    lines = ["# Evolution of concepts across pre-training (offline series)", "",
             f"Command: `{out['command']}` (after `python training/pretrain.py --out "
             f"{args.series}`, which the study runs when the series is missing). Stage times (s): "
             f"{json.dumps(times)}; pre-training {info['wall_s']} s; this analysis pass {wall:.0f} s.", "",
             f"Series: {info['n_params']:,}-parameter Llama ({info['settings']['layers']} layers, d_model "
             f"{info['settings']['d_model']}, BPE vocabulary {info['settings']['vocab']}) trained "
             f"{info['settings']['steps']} steps x {info['tokens_per_step']} tokens on Shakespeare; "
             f"{len(revs)} snapshots on a log-spaced schedule. Crosscoder over `{hook}` of every snapshot: "
             f"{args.n_latents} latents, TopK k={args.k}, {args.tokens} tokens x {args.epochs} epochs in batches of "
             f"{args.batch_size}, lr {args.lr}, AuxK after {args.dead_tokens} silent tokens; each snapshot "
             "is scaled to unit mean square in training, and decoder norms are read in those units. Latents "
             "that never fire on the training tokens are left out "
             f"({s['n_latents']} kept). One crosscoder seed (0), so no figure here has a seed spread.", "",
             "Rules (`saekit.analyze.evolution`): emergence = the first snapshot from which the latent's decoder "
             "norm stays at or above half its maximum to the end (-1: not present at the end); fading = present "
             "at step 0 and its last norm below half its step-0 norm; unigram R^2 = held-out R^2 of the latent's "
             "activation predicted by its mean on the current token.", "",
             "![loss](evolution_loss.png)", "",
             md_table(rows), "",
             f"Emerged {s['emerged']} of {s['n_latents']}; never {s['never']}; present at initialisation "
             f"{s['initial']}, of which fading {s['fading']}. Median emergence index {s['median_emergence']}. "
             f"Spearman(emergence, unigram R^2): {s.get('spearman_emergence_unigram', math.nan):.3f} over emerged "
             f"latents, {out['spearman_later_emergence_unigram']:.3f} over those emerging after step 0. "
             f"Held-out loss first at or below the unigram entropy ({h1:.2f} nats) at {out['first_below_unigram']}.",
             "",
             "![emergence](evolution_emergence.png)", "", "![trajectories](evolution_trajectories.png)", "",
             "## Emergence against the complexity proxy", "", md_table(complexity), ""]
    reading = res / "evolution_reading.md"
    if reading.exists():
        lines += ["## Reading", "", reading.read_text().strip(), ""]
    atomic_write(res / "evolution.md", lambda q: q.write_text("\n".join(lines)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
