"""Calendar circles: do the day and month names lie on a circle in calendar order in SmolLM2-135M's
residual stream, and in its SAEs? Engels et al. 2024 ("Not All Language Model Features Are Linear")
found such circles in Mistral 7B and Llama 3 8B through clusters of SAE decoder directions. The
held-out Shakespeare holds too few of the names to test it, so templated prompts put every name
in 30 contexts per group.

Per layer and group (7 days, 12 months): the residual stream at the name token (each name one
token with its leading space; only the words before it reach that position, so a prompt ends at
the name), the mean per name, and `saekit.analyze.circularity` on the means: the best plane among
the top 4 PCs, the count of angular neighbours that are calendar neighbours (cyclic: Sunday next
to Monday), its p against relabelled names searched over the same planes, the spread of radii and
the widest step between calendar neighbours; also on each half of the templates, and on the names'
token embeddings. Per SAE of `--runs` at those layers: its error at the names, the name latents
(firing on >= half of one name's prompts and on <= 5 % of the prompts' other tokens), whether
their decoder rows form clusters (`find_clusters`), and the same statistic on the names'
reconstructions from all latents, from the name latents only and from the dictionary cluster that
holds most of them (Engels et al.'s procedure), and on the SAE's error. Writes
analysis/results/calendar{_NAME}.{md,json,png}.

    python3 analysis/calendar_study.py --runs runs/depth runs/depth-seed1
    python3 analysis/calendar_study.py --runs runs/default --name default   # one layer-6 SAE
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
from saekit.analyze import circularity
from saekit.analyze.geometry import find_clusters
from saekit.errors import SaekitError
from saekit.io import atomic_write, md_table
from saekit.model import DEFAULT_MODEL, harvest, load_model

sys.path.insert(0, str(Path(__file__).parent))
from geometry_study import CALENDAR  # noqa: E402

OUT = Path(__file__).parent / "results"
LAYERS = (0, 6, 12, 15, 18, 24, 29)  # configs/depth.yaml's first, middle and last layers and every sixth
NAME_RATE, OTHER_RATE = 0.5, 0.05  # a name latent: fires on >= half of one name's prompts, <= 5 % of other tokens
ALPHA = 0.05
# the words before the name: each prompt is one of these, a space and the name
PREFIXES = {
    "days": ["The meeting was moved to", "See you on", "The store is closed on", "We always go swimming on",
             "Her birthday falls on a", "I will call you on", "The package should arrive by", "Every",
             "The deadline is next", "It rained all day last", "Our flight leaves on", "The concert is on",
             "He was born on a", "The report is due", "Let's meet for lunch on", "The museum is free on",
             "school starts again on", "my favourite day of the week is", "the train does not run on",
             "TODAY IS", "Yesterday was", "The weekly market is held every", "She works from home on",
             "The first day of the trip was a", "We can reschedule it for", "The office is open until",
             "Last", "The game was postponed until", "Tickets go on sale this", "The class meets on"],
    "months": ["Born in", "The conference takes place in", "We moved to the city in", "The harvest begins in",
               "It usually snows in", "Her birthday is in", "The school year ends in", "The report was published in",
               "They got married in", "The first frost came in early", "Sales always rise in",
               "The festival is held every", "I will start the new job in", "The museum reopens in late",
               "The elections are scheduled for", "My favourite month is", "the rent is due at the start of",
               "the river floods every", "PUBLISHED IN", "The warmest month of the year is usually",
               "He retired in", "The bridge was finished in", "We visited Paris last",
               "The law came into force on 1", "The trial is set for", "Prices fell sharply in",
               "The birds return each", "The accounts close at the end of", "The flowers bloom in",
               "She was born on the 3rd of"],
}


def name_tokens(tok) -> dict[str, int]:
    """Each calendar name's token id with its leading space; stops naming those that are not one token."""
    ids = {w: tok.encode(" " + w, add_special_tokens=False) for ws in CALENDAR.values() for w in ws}
    if bad := {w: i for w, i in ids.items() if len(i) != 1}:
        raise SaekitError("not one token with a leading space on this tokenizer: "
                          + ", ".join(f"{w} -> {i}" for w, i in bad.items()))
    return {w: i[0] for w, i in ids.items()}


def prompts(tok, ids: dict[str, int]):
    """Token rows (BOS, prefix, name; right-padded), the name's position, its group, name index
    and template index per row."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    rows, meta = [], []
    for group, words in CALENDAR.items():
        for t, prefix in enumerate(PREFIXES[group]):
            for n, w in enumerate(words):
                rows.append(bos + tok.encode(prefix, add_special_tokens=False) + [ids[w]])
                meta.append((group, n, t))
    width = max(map(len, rows))
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    at = torch.tensor([len(r) - 1 for r in rows])
    return tokens, at, meta


def record(model, tokens: torch.Tensor, at: torch.Tensor, hookpoints: list[str]):
    """Activations at the name ([prompts, d]) and at the prompts' other real tokens, per hookpoint."""
    pos = torch.arange(tokens.shape[1])
    first = 1 if model.tokenizer.bos_token_id is not None else 0
    mask = (pos >= first) & (pos[None] <= at[:, None])
    is_name = (pos[None] == at[:, None])[mask]
    parts = list(harvest(model, tokens, mask, hookpoints, batch_size=64))
    acts = {h: torch.cat([p[h] for p in parts]) for h in hookpoints}
    return {h: a[is_name] for h, a in acts.items()}, {h: a[~is_name] for h, a in acts.items()}


def circle_row(points: torch.Tensor, n_perm: int):
    """`circularity` of the per-name means as plain numbers (or why it could not run), and the result."""
    try:
        r = circularity(points, n_perm=n_perm)
    except SaekitError as e:
        return {"error": str(e), "circle": "no (" + str(e).split("got ")[-1] + ")"}, None
    d = {k: v for k, v in r.to_dict().items() if k not in ("mean", "components")}
    d["circle"] = verdict(d)
    return d, r


def verdict(c: dict) -> str:
    """Names in calendar order (p < ALPHA, at most one pair of neighbours swapped) around a round
    shape (radius CV < 0.3), closed (no step between calendar neighbours over twice the median) or
    open at one seam."""
    if c["p_value"] >= ALPHA:
        return "no"
    if c["neighbours"] < c["n_points"] - 2:
        return "partly ordered"
    if c["radius_cv"] >= 0.3:
        return "ordered, not round"
    return "closed ring" if c["gap_ratio"] < 2 else "open ring"


def group_index(meta: list, group: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The group's prompt rows, and each one's name and template index."""
    rows = [i for i, m in enumerate(meta) if m[0] == group]
    return torch.tensor(rows), torch.tensor([meta[i][1] for i in rows]), torch.tensor([meta[i][2] for i in rows])


def means_by(x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The mean row per label 0..max [labels, d]; per name, the means carry no template effect
    (every name has the same templates)."""
    return torch.stack([x[label == n].mean(0) for n in range(int(label.max()) + 1)])


@torch.no_grad()
def sae_side(sae, names: torch.Tensor, other: torch.Tensor, meta: list, n_perm: int) -> dict:
    """Name latents per group, their decoder clusters, and circles in their reconstructions."""
    m = sae.n_latents
    W = sae.W_dec.detach().float().cpu()

    def dense(x):
        v, i = sae.encode(x)
        return torch.zeros(len(x), m).scatter_add_(1, i, v.float())

    v, i = sae.encode(other)
    Z, other_rate = dense(names), torch.bincount(i[v > 0], minlength=m) / len(other)
    centre = torch.cat([names, other]).mean(0)
    fvu = lambda x, x_hat: float(((x_hat - x) ** 2).sum() / ((x - centre) ** 2).sum())  # noqa: E731
    clusters = find_clusters(W)
    cid = torch.full((m,), -1)
    for c, ids in enumerate(clusters):
        cid[ids] = c
    out = {"dictionary_clusters": len(clusters), "fvu_other": fvu(other, sae.decode(v, i))}
    for group, words in CALENDAR.items():
        rows, name, _ = group_index(meta, group)
        Zg, xg = Z[rows], names[rows]
        x_hat = Zg @ W + sae.b_dec.detach().float()
        rate = means_by((Zg > 0).float(), name)  # [names, m] firing rates
        lat = ((rate.max(0).values >= NAME_RATE) & (other_rate <= OTHER_RATE)).nonzero().flatten()
        on = rate[:, lat] >= NAME_RATE
        means, means_hat = means_by(xg, name), means_by(x_hat, name)
        g = {"fvu": fvu(xg, x_hat),  # mean error > 1: the error is larger than the differences between names
             "mean_error": float(((means_hat - means) ** 2).sum() / ((means - means.mean(0)) ** 2).sum()),
             "latents": lat.tolist(), "n_latents": len(lat), "all_names": int(on.all(0).sum()),
             "one_name": int((on.sum(0) == 1).sum()),
             "top": [{"latent": int(i), "names": [w for w, r in zip(words, rate[:, i].tolist(), strict=True)
                                                  if r >= NAME_RATE]} for i in lat[:12]]}
        if len(lat) >= 2:
            Wl = W[lat] / W[lat].norm(dim=1, keepdim=True)
            cos = Wl @ Wl.T
            g["mean_cosine"] = float(cos[~torch.eye(len(lat), dtype=torch.bool)].mean())
            g["own_clusters"] = [[int(lat[j]) for j in c] for c in find_clusters(W[lat])]
        held = cid[lat][cid[lat] >= 0]
        g["in_dictionary_clusters"] = int(len(held))
        g["dictionary_clusters_touched"] = int(held.unique().numel())
        spans = {"all latents": list(range(m)), "name latents": lat.tolist()}
        if len(held) and (best := int(held.mode().values)) >= 0 and int((held == best).sum()) >= 2:
            spans["dictionary cluster"] = clusters[best]
        g["spans"] = {}
        for span, ids in spans.items():
            ids_t = torch.tensor(ids, dtype=torch.long)
            if len(ids_t) == 0:
                g["spans"][span] = {"size": 0, "error": "no name latents", "circle": "no (no latents)"}
                continue
            rec = Zg[:, ids_t] @ W[ids_t]  # the reconstruction from these latents only
            g["spans"][span] = {"size": len(ids), "latents": ids[:64] if len(ids) < m else "all",
                                **circle_row(means_by(rec, name), n_perm)[0]}
        g["spans"]["error"] = {"size": "–", **circle_row(means - means_hat, n_perm)[0]}  # what the SAE misses
        out[group] = g
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], metavar="RUN", help="runs whose SAEs at --layers to analyse")
    p.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    p.add_argument("--model", default=None, help="default: the runs' model, else " + DEFAULT_MODEL)
    p.add_argument("--perm", type=int, default=2000, help="relabellings in each null")
    p.add_argument("--name", default=None, help="results as calendar_NAME.* (default: calendar.*)")
    args = p.parse_args()
    start = time.time()
    runs = [Run.open(r) for r in args.runs]
    models = {r.model_name for r in runs} | ({args.model} if args.model else set())
    if len(models) > 1:
        raise SaekitError(f"the runs and --model name different models: {sorted(models, key=str)}")
    model_name = models.pop() if models else DEFAULT_MODEL
    model = load_model(model_name)
    tok = model.tokenizer
    ids = name_tokens(tok)
    tokens, at, meta = prompts(tok, ids)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in sorted(set(args.layers))]
    names, other = record(model, tokens, at, hooks)
    raw, planes = {"embedding": {}}, {}
    for group, words in CALENDAR.items():  # the names' token embeddings: what every layer starts from
        raw["embedding"][group] = circle_row(model.W_E[[ids[w] for w in words]].detach().float(), args.perm)[0]
    for h in hooks:
        raw[h], planes[h] = {}, {}
        for group in CALENDAR:
            rows, name, tmpl = group_index(meta, group)
            xs = names[h][rows]
            means = means_by(xs, name)
            raw[h][group], r = circle_row(means, args.perm)
            if r is None:
                continue
            # the same on each half of the templates: does the order hold on prompts it was not found on?
            raw[h][group]["halves"] = [circle_row(means_by(xs[tmpl % 2 == k], name[tmpl % 2 == k]), args.perm)[0]
                                       .get("neighbours_top") for k in (0, 1)]
            to_plane = lambda x, r=r: ((x - r.mean) @ r.components[:2].T).round(decimals=3).tolist()  # noqa: E731
            # each prompt with its template's mean removed, around its name's mean: the spread within a name
            within = xs - means_by(xs, tmpl)[tmpl] + means.mean(0)
            planes[h][group] = {"means": to_plane(means), "prompts": to_plane(within), "name": name.tolist()}
        print(f"{h}: " + "; ".join(f"{g} {c.get('neighbours_top')}/{len(CALENDAR[g])} in PCs 1-2, best "
                                   f"{c.get('neighbours')} p {c.get('p_value', float('nan')):.3g}"
                                   for g, c in raw[h].items()), flush=True)
    saes = []
    for run in runs:
        seed = run.config.seed if run.config else None
        for h in run.hookpoints:
            if h not in hooks:
                continue
            res = sae_side(run.sae(h), names[h], other[h], meta, args.perm)
            saes.append({"run": str(run.path), "seed": seed, "hookpoint": h, **res})
            print(f"{run.path} {h}: " + "; ".join(
                f"{g} {res[g]['n_latents']} name latents, " + ", ".join(
                    f"{s} {c.get('neighbours')} p {c.get('p_value', float('nan')):.3g}"
                    for s, c in res[g]["spans"].items()) for g in CALENDAR), flush=True)
    skipped = [f"{r.path}: {h}" for r in runs for h in r.hookpoints if h not in hooks]
    stem = f"calendar_{args.name}" if args.name else "calendar"
    info = {"command": "python3 " + shlex.join(["analysis/calendar_study.py", *sys.argv[1:]]),
            "wall_s": round(time.time() - start, 1), "model": model_name,
            "names": ids, "prompts": {g: len(PREFIXES[g]) for g in CALENDAR}, "perm": args.perm,
            "seeds": sorted({s["seed"] for s in saes}, key=str), "skipped_hookpoints": skipped,
            "runs": [describe(r) for r in runs]}
    OUT.mkdir(exist_ok=True)
    means = {h: {g: d["means"] for g, d in gs.items()} for h, gs in planes.items()}  # the PCs 1-2 plane per name
    atomic_write(OUT / f"{stem}.json", lambda q: q.write_text(json.dumps(
        {**info, "raw": raw, "saes": saes, "planes": means}, indent=1)))
    _plot(planes, raw, OUT / f"{stem}.png")
    text = report(info, raw, saes, stem)
    atomic_write(OUT / f"{stem}.md", lambda q: q.write_text(text))
    print(text)


def describe(run: Run) -> str:
    c = run.config
    if c is None:
        return f"`{run.path}`: a bare SAE folder"
    many = "s" if len(run.hookpoints) > 1 else ""
    return (f"`{run.path}`: {len(run.hookpoints)} SAE{many} (layer{many} "
            f"{', '.join(h.split('.')[1] if '.' in h else h for h in run.hookpoints)}), seed {c.seed}, "
            f"{c.expansion}x, k {c.k}, lr {c.lr:g}, {c.epochs} epoch{'s' if c.epochs > 1 else ''} over "
            f"{c.n_tokens:,} tokens of {c.dataset} (activations: {c.activations})")


def _fmt(c: dict, group: str) -> dict:
    words = CALENDAR[group]
    n = len(words)
    if "error" in c:
        return {"PCs 1-2": "–", "p": None, "best pair": "–", "best": "–", "p (best)": None, "radius CV": None,
                "widest gap": "–", "circle": c["circle"]}
    return {"PCs 1-2": f"{c['neighbours_top']}/{n}", "p": c["p_value_top"],
            "best pair": f"{c['pcs'][0] + 1},{c['pcs'][1] + 1}", "best": f"{c['neighbours']}/{n}",
            "p (best)": c["p_value"], "radius CV": c["radius_cv"],
            "widest gap": f"{words[c['gap_after']][:3]}–{words[(c['gap_after'] + 1) % n][:3]} ×{c['gap_ratio']:.1f}",
            "circle": c["circle"]}


def where(s: dict, group: str) -> dict:
    return {"run": Path(s["run"]).name, "seed": s["seed"], "layer": s["hookpoint"].split(".")[1], "group": group}


def report(info: dict, raw: dict, saes: list, stem: str) -> str:
    n_seeds = len(info["seeds"])
    lines = ["# Calendar circles (days of the week, months of the year)", "",
             f"`{info['command']}` — {info['wall_s']:.0f} s on 2 shared CPU cores; "
             f"{info['prompts']['days']} prompts per day name and {info['prompts']['months']} per month; "
             f"every name is one token with its leading space on the tokenizer; "
             f"SAEs: {len(saes)} from {n_seeds} seed{'s' if n_seeds != 1 else ''} "
             f"({', '.join(map(str, info['seeds'])) or 'none'}).", "",
             "Statistic (`saekit.analyze.circularity`, on the mean activation per name): the names sorted by angle "
             "in a plane of principal components; how many of the n angularly consecutive pairs are calendar "
             "neighbours (n/n: a ring in calendar order, either way round; random names give about 2). "
             f"`p` for the plane of PCs 1-2 alone, `p (best)` for the best of the 6 planes among the top 4 PCs "
             f"with each of {info['perm']} relabellings searched the same way. Radius CV = std / mean of the "
             "names' distances from their centre in the best plane (0 on a ring). Angular order alone cannot "
             "tell a closed ring from an open arc (an arc's two ends are angular neighbours too), so `widest gap` "
             "gives the widest step between calendar neighbours in that plane over the median step (about 5 for "
             f"12 points on two thirds of a circle). `circle`: p (best) < {ALPHA} and at least n − 2 of n "
             "(one pair swapped at most; fewer: partly ordered) and radius CV < 0.3 (else ordered, not round): "
             "a closed ring when the widest gap < 2x, an open ring otherwise. "
             "The p floor with 7 days is 14/7! = 0.0028 in one plane and about 0.02 for the best of 6; with 12 "
             f"months it is 1/{info['perm'] + 1} (relabellings + 1). No correction for the number of rows.", "",
             *([f"Runs: {'; '.join(info['runs'])}.", ""] if info["runs"] else []),
             "## Residual stream", "",
             "`embedding`: the names' rows of the token embedding matrix; other rows: the residual stream after "
             "block N at the name token. `halves`: PCs 1-2 neighbours on the even and on the odd templates alone.",
             "",
             md_table([{"layer": h.split(".")[1] if "." in h else h, "group": g, **_fmt(c, g),
                        "halves": " · ".join(f"{k}/{len(CALENDAR[g])}" for k in c.get("halves", [])) or "–"}
                       for h, gs in raw.items() for g, c in gs.items()]), "",
             f"![name means in the plane of PCs 1-2, per layer]({stem}.png)", "",
             "In the figure: each name's mean (labelled, joined in calendar order) and its prompts with the "
             "template's mean removed (dots), in the plane of the means' PCs 1-2.", ""]
    if not saes:
        lines += ["No SAEs analysed (no --runs).", ""]
    else:
        lines += ["## SAEs", "",
                  "FVU: the SAE's squared error over the variance around the mean of all the prompts' tokens, at "
                  "the group's names and at the prompts' other tokens. Mean error: the squared error of the "
                  "SAE's per-name mean reconstruction over the spread of the per-name means (> 1: the error is "
                  "larger than the differences between names the statistic reads). "
                  f"Name latents: fire on >= {NAME_RATE:.0%} of one name's prompts and on <= {OTHER_RATE:.0%} of "
                  "the prompts' other tokens (`all`: on every name of the group, `one`: on one name only). "
                  "Clusters: `find_clusters` (top-2 neighbours at decoder cosine > 0.5) among the name latents "
                  "alone, and over the whole dictionary (how many name latents sit in one of its clusters, and "
                  "in how many). Spans: the names' reconstructions from all latents (the SAE's reconstruction), from "
                  "the name latents only, and from the dictionary cluster that holds most of them (when >= 2), "
                  "each averaged per name, then the statistic above; `error`: the same on the per-name means of "
                  "the SAE's error x − x̂ (where a ring the SAE misses would show).", "",
                  md_table([{**where(s, g), "FVU names / other": f"{s[g]['fvu']:.3f} / {s['fvu_other']:.3f}",
                             "mean error": s[g]["mean_error"], "name latents": s[g]["n_latents"],
                             "all / one": f"{s[g]['all_names']} / {s[g]['one_name']}",
                             "mean cos": s[g].get("mean_cosine"),
                             "own clusters": ", ".join(str(len(c)) for c in s[g].get("own_clusters", [])) or "–",
                             "in dict. clusters": f"{s[g]['in_dictionary_clusters']} in "
                                                  f"{s[g]['dictionary_clusters_touched']}"}
                            for s in saes for g in CALENDAR]), "",
                  md_table([{**where(s, g), "span": span, "size": c["size"], **_fmt(c, g)}
                            for s in saes for g in CALENDAR for span, c in s[g]["spans"].items()]), ""]
    if info["skipped_hookpoints"]:
        lines += ["Hookpoints of the runs outside --layers, not analysed: " + ", ".join(info["skipped_hookpoints"]),
                  ""]
    return "\n".join(lines)


def _plot(planes: dict, raw: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hooks = list(planes)
    fig, axes = plt.subplots(len(CALENDAR), len(hooks), figsize=(2.6 * len(hooks), 5.4), squeeze=False)
    for row, (group, words) in enumerate(CALENDAR.items()):
        colours = plt.get_cmap("hsv")(np.arange(len(words)) / len(words))  # cyclic: neighbours look alike
        for col, h in enumerate(hooks):
            ax, d, c = axes[row, col], planes[h].get(group), raw[h][group]
            if d is None:
                ax.axis("off")
                continue
            P, M = np.array(d["prompts"]), np.array(d["means"])
            ax.scatter(P[:, 0], P[:, 1], s=3, c=colours[d["name"]], alpha=0.35, linewidths=0)
            ring = np.vstack([M, M[:1]])
            ax.plot(ring[:, 0], ring[:, 1], lw=0.6, color="0.5")
            for n, w in enumerate(words):
                ax.annotate(w[:3], M[n], fontsize=7, ha="center", va="center", color=colours[n] * 0.7)
            ax.set_title(f"L{h.split('.')[1]} {group}: {c.get('neighbours_top', '–')}/{len(words)}, "
                         f"p {c.get('p_value_top', float('nan')):.2g}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    atomic_write(file, lambda q: fig.savefig(q, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except SaekitError as e:
        sys.exit(f"calendar_study: {e}")
