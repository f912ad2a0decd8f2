"""The `saekit` command line: one verb per stage (train, cache, eval, analyze, export)."""

import argparse
import sys

import saekit
from saekit.errors import SaekitError


def _values(extra: list[str]) -> dict:
    """`[CONFIG.yaml] [--key value ...]` -> the raw config values they give."""
    from saekit.config import load_values

    path = extra.pop(0) if extra and not extra[0].startswith("--") else None
    return load_values(path, extra)


def _train(args, extra):
    from saekit.config import TrainConfig, make_config
    from saekit.pipeline import train
    from saekit.run import Run
    from saekit.runtime import keep_freed_memory

    values = _values(extra)
    if args.resume:  # the stored config; what is given again must agree with it
        cfg = Run.for_resume(values.get("out", TrainConfig.out), values).config
    else:
        cfg = make_config(TrainConfig, values)
    keep_freed_memory()
    run = train(cfg, resume=args.resume, quiet=args.quiet)
    print(f"saekit: run written to {run} (SAEs in {run}/<hookpoint>/, eval.json, metrics.jsonl)")


def _cache(args, extra):
    from saekit.config import TrainConfig, make_config
    from saekit.pipeline import prepare

    _, _, caches = prepare(make_config(TrainConfig, _values(extra)), quiet=args.quiet)
    for split, c in caches.items():
        print(f"{split}: {c.path} ({c.n_tokens:,} tokens, hookpoints {', '.join(c.hookpoints)})")


def _eval(args, extra):
    from saekit.pipeline import evaluate_run

    evaluate_run(args.run, quiet=args.quiet, n_contexts=args.contexts, activations=args.activations,
                 model_name=args.model)


def _analyze(args, extra):
    from saekit.analyze.report import ANALYSES, analyze_run

    analyze_run(args.run, ANALYSES if args.analysis == "all" else (args.analysis,), hookpoint=args.hookpoint,
                activations=args.activations, tokens=args.tokens, words=args.words, f1_threshold=args.f1_threshold,
                min_letters=args.min_letters, model=args.model, quiet=args.quiet)


def _export(args, extra):
    from pathlib import Path

    from saekit.formats import describe
    from saekit.run import Run

    run = Run.open(args.run)
    hookpoints = [run.hookpoint(args.hookpoint)] if args.hookpoint or run.bare else run.hookpoints
    for h in hookpoints:
        src = run.sae_dir(h)
        sae = run.sae(h)
        if args.out is None:
            out = Path(f"{src}-sae-lens") if run.bare else run.path / "export-sae-lens" / h
        else:
            out = Path(args.out) if len(hookpoints) == 1 else Path(args.out) / h
        sae.save(out, format=args.format)
        print(f"saekit: loaded {describe(sae.cfg.source_format)} from {src}; wrote a SAELens SAE to {out}")


ACTIVATIONS_HELP = ("activation cache folder or .safetensors file with one [N, d_in] tensor "
                    "(default: the run's held-out cache; needed for a bare SAE folder)")


def build_parser() -> argparse.ArgumentParser:
    from saekit.config import config_help

    p = argparse.ArgumentParser(prog="saekit", description=__doc__)
    p.add_argument("--version", action="version", version=f"saekit {saekit.__version__}")
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", usage="saekit train [CONFIG.yaml] [--resume] [--quiet] [--KEY VALUE ...]",
                       help="harvest activations and train one SAE per hookpoint, then evaluate",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Config keys come from the YAML file (default: built-in defaults), "
                                   "overridden by --key value pairs, e.g. --k 64 --out runs/x.",
                       epilog="config keys (default, meaning):\n" + config_help())
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its stored config")
    t.set_defaults(func=_train)

    c = sub.add_parser("cache", usage="saekit cache [CONFIG.yaml] [--quiet] [--KEY VALUE ...]",
                       help="harvest and cache the activations a config needs (reused by train)")
    c.set_defaults(func=_cache)

    e = sub.add_parser("eval", help="evaluate a run's SAEs on its held-out text (writes RUN/eval.json)")
    e.add_argument("run", help="a run folder or a bare SAE folder")
    e.add_argument("--contexts", type=int, default=None, help="held-out contexts for the downstream loss")
    e.add_argument("--activations", default=None, help=ACTIVATIONS_HELP)
    e.add_argument("--model", default=None, help="model for the downstream loss of a bare SAE folder")
    e.set_defaults(func=_eval)

    a = sub.add_parser("analyze", help="dead/dense latents, collapse, absorption, feature geometry of a run's SAEs "
                                       "(writes RUN/analysis/)")
    a.add_argument("analysis", choices=["dead", "collapse", "absorption", "geometry", "all"])
    a.add_argument("run", help="a run folder or a bare SAE folder")
    a.add_argument("--hookpoint", default=None, help="analyse only this hookpoint of the run")
    a.add_argument("--activations", default=None, help=ACTIVATIONS_HELP)
    a.add_argument("--model", default=None, help="model for absorption (default: the run's)")
    a.add_argument("--tokens", type=int, default=None, help="tokens for dead/collapse/geometry (default: all)")
    a.add_argument("--words", type=int, default=3000, help="vocabulary words for absorption")
    a.add_argument("--f1-threshold", type=float, default=0.6, help="absorption: keep letters whose probe F1 >= this")
    a.add_argument("--min-letters", type=int, default=20, help="absorption: letters that must pass the probe")
    a.set_defaults(func=_analyze)

    x = sub.add_parser("export", help="write a run's SAEs (or any SAE folder saekit loads) in another tool's format")
    x.add_argument("run", help="a run folder or an SAE folder (saekit, SAELens, sparsify, dictionary_learning, "
                               "Gemma Scope)")
    x.add_argument("--format", choices=["sae-lens"], required=True, help="the format to write")
    x.add_argument("--out", default=None, help="output folder (default: SAE_FOLDER-sae-lens, or "
                                               "RUN/export-sae-lens/<hookpoint>/; one subfolder per hookpoint)")
    x.add_argument("--hookpoint", default=None, help="export only this hookpoint of the run")
    x.set_defaults(func=_export)

    for s in (t, c, e, a, x):
        s.add_argument("--quiet", action="store_true", help="no progress bars")
    for s in (e, a, x):
        s.set_defaults(strict=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "strict", False) and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args, extra)
    except SaekitError as e:
        print(f"saekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saekit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
