"""`saekit analyze task RUN --task ioi`: each SAE of a run judged against a supervised dictionary
on a task whose attributes are known (Makelov, Lange & Nanda, ICLR 2025), on three axes:
approximation, control and interpretability (`saekit.analyze.supervised`). The task supplies
prompts, attributes, counterfactual edits and the model readout; IOI (`saekit.analyze.ioi`) is
the one task so far.

The supervised dictionary is fitted on `n_fit` prompts; approximation and control are measured
on `n_eval` other prompts plus, for each edit, counterfactuals of the first `n_pairs` of them;
interpretability (which concerns the SAE alone) on the `n_fit` prompts, which give each name
about n_fit / 24 examples.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

import saekit.analyze.ioi as ioi
from saekit.analyze.common import Result
from saekit.analyze.supervised import compare, supervised_dictionary
from saekit.errors import SaekitError
from saekit.io import atomic_write, md_table
from saekit.run import Run
from saekit.sae import SAE

TASKS = ("ioi",)


@dataclass
class TaskEvalResult(Result):
    task: str
    model: str
    position: str  # where in the prompt the activation is read and replaced
    hookpoints: dict  # hookpoint -> DictionaryComparison.to_dict()
    settings: dict  # prompt counts, seed, thresholds
    wall_time_s: float
    cpu_time_s: float  # this process's CPU time (all threads): what a shared machine's load does not inflate


def _saes(sae_or_run, hookpoint: str | None) -> tuple[list[tuple[str, SAE]], str | None]:
    """(hookpoint, SAE) pairs to evaluate and the model they were trained on."""
    if isinstance(sae_or_run, SAE):
        h = hookpoint or sae_or_run.cfg.hookpoint
        if not h:
            raise SaekitError("this SAE records no hookpoint; pass hookpoint=")
        return [(h, sae_or_run)], sae_or_run.cfg.model
    run = sae_or_run if isinstance(sae_or_run, Run) else Run.open(Path(sae_or_run))
    hooks = run.hookpoints if hookpoint is None else [run.hookpoint(hookpoint)]
    return [(h, run.sae(h)) for h in hooks], run.model_name


def task_eval(sae_or_run, task: str = "ioi", hookpoint: str | None = None, position: str = "end", model=None,
              n_fit: int = 512, n_eval: int = 64, n_pairs: int = 16, seed: int = 0, max_edits: int = 64,
              progress: bool = False) -> TaskEvalResult:
    """The three axes for each SAE of `sae_or_run` (an SAE, a Run or a run / SAE folder) next to
    the supervised dictionary at its hookpoint, on `task`. `model`: a loaded model or a name
    (default: the one the SAEs were trained on). `position`: the prompt position whose
    activation is read and replaced (IOI: end, io, s1, s2)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if task not in TASKS:
        raise SaekitError(f"unknown task {task!r}; saekit knows: {', '.join(TASKS)}")
    if position not in ioi.POSITIONS:
        raise SaekitError(f"unknown IOI position {position!r}; choose from {', '.join(ioi.POSITIONS)}")
    if not 0 < n_pairs <= n_eval:
        raise SaekitError(f"n_pairs must be in [1, n_eval={n_eval}], got {n_pairs}")
    saes, trained_on = _saes(sae_or_run, hookpoint)
    name = model if isinstance(model, str) else trained_on
    lm = model if model is not None and not isinstance(model, str) else None
    if lm is None:
        from saekit.model import load_model

        if not name:
            raise SaekitError("the SAE names no model; pass --model NAME (e.g. smollm2-135m or a local HF folder)")
        lm = load_model(name)
    from saekit.model import check_hookpoints

    hooks = [h for h, _ in saes]
    check_hookpoints(lm, hooks)
    tok = lm.tokenizer
    fit = ioi.ioi_prompts(tok, n_fit, seed)
    ev = ioi.ioi_prompts(tok, n_eval, seed + 1)
    first = ioi.subset(ev, torch.arange(n_pairs))
    every = ioi.concat(ev, *(ioi.counterfactuals(tok, first, e, seed + 2) for e in ioi.EDITS))
    pairs = {e: torch.stack([torch.arange(n_pairs), n_eval + k * n_pairs + torch.arange(n_pairs)], 1)
             for k, e in enumerate(ioi.EDITS)}
    fit_acts = ioi.site_acts(lm, fit, hooks, (position,))
    ev_acts = ioi.site_acts(lm, every, hooks, (position,))
    out = {}
    for h, sae in saes:
        sup = supervised_dictionary(fit_acts[h, position], fit.labels[list(ioi.ATTRIBUTES)])
        read = ioi.readout(lm, every, h, position)
        res = compare(read, ev_acts[h, position], every.labels, every.answer, every.distractor, sup, sae.cpu(), pairs,
                      max_edits, interp=(fit_acts[h, position], fit.labels))
        out[h] = res.to_dict()
        if progress:
            print(f"{h}: done ({time.perf_counter() - t0:.0f} s)")
    return TaskEvalResult(task, name or type(lm).__name__, position, out,
                          {"n_fit": n_fit, "n_eval": n_eval, "n_pairs": n_pairs, "seed": seed, "edits": list(ioi.EDITS),
                           "max_edits": max_edits}, round(time.perf_counter() - t0, 1),
                          round(time.process_time() - c0, 1))


def markdown(res: dict) -> str:
    """The result of `task_eval(...).to_dict()` as markdown tables, one section per hookpoint."""
    s = res["settings"]
    lines = [f"# Task evaluation: {res['task']} on {res['model']} (position {res['position']})", "",
             f"Supervised dictionary fitted on {s['n_fit']} prompts (interpretability measured on them too); "
             f"approximation and control on {s['n_eval']} others plus {s['n_pairs']} counterfactuals per edit "
             f"({', '.join(s['edits'])}); {res['wall_time_s']:.0f} s wall"
             + (f", {res['cpu_time_s']:.0f} s CPU." if "cpu_time_s" in res else "."), ""]
    for h, r in res["hookpoints"].items():
        th = r["thresholds"]
        lines += [f"## {h}", "", "Approximation (logit difference IO - S at the answer position; recovered = share "
                  "of the clean - mean-ablation gap; necessity = recovered when the reconstruction is mean-ablated):",
                  "", md_table(r["approximation"]), "",
                  "Control (success: the counterfactual's answer beats both prompts' names; pairs the model "
                  "gets right cleanly):", "",
                  md_table([{"edit": e, **{k: v for k, v in c.items() if k != "sae_edits"}}
                            for e, c in r["control"].items()]), ""]
        if r["attributes"] is not None:
            lines += [f"Interpretability (best single latent per value; tracked: precision >= {th['precision']} and "
                      f"recall >= {th['recall']}; over-split: not tracked, >= 2 latents of precision >= "
                      f"{th['precision']} and recall >= {th['piece_recall']} reaching recall >= {th['recall']} "
                      "together; occluded: < half the values tracked or over-split while another attribute has "
                      ">= half tracked):", "", md_table(r["attributes"]), ""]
    return "\n".join(lines)


def task_report(run: str | Path | Run, task: str = "ioi", **options) -> str:
    """`task_eval` of a run's SAEs (`options` are its keyword arguments), written to
    RUN/analysis/task_<task>.json and .md; returns the markdown."""
    res = task_eval(run, task, **options).to_dict()
    run = run if isinstance(run, Run) else Run.open(run)
    run.write_json(f"analysis/task_{task}.json", res)
    md = markdown(res)
    atomic_write(run.analysis_dir / f"task_{task}.md", lambda p: p.write_text(md))
    return md
