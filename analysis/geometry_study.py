"""Feature-geometry layer sweep on a multi-layer run (`configs/layers.yaml`, six consecutive
residual layers of SmolLM2-135M; `configs/depth.yaml`, six layers over all 30), or on several seeds
of one config, which adds a table of each figure's mean and range over the seeds.

Per layer: the decoder covariance power law α (raw and on shrunk eigenvalues) with its 95 % CI,
over all rows and over the living ones (those that fire on the held-out tokens), and the share of
living and of dead rows with a twin (another row at cosine >= 0.7),
the clustering entropy with its bootstrap CI, co-occurrence lobes against geometric lobes, and
the best multi-dimensional clusters with the tokens on which they fire most. Also looks for the
circles Engels et al. found (days of the week, months): which latents fire on those tokens and
whether they form one cluster. Writes analysis/results/geometry{_NAME}.{md,json} and
geometry{_NAME}_spectrum.png.

    saekit train configs/layers.yaml
    python3 analysis/geometry_study.py --run runs/layers
    saekit train configs/depth.yaml && saekit train configs/depth.yaml --seed 1 --out runs/depth-seed1
    python3 analysis/geometry_study.py --run runs/depth runs/depth-seed1 --name depth
"""

import argparse
import json
from pathlib import Path

import torch

from saekit import Run
from saekit.analyze import geometry, geometry_bundle
from saekit.codes import encode_all
from saekit.io import atomic_write, md_table
from saekit.model import load_model
from saekit.ortho import max_cosine
from saekit.pipeline import contexts

OUT = Path(__file__).parent / "results"
PUBLISHED = "Gemma-2-2B (Li et al. 2024): α ≈ 0.24 at the first layers, ≈ 0.49 in the middle, ≈ 0.23 at the last"
CALENDAR = {"days": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
            "months": ["January", "February", "March", "April", "May", "June", "July", "August", "September",
                       "October", "November", "December"]}


def top_contexts(codes, token_ids, tok, latents: list[int], n: int = 5, width: int = 4) -> list[str]:
    """The `n` tokens where the latents' summed activation is largest, each with `width` tokens before."""
    lat = torch.tensor(latents)
    hit = torch.isin(codes.indices, lat)
    total = (codes.values * hit).sum(1)
    best = total.topk(min(n, int((total > 0).sum()))).indices.tolist()
    out = []
    for t in best:
        left = tok.decode(token_ids[max(0, t - width) : t].tolist())
        out.append(f"{left}[{tok.decode([int(token_ids[t])])}]".replace("\n", "⏎").replace("|", "/"))
    return out


def calendar_latents(codes, token_ids, tok) -> dict:
    """For each calendar word present in the text, the latent that fires most on it."""
    out = {}
    for group, words in CALENDAR.items():
        found = {}
        for w in words:
            ids = [tok.encode(p + w, add_special_tokens=False) for p in (" ", "")]
            ids = [i[0] for i in ids if len(i) == 1]
            pos = torch.isin(token_ids, torch.tensor(ids)).nonzero().flatten() if ids else torch.tensor([])
            if len(pos) == 0:
                continue
            v, i = codes.values[pos].flatten(), codes.indices[pos].flatten()
            best = torch.zeros(codes.n_latents).index_add_(0, i, v).argmax()
            found[w] = {"occurrences": len(pos), "top_latent": int(best)}
        out[group] = found
    return out


SPREAD = ["dead", "α live", "α live shrunk", "α", "twins live", "clustering", "lobe z", "multi-dim clusters"]


def measure(run: Run, tokens: int | None, token_ids: torch.Tensor, tok) -> tuple[list, dict, dict]:
    """One run's table rows, per-hookpoint details and decoder spectra."""
    rows, details, spectra = [], {}, {}
    for h in run.hookpoints:
        sae = run.sae(h)
        acts = run.activations(h)
        g = geometry_bundle(sae, acts, max_tokens=tokens)
        codes = encode_all(sae, acts, tokens)
        alive = codes.counts() > 0
        live = alive.nonzero().flatten()  # dead rows stay near their start, or collapse onto each other
        gl = geometry(sae, latents=live, n_boot=0)
        twin = max_cosine(sae.W_dec.detach().float())[0] >= 0.7  # another row of this SAE at cosine >= 0.7
        gal, lb = g["galaxy"], g["lobes"] or {}
        rows.append({"hookpoint": h, "dead": 1 - float(alive.float().mean()), "α": gal["power_law_alpha"],
                     "α 95 % CI": f"{gal['power_law_ci'][0]:.3f} .. {gal['power_law_ci'][1]:.3f}",
                     "α shrunk": gal["power_law_alpha_shrunk"], "R²": gal["power_law_r2"], "live": len(live),
                     "α live": gl.power_law_alpha,
                     "α live 95 % CI": f"{gl.power_law_ci[0]:.3f} .. {gl.power_law_ci[1]:.3f}",
                     "α live shrunk": gl.power_law_alpha_shrunk, "twins live": float(twin[alive].float().mean()),
                     "twins dead": float(twin[~alive].float().mean()) if (~alive).any() else None,
                     "clustering": gal["clustering"],
                     "clustering 95 % CI": f"{gal['clustering_ci'][0]:.3g} .. {gal['clustering_ci'][1]:.3g}",
                     "lobe AMI": lb.get("ami"), "lobe z": lb.get("z_score"),
                     "multi-dim clusters": g.get("n_multidim_clusters")})
        spectra[h] = (gal["eigenvalues"], gal["rank_window"], gal["power_law_alpha"], gal["power_law_intercept"])
        top = [{**r, "contexts": top_contexts(codes, token_ids, tok, r["latents"])} for r in (g["multidim"] or [])[:5]]
        details[h] = {"galaxy": {k: v for k, v in gal.items() if k != "eigenvalues"},
                      "lobes": {k: v for k, v in lb.items() if k not in ("labels", "geometric_labels")},
                      "multidim": top, "calendar": calendar_latents(codes, token_ids, tok), "notes": g["notes"]}
        print(f"{run.path} {h}: dead {rows[-1]['dead']:.3f}, α live {gl.power_law_alpha:.3f}", flush=True)
    return rows, details, spectra


def seed_spread(tables: list[list[dict]]) -> list[dict]:
    """Per hookpoint, each SPREAD figure as "mean (min–max)" over the runs' tables (shares in %)."""
    out = []
    for same in zip(*tables, strict=True):
        row = {"hookpoint": same[0]["hookpoint"]}
        for key in SPREAD:
            scale, unit = (100, " %") if key in ("dead", "twins live") else (1, "")
            v = [scale * r[key] for r in same if r[key] is not None]
            row[key] = f"{sum(v) / len(v):.4g}{unit} ({min(v):.4g}–{max(v):.4g})" if v else None
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="+", default=["runs/layers"], help="one run, or the same config at several seeds")
    p.add_argument("--tokens", type=int, default=None, help="held-out tokens (default: all)")
    p.add_argument("--name", default=None, help="results as geometry_NAME.* (default: geometry.*)")
    args = p.parse_args()
    stem = f"geometry_{args.name}" if args.name else "geometry"
    runs = [Run.open(r) for r in args.run]
    run = runs[0]
    for other in runs[1:]:
        diff = {k for k, v in vars(run.config).items() if k not in ("seed", "out") and vars(other.config)[k] != v}
        if diff:
            raise SystemExit(f"{other.path} differs from {run.path} in more than the seed: {sorted(diff)}")
    model = load_model(run.model_name)
    vt, vm = contexts(run.config, model.tokenizer)["val"]
    token_ids = vt[vm]  # the cache's row order: masked positions, context by context
    measured = [measure(r, args.tokens, token_ids, model.tokenizer) for r in runs]
    rows, details, spectra = measured[0]
    seeds = [r.config.seed for r in runs]
    OUT.mkdir(exist_ok=True)
    command = "python3 analysis/geometry_study.py --run " + " ".join(args.run) + (f" --name {args.name}" if args.name
                                                                                  else "")
    lines = ["# Feature geometry across layers", "", f"Command: `{command}`.", "",
             f"{len(rows)} residual-stream SAEs ({run.config.expansion}x, k {run.config.k}, lr {run.config.lr}, "
             f"{run.config.epochs} epochs), held-out tokens of the validation cache; {len(runs)} seed(s) "
             f"({', '.join(map(str, seeds))}) per layer. \"dead\": share of latents that never fire on those tokens; "
             "\"α live\": the power law of the rows that do.", ""]
    if len(runs) > 1:
        spread = seed_spread([m[0] for m in measured])
        lines += [f"Mean (min–max) over the {len(runs)} seeds:", "", md_table(spread), ""]
    for r, (rs, _, _) in zip(runs, measured, strict=True):
        lines += [f"Seed {r.config.seed} (`{r.path}`); the 95 % CIs are the fit's and the bootstrap's, "
                  "not seed spreads:", "", md_table(rs), ""]
    lines += [f"Published shape: {PUBLISHED}; a Gaussian cloud gives ≈ 0.", "",
              f"![decoder covariance spectra, seed {seeds[0]}]({stem}_spectrum.png)", "",
              f"Per-layer details below are seed {seeds[0]}'s.", ""]
    for h, d in details.items():
        lines += [f"## {h}", ""]
        if d["multidim"]:
            lines += ["Best multi-dimensional clusters (score = separability × (1 − mixture)):", "",
                      md_table([{"latents": ", ".join(map(str, r["latents"][:8])), "size": r["size"],
                                 "mixture": r["mixture_index"], "separability": r["separability_index"],
                                 "score": r["score"], "top contexts": " · ".join(r["contexts"][:3])}
                                for r in d["multidim"]]), ""]
        cal = d["calendar"]
        seen = {g: len(v) for g, v in cal.items()}
        lines += [f"Calendar words in the held-out text: {seen['days']} of 7 day names, {seen['months']} of 12 months"
                  + "".join(f"; {g}: " + ", ".join(f"{w} ×{v['occurrences']} → latent {v['top_latent']}"
                                                      for w, v in found.items()) for g, found in cal.items() if found)
                  + ".", ""]
        lines += [f"Note: {n}." for n in d["notes"]]
    atomic_write(OUT / f"{stem}.md", lambda q: q.write_text("\n".join(lines) + "\n"))
    result = {"command": command, "seeds": seeds, "rows": rows, "details": details,
              "per_seed": {str(r.path): m[0] for r, m in zip(runs, measured, strict=True)}}
    atomic_write(OUT / f"{stem}.json", lambda q: q.write_text(json.dumps(result, indent=1, default=str)))
    _plot(spectra, OUT / f"{stem}_spectrum.png")
    print("\n".join(lines))


def _plot(spectra: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(spectra)))  # by depth, one colour per layer
    for (h, (lam, (lo, hi), alpha, c)), colour in zip(spectra.items(), colours, strict=True):
        r = np.arange(1, len(lam) + 1)
        line, = ax.loglog(r, lam, lw=1, color=colour, label=f"{h.split('.')[1]}: α {alpha:.2f}")
        w = np.arange(lo, hi + 1)
        ax.loglog(w, 10 ** (c - alpha * np.log10(w)), "--", color=line.get_color(), lw=1.5)
    ax.set(xlabel="rank", ylabel="eigenvalue of the decoder-row covariance",
           title="Decoder spectra by layer (dashed: power-law fit)")
    ax.legend(title="layer", fontsize=8)
    fig.tight_layout()
    atomic_write(file, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
