"""Recipe study: every dictionary family on the same cached SmolLM2 activations (the main job's
layer-6 residual stream, data, width, k and budget), over several seeds, with first-letter
absorption (Chanin et al. 2024) and seed stability per recipe.

    nice -n 15 python3 analysis/recipes_study.py [--seeds 0,1,2] [--recipes TopK,MP,...] [--stability TopK]
        [--hookpoint blocks.6.hook_attn_out]

Each (recipe, seed) is one `saekit train` run under runs/recipes/<recipe>/s<seed> with the
config of configs/default.yaml plus the recipe's keys (the seed sets initialisation and batch
order; every run reads the same activation cache). `--hookpoint` trains the same recipes on another
hookpoint of the model (runs under runs/recipes_<hookpoint>/, results in
analysis/results/recipes_<hookpoint>.{md,json}). Resumable: finished runs are read back,
killed ones resume, and each run's absorption is stored next to it (absorption.json). Writes
analysis/results/recipes.{md,json} after every run. Step costs are not timed here: side by side
timings of the families are in benchmarks/RESULTS.md (bench_dictionary.py, bench_mp.py).
"""

import argparse
import itertools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from saekit import Run
from saekit.analyze.absorption import absorption_from_data, first_letter_data
from saekit.analyze.stability import stability
from saekit.config import load_config
from saekit.errors import SaekitError
from saekit.io import atomic_write, md_table
from saekit.linalg import effective_dimension
from saekit.model import load_model
from saekit.ortho import max_cosine
from saekit.pipeline import train

OUT = Path(__file__).parent / "results"
RECIPES = {  # name -> config keys on top of configs/default.yaml
    "TopK": {},
    "BatchTopK": {"architecture": "batchtopk"},
    "OrtSAE": {"architecture": "batchtopk", "ortho_penalty": 0.25, "ortho_every": 5},
    "TopK + subspace init": {"init": "subspace"},
    "Matryoshka": {"architecture": "matryoshka", "matryoshka_groups": [0.0625, 0.125, 0.25, 0.5, 1.0]},
    "JumpReLU": {"architecture": "jumprelu", "l0_coeff": 1e-3},
    "MP": {"architecture": "mp"},
}


def slug(name: str) -> str:
    return name.lower().replace(" + ", "-").replace(" ", "-")


def run_one(name: str, seed: int, root: Path, hookpoint: str) -> Path:
    """Train (or finish, or read back) one recipe at one seed."""
    out = root / slug(name) / f"s{seed}"
    if (out / "eval.json").is_file():
        return out
    keys = {**RECIPES[name], "hookpoints": [hookpoint]}
    overrides = [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in keys.items()]
    cfg = load_config("configs/default.yaml", [*overrides, "--seed", str(seed), "--out", str(out)])
    return train(cfg, resume=(out / "state.safetensors").is_file(), quiet=True)


def measure(out: Path, data) -> dict:
    """Held-out figures from the run's eval, decoder geometry, and first-letter absorption."""
    run = Run.open(out)
    h = run.hookpoints[0]
    sae, ev = run.sae(h), json.loads((out / "eval.json").read_text())[h]
    file = out / "absorption.json"
    if not file.is_file():
        try:
            res = absorption_from_data(sae, data)
            ab = {"mean_absorption_fraction": res.mean_absorption_fraction,
                  "mean_full_absorption": res.mean_full_absorption, "n_letters": res.n_letters}
        except SaekitError as e:  # too few letters' probes pass at this hookpoint: not measurable here
            ab = {"mean_absorption_fraction": None, "mean_full_absorption": None, "n_letters": 0, "why": str(e)}
        atomic_write(file, lambda p: p.write_text(json.dumps(ab)))  # noqa: B023
    ab = json.loads(file.read_text())
    return {"fvu": ev["fvu"], "l0": ev["l0"], "dead": ev["dead_fraction"],
            "max_cos": float(max_cosine(sae.W_dec)[0].mean()),
            "eff_rank": effective_dimension(sae.W_dec, center=False)["effective_rank"],
            "absorption": ab["mean_absorption_fraction"], "full_absorption": ab["mean_full_absorption"],
            "letters": ab["n_letters"], **({"why": ab["why"]} if "why" in ab else {})}


def spread(vals: list[float | None], digits: int = 4) -> str:
    """Mean and range over seeds, e.g. '0.0773 (0.0770–0.0776)'; '–' where a seed has no value."""
    if None in vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ({min(vals):.{digits}f}–{max(vals):.{digits}f})"


def train_seconds(out: Path) -> float:
    """A run's training time from its last log line (tokens over the logged mean rate)."""
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return last["tokens"] / last["tokens_per_s"]


def write(res: dict, argv: list[str], hookpoint: str, root: Path, stem: str) -> None:
    rows = []
    for name in RECIPES:
        per = [res["runs"][k] for k in sorted(res["runs"]) if k.startswith(f"{name}|")]
        if not per:
            continue
        col = {c: [p.get(c) for p in per] for c in per[0]}
        pairs = [v for k, v in res["stability"].items() if k.startswith(f"{name}|")]
        rows.append({"recipe": name, "seeds": len(per), "FVU (held out)": spread(col["fvu"]),
                     "L0": spread(col["l0"], 1), "dead %": spread([100 * d for d in col["dead"]], 2),
                     "mean max dec cos": spread(col["max_cos"], 3), "dec eff. rank": spread(col["eff_rank"], 0),
                     "absorption": spread(col["absorption"], 3), "full absorption": spread(col["full_absorption"], 3),
                     "shared_0.7 (seed pairs)": spread(pairs, 3) if pairs else "",
                     "train s": spread([train_seconds(root / slug(name) / f"s{k.split('|')[1]}")
                                        for k in sorted(res["runs"]) if k.startswith(f"{name}|")], 0)})
    cmd = " ".join(["nice -n 15 python3 analysis/recipes_study.py", *map(shlex.quote, argv)])
    lines = [f"# Recipes on SmolLM2-135M {hookpoint}", "",
             f"Command: `{cmd}`; 2-core CPU shared with other jobs: train s (training alone, from the run's log) "
             "is an upper bound.", "",
             f"Every run: configs/default.yaml at {hookpoint} (350k Shakespeare tokens × 3 epochs = 255 steps, "
             "9,216 latents, k 32, Adam lr 2e-3) plus the recipe's keys; seeds differ in initialisation and batch "
             "order only (one "
             "activation cache). Cells: mean (min–max) over seeds. FVU, L0 and dead % on the held-out tokens; "
             "absorption: mean absorption fraction over letters whose probe passes F1 0.6 (and full absorption), "
             "3,000 vocabulary words, in-context first-letter prompts; shared_0.7: share of latents matched "
             "one-to-one across two seeds at decoder cosine ≥ 0.7, over every pair of seeds (recipes in "
             "--stability).", "",
             md_table(rows), ""]
    why = {r.get("why") for r in res["runs"].values() if r.get("why")}
    if why:
        lines += [f"Absorption –: not measurable at {hookpoint}: {' / '.join(sorted(why))}.", ""]
    atomic_write(OUT / f"{stem}.md", lambda p: p.write_text("\n".join(lines)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--root", default=None, help="where the runs go (default runs/<results name>)")
    ap.add_argument("--hookpoint", default=None, help="another hookpoint than configs/default.yaml's")
    ap.add_argument("--stability", default="TopK", help="recipes whose seeds are matched (a few minutes per pair)")
    args = ap.parse_args()
    default = load_config("configs/default.yaml", []).hookpoints[0]
    hookpoint = args.hookpoint or default
    stem = "recipes" if hookpoint == default else f"recipes_{hookpoint}"
    seeds, names = [int(s) for s in args.seeds.split(",")], args.recipes.split(",")
    root = Path(args.root or f"runs/{stem}")
    if unknown := set(names) - set(RECIPES):
        sys.exit(f"unknown recipes {sorted(unknown)}; recipes: {', '.join(RECIPES)}")
    file = OUT / f"{stem}.json"
    res = json.loads(file.read_text()) if file.exists() else {"runs": {}, "stability": {}}
    data = None
    for seed, name in itertools.product(seeds, names):  # seed-major: every recipe gets seed 0 first
        key = f"{name}|{seed}"
        if key in res["runs"]:
            continue
        t0 = time.perf_counter()
        out = run_one(name, seed, root, hookpoint)
        wall = round(time.perf_counter() - t0, 1)
        data = data or first_letter_data(load_model(), hookpoint)
        res["runs"][key] = {**measure(out, data), "wall_s": wall}
        print(key, res["runs"][key], flush=True)
        done = sorted(s for s in seeds if f"{name}|{s}" in res["runs"]) if name in args.stability.split(",") else []
        for a, b in itertools.combinations(done, 2):
            pair = f"{name}|{a}-{b}"
            if pair not in res["stability"]:
                sa, sb = (Run.open(root / slug(name) / f"s{s}").sae(hookpoint) for s in (a, b))
                res["stability"][pair] = stability(sa, sb).to_dict()["shared_0.7"]
        atomic_write(file, lambda p: p.write_text(json.dumps(res, indent=1)))  # noqa: B023
        write(res, sys.argv[1:], hookpoint, root, stem)
    write(res, sys.argv[1:], hookpoint, root, stem)


if __name__ == "__main__":
    main()
