"""saekit next to sae-bench 0.6.0 itself on the same SAE: SAEBench's absorption protocol on the same
words, and the core figures on the same held-out contexts.

    python3 benchmarks/saebench_parity.py [RUN] [--words 3000] [--seeds 0 1] [--evals absorption core]

RUN (default runs/default) is a saekit run whose SAE is exported to SAELens format (`saekit export
--format sae-lens`) and handed to sae-bench's own evaluations (absorption's `run_eval` and core's
`run_evals`, unmodified) in benchmarks/.venv, which this script creates on first use: torch 2.13.0
(the CPU build, first, so that nothing pulls a CUDA torch), then sae-bench 0.6.0 with sae-lens 6
and transformer-lens 3. The PyPI torchvision (built for CUDA torch) is removed afterwards: on the
CPU torch it breaks transformers' imports, and neither evaluation uses it.

What sae-bench is given, and why:
- the model: the offline SmolLM2-135M (saekit's dequantised GGUF, ~/.cache/saekit/models) as a
  TransformerLens 3 HookedTransformer built from the local folder with `hf_model=`; its
  activations match saekit's TransformerBridge to 1e-6 (relative). Its forward stops after the
  SAE's layer (`stop_at_layer`): the activations read are the same, at a fifth of the cost.
- the words: sae-bench's vocabulary (every alphabetic token, `saebench_words`) subsampled to the
  same `--words` seeded words for both tools (`word_sample`), so that a CPU runs it in minutes.
- its option `precalc_k_sparse_probe_sae_acts` (encode the training words once, not every epoch:
  the same codes; without it the driver ran out of memory on a busy 24 GiB machine), and one BLAS
  thread (its 260 small scikit-learn fits run ~10x faster on a busy 2-core CPU).
- the seed: python's `random` and torch are seeded with each `--seeds` value before a run; the two
  tools' randomness (word split, ICL examples, probe starts, minibatch order) is not shared, so
  several seeds of each measure how far each tool's own randomness moves its figures.
- for core: the run's held-out contexts (`saekit.data.contexts`, BOS first, documents joined by
  EOS) in place of its streamed OpenWebText, in batches of 8, with BOS, EOS and padding as the
  tokens it ignores (as its `multiple_evals` passes them); CE and KL on the run's first
  `eval_contexts` of them, as saekit's eval. saekit's side is RUN/eval.json and the same figures in
  sae-bench's core schema (`saekit.saebench.core`, CE and KL under SAEBench's convention, as
  `saekit eval --format saebench` writes them), which sae-bench's own `CoreEvalOutput` validates.

`--prepare` does the model-side work only (both tools' prompts and activations, sae-bench's probe
training through its own `train_and_save_probes`, as `run_eval` calls it first) and keeps it in
~/.cache/saekit/saebench-parity/, so that a busy CPU can do it while the SAE trains; a later run
reuses it (sae-bench finds its probe where it caches probes, and goes on from there).

Prints the core figures side by side (saekit's eval.json, its sae-bench file, sae-bench's core),
each row naming where the definitions differ; then one row per tool and seed of absorption (mean
absorption fraction, mean full-absorption rate, letters kept, mean main latents) and the
difference of the means. Results: benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "benchmarks" / ".venv"
PY = VENV / "bin" / "python"


def ensure_venv() -> None:
    """benchmarks/.venv with sae-bench 0.6.0 on the CPU torch (created once)."""
    if PY.exists() and subprocess.run([PY, "-c", "import sae_bench, sae_lens"], capture_output=True).returncode == 0:
        return
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    pip = [PY, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "sae-bench==0.6.0", "torch==2.13.0", "torchvision==0.28.0"], check=True)
    subprocess.run([PY, "-m", "pip", "uninstall", "-q", "-y", "torchvision"], check=True)


# -- the sae-bench side: runs in benchmarks/.venv, never imports saekit --------------------------
def driver(args) -> None:
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as feature_absorption
    import sae_bench.evals.absorption.main as absorption_main
    import torch
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    words = json.loads(Path(args.words_file).read_text())
    common.get_alpha_tokens = feature_absorption.get_alpha_tokens = lambda *a, **k: list(words)
    official = loading.get_official_model_name
    loading.get_official_model_name = lambda n: n if Path(n).is_dir() else official(n)
    tok = AutoTokenizer.from_pretrained(args.model)
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = HookedTransformer.from_pretrained_no_processing(args.model, hf_model=hf, tokenizer=tok, device="cpu",
                                                            dtype=torch.float32)
    layer = int(args.hookpoint.split(".")[1])
    run_with_cache = model.run_with_cache
    model.run_with_cache = lambda *a, **k: run_with_cache(*a, **{"stop_at_layer": layer + 1, **k})

    class Loader:  # run_eval loads its model by name; hand it this one
        @staticmethod
        def from_pretrained_no_processing(*a, **k):
            return model

    absorption_main.HookedTransformer = Loader
    out = {"absorption": absorption_driver(args, model, layer, words) if "absorption" in args.evals else []}
    if "core" in args.evals and not args.prepare:
        out["core"] = core_driver(args, model)
    if not args.prepare:
        Path(args.out).write_text(json.dumps(out))


def absorption_driver(args, model, layer: int, words: list[str]) -> list[dict]:
    """sae-bench's absorption `run_eval`, once per seed (with --prepare: its probe training only)."""
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.main as absorption_main
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_lens import SAE

    stash = Path(args.stash)
    results_dir = Path(tempfile.mkdtemp(prefix="saebench-artifacts-"))
    own_results_dir(results_dir)
    out = []
    for seed in args.seeds:
        shutil.rmtree(common.RESULTS_DIR, ignore_errors=True)  # it caches probes there, across runs
        seed_all(seed)
        if args.prepare:  # its own probe training, as run_eval would call it first
            common.train_and_save_probes(model, layers=[layer], base_template="{word} has the first letter:",
                                         pos_idx=-6, device="cpu")
            shutil.copytree(common.PROBES_DIR, stash / f"saebench-seed{seed}")
            continue
        if (stash / f"saebench-seed{seed}").exists():
            shutil.copytree(stash / f"saebench-seed{seed}", common.PROBES_DIR)
        cfg = AbsorptionEvalConfig(model_name="smollm2-135m", random_seed=seed, llm_batch_size=32, llm_dtype="float32",
                                   precalc_k_sparse_probe_sae_acts=True)  # its option for small SAEs: same codes
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)  # it writes artifacts/ under the working directory
            res = absorption_main.run_eval(cfg, [("saekit", SAE.load_from_disk(args.sae, device="cpu"))], "cpu",
                                           tmp, force_rerun=True)
        if not res:  # run_eval prints why and returns nothing: too few letters pass its probe
            sys.exit(f"sae-bench (seed {seed}) found fewer than 20 letters whose probe F1 > 0.6 on these "
                     f"{len(words)} words: use more --words (3,000 reach 20 and more)")
        r = next(iter(res.values()))
        means = r["eval_result_metrics"]["mean"]
        details = r["eval_result_details"]
        out.append({"seed": seed, "wall_s": time.perf_counter() - t0,
                    "mean_absorption_fraction": means["mean_absorption_fraction_score"],
                    "mean_full_absorption": means["mean_full_absorption_score"], "n_letters": len(details),
                    "mean_main_latents": statistics.mean(d["num_split_features"] for d in details),
                    "letters": {d["first_letter"]: d["mean_absorption_fraction"] for d in details}})
    return out


def core_driver(args, model) -> dict:
    """sae-bench's core `run_evals` (unmodified) on saekit's held-out contexts: the first
    `n_ctx` for CE and KL, all of them for the reconstruction figures, in batches of 8; the
    special tokens it ignores are BOS, EOS and padding, as in its `multiple_evals`. Also checks
    saekit's `--format saebench` file against sae-bench's own schema (CoreEvalOutput)."""
    import torch
    from pydantic import TypeAdapter
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.evals.core.eval_output import CoreEvalOutput
    from sae_bench.evals.core.main import run_evals
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
    from sae_lens import SAE

    data = torch.load(args.core_tokens)
    tokens, n_ctx, batch = data["tokens"], data["n_ctx"], 8

    class Store:  # the ActivationsStore calls run_evals makes, served from saekit's contexts in order
        context_size, store_batch_size_prompts, at = tokens.shape[1], batch, 0

        def get_batch_tokens(self, n):
            self.at += n
            return tokens[self.at - n : self.at]

        def reset_input_dataset(self):
            self.at = 0

    _, sae, _ = load_and_format_sae("saekit", SAE.load_from_disk(args.sae, device="cpu"), "cpu")
    cfg = CoreEvalConfig(batch_size_prompts=batch, n_eval_reconstruction_batches=-(-n_ctx // batch),
                         n_eval_sparsity_variance_batches=-(-len(tokens) // batch), compute_kl=True,
                         compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
                         compute_variance_metrics=True)
    tok = model.tokenizer
    ignore = {t for t in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) if t is not None}
    metrics, _ = run_evals(sae, Store(), model, cfg, ignore_tokens=ignore)
    TypeAdapter(CoreEvalOutput).validate_python(json.loads(Path(args.ours_core).read_text()))  # raises if not
    return {k: v for group in metrics.values() for k, v in group.items()}


def own_results_dir(root: Path) -> None:
    """sae-bench caches probes and results in one folder inside its package; point this process's
    copy at `root` (module constants and the defaults bound from them), so runs do not collide."""
    import inspect

    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as feature_absorption
    import sae_bench.evals.absorption.k_sparse_probing as k_sparse_probing

    old = str(common.RESULTS_DIR)
    move = lambda v: Path(str(v).replace(old, str(root), 1)) if isinstance(v, Path) and str(v).startswith(old) else v  # noqa: E731
    for mod in (common, feature_absorption, k_sparse_probing):
        for name in ("RESULTS_DIR", "PROBES_DIR"):
            if hasattr(mod, name):
                setattr(mod, name, move(getattr(mod, name)))
        for fn in vars(mod).values():
            if inspect.isfunction(fn) and fn.__defaults__:
                fn.__defaults__ = tuple(map(move, fn.__defaults__))


def seed_all(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- the saekit side ---------------------------------------------------------------------------
def saekit_data(model, hookpoint: str, words, seed: int, stash: Path):
    """`saebench_data` for `seed`, kept in `stash` (the model-side work, reused by later runs)."""
    import torch

    from saekit.analyze.absorption import FirstLetterData, saebench_data

    path = stash / f"saekit-seed{seed}.pt"
    if path.exists():
        return FirstLetterData(**torch.load(path))
    data = saebench_data(model, hookpoint, words=words, seed=seed)
    torch.save(vars(data), path)
    return data


def saekit_side(sae, model, hookpoint: str, words, seeds: list[int], stash: Path) -> list[dict]:
    from saekit.analyze.absorption import saebench_from_data

    out = []
    for seed in seeds:
        t0 = time.perf_counter()
        data = saekit_data(model, hookpoint, words, seed, stash)
        res = saebench_from_data(sae, data, seed=seed)
        t = res.table
        out.append({"seed": seed, "wall_s": time.perf_counter() - t0,
                    "mean_absorption_fraction": res.mean_absorption_fraction,
                    "mean_full_absorption": res.mean_full_absorption, "n_letters": res.n_letters,
                    "mean_main_latents": float(t["main_latents"].map(len).mean()),
                    "letters": dict(zip(t["letter"], t["absorption_fraction"], strict=True))})
    return out


def word_sample(words: list[tuple[int, str]], n: int, per_letter: int = 10) -> list[tuple[int, str]]:
    """`n` of `words` drawn with seed 0, topped up (seeded) to `per_letter` words for each first
    letter: sae-bench's probe training turns to NaN when a letter has no training word, and
    uniform samples of a few thousand words hold only a handful of z, x and q words."""
    import random

    rng = random.Random(0)
    out = set(rng.sample(words, min(n, len(words))))
    for c in "abcdefghijklmnopqrstuvwxyz":
        have = [w for w in out if w[1].strip()[0].lower() == c]
        pool = sorted(w for w in words if w[1].strip()[0].lower() == c and w not in out)
        out |= set(rng.sample(pool, min(len(pool), max(0, per_letter - len(have)))))
    return sorted(out)


def core_table(ours: dict, ours_sb: dict, theirs: dict) -> None:
    """saekit's eval.json, its `--format saebench` file and sae-bench's core evaluation, with what
    each row measures where the definitions differ."""
    sb = {k: v for group in ours_sb["eval_result_metrics"].values() for k, v in group.items()}
    kl_score = (ours["kl_zero"] - ours["kl_sae"]) / ours["kl_zero"]
    alike = "defined alike"
    ce_pos = "saekit: positions whose target is a real token; SAEBench: whose input is"
    spliced = "saekit: at real tokens, BOS keeps its own; SAEBench: at every position, BOS included"
    rows = [
        ("L0", ours["l0"], sb["l0"], "l0", alike),
        ("cosine(x, x_hat)", ours["cosine"], sb["cossim"], "cossim", alike),
        ("L2 ratio", ours["l2_ratio"], sb["l2_ratio"], "l2_ratio", alike),
        ("explained variance", ours["explained_variance"], sb["explained_variance"], "explained_variance",
         "saekit: 1 - FVU, centred on the mean; SAEBench (and `explained_variance_saebench`): variance about zero"),
        ("explained variance (legacy)", None, None, "explained_variance_legacy",
         "SAEBench only: per token, centred on its batch's mean"),
        ("MSE", ours["mse"], None, "mse",
         "saekit: per element; SAEBench: a token's squared error over its batch's tokens"),
        ("CE clean", ours["ce_clean"], sb["ce_loss_without_sae"], "ce_loss_without_sae", ce_pos),
        ("CE, SAE spliced", ours["ce_sae"], sb["ce_loss_with_sae"], "ce_loss_with_sae", f"{ce_pos}; {spliced}"),
        ("CE, zero-ablated", ours["ce_zero"], sb["ce_loss_with_ablation"], "ce_loss_with_ablation",
         f"{ce_pos}; {spliced}"),
        ("loss recovered", ours["loss_recovered"], sb["ce_loss_score"], "ce_loss_score", "from the three CE above"),
        ("KL, SAE spliced", ours["kl_sae"], sb["kl_div_with_sae"], "kl_div_with_sae",
         f"{spliced}; SAEBench also counts the last position"),
        ("KL, zero-ablated", ours["kl_zero"], sb["kl_div_with_ablation"], "kl_div_with_ablation", "as above"),
        ("KL score", kl_score, sb["kl_div_score"], "kl_div_score", "from the two KL above"),
    ]
    f = lambda v: "-" if v is None or v == -1 else f"{v:.4f}"  # noqa: E731
    print("\n| figure | saekit eval.json | saekit --format saebench | sae-bench 0.6.0 core | definitions |")
    print("|---|---|---|---|---|")
    for name, a, b, key, note in rows:
        print(f"| {name} | {f(a)} | {f(b)} | {f(theirs.get(key))} | {note} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default="runs/default")
    p.add_argument("--hookpoint", default=None)
    p.add_argument("--evals", nargs="+", choices=["absorption", "core"], default=["absorption", "core"])
    p.add_argument("--words", type=int, default=3000, help="seeded vocabulary sample both tools use")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", choices=["saebench", "saekit"], default=None,
                   help="with --prepare: one tool's side (two processes can prepare both at once)")
    p.add_argument("--prepare", action="store_true",
                   help="only the model-side work (both tools' probe data, sae-bench's probes) for --hookpoint, "
                        "kept in ~/.cache/saekit/saebench-parity/ for later runs; needs no run")
    p.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sae", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--words-file", help=argparse.SUPPRESS)
    p.add_argument("--stash", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--core-tokens", help=argparse.SUPPRESS)
    p.add_argument("--ours-core", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.driver:
        return driver(args)

    import hashlib

    import torch
    from transformers import AutoTokenizer

    from saekit import saebench
    from saekit.analyze.absorption import saebench_words
    from saekit.data import contexts
    from saekit.evaluate import downstream_metrics
    from saekit.io import saekit_cache
    from saekit.model import DEFAULT_MODEL, load_model, resolve_model
    from saekit.run import EVAL, Run

    ensure_venv()
    if args.prepare:
        run, h, sae = None, args.hookpoint or "blocks.6.hook_resid_post", None
        args.evals = ["absorption"]
    else:
        run = Run.open(args.run)
        h = run.hookpoint(args.hookpoint)
        if run.model_name != DEFAULT_MODEL:
            sys.exit(f"this comparison runs the offline {DEFAULT_MODEL}; {args.run} was trained on {run.model_name}")
        sae = run.sae(h)
    model_dir, _ = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = word_sample(saebench_words(tokenizer), args.words)
    key = hashlib.sha256(json.dumps([h, words]).encode()).hexdigest()[:16]
    stash = saekit_cache() / "saebench-parity" / key
    stash.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only == "saekit":
            for seed in args.seeds:
                saekit_data(load_model(DEFAULT_MODEL), h, words, seed, stash)
            return
        tmp = Path(tmp)
        (tmp / "words.json").write_text(json.dumps([w for _, w in words]))
        cmd = [PY, __file__, "--driver", "--hookpoint", h, "--model", model_dir, "--words-file", tmp / "words.json",
               "--stash", stash, "--out", tmp / "saebench.json", "--seeds", *map(str, args.seeds),
               "--evals", *args.evals]
        if args.prepare:
            cmd.append("--prepare")
        else:
            sae.save(tmp / "sae", format="sae-lens")
            cmd += ["--sae", tmp / "sae"]
        if "core" in args.evals:  # saekit's figures in both conventions, then sae-bench's on the same contexts
            cfg, n_ctx = run.config, run.config.eval_contexts
            ours_core = json.loads((run.path / EVAL).read_text())[h]  # as `saekit eval --format saebench`:
            val_tokens, val_mask = contexts(cfg, tokenizer)["val"]
            ce = downstream_metrics(load_model(DEFAULT_MODEL), sae, h, val_tokens[:n_ctx], val_mask[:n_ctx],
                                    convention="saebench")
            ours_sb = saebench.core(ours_core, ce, sae, h, cfg.model, dataset=cfg.dataset, context_size=cfg.ctx_len,
                                    n_contexts=n_ctx)
            (tmp / "ours_core.json").write_text(json.dumps(ours_sb))
            torch.save({"tokens": val_tokens, "n_ctx": n_ctx}, tmp / "tokens.pt")
            cmd += ["--core-tokens", tmp / "tokens.pt", "--ours-core", tmp / "ours_core.json"]
        one_thread = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        subprocess.run(list(map(str, cmd)), check=True, cwd=tmp, env={**os.environ, **one_thread})
        theirs = {} if args.prepare else json.loads((tmp / "saebench.json").read_text())
    if args.only == "saebench":
        return
    if args.prepare:
        model = load_model(DEFAULT_MODEL)
        for seed in args.seeds:
            saekit_data(model, h, words, seed, stash)
        print(f"prepared {stash}")
        return
    if "core" in args.evals:
        print(f"\n{args.run} {h}: core figures on its {len(val_tokens)} held-out contexts "
              f"(CE and KL: the first {run.config.eval_contexts}); saekit's sae-bench file passes sae-bench's schema")
        core_table(ours_core, ours_sb, theirs["core"])
    if "absorption" not in args.evals:
        return
    ours = saekit_side(sae, load_model(DEFAULT_MODEL), h, words, args.seeds, stash)
    theirs = theirs["absorption"]

    print(f"\n{args.run} {h}, {len(words)} words (seeded sample of every alphabetic token)\n")
    print("| tool | seed | mean absorption fraction | mean full absorption | letters | main latents | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in (("sae-bench 0.6.0", theirs), ("saekit --protocol saebench", ours)):
        for r in rows:
            print(f"| {name} | {r['seed']} | {r['mean_absorption_fraction']:.3f} | {r['mean_full_absorption']:.3f} "
                  f"| {r['n_letters']} | {r['mean_main_latents']:.2f} | {r['wall_s']:.0f} |")
    for key in ("mean_absorption_fraction", "mean_full_absorption"):
        a, b = (statistics.mean(r[key] for r in rows) for rows in (theirs, ours))
        spread = max(r[key] for r in theirs) - min(r[key] for r in theirs)
        print(f"\n{key}: sae-bench {a:.3f}, saekit {b:.3f}, difference {b - a:+.3f} "
              f"(range of sae-bench over its seeds: {spread:.3f})")


if __name__ == "__main__":
    main()
