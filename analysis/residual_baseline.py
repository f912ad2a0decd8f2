"""The residual baseline of the cross-layer matching study: layer t's activations themselves as the
prediction of layer t+1 (no SAE), on the held-out contexts of `configs/layers.yaml` (SmolLM2-135M,
residual layers 3 to 8), scored as the layer skip is (`saekit.analyze.crosslayer`): explained
variance of layer t+1 and the next-token loss when layer t+1 is replaced by layer t. It needs the
model only, no trained SAE, so it sits beside the matching study's tables in any later rerun.

    nice -n 15 python3 analysis/residual_baseline.py [--ev-contexts 128] [--loss-contexts 24]

Writes analysis/results/residual_baseline.{md,json} with the command and wall time.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from saekit.analyze.crosslayer import layer_skip_loss, residual_skip
from saekit.config import load_config
from saekit.io import atomic_write, md_table
from saekit.model import load_model, logprobs
from saekit.pipeline import contexts

OUT = Path(__file__).parent / "results" / "residual_baseline.md"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/layers.yaml")
    ap.add_argument("--ev-contexts", type=int, default=128, help="held-out contexts for the explained variance")
    ap.add_argument("--loss-contexts", type=int, default=24, help="held-out contexts for the Δloss (the study's 24)")
    args = ap.parse_args()
    started = time.time()
    cfg = load_config(args.config)
    hooks = cfg.hookpoints
    model = load_model(cfg.model)
    tokens, mask = contexts(cfg, model.tokenizer)["val"]
    acts = {h: [] for h in hooks}
    for s in range(0, min(args.ev_contexts, len(tokens)), 4):
        toks, m = tokens[s : s + 4], mask[s : s + 4]
        grab = tuple((h, lambda act, h=h, m=m: acts[h].append(act[m.to(act.device)].float().cpu()) or act)
                     for h in hooks)
        logprobs(model, toks, hooks=grab)
    acts = {h: torch.cat(v) for h, v in acts.items()}
    n_loss = min(args.loss_contexts, len(tokens))
    rows = []
    for a, b in zip(hooks, hooks[1:], strict=False):
        ev = residual_skip(acts[a], acts[b], acts[a].shape[1])
        loss = layer_skip_loss(model, None, None, {}, a, b, tokens[:n_loss], mask[:n_loss], residual=True)
        rows.append({"layer t": a, "layer t+1": b, "EV residual": round(ev, 4),
                     "Δloss residual": round(loss["dloss_residual"], 4), "clean CE": round(loss["ce_clean"], 4)})
        print(rows[-1], flush=True)
    wall = time.time() - started
    command = "python3 " + " ".join(sys.argv)
    n_tok = len(next(iter(acts.values())))
    atomic_write(OUT.with_suffix(".json"), lambda p: p.write_text(json.dumps(
        {"command": command, "wall_s": round(wall), "ev_tokens": n_tok, "loss_contexts": n_loss, "rows": rows},
        indent=1)))
    lines = ["# Residual baseline of the cross-layer layer skip", "",
             f"`{command}`: {wall:.0f} s wall on 2 shared cores; deterministic (no training, no seed). "
             f"Held-out contexts of `{args.config}`: explained variance over {n_tok:,} tokens, Δloss (next-token "
             f"CE minus the clean CE, layer t+1 replaced by layer t at every non-BOS position) over {n_loss} "
             "contexts.", "", md_table(rows), ""]
    atomic_write(OUT, lambda p: p.write_text("\n".join(lines)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
