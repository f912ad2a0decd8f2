"""Layer crosscoder against SAE Match chains on the same six residual-stream layers of
SmolLM2-135M (configs/crosscoder_layers.yaml and configs/layers.yaml: one activation cache, the
same tokens, width per layer and budget).

Two ways to say how far a feature persists through the layers. The crosscoder (Lindsey et al.
2024) learns it: a latent is *present* at a layer where its decoder norm is at least half its
largest (`saekit.analyze.evolution`), and its direction at two layers is the cosine of its two
decoders. SAE Match (Balagansky et al. 2025) infers it after the fact: each layer's SAE is matched
to the next one's (decoder folding, exact assignment) and a feature persists while the matched
cosine stays above a threshold.

    nice -n 15 python3 analysis/crosscoder_study.py    # trains both runs first when missing

Writes analysis/results/crosscoder_layers.{md,json}.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from saekit import Run
from saekit.analyze.evolution import evolution
from saekit.codes import encode_all
from saekit.config import load_config
from saekit.io import atomic_write, md_table
from saekit.matching import match
from saekit.pipeline import train

OUT = Path(__file__).parent / "results"
CONFIGS = {"sae": "configs/layers.yaml", "cc": "configs/crosscoder_layers.yaml"}


def ensure(config: str) -> Run:
    """The run of `config`, trained (or finished) first when it is not complete."""
    cfg = load_config(config)
    out = Path(cfg.out)
    if not (out / "eval.json").is_file():
        train(cfg, resume=(out / "state.safetensors").is_file(), quiet=True)
    return Run.open(out)


def crosscoder_side(run: Run, tokens: int) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    """Per firing latent: the layers it is present at, and its decoder cosine between adjacent layers."""
    cc = run.sae("crosscoder")
    codes = encode_all(cc, run.activations("crosscoder"), tokens)
    fires = torch.bincount(codes.indices[codes.values > 0].flatten(), minlength=cc.n_latents).numpy() > 0
    df = evolution(cc)[fires]
    norms = df[[f"norm:{h}" for h in cc.targets]].to_numpy()
    present = norms >= 0.5 * norms.max(1, keepdims=True)
    W = [torch.nn.functional.normalize(cc.W_dec[t][torch.as_tensor(df.latent.to_numpy())], dim=1) for t in cc.targets]
    adj = [(W[t] * W[t + 1]).sum(1).numpy() for t in range(len(W) - 1)]
    spans = present.sum(1)
    contiguous = np.array([np.all(np.diff(np.flatnonzero(p)) == 1) for p in present])
    info = {"latents": cc.n_latents, "firing": int(fires.sum()),
            "span_hist": np.bincount(spans, minlength=len(W) + 1)[1:].tolist(),
            "span_mean": float(spans.mean()), "contiguous": float(contiguous.mean()),
            "peak_hist": np.bincount(df.peak, minlength=len(W)).tolist()}
    return info, present, adj


def sae_side(run: Run, tokens: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Per pair of adjacent layers t, t+1 (SAE Match, exact solver): each latent of t's matched
    decoder cosine and its partner at t+1; and the SAEs' width."""
    hooks = run.hookpoints
    saes = [run.sae(h) for h in hooks]
    codes = [encode_all(s, run.activations(h), tokens) for s, h in zip(saes, hooks, strict=True)]
    ms = [match(saes[t], saes[t + 1], codes=(codes[t], codes[t + 1])) for t in range(len(hooks) - 1)]
    return [m.score.numpy() for m in ms], [m.b_for_a.numpy() for m in ms], saes[0].n_latents


def persistence(step_ok: list[np.ndarray], chains: list[np.ndarray] | None = None) -> list[float]:
    """Share of the first layer's features still alive after 1, 2, ... further layers: `step_ok[t]`
    says which features of layer t carry on to t+1, `chains[t]` (SAEs) maps them to t+1's latents."""
    alive = np.ones(len(step_ok[0]), bool)
    where = np.arange(len(step_ok[0]))
    out = []
    for t, ok in enumerate(step_ok):
        alive &= ok[where]
        if chains is not None:
            where = chains[t][where]
        out.append(float(alive.mean()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768, help="held-out tokens encoded (firing latents, matching)")
    ap.add_argument("--threshold", type=float, default=0.5, help="decoder cosine above which a feature carries on")
    args = ap.parse_args()
    t0 = time.perf_counter()
    sae_run, cc_run = ensure(CONFIGS["sae"]), ensure(CONFIGS["cc"])
    trained = round(time.perf_counter() - t0, 1)
    hooks = sae_run.hookpoints
    cc_info, present, cc_adj = crosscoder_side(cc_run, args.tokens)
    sae_scores, chains, width = sae_side(sae_run, args.tokens)
    ev_sae, ev_cc = (json.loads((r.path / "eval.json").read_text()) for r in (sae_run, cc_run))
    rows = []
    for t in range(len(hooks) - 1):
        both = present[:, t] & present[:, t + 1]
        rows.append({"layers": f"{hooks[t].split('.')[1]} → {hooks[t + 1].split('.')[1]}",
                     "cc: present at t, also at t+1": float(both.sum() / max(present[:, t].sum(), 1)),
                     "cc: decoder cos (present at both)": float(np.median(cc_adj[t][both])) if both.any() else None,
                     f"SAE: matched cos ≥ {args.threshold}": float((sae_scores[t] >= args.threshold).mean()),
                     "SAE: matched cos (median)": float(np.nanmedian(sae_scores[t]))})
    starts = present[:, 0]
    cc_chain = persistence([present[starts, t] & present[starts, t + 1] for t in range(len(hooks) - 1)])
    sae_chain = persistence([s >= args.threshold for s in sae_scores], chains)
    fvu = [{"layer": h, "SAE FVU": ev_sae[h]["fvu"], "crosscoder FVU": ev_cc["crosscoder"][f"fvu/{h}"]}
           for h in hooks]
    wall = {"train": trained, "analysis": round(time.perf_counter() - t0 - trained, 1)}
    res = {"crosscoder": cc_info, "adjacent": rows, "chain_cc": cc_chain, "chain_sae": sae_chain, "fvu": fvu,
           "threshold": args.threshold, "tokens": args.tokens, "wall_s": wall}
    atomic_write(OUT / "crosscoder_layers.json", lambda p: p.write_text(json.dumps(res, indent=1)))
    cmd = " ".join(["nice -n 15 python3 analysis/crosscoder_study.py", *map(shlex.quote, sys.argv[1:])])
    n = len(hooks)
    lines = ["# A layer crosscoder next to SAE Match chains (SmolLM2-135M, residual layers "
             f"{hooks[0].split('.')[1]}–{hooks[-1].split('.')[1]})", "",
             f"Command: `{cmd}`; wall time {res['wall_s']['train']:.0f} s training (0 if the runs existed) + "
             f"{res['wall_s']['analysis']:.0f} s analysis, 2-core CPU shared with other jobs.", "",
             f"Runs: `{sae_run.path}` ({n} SAEs of {width:,} latents) and `{cc_run.path}` (one crosscoder "
             f"of {cc_info['latents']:,} latents over the {n} layers), both k 32, the same 250k tokens × 2 epochs, one "
             "seed each (no seed spread). "
             f"{cc_info['firing']:,} crosscoder latents fire on {args.tokens:,} held-out tokens (the others are "
             "left out).",
             "", "## Reconstruction per layer (held-out FVU)", "", md_table(fvu), "",
             "## How many layers a crosscoder latent spans", "",
             "Layers where its decoder norm is at least half its largest:", "",
             md_table([{"layers spanned": i + 1, "latents": c} for i, c in enumerate(cc_info["span_hist"])]), "",
             f"Mean span {cc_info['span_mean']:.2f} layers; {100 * cc_info['contiguous']:.1f} % of latents span one "
             "unbroken run of layers. Layer of the largest decoder norm: "
             + ", ".join(f"{h.split('.')[1]}: {c}" for h, c in zip(hooks, cc_info["peak_hist"], strict=True)) + ".", "",
             "## Adjacent layers", "", md_table(rows), "",
             f"## Persistence from layer {hooks[0].split('.')[1]}", "",
             "Share of the first layer's features still present after each further layer: crosscoder latents "
             f"present at the first layer, staying present; SAE latents whose chain of matches keeps cosine ≥ "
             f"{args.threshold} at every step.", "",
             md_table([{"after layer": h.split(".")[1], "crosscoder": c, "SAE Match chain": s}
                       for h, c, s in zip(hooks[1:], cc_chain, sae_chain, strict=True)]), ""]
    atomic_write(OUT / "crosscoder_layers.md", lambda p: p.write_text("\n".join(lines)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
