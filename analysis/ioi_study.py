"""IOI study: SmolLM2-135M's indirect-object identification, where its attributes are linearly
present, and SAEs judged against supervised dictionaries there (Makelov, Lange & Nanda, ICLR
2025) in the paper's two settings: SAEs trained on the general corpus and one trained on the IOI
prompts' own activations. The general-corpus SAEs are every family's recipe in configs/ (the main
job's data, width, k and budget) moved to `--hookpoint`, the site the probes pick; the main job
itself (layer 6, where the answer position does not yet hold the names) is the `default` part.

    nice -n 15 python3 analysis/ioi_study.py [--parts figure,probes,default,ioi_sae,recipes]

Resumable by part: each finished part is kept in analysis/results/ioi.json and skipped on a
rerun (parts may also run in separate processes); analysis/results/ioi.md is rewritten from it
after every part (command and wall times).
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from saekit import Run, fit
from saekit.analyze import ioi
from saekit.analyze.task import markdown, task_eval
from saekit.config import load_config
from saekit.io import atomic_write, md_table
from saekit.model import load_model
from saekit.pipeline import train

OUT = Path(__file__).parent / "results"
PARTS = ("figure", "probes", "default", "ioi_sae", "recipes")
RECIPES = ("default", "batchtopk", "ortsae", "matryoshka", "jumprelu", "mp")  # configs/<name>.yaml
LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29)


def figure(lm, n: int) -> dict:
    """The model's IOI figure on train-name and held-out-name prompts, and per template."""
    tr, te = ioi.ioi_prompts(lm.tokenizer, n, seed=10), ioi.ioi_prompts(lm.tokenizer, n // 2, seed=11, split="test")
    ft, fe = ioi.task_figure(lm, tr), ioi.task_figure(lm, te)
    ld = pd.DataFrame({"template": tr.labels.template, "order": tr.labels.order, "ld": ft.pop("per_prompt")})
    fe.pop("per_prompt")
    per = ld.groupby(["template"]).ld.agg(["size", "mean", lambda v: float((v > 0).mean())]).reset_index()
    per.columns = ["template", "prompts", "logit_diff", "accuracy"]
    per["text"] = [ioi.TEMPLATES[t] for t in per.template]
    by_order = ld.groupby("order").ld.agg(["size", "mean", lambda v: float((v > 0).mean())]).reset_index()
    by_order.columns = ["order", "prompts", "logit_diff", "accuracy"]
    return {"train_names": ft, "test_names": fe, "per_template": per.to_dict("records"),
            "per_order": by_order.to_dict("records")}


def probes(lm, n: int) -> list[dict]:
    """Held-out probe accuracy per attribute, layer (residual stream) and position."""
    p = ioi.ioi_prompts(lm.tokenizer, n, seed=20)
    acts = ioi.site_acts(lm, p, [f"blocks.{k}.hook_resid_post" for k in LAYERS], ("end", "s2", "io"))
    return ioi.probe_table(acts, p.labels).to_dict("records")


def ioi_sae(lm, hookpoint: str, n_prompts: int, n_latents: int, k: int):
    """An SAE trained on the activations at every (non-BOS) position of IOI prompts (the paper's
    task-specific setting), with prompts drawn apart from task_eval's (another seed)."""
    p = ioi.ioi_prompts(lm.tokenizer, n_prompts, seed=30)
    mask = torch.arange(p.tokens.shape[1])[None] <= p.where["end"][:, None]
    mask[:, 0] = False  # BOS
    from saekit.model import harvest

    acts = torch.cat([b[hookpoint] for b in harvest(lm, p.tokens, mask, [hookpoint], batch_size=32)])
    sae = fit(acts, n_latents, k, seed=0, epochs=20, batch_size=512, lr=2e-3)
    sae.cfg.hookpoint, sae.cfg.model = hookpoint, "smollm2-135m"
    return sae, len(acts)


def recipe_run(name: str, hookpoint: str, root: Path) -> Run:
    """configs/<name>.yaml trained at `hookpoint` (or read back, or finished after a kill)."""
    out = root / name
    if not (out / "eval.json").is_file():
        cfg = load_config(f"configs/{name}.yaml", ["--hookpoints", f"[{hookpoint}]", "--out", str(out)])
        train(cfg, resume=(out / "state.safetensors").is_file(), quiet=True)
    return Run.open(out)


def recipe_row(name: str, ev: dict) -> dict:
    """One line per recipe: the SAE's approximation, control and interpretability in brief."""
    (r,) = ev["hookpoints"].values()
    sae = next(a for a in r["approximation"] if a["dictionary"] == "sae")
    sup = next(a for a in r["approximation"] if a["dictionary"] == "supervised")
    row = {"recipe": name, "recovered": sae["recovered"], "KL": sae["kl"], "supervised recovered": sup["recovered"]}
    for edit, c in r["control"].items():
        nan = float("nan")
        row[f"control {edit}"] = f"{c.get('sae_success', nan):.2f} ({c.get('sae_median_edits', nan):g})"
    attrs = r["attributes"] or []
    row["values tracked"] = " / ".join(f"{a['attribute']} {a['tracked']:.2f}" for a in attrs)
    row["over-split"] = " / ".join(f"{a['attribute']} {a['over_split']:.2f}" for a in attrs)
    row["occluded"] = ", ".join(a["attribute"] for a in attrs if a["occluded"]) or "none"
    row["eval s"] = round(ev["wall_time_s"])
    return row


def write_md(res: dict, argv: list[str]) -> None:
    lines = ["# IOI on SmolLM2-135M: the task, where its attributes live, and SAEs against supervised dictionaries", "",
             f"Command: `{' '.join(['nice -n 15 python3 analysis/ioi_study.py', *map(shlex.quote, argv)])}` (parts "
             "may run in separate processes; 2-core CPU shared with other jobs; wall times per part below). One seed "
             "per dictionary (no seed spread); control shares are over each edit's valid pairs, without an "
             "interval.", ""]
    if f := res.get("figure"):
        lines += ["## The model's task figure", "", md_table([{"names": k, **{c: v for c, v in f[k].items()}}
                                                              for k in ("train_names", "test_names")]), "",
                  "Per template (train names):", "", md_table(f["per_template"]), "",
                  "Per order:", "", md_table(f["per_order"]), ""]
    if p := res.get("probes"):
        lines += ["## Linear probes (held-out accuracy; logistic regression on 75 % of the prompts)", "",
                  md_table(p), ""]
    for part, title in (("default", "SAE trained on the general corpus (the default run)"),
                        ("ioi_sae", "SAE trained on IOI prompts' activations")):
        if r := res.get(part):
            md = markdown(r["eval"]).replace("# Task evaluation", "### Task evaluation").replace("\n## ", "\n#### ")
            lines += [f"## {title}", "", *(f"{k}: {v}" for k, v in r.get("info", {}).items()), "", md, ""]
    if r := {k[7:]: v for k, v in res.items() if k.startswith("recipe:")}:
        (h,) = next(iter(r.values()))["hookpoints"]
        lines += [f"## Every family on the general corpus at {h} (configs/<recipe>.yaml: 350k tokens × 3 epochs, "
                  "9,216 latents, k 32)", "", "recovered: share of the clean − mean-ablation logit-difference gap kept "
                  "when the activation is replaced by the SAE's reconstruction (supervised: by the supervised "
                  "dictionary's); "
                  "control EDIT: success rate of the greedy latent edit (median latents edited); values tracked / "
                  "over-split: share of each attribute's values with one latent of precision and recall above the "
                  "thresholds / split over several.", "",
                  md_table([recipe_row(name, ev) for name, ev in r.items()]), ""]
    cpu = res.get("cpu_time_s", {})
    lines += ["## Time (s; CPU = this process's CPU time over all threads, not recorded for the first parts)", "",
              md_table([{"part": k, "wall": v, "CPU": cpu.get(k, "")} for k, v in res["wall_time_s"].items()]), ""]
    atomic_write(OUT / "ioi.md", lambda p: p.write_text("\n".join(lines)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/default")
    ap.add_argument("--hookpoint", default="blocks.24.hook_resid_post", help="site of the ioi_sae and recipes parts")
    ap.add_argument("--recipes", default="runs/ioi", help="where the recipes part trains its runs")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--position", default="end")
    ap.add_argument("--figure-prompts", type=int, default=192)
    ap.add_argument("--probe-prompts", type=int, default=256)
    ap.add_argument("--sae-prompts", type=int, default=512, help="IOI prompts the task SAE trains on")
    ap.add_argument("--eval-prompts", type=int, default=48, help="task_eval: held-out prompts")
    ap.add_argument("--pairs", type=int, default=12, help="task_eval: counterfactual pairs per edit")
    args = ap.parse_args()
    file = OUT / "ioi.json"
    res = json.loads(file.read_text()) if file.exists() else {"wall_time_s": {}}
    lm = load_model()
    torch.manual_seed(0)
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--parts" and sys.argv[i] != "--parts"]
    parts = args.parts.split(",")
    if "recipes" in parts:  # one part per recipe
        i = parts.index("recipes")
        parts[i : i + 1] = [f"recipe:{r}" for r in RECIPES]
    for part in parts:
        if part in res:
            print(f"{part}: done before, skipped")
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        if part == "figure":
            res[part] = figure(lm, args.figure_prompts)
        elif part == "probes":
            res[part] = probes(lm, args.probe_prompts)
        elif part == "default":
            run = Run.open(args.run)
            ev = task_eval(run, model=lm, position=args.position, n_eval=args.eval_prompts, n_pairs=args.pairs,
                           progress=True)
            res[part] = {"info": {"run": str(run.path), "hookpoints": ", ".join(run.hookpoints)}, "eval": ev.to_dict()}
        elif part == "ioi_sae":
            h = args.hookpoint
            sae, n_tok = ioi_sae(lm, h, args.sae_prompts, 2304, 16)
            ev = task_eval(sae, model=lm, position=args.position, n_eval=args.eval_prompts, n_pairs=args.pairs,
                           progress=True)
            res[part] = {"info": {"trained on": f"{n_tok} tokens of {args.sae_prompts} IOI prompts ({h})",
                                  "SAE": "TopK, 2,304 latents, k 16, 20 epochs, batch 512"}, "eval": ev.to_dict()}
        elif part.startswith("recipe:"):
            run = recipe_run(part[7:], args.hookpoint, Path(args.recipes))
            ev = task_eval(run, model=lm, position=args.position, n_eval=args.eval_prompts, n_pairs=args.pairs,
                           progress=True)
            res[part] = ev.to_dict()
        else:
            sys.exit(f"unknown part {part!r}; parts: {', '.join(PARTS)}")
        wall, cpu = round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1)
        if file.exists():  # parts may run in separate processes: keep what the others wrote
            res = {**json.loads(file.read_text()), part: res[part]}
        res["wall_time_s"][part] = wall
        res.setdefault("cpu_time_s", {})[part] = cpu
        atomic_write(file, lambda p: p.write_text(json.dumps(res, indent=1)))  # noqa: B023
        write_md(res, argv)
        print(f"{part}: {res['wall_time_s'][part]:.0f} s")
    write_md(res, argv)


if __name__ == "__main__":
    main()
