"""`saekit analyze`: run the analyses on the SAEs of a run (or a bare SAE folder) and write
`RUN/analysis/`.

`all` writes `report.md` (tables, wall time of each analysis), `report.json` (every number)
and PNG plots (density histogram, decoder singular values, per-letter absorption, the decoder
covariance spectrum with its power-law fit, the lobe map, the top multi-dimensional features;
they need the optional `plots` extra, matplotlib). A single analysis writes
`RUN/analysis/<name>.json`. Activations come from `--activations` (a cache folder or a
.safetensors file) or the run's own held-out activation cache; absorption loads the run's model
(or `--model`), and `all` skips it, with a note in the report, for an SAE that names no model
(e.g. one from `saekit.fit`). Geometry needs no activations for its decoder-only part: without any (a bare SAE
folder and no `--activations`) it skips lobes and multi-dimensional features. With `--against
RUN_B` (another seed of the same config) the report adds each hookpoint's seed stability against
RUN_B (`saekit.analyze.stability`).
"""

import time
from pathlib import Path

from saekit.activations import check_width
from saekit.analyze.absorption import absorption, saebench_output
from saekit.analyze.collapse import collapse
from saekit.analyze.common import Result
from saekit.analyze.dead import dead
from saekit.analyze.geometry import geometry_bundle
from saekit.analyze.stability import markdown as stability_markdown
from saekit.analyze.stability import run_stability
from saekit.errors import SaekitError
from saekit.io import Phases, atomic_write, figure, md_table
from saekit.run import Run
from saekit.sae import SAE

ANALYSES = ("dead", "collapse", "absorption", "geometry")
RESULT_KEYS = ("run", "wall_time_s", "skipped")  # the report's keys that are not hookpoints


def _analyse(name: str, run: Run, h: str, sae: SAE, acts, model, tokens: int | None, quiet: bool,
             **absorption_options) -> Result | dict:
    if name == "dead":
        return dead(sae, acts, max_tokens=tokens, history=run.firing_history(h))
    if name == "collapse":
        return collapse(sae, acts, max_tokens=tokens)
    if name == "geometry":
        return geometry_bundle(sae, acts, max_tokens=tokens)
    return absorption(sae, model, h, progress=not quiet, **absorption_options)


def _activations(run: Run, h: str, path: str | None, analyses: tuple[str, ...]):
    """The activations the analyses read: required by dead and collapse; optional for geometry
    (None when neither `path` nor the run's own cache gives any)."""
    if {"dead", "collapse"} & set(analyses) or ("geometry" in analyses and path is not None):
        return run.activations(h, path=path)
    if "geometry" in analyses:
        try:
            return run.activations(h)
        except SaekitError:
            return None
    return None


def analyze_run(run: str | Path | Run, analyses: tuple[str, ...] = ANALYSES, hookpoint: str | None = None,
                activations: str | None = None, tokens: int | None = None, words: int = 3000,
                f1_threshold: float = 0.6, min_letters: int = 20, model: str | None = None,
                quiet: bool = False, against: str | Path | None = None, protocol: str = "saekit") -> dict:
    """Run `analyses` on every hookpoint of `run` (or just `hookpoint`); returns every number
    as `{hookpoint: {analysis: dict}}` plus `wall_time_s`, and writes RUN/analysis/. With
    `against` (another run of the same hookpoints), each hookpoint's `stability` too."""
    run = run if isinstance(run, Run) else Run.open(run)
    hooks = run.hookpoints if hookpoint is None else [run.hookpoint(hookpoint)]
    acts = {h: _activations(run, h, activations, tuple(analyses)) for h in hooks}
    for h in hooks if activations is not None else ():  # a wrong width is named before the model loads
        if acts[h] is not None and not run.crosscoder:
            check_width(acts[h], run.sae(h).cfg.d_in)
    full, lm, skipped = tuple(analyses) == ANALYSES, None, {}
    if "absorption" in analyses:
        from saekit.model import check_hookpoints, load_model

        name = model or run.model_name
        if not name:
            why = f"{run.path} names no model; pass --model NAME (e.g. smollm2-135m or a local HF folder)"
            if not full:
                raise SaekitError(f"{why} so absorption can run it")
            skipped["absorption"] = f"{why} to run it"
            analyses = tuple(a for a in analyses if a != "absorption")
        else:
            with Phases("analyze", quiet) as say:
                say.step(f"loading {name}")
                lm = load_model(name)
            check_hookpoints(lm, hooks)
    say = (lambda *a: None) if quiet else print
    results: dict = {"run": str(run.path), "wall_time_s": {}, "skipped": skipped}
    saebench = {}  # hookpoint -> SAEBench's protocol's absorption in sae-bench's output schema
    for h in hooks:
        sae = run.sae(h)
        results[h], results["wall_time_s"][h] = {}, {}
        for name in analyses:
            if name == "absorption" and run.crosscoder:
                say(f"{h}: absorption probes one hookpoint's SAE; skipped for this crosscoder/transcoder")
                continue
            with Phases(h, quiet) as phase:  # absorption adds a bar and lines of its own
                phase.step(name)
                t0 = time.perf_counter()
                res = _analyse(name, run, h, sae, acts[h], lm, tokens, quiet, n_words=words,
                               f1_threshold=f1_threshold, min_letters=min_letters, protocol=protocol)
            results[h][name] = res if isinstance(res, dict) else res.to_dict()
            results["wall_time_s"][h][name] = round(time.perf_counter() - t0, 2)
            if name == "absorption" and protocol == "saebench":
                saebench[h] = saebench_output(res, sae, model or run.model_name)
        if against is not None:
            with Phases(h, quiet) as phase:
                phase.step(f"stability against {against}")
                t0 = time.perf_counter()
                results[h]["stability"] = {"against": str(against),
                                           **run_stability(run, against, h, activations, tokens).to_dict()}
            results["wall_time_s"][h]["stability"] = round(time.perf_counter() - t0, 2)
    out = run.analysis_dir
    name = "report" if full else "_".join(analyses)
    with run.writing_analysis():
        run.write_json(f"analysis/{name}.json", results)
        for h, out in saebench.items():  # named as sae-bench names its result files
            run.write_json(f"analysis/saebench/saekit_{h}_eval_results.json", out)
        md = markdown(results, plots(results, out) if name == "report" else None)
        if name == "report":
            atomic_write(out / "report.md", lambda p: p.write_text(md))
    print(md)
    return results


def markdown(results: dict, plot_note: list[str] | None = None) -> str:
    """The report: headline tables per hookpoint, the per-letter table, wall times, plots."""
    lines = [f"# saekit analysis of `{results['run']}`", ""]
    for h, res in results.items():
        if h in RESULT_KEYS:
            continue
        lines += [f"## {h}", ""]
        if d := res.get("dead"):
            lines += ["### Dead and dense latents", "", md_table([{
                "tokens": d["n_tokens"], "latents": d["n_latents"], "dead": d["n_dead"],
                "dead share": d["dead_fraction"], "dense share (> 0.1)": d["dense_fraction"],
                "share > 0.01": d["dense_fraction_1pct"], "dead at init": d["dead_at_init"],
                "died in training": d["died_in_training"], "dead by training rule": d["dead_by_training_rule"]}]), ""]
        if c := res.get("collapse"):
            lines += ["### Collapse", "", md_table([{
                "effective rank": c["effective_rank"], "d_in": c["d_in"], "ratio": c["effective_rank_ratio"],
                "participation ratio": c["participation_ratio"], "mean max dec cos": c["mean_max_decoder_cos"],
                "mean max enc cos": c["mean_max_encoder_cos"], f"pairs cos > {c['tau']}": len(c["duplicate_pairs"]),
                "share in pairs": c["duplicate_fraction"]}]), ""]
            if c["n_tokens"] is not None:
                lines += [md_table([{
                    "tokens": c["n_tokens"], "code eff. rank": c["code_effective_rank"],
                    "over live latents": c["code_latents"], "ratio": c["code_effective_rank_ratio"],
                    "input dims 90 %": c["input_dims_90"], "input dims 99 %": c["input_dims_99"],
                    "share 99 %": c["input_share_99"]}]), ""]
            lines += ["Collapse rate, each part named: "
                      + (f"dead share {figure('dead', res['dead']['dead_fraction'])}, " if "dead" in res else "")
                      + f"near-duplicate share {figure('share', c['duplicate_fraction'])}, "
                      f"effective-rank ratio {c['effective_rank_ratio']:.4g}.", ""]
        if a := res.get("absorption"):
            lines += ["### Absorption (first letter)", "",
                      f"Mean absorption fraction **{a['mean_absorption_fraction']:.4g}**, full-absorption rate "
                      f"**{a['mean_full_absorption']:.4g}**, over {a['n_letters']} letters with probe F1 >= "
                      f"{a['f1_threshold']} "
                      f"({a['n_words']} words, {a['protocol']} protocol).", "",
                      md_table([{**r, "main_latents": ", ".join(map(str, r["main_latents"])),
                                "absorbing (top 5)": ", ".join(map(str, a["absorbing_latents"][r["letter"]][:5]))}
                               for r in a["table"]]), ""]
        if g := res.get("geometry"):
            lines += _geometry_markdown(g)
        if st := res.get("stability"):
            lines += stability_markdown(st["against"], st)
    skipped = [f"Skipped {a}: {why}." for a, why in results.get("skipped", {}).items()]
    lines += skipped + ([""] if skipped else [])
    lines += ["## Wall time (s)", "", md_table([{"hookpoint": h, **t} for h, t in results["wall_time_s"].items()]), ""]
    if plot_note:
        lines += ["## Plots", "", *plot_note, ""]
    return "\n".join(lines)


def _geometry_markdown(g: dict) -> list[str]:
    gal = g["galaxy"]
    lo, hi = gal["power_law_ci"]
    clo, chi = gal["clustering_ci"]
    lines = ["### Feature geometry", "", md_table([{
        "alpha": gal["power_law_alpha"], "95 % CI": f"{lo:.4g} .. {hi:.4g}",
        "ranks": f"{gal['rank_window'][0]}-{gal['rank_window'][1]}", "R^2": gal["power_law_r2"],
        "alpha (shrunk eigenvalues)": gal["power_law_alpha_shrunk"], "clustering (nats)": gal["clustering"],
        "clustering 95 % CI": f"{clo:.4g} .. {chi:.4g}", "rows x dims": f"{gal['clustering_rows']} x "
        f"{gal['clustering_dims']}"}]), ""]
    if lb := g.get("lobes"):
        z = "n/a" if lb["z_score"] is None else f"{lb['z_score']:.3g}"
        lines += [f"Lobes: {lb['n_lobes']} co-occurrence lobes over {lb['n_chunks']} chunks of {lb['chunk']} tokens "
                  f"({lb['n_fired']} latents fired, {lb['n_clustered']} clustered); AMI with the geometric lobes "
                  f"**{lb['ami']:.3g}** (shuffled null {lb['null_mean']:.3g} +- {lb['null_std']:.3g}, z = {z}); "
                  f"sizes {lb['lobe_sizes']} vs geometric {lb['geometric_lobe_sizes']}.", ""]
    if g.get("multidim"):
        lines += ["Multi-dimensional features (best first):", "", md_table([{
            "latents": ", ".join(map(str, r["latents"][:8])) + (" ..." if len(r["latents"]) > 8 else ""),
            "size": r["size"], "tokens": r["n_tokens"], "PCs": f"{r['pcs'][0] + 1}-{r['pcs'][1] + 1}",
            "mixture index": r["mixture_index"], "separability (nats)": r["separability_index"],
            "score": r["score"]} for r in g["multidim"][:5]]), ""]
    if g.get("crystals"):
        lines += ["Crystals, a - b ~ c - d (best first):", "", md_table([{
            k: r[k] for k in ("a", "b", "c", "d", "cos", "length_ratio", "kind", "score")} for r in g["crystals"][:5]]),
            ""]
    lines += [f"Note: {n}." for n in g.get("notes", [])] + ([""] if g.get("notes") else [])
    return lines


def plots(results: dict, out: Path) -> list[str]:
    """PNG plots next to the report; returns the markdown lines that show them (or a note)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["Plots skipped: matplotlib is not installed (`pip install 'saekit[plots]'`)."]
    lines = []
    for h, res in results.items():
        if h in RESULT_KEYS:
            continue
        stem = h.replace("/", "_")
        figs = []
        if d := res.get("dead"):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            e = d["hist_edges"]
            ax.stairs(d["hist_counts"], e, fill=True)
            ax.set(xlabel="log10 density", ylabel="latents", title=f"{h}: {d['n_dead']} dead of {d['n_latents']}")
            figs.append(("density", fig))
        if c := res.get("collapse"):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.semilogy(c["singular_values"])
            ax.set(xlabel="index", ylabel="singular value of W_dec",
                   title=f"{h}: effective rank {c['effective_rank']:.0f} / {c['d_in']}")
            figs.append(("spectrum", fig))
        if a := res.get("absorption"):
            fig, ax = plt.subplots(figsize=(7, 3.5))
            t = a["table"]
            x = range(len(t))
            ax.bar([i - 0.2 for i in x], [r["absorption_fraction"] for r in t], 0.4, label="absorption fraction")
            ax.bar([i + 0.2 for i in x], [r["full_absorption"] for r in t], 0.4, label="full absorption")
            ax.set_xticks(list(x), [r["letter"] for r in t])
            ax.set(ylabel="rate", title=f"{h}: absorption per letter")
            ax.legend()
            figs.append(("absorption", fig))
        if g := res.get("geometry"):
            figs += _geometry_plots(plt, h, g)
        for kind, fig in figs:
            file = f"{stem}_{kind}.png"
            fig.tight_layout()
            atomic_write(out / file, lambda p: fig.savefig(p, dpi=110, format="png"))  # noqa: B023
            plt.close(fig)
            lines.append(f"![{kind}]({file})")
    return lines


def _geometry_plots(plt, h: str, g: dict) -> list:
    """Eigenvalue spectrum with its power-law fit, the lobe map, the best multi-dim features."""
    import numpy as np

    figs = []
    gal = g["galaxy"]
    lam = np.asarray(gal["eigenvalues"])
    r = np.arange(1, len(lam) + 1)
    lo, hi = gal["rank_window"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.loglog(r[lam > 0], lam[lam > 0], ".", ms=3, label="eigenvalues of cov(W_dec rows)")
    fr = np.arange(lo, hi + 1)
    ax.loglog(fr, 10 ** (gal["power_law_intercept"] - gal["power_law_alpha"] * np.log10(fr)), "r-",
              label=f"fit, alpha = {gal['power_law_alpha']:.3f}")
    ax.axvspan(lo, hi, color="0.9", zorder=0)
    ax.set(xlabel="rank", ylabel="eigenvalue", title=f"{h}: decoder spectrum")
    ax.legend(fontsize=8)
    figs.append(("geometry_spectrum", fig))
    if (lm := g.get("lobe_map")) and lm["x"]:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        sc = ax.scatter(lm["x"], lm["y"], c=lm["lobe"], s=4, cmap="tab10")
        ax.legend(*sc.legend_elements(), title="lobe", fontsize=8)
        lb = g["lobes"]
        ax.set(xlabel="PC 1 of unit decoder rows", ylabel="PC 2",
               title=f"{h}\nco-occurrence lobes, AMI with geometry {lb['ami']:.3f}")
        figs.append(("lobes", fig))
    if cp := g.get("cluster_points"):
        fig, axes = plt.subplots(1, len(cp), figsize=(max(3.6 * len(cp), 4.5), 3.8), squeeze=False)
        for ax, c, row in zip(axes[0], cp, g["multidim"], strict=False):
            ax.scatter(c["x"], c["y"], s=3, alpha=0.5)
            ids = ", ".join(map(str, c["latents"][:4])) + (", ..." if len(c["latents"]) > 4 else "")
            p, q = (i + 1 for i in row["pcs"])
            ax.set(title=f"latents {ids}\n({len(c['latents'])} latents, score {row['score']:.2f})", xlabel=f"PC {p}",
                   ylabel=f"PC {q}")
            ax.title.set_fontsize(9)
        fig.suptitle(f"{h}\nmulti-dimensional features: each cluster's reconstructions", fontsize=9)
        figs.append(("multidim", fig))
    return figs
