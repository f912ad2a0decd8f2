"""Training-budget study: does the default hookpoint's dictionary converge as training grows?

    nice -n 15 python analysis/budget_study.py [--seeds 2] [--points e3,e6,...] [--until 18:30]
                                               [--reuse /work/main/runs/default runs/seed1]
    python analysis/budget_study.py --plot-only      # redraw budget.png from budget.json (no runs needed)

For each point (overrides of configs/default.yaml: more epochs over the same cached 350k tokens,
or a lever: data-initialised decoder rows, a higher learning rate) and each seed, `saekit train`
writes runs/budget/<point>_s<seed>/. Then, per point: held-out FVU and dead fraction (the run's
eval.json), seed stability between every pair of its seeds (`saekit.analyze.stability`: shares
of latents at matched decoder cosine >= 0.7 and >= 0.9, mean matched cosine, co-firing), the
mean cosine of each decoder row with its own initial direction (the trainer's initialisation,
rebuilt from the run's config and cache), first-letter absorption (as in recipes_study.py) and
the decoder covariance power law alpha (`saekit.analyze.geometry`).

Resumable: a finished run (eval.json) is skipped, a killed one continues from its last
checkpoint (`saekit train --resume`); a point none of whose runs is on this machine keeps its row
from the previous budget.json (marked carried), so a study can go on across machines.
`--until HH:MM` (UTC) starts no run after that time and stops a running one there (it resumes
next time). `--reuse RUN ...`: finished runs elsewhere
whose training config equals a point's (e.g. the main job's runs/default is e3, seed 0). Runs
go in the order: every point's seeds 0 and 1, then every point's further seeds. Writes
analysis/results/budget.{md,json,png} after every run, with the command, each run's wall time,
and which points have not run yet.
"""

import argparse
import datetime as dt
import itertools
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from recipes_study import measure

from saekit.analyze.absorption import first_letter_data
from saekit.analyze.geometry import geometry
from saekit.analyze.stability import run_stability, stability
from saekit.config import load_config
from saekit.io import atomic_write, md_table
from saekit.model import load_model
from saekit.pipeline import init_sample
from saekit.run import RESUMABLE_CHANGES, Run
from saekit.trainer import Trainer

CONFIG = "configs/default.yaml"
ROOT = Path("runs/budget")
# name -> (overrides of CONFIG, what it measures); trained in this order (cheap levers early)
POINTS = {
    "e3": ({"epochs": 3}, "today's default budget (255 steps)"),
    "e3-data-init": ({"epochs": 3, "init": "data"}, "decoder rows start on centred activation samples"),
    "e6": ({"epochs": 6}, "2x the steps over the same tokens"),
    "e3-lr6e-3": ({"epochs": 3, "lr": 6e-3}, "3x the default config's learning rate"),
    "e12": ({"epochs": 12}, "4x the steps"),
    "e24": ({"epochs": 24}, "8x the steps"),
    "e12-lr6e-3": ({"epochs": 12, "lr": 6e-3}, "4x the steps at 3x the learning rate"),
    "e6-data-init": ({"epochs": 6, "init": "data"}, "data init at 2x the steps"),
    "e12-lr6e-3-x8": ({"epochs": 12, "lr": 6e-3, "expansion": 8}, "the 3x-lr budget at half the width"),
    "e12-lr6e-3-x4": ({"epochs": 12, "lr": 6e-3, "expansion": 4}, "the 3x-lr budget at a quarter of the width"),
}
STABILITY_TOKENS = 16_384  # held-out tokens for the co-firing of matched pairs


def config(point: str, seed: int):
    return load_config(CONFIG, [f"--{k}={v}" for k, v in {**POINTS[point][0], "seed": seed,
                                                          "out": str(ROOT / f"{point}_s{seed}")}.items()])


def _training(cfg) -> dict:
    """The keys of a config that change what is trained."""
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}


def find_run(point: str, seed: int, reuse: list[Path]) -> Path | None:
    """A finished run of this point and seed: its own folder, or one of `reuse` with the same config."""
    cfg = config(point, seed)
    for path in [Path(cfg.out), *reuse]:
        if (path / "eval.json").is_file() and _training(Run.open(path).config) == _training(cfg):
            return path
    return None


def train(point: str, seed: int, deadline: float | None) -> None:
    """Train (or resume) one run until it finishes or `deadline` (then it resumes on the next
    call); adds this invocation's wall seconds to RUN/budget_wall.json."""
    cfg = config(point, seed)
    out = Path(cfg.out)
    resume = (out / "config.json").is_file()
    cmd = [sys.executable, "-m", "saekit.cli", "train", CONFIG, *(f"--{k}={v}" for k, v in POINTS[point][0].items()),
           f"--seed={seed}", f"--out={out}", "--quiet", *(["--resume"] if resume else [])]
    print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    # SIGINT stops saekit cleanly at --until; a shell starts background jobs with it ignored, so restore it
    proc = subprocess.Popen(cmd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.wait(timeout=None if deadline is None else max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # saekit stops cleanly; the last checkpoint stays
        proc.wait()
    wall = time.time() - t0
    log = out / "budget_wall.json"  # wall seconds of every invocation on this run
    if out.is_dir():  # not when it stopped before the run folder was made (while harvesting)
        spent = json.loads(log.read_text()) if log.is_file() else []
        atomic_write(log, lambda p: p.write_text(json.dumps(spent + [round(wall, 1)])))
    if proc.returncode not in (0, 130, -signal.SIGINT):
        raise SystemExit(f"training {out} failed with exit code {proc.returncode}")


def initial_sae(path: Path):
    """The SAE a run started from (the trainer's initialisation, rebuilt from the run's config and cache)."""
    run = Run.open(path)
    h = run.hookpoint()
    cache = run.cache("train")
    return Trainer(run.config, {h: cache.dim(h)}, init_sample(cache, [h], run.config), None,
                   torch.device("cpu")).saes[h]


def init_cosine(point: str, seed: int, path: Path) -> dict:
    """Mean cosine of each final decoder row with its initial direction (cached under runs/budget/,
    so a reused run elsewhere is only read)."""
    file = ROOT / f"init_cosine_{point}_s{seed}.json"
    if file.is_file():
        return json.loads(file.read_text())
    start = initial_sae(path).W_dec.detach()
    end = Run.open(path).sae().W_dec.detach()
    cos = torch.nn.functional.cosine_similarity(end.float(), start.float(), dim=1)
    res = {"mean": float(cos.mean()), "above_0.5": float((cos > 0.5).double().mean())}
    ROOT.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda p: p.write_text(json.dumps(res)))
    return res


def start_shared(point: str, a: tuple[int, Path], b: tuple[int, Path]) -> float:
    """Share of latents two seeds' starting dictionaries already have in common at decoder cosine >= 0.7
    (cached): the floor under their final shared fraction when rows start on data samples."""
    file = ROOT / f"start_shared_{point}_s{a[0]}_s{b[0]}.json"
    if not file.is_file():
        res = stability(initial_sae(a[1]), initial_sae(b[1])).to_dict()["shared_0.7"]
        ROOT.mkdir(parents=True, exist_ok=True)
        atomic_write(file, lambda p: p.write_text(json.dumps(res)))
    return json.loads(file.read_text())


def features(point: str, seed: int, path: Path, data: dict) -> dict:
    """First-letter absorption and the decoder's power-law alpha of one run (cached under runs/budget/;
    the first-letter data, which needs the model, is built once, on first need, into `data`)."""
    file = ROOT / f"features_{point}_s{seed}.json"
    if file.is_file():
        return json.loads(file.read_text())
    run = Run.open(path)
    if "letters" not in data:
        data["letters"] = first_letter_data(load_model(run.model_name), run.hookpoint())
    g = geometry(run.sae(run.hookpoint()))
    res = {"absorption": measure(path, data["letters"])["absorption"], "alpha": g.power_law_alpha,
           "alpha_shrunk": g.power_law_alpha_shrunk}
    ROOT.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda p: p.write_text(json.dumps(res)))
    return res


def pair_stability(point: str, a: tuple[int, Path], b: tuple[int, Path]) -> dict:
    """Stability of seeds a and b of a point (cached under runs/budget/)."""
    file = ROOT / f"stability_{point}_s{a[0]}_s{b[0]}.json"
    if file.is_file():
        return json.loads(file.read_text())
    res = run_stability(a[1], b[1], max_tokens=STABILITY_TOKENS).to_dict()
    ROOT.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda p: p.write_text(json.dumps(res)))
    return res


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def report(seeds: int, reuse: list[Path], command: str, started: float, out: Path) -> None:
    rows, missing, data = [], [], {}
    last = out.with_suffix(".json")
    previous = {r["point"]: r for r in json.loads(last.read_text())["rows"]} if last.is_file() else {}
    for point, (over, what) in POINTS.items():
        runs = {s: find_run(point, s, reuse) for s in range(seeds)}
        done = {s: p for s, p in runs.items() if p is not None}
        if not done and point in previous:  # measured by an earlier invocation whose runs are not here
            rows.append({**previous[point], "carried": True})
            missing += [f"{point} seed {s}" for s in range(previous[point]["seeds"], seeds)]
            continue
        missing += [f"{point} seed {s}" for s in runs if s not in done]
        if not done:
            continue
        evals = [json.loads((p / "eval.json").read_text()) for p in done.values()]
        evals = [next(iter(e.values())) for e in evals]
        steps = [json.loads((p / "metrics.jsonl").read_text().splitlines()[-1])["step"] for p in done.values()]
        inits = [init_cosine(point, s, p) for s, p in done.items()]
        feats = [features(point, s, p, data) for s, p in done.items()]
        stab = [pair_stability(point, a, b) for a, b in itertools.combinations(sorted(done.items()), 2)]
        rows.append({
            "point": point, "what": what, "epochs": over["epochs"], "steps": max(steps), "seeds": len(done),
            "fvu": _mean([e["fvu"] for e in evals]), "dead": _mean([e["dead_fraction"] for e in evals]),
            "loss_recovered": _mean([e.get("loss_recovered") for e in evals]),
            "init_cos": _mean([i["mean"] for i in inits]), "init_cos>0.5": _mean([i["above_0.5"] for i in inits]),
            "seed_pairs": len(stab), "shared_0.7": _mean([s["shared_0.7"] for s in stab]),
            "shared_0.9": _mean([s["shared_0.9"] for s in stab]),
            "matched_cos": _mean([s["decoder"]["mean"] for s in stab]),
            "enc_shared_0.7": _mean([s["encoder"]["shared_0.7"] for s in stab]),
            "both_0.7": _mean([s["shared_both_0.7"] for s in stab]),
            "both_0.9": _mean([s["shared_both_0.9"] for s in stab]),
            "null_both_0.7": _mean([s["null"]["shared_both_0.7"] for s in stab]),
            "null_cos": _mean([s["null"]["mean"] for s in stab]),
            "jaccard": _mean([s["cofiring"]["mean_jaccard"] for s in stab if s.get("cofiring")]),
            "start_shared_0.7": start_shared(point, *sorted(done.items())[:2])
            if over.get("init") == "data" and len(done) > 1 else None,
            "absorption": _mean([f["absorption"] for f in feats]),
            "absorption_range": [min(f["absorption"] for f in feats), max(f["absorption"] for f in feats)],
            "alpha": _mean([f["alpha"] for f in feats]), "alpha_shrunk": _mean([f["alpha_shrunk"] for f in feats]),
            "wall_s": [_logged_wall(p) for _, p in sorted(done.items())], "carried": False,
        })
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(
        {"command": command, "rows": rows, "not_run": missing}, indent=1)))
    plot = _plot(rows, out.with_suffix(".png"))
    show = ("point", "steps", "seeds", "fvu", "dead", "init_cos", "init_cos>0.5", "seed_pairs", "shared_0.7",
            "shared_0.9", "start_shared_0.7", "matched_cos", "enc_shared_0.7", "both_0.7", "both_0.9", "null_both_0.7",
            "null_cos", "jaccard", "absorption",
            "alpha", "wall_s", "carried")
    lines = ["# Training budget on the default hookpoint (SmolLM2-135M blocks.6.hook_resid_post, 9,216 latents)", "",
             f"Command: `{command}`; this invocation's wall time {time.time() - started:.0f} s "
             f"(2 shared cores; other jobs ran beside it, so wall times are upper bounds).", "",
             md_table([{k: r.get(k) for k in show} for r in rows]) if rows else "(no point has finished yet)", "",
             "Columns: held-out FVU and dead fraction (eval.json, mean over seeds); `init_cos` mean cosine of each "
             "final decoder row with its own initial direction (and the share above 0.5); stability over every pair "
             "of seeds (mean): shares of the smaller SAE's latents matched one-to-one at decoder cosine >= 0.7 / 0.9, "
             "`start_shared_0.7` the share >= 0.7 of seeds 0 and 1's starting dictionaries (data init only), "
             "the mean matched cosine, the encoder rows' share >= 0.7, `both_0.7` / `both_0.9` the share of latents "
             "alive in both seeds (on the held-out tokens) whose decoder-matched partner agrees on decoder and encoder "
             "row (a latent shared as a whole; of the smaller number of living latents) and `null_both_0.7` that "
             "share against a random dictionary, the mean matched cosine against a random unit dictionary (null), "
             "rows without `both_0.7` were measured before it existed; and the mean Jaccard co-firing of matched "
             "pairs on "
             f"{STABILITY_TOKENS:,} held-out tokens; `absorption` the mean first-letter absorption fraction "
             "(mean over seeds; json: range), `alpha` the decoder covariance power law; `wall_s` training + "
             "evaluation per seed (reused runs: as logged, or None); `carried` rows were measured by an earlier "
             "invocation whose runs are not on this machine, copied from the previous budget.json.", "",
             "Points: " + "; ".join(f"`{p}` {w} ({', '.join(f'{k} {v}' for k, v in o.items())})"
                                    for p, (o, w) in POINTS.items()) + ".", ""]
    if missing:
        lines += ["Not run yet: " + ", ".join(missing) + ". Rerun the command to continue (finished runs are "
                  "skipped, killed ones resume).", ""]
    if plot:
        lines += [f"![budget]({out.with_suffix('.png').name})", ""]
    atomic_write(out, lambda p: p.write_text("\n".join(lines)))


def _logged_wall(path: Path):
    log = path / "budget_wall.json"
    return round(sum(json.loads(log.read_text())), 1) if log.is_file() else None


def _plot(rows: list[dict], file: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = figure(rows)
    atomic_write(file, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return True


KINDS = (("", "o-", "C0", "epochs"), ("-data-init", "s--", "C1", "data init"), ("-lr6e-3", "^:", "C2", "lr 6e-3"))


def figure(rows: list[dict]):
    """The study's six panels against training steps: one colour and marker per kind of point in
    every panel (one legend above them), the seeds' min-max as bars where the results keep it
    (absorption), the other figures as means over the seeds."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.4))
    panels = (("fvu", "held-out FVU"), ("dead", "dead fraction"),
              ("shared_0.7", "seed-shared at cos >= 0.7 (faded: >= 0.9)"), ("init_cos", "cos(final row, initial row)"),
              ("absorption", "first-letter absorption (bars: seeds' min-max)"), ("alpha", "decoder power law alpha"))
    steps = sorted({r["steps"] for r in rows})
    for ax, (key, title) in zip(axes.flatten(), panels, strict=True):
        for kind, style, colour, name in KINDS:
            mine = sorted((r for r in rows if r[key] is not None and r["point"] == f"e{r['epochs']}{kind}"),
                          key=lambda r: r["steps"])
            if not mine:
                continue
            x, y = [r["steps"] for r in mine], [r[key] for r in mine]
            ax.plot(x, y, style, color=colour, label=name)
            if key == "absorption":
                lo, hi = zip(*(r["absorption_range"] for r in mine), strict=True)
                ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo, strict=True)],
                                        [b - a for a, b in zip(y, hi, strict=True)]],
                            fmt="none", ecolor=colour, capsize=3, lw=1)
            if key == "shared_0.7":
                p9 = [(r["steps"], r["shared_0.9"]) for r in mine if r["shared_0.9"] is not None]
                if p9:
                    ax.plot(*zip(*p9, strict=True), style, color=colour, alpha=0.35, label=f"_{name} 0.9")
        ax.set(xscale="log", xlabel="training steps (log)", title=title)
        ax.xaxis.set_major_locator(FixedLocator(steps))  # only the budgets run, written out: no crowded labels
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    seeds = sorted({r["seeds"] for r in rows})
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle(f"Budget study: means over {'-'.join(map(str, seeds))} seeds per point", y=0.99, fontsize=11)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.91))
    return fig


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2, help="seeds per point (stability needs 2; 3 gives 3 pairs)")
    ap.add_argument("--points", default=",".join(POINTS), help="comma-separated points to train, in this order")
    ap.add_argument("--until", default=None, help="HH:MM UTC: start nothing after it, stop a running run there")
    ap.add_argument("--reuse", nargs="*", default=[], help="finished runs to use for a point with the same config")
    ap.add_argument("--report-only", action="store_true", help="train nothing; rewrite the report")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON beside --out (no runs "
                                                             "needed)")
    ap.add_argument("--out", default="analysis/results/budget.md")
    args = ap.parse_args()
    points = args.points.split(",")
    if unknown := set(points) - set(POINTS):
        raise SystemExit(f"unknown points {sorted(unknown)}; known: {', '.join(POINTS)}")
    deadline = None
    if args.until:
        now = dt.datetime.now(dt.timezone.utc)
        h, m = map(int, args.until.split(":"))
        deadline = now.replace(hour=h, minute=m, second=0, microsecond=0).timestamp()
    if args.plot_only:
        _plot(json.loads(Path(args.out).with_suffix(".json").read_text())["rows"], Path(args.out).with_suffix(".png"))
        return
    command = "nice -n 15 python " + " ".join(sys.argv)
    started, reuse = time.time(), [Path(p) for p in args.reuse]
    order = [(p, s) for p in points for s in range(min(2, args.seeds))]
    order += [(p, s) for s in range(2, args.seeds) for p in points]
    for point, seed in [] if args.report_only else order:
        if find_run(point, seed, reuse) is not None:
            continue
        if deadline is not None and time.time() >= deadline:
            print(f"--until {args.until} reached: {point} seed {seed} and later runs are left for the next call")
            break
        train(point, seed, deadline)
        report(args.seeds, reuse, command, started, Path(args.out))
    report(args.seeds, reuse, command, started, Path(args.out))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
