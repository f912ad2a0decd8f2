"""The `saekit` command line: one verb per stage (train, cache, eval, analyze, match, stability, export,
atlas, steer, attribute)."""

import argparse
import shlex
import sys
from pathlib import Path

import saekit
from saekit.errors import SaekitError


def _values(extra: list[str]) -> dict:
    """`[CONFIG.yaml] [--key value ...]` -> the raw config values they give."""
    from saekit.config import load_values

    path = extra.pop(0) if extra and not extra[0].startswith("--") else None
    return load_values(path, extra)


def _train(args, extra):
    from saekit import distributed
    from saekit.config import TrainConfig, make_config
    from saekit.pipeline import train
    from saekit.run import Run
    from saekit.runtime import keep_freed_memory

    command = shlex.join(["saekit", "train", *extra, *["--resume"] * args.resume, *["--quiet"] * args.quiet])
    values = _values(extra)
    if args.resume:  # the stored config; what is given again must agree with it
        cfg = Run.for_resume(values.get("out", TrainConfig.out), values).config
    else:
        cfg = make_config(TrainConfig, values)
    keep_freed_memory()
    try:  # under torchrun every process runs this; they train together (saekit.distributed)
        run = train(cfg, resume=args.resume, quiet=args.quiet)
        main = distributed.is_main()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_resume_hint(Path(cfg.out), command)) from None
    finally:
        distributed.leave()
    if main:
        print(f"saekit: the run is in {run} (SAEs in {run}/<hookpoint>/, eval.json, metrics.jsonl)")


def _resume_hint(out: Path, command: str) -> str:
    """What an interrupted `saekit train` leaves in `out`, and the command that continues it."""
    from saekit.run import CONFIG, Run

    if not (out / CONFIG).is_file():  # stopped while harvesting: the cache keeps the finished shards
        return f"nothing trained yet; `{command}` continues the activation harvest where it stopped"
    resume = shlex.join(["saekit", "train", "--out", str(out), "--resume"])
    try:
        meta = Run.open(out).checkpoint()
    except SaekitError:
        meta = None
    if not meta or not isinstance(meta.get("step"), int):
        return f"no checkpoint in {out} yet; `{resume}` starts it again from step 0"
    total = meta.get("total_steps")
    return f"last checkpoint: step {meta['step']}{f' of {total}' if total else ''} in {out}; continue with `{resume}`"


def _cache(args, extra):
    from saekit import distributed
    from saekit.activations import cache_root, list_caches, remove_caches
    from saekit.config import TrainConfig, make_config
    from saekit.io import md_table
    from saekit.pipeline import prepare

    cfg = make_config(TrainConfig, _values(extra))
    if args.list:
        rows = list_caches(cache_root(cfg))
        print(md_table(rows) if rows else f"no activation caches in {cache_root(cfg)}")
        return
    if args.remove:
        for path in remove_caches(cache_root(cfg), args.remove):
            print(f"saekit: removed {path}")
        return
    distributed.init_from_env(cfg.device)
    try:  # under torchrun every process harvests its own contexts
        _, _, caches = prepare(cfg, quiet=args.quiet or not distributed.is_main())
        main = distributed.is_main()
    finally:
        distributed.leave()
    for split, c in caches.items() if main else ():
        print(f"{split}: {c.path} ({c.n_tokens:,} tokens, hookpoints {', '.join(c.hookpoints)})")


def _eval(args, extra):
    from saekit.pipeline import evaluate_run

    evaluate_run(args.run, quiet=args.quiet, n_contexts=args.contexts, activations=args.activations,
                 model_name=args.model, format=args.format)


def _analyze(args, extra):
    from saekit.analyze.report import ANALYSES, analyze_run

    if args.analysis == "task":
        from saekit.analyze.task import task_report

        print(task_report(args.run, args.task, hookpoint=args.hookpoint, position=args.position, model=args.model,
                          n_eval=args.prompts, n_pairs=min(args.pairs, args.prompts), progress=not args.quiet))
        return
    analyze_run(args.run, ANALYSES if args.analysis == "all" else (args.analysis,), hookpoint=args.hookpoint,
                activations=args.activations, tokens=args.tokens, words=args.words, f1_threshold=args.f1_threshold,
                min_letters=args.min_letters, model=args.model, quiet=args.quiet, against=args.against,
                protocol=args.protocol)


def _stability(args, extra):
    import json

    from saekit.analyze.stability import markdown, run_stability
    from saekit.io import atomic_write
    from saekit.run import Run

    run = Run.open(args.a)
    h = run.hookpoint(args.hookpoint)
    res = run_stability(run, args.b, h, args.activations, args.tokens).to_dict()
    out = run.analysis_dir / f"stability_{Path(args.b).resolve().name}.json"
    atomic_write(out, lambda p: p.write_text(json.dumps(res, indent=1)))
    print(json.dumps(res, indent=1) if args.json else "\n".join(markdown(args.b, res)))
    if not args.json:
        print(f"saekit: stability written to {out}")


def _match(args, extra):
    from saekit.analyze.crosslayer import chain_report
    from saekit.io import md_table
    from saekit.matching import match_saes

    if args.chain:
        if args.b is not None:
            raise SaekitError("--chain takes one run folder (its consecutive hookpoints are matched), not two")
        chain_report(args.a, max_tokens=args.tokens, n_contexts=args.contexts, solver=args.solver, quiet=args.quiet)
        return
    if args.b is None:
        raise SaekitError("give two SAEs to match (SAE folders, or RUN/<hookpoint>), or one run with --chain")
    m, out = match_saes(args.a, args.b, args.method, args.solver, args.candidates, min_score=args.min_score,
                        tokens=args.tokens, activations=(args.activations_a, args.activations_b), out=args.out,
                        force=args.force)
    print(md_table([{"A": args.a, "B": args.b, "method": m.method, "solver": m.solver, **m.summary(),
                     "seconds": m.info["seconds"]}]))
    table = m.table
    print(f"\n{table.sort_values('score', ascending=False).head(args.show).to_string(index=False)}")
    _left_out(len(table) - min(len(table), args.show), "--show N prints more; all are in the match file")
    print(f"\nsaekit: match written to {out}")


def _export(args, extra):
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


def _atlas(args, extra):
    import json

    from saekit.atlas import Atlas, add_analyses, build_atlas

    if args.action in ("export", "serve"):
        from saekit.atlas.html import export_html, make_server

        if args.action == "export":
            out = export_html(args.path, args.target, args.hookpoint, quiet=args.quiet)
            print(f"saekit: static atlas written to {out}/index.html")
            return
        server = make_server(args.path, args.port)
        print(f"saekit: serving {args.path} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
        try:
            server.serve_forever()
        finally:
            server.server_close()
        return
    if args.action == "add":
        added = add_analyses(args.path, args.run)
        print(f"saekit: added to {args.path}: " + ", ".join(f"{v:,} {k}" for k, v in added.items()))
        return
    if args.action == "build":
        out = build_atlas(args.path, tokens=args.tokens, out=args.out, split=args.split, quiet=args.quiet)
        print(f"saekit: atlas written to {out} ({out.stat().st_size:,} bytes)")
        return
    atlas = Atlas.open(args.path)
    given = [k for k in ("feature", *_QUERIES) if getattr(args, k) is not None and getattr(args, k) is not False]
    if len(given) != 1:
        raise SaekitError("give exactly one of --feature, --text, --similar, --token, --search, --dead, --dense, "
                          "--top-by")
    what, h = given[0], args.hookpoint
    if what == "feature":
        card = atlas.card(args.feature, h)
        print(json.dumps(card.to_dict(), indent=1) if args.json else card.to_text())
        return
    df = _QUERIES[what](atlas, args, h)
    if args.json:
        print(df.to_json(orient="records"))
        return
    print(_table(df.head(args.limit)) if len(df) else "(nothing)")
    if what in ("dense", "top_by"):  # the first --limit rows of a ranking of every latent
        f, col = atlas.features(h), "density" if what == "dense" else args.top_by
        _left_out(int(f[col].notna().sum()) - len(df) if col in f else len(f) - len(df), "--limit N shows more")
    else:
        _left_out(len(df) - min(len(df), args.limit), "--limit N or --json shows them")


def _table(df) -> str:
    """`df` for people: labels and tokens quoted (so a leading space, ' king', shows), floats to 4 digits."""
    shown = df.copy()
    for col in set(shown.columns) & {"label", "token"}:
        shown[col] = shown[col].map(lambda t: t if t is None else repr(t))
    return shown.to_string(index=False, float_format="{:.4g}".format)


def _steer(args, extra):
    import json

    from saekit.intervene import steer

    res = steer(args.run, args.prompt, args.feature, args.hookpoint, args.max_new_tokens, args.temperature, args.seed,
                error=not args.no_error, model=args.model)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
        return
    print(f"clean:   {args.prompt}[[{res.clean}]]")
    print(f"steered: {args.prompt}[[{res.steered}]]")
    print("next token: largest moves of its probability")
    print(_table(res.next_token))


def _attribute(args, extra):

    from saekit.intervene import attribute

    res = attribute(args.run, args.prompt, args.target, args.against, args.hookpoint, model=args.model)
    if args.json:
        print(res.table.to_json(orient="records"))
        return
    against = f" - logit[{args.against!r}]" if args.against is not None else ""
    print(f"logit[{args.target!r}]{against} = {res.metric:.4g}; the error term's attribution {res.error:.4g} "
          f"(share {res.error_share:.1%}), the decoder bias's {res.bias:.4g}")
    print(_table(res.table.head(args.limit)))
    _left_out(len(res.table) - min(len(res.table), args.limit), "--limit N or --json shows them")


# `saekit atlas query --WHAT`: the Atlas method each answers with (a table)
_QUERIES = {
    "text": lambda atlas, args, h: atlas.text(args.text, h),
    "similar": lambda atlas, args, h: atlas.similar(args.similar, h),
    "token": lambda atlas, args, h: atlas.token(args.token, h),
    "search": lambda atlas, args, h: atlas.search(args.search, h),
    "dead": lambda atlas, args, h: atlas.dead(h),
    "dense": lambda atlas, args, h: atlas.top_by("density", args.limit, h),
    "top_by": lambda atlas, args, h: atlas.top_by(args.top_by, args.limit, h),
}


def _left_out(n: int, how: str) -> None:
    """Say under a table cut to its first rows how many were left out and how to see them."""
    if n > 0:
        print(f"({n:,} more rows not shown; {how})")


ACTIVATIONS_HELP = ("activation cache folder or .safetensors file with one [N, d_in] tensor "
                    "(default: the run's held-out cache; needed for a bare SAE folder)")


ANALYSES_HELP = """analyses:
  dead        latents that never fire on the activations (and, from the training state, when they
              died), dense ones (firing on > 10 % / > 1 % of tokens), a density histogram
  collapse    effective rank and participation ratio of the decoder, near-duplicate latent pairs
              (decoder cosine > 0.9), effective rank of the codes on the activations
  absorption  first-letter feature absorption (Chanin et al. 2024): probes for each word's first
              letter, the SAE latents that carry it, and the share absorbed by token-specific
              latents; runs the model (the run's, or --model)
  geometry    the decoder's covariance spectrum and its power law, co-occurrence lobes, multi-
              dimensional features and crystals (Li et al. 2024, "The Geometry of Concepts")
  all         every one of them, plus RUN/analysis/report.md and PNG plots (absorption is skipped,
              with a note, for an SAE that names no model)
  task        a task evaluation against supervised dictionaries (Makelov et al. 2025; --task ioi):
              approximation, control and interpretability of each SAE next to the supervised one"""


def _at_least(lo: int):
    """An argparse type: an integer >= `lo`; anything else is refused with the flag's name."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saekit", description=__doc__)
    p.add_argument("--version", action="version", version=f"saekit {saekit.__version__}")
    sub = p.add_subparsers(dest="verb", required=True)
    for verb in (_train_verb, _cache_verb, _eval_verb, _analyze_verb, _match_verb, _stability_verb, _export_verb,
                 _atlas_verb):
        verb(sub).add_argument("--quiet", action="store_true", help="no progress bars")
    for verb in (_steer_verb, _attribute_verb):
        verb(sub)
    for s in sub.choices.values():
        s.set_defaults(parser=s)  # a verb's own usage in its error messages
    return p


def _train_verb(sub):
    """`saekit train`'s arguments."""
    from saekit.config import config_help

    t = sub.add_parser("train", usage="saekit train [CONFIG.yaml] [--resume] [--quiet] [--KEY VALUE ...]",
                       help="harvest activations and train one SAE per hookpoint, then evaluate",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Config keys come from the YAML file (default: built-in defaults), "
                                   "overridden by --key value pairs, e.g. --k 64 --out runs/x.",
                       epilog="config keys (default, meaning):\n" + config_help())
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its stored config")
    t.set_defaults(func=_train)
    return t


def _cache_verb(sub):
    """`saekit cache`'s arguments."""
    from saekit.config import config_help

    c = sub.add_parser("cache", usage="saekit cache [CONFIG.yaml] [--quiet] [--KEY VALUE ...] | saekit cache --list | "
                                      "saekit cache --remove KEY|all [--cache_dir DIR]",
                       help="harvest and cache the activations a config needs (reused by train); list or remove caches",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Harvests the activations of the config's train and held-out splits into "
                                   "cache_dir (default $SAEKIT_CACHE/activations, i.e. ~/.cache/saekit/activations), "
                                   "one folder per content hash; `saekit train` with the same data keys reuses them.",
                       epilog="config keys (default, meaning):\n" + config_help())
    c.add_argument("--list", action="store_true", help="list the caches in cache_dir: key, size, tokens, split, "
                                                       "hookpoints, model")
    c.add_argument("--remove", metavar="KEY|all", default=None, help="delete one cache (its key from --list) or all")
    c.set_defaults(func=_cache)
    return c


def _eval_verb(sub):
    """`saekit eval`'s arguments."""
    e = sub.add_parser("eval", help="evaluate a run's SAEs on its held-out text (writes RUN/eval.json)")
    e.add_argument("run", help="a run folder or a bare SAE folder")
    e.add_argument("--contexts", type=_at_least(1), default=None, help="held-out contexts for the downstream loss")
    e.add_argument("--activations", default=None, help=ACTIVATIONS_HELP)
    e.add_argument("--model", default=None, help="model for the downstream loss of a bare SAE folder")
    e.add_argument("--format", choices=["saekit", "saebench"], default="saekit",
                   help="saebench: also write sae-bench's core result files, CE under SAEBench's convention "
                        "(RUN/saebench/core/)")
    e.set_defaults(func=_eval, strict=True)
    return e


def _analyze_verb(sub):
    """`saekit analyze`'s arguments."""
    a = sub.add_parser("analyze", help="dead/dense latents, collapse, absorption, feature geometry of a run's SAEs, "
                                       "or a task evaluation against supervised dictionaries (writes RUN/analysis/)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ANALYSES_HELP)
    a.add_argument("analysis", choices=["dead", "collapse", "absorption", "geometry", "all", "task"],
                   help="which analysis (each is described below)")
    a.add_argument("run", help="a run folder or a bare SAE folder")
    a.add_argument("--hookpoint", default=None, help="analyse only this hookpoint of the run")
    a.add_argument("--activations", default=None, help=ACTIVATIONS_HELP)
    a.add_argument("--model", default=None, help="model for absorption (default: the run's)")
    a.add_argument("--tokens", type=_at_least(1), default=None, help="tokens for dead/collapse/geometry (default: all)")
    a.add_argument("--words", type=_at_least(1), default=3000, help="vocabulary words for absorption")
    a.add_argument("--f1-threshold", type=float, default=0.6, help="absorption: keep letters whose probe F1 >= this")
    a.add_argument("--min-letters", type=_at_least(1), default=20, help="absorption: letters that must pass the probe")
    a.add_argument("--protocol", choices=["saekit", "saebench"], default="saekit",
                   help="absorption: saekit's protocol, or SAEBench's (compares with published SAEBench figures)")
    a.add_argument("--against", default=None, help="another run of the same config (e.g. --seed 1): add the seed "
                                                   "stability of each hookpoint against it")
    a.add_argument("--task", default="ioi", help="task: the task (ioi: indirect object identification)")
    a.add_argument("--position", default="end", help="task: prompt position read and replaced (ioi: end, io, s1, s2)")
    a.add_argument("--prompts", type=_at_least(1), default=64, help="task: held-out prompts the axes are measured on")
    a.add_argument("--pairs", type=_at_least(1), default=16, help="task: counterfactual pairs per edit")
    a.set_defaults(func=_analyze, strict=True)
    return a


def _match_verb(sub):
    """`saekit match`'s arguments."""
    mt = sub.add_parser("match", usage="saekit match A B [options] | saekit match RUN --chain [options]",
                        help="match the latents of two SAEs (or every layer of a run) and report how alike they are")
    mt.add_argument("a", help="SAE folder (or RUN/<hookpoint>); with --chain, a run folder")
    mt.add_argument("b", nargs="?", default=None, help="the SAE folder to match A to")
    mt.add_argument("--chain", action="store_true", help="match consecutive hookpoints of run A; writes "
                                                         "RUN/analysis/matching.{md,json,png}")
    mt.add_argument("--method", choices=["decoder", "activations"], default="decoder",
                    help="decoder rows (SAE Match) or activation correlation on the same tokens")
    mt.add_argument("--solver", choices=["auto", "exact", "sparse", "argmax"], default="auto")
    mt.add_argument("--candidates", type=_at_least(1), default=16, help="sparse solver: neighbours per latent")
    mt.add_argument("--min-score", type=float, default=None, help="unmatch pairs scoring at or below this")
    mt.add_argument("--tokens", type=_at_least(1), default=32768, help="held-out tokens to encode (activations, chain)")
    mt.add_argument("--contexts", type=_at_least(0), default=None, help="--chain: contexts for the layer-skip Δloss "
                                                               "(default: the run's eval_contexts; 0 skips it)")
    mt.add_argument("--activations-a", default=None, help=ACTIVATIONS_HELP)
    mt.add_argument("--activations-b", default=None, help=ACTIVATIONS_HELP)
    mt.add_argument("--out", default=None, help="match file, .json or .parquet (default: "
                                                "A_RUN/analysis/matches/<A hookpoint>__<B run>@<B hookpoint>.json)")
    mt.add_argument("--force", action="store_true", help="overwrite an existing match file")
    mt.add_argument("--show", type=_at_least(1), default=10, help="best pairs to print")
    mt.set_defaults(func=_match, strict=True)
    return mt


def _stability_verb(sub):
    """`saekit stability`'s arguments."""
    st = sub.add_parser("stability", help="how much two runs' SAEs of one hookpoint agree (two seeds): matched "
                                          "decoder/encoder cosines, shares >= 0.7 and 0.9, co-firing")
    st.add_argument("a", help="run folder (or SAE folder) A; its held-out cache gives the co-firing tokens")
    st.add_argument("b", help="run folder (or SAE folder) B")
    st.add_argument("--hookpoint", default=None, help="the hookpoint to compare (needed when A has several)")
    st.add_argument("--activations", default=None, help=ACTIVATIONS_HELP)
    st.add_argument("--tokens", type=_at_least(1), default=32768, help="held-out tokens for co-firing")
    st.add_argument("--json", action="store_true", help="print the result as JSON")
    st.set_defaults(func=_stability, strict=True)
    return st


def _export_verb(sub):
    """`saekit export`'s arguments."""
    x = sub.add_parser("export", help="write a run's SAEs (or any SAE folder saekit loads) in another tool's format")
    x.add_argument("run", help="a run folder or an SAE folder (saekit, SAELens, sparsify, dictionary_learning, "
                               "Gemma Scope)")
    x.add_argument("--format", choices=["sae-lens"], required=True, help="the format to write")
    x.add_argument("--out", default=None, help="output folder (default: SAE_FOLDER-sae-lens, or "
                                               "RUN/export-sae-lens/<hookpoint>/; one subfolder per hookpoint)")
    x.add_argument("--hookpoint", default=None, help="export only this hookpoint of the run")
    x.set_defaults(func=_export, strict=True)
    return x


def _atlas_verb(sub):
    """`saekit atlas`'s arguments."""
    at = sub.add_parser("atlas", usage="saekit atlas build RUN [--tokens N] [--split S] [--out PATH] | "
                                       "saekit atlas add ATLAS [--run RUN] | saekit atlas export ATLAS [DIR] | "
                                       "saekit atlas serve ATLAS [--port P] | saekit atlas query ATLAS "
                                       "(--feature N | --text T | --similar N | --token T | --search REGEX | --dead | "
                                       "--dense | --top-by COL) [--hookpoint H] [--json]",
                        help="build or query a feature atlas (RUN/atlas.sqlite)")
    at.add_argument("action", choices=["build", "add", "query", "export", "serve"],
                    help="build an atlas; add RUN/analysis results to one (no rebuild); query one; export it as "
                         "static HTML; serve it on 127.0.0.1")
    at.add_argument("path", help="build: a run folder; add, query: an atlas file (or the run folder holding one)")
    at.add_argument("target", nargs="?", default=None, help="export: the folder to write (default: site/ beside "
                                                            "the atlas file, e.g. RUN/site/)")
    at.add_argument("--port", type=int, default=8000, help="serve: the port on 127.0.0.1")
    at.add_argument("--run", default=None, help="add: the run whose analyses to add (default: the atlas's run)")
    at.add_argument("--tokens", type=_at_least(1), default=None, help="build: cached tokens to read (default: all)")
    at.add_argument("--split", default="train", choices=["train", "val"],
                    help="build: the activation cache to read (default: train, the run's largest)")
    at.add_argument("--out", default=None, help="build: atlas file (default: RUN/atlas.sqlite)")
    at.add_argument("--hookpoint", default=None, help="query: this hookpoint (needed for a card of a multi-layer run)")
    at.add_argument("--feature", type=_at_least(0), default=None, help="the card of this latent")
    at.add_argument("--text", default=None, help="the latents active on each token of this text (loads the model)")
    at.add_argument("--similar", type=_at_least(0), default=None, help="the latents whose decoder rows are "
                                                                          "nearest this one's")
    at.add_argument("--token", default=None, help="latents whose top contexts peak on this token, e.g. ' king'")
    at.add_argument("--search", default=None, help="latents whose label or top peak tokens match this regex")
    at.add_argument("--dead", action="store_true", help="latents that never fired")
    at.add_argument("--dense", action="store_true", help="the densest latents")
    at.add_argument("--top-by", default=None, help="latents with the highest density, mean_act, max_act, "
                                                   "label_score or n_fires")
    at.add_argument("--limit", type=_at_least(1), default=20, help="rows to print")
    at.add_argument("--json", action="store_true", help="JSON instead of a table")
    at.set_defaults(func=_atlas, strict=True)
    return at


def _steer_verb(sub):
    """`saekit steer`'s arguments."""
    sr = _spliced_verb(sub, "steer", _steer, "the run's model continuing a prompt, clean and with latents edited "
                       "(the dictionaries spliced in, reconstruction error kept)",
                       "the text to continue (after a BOS token)")
    sr.add_argument("--feature", action="append", required=True, metavar="LATENT=EDIT",
                    help="an edit at every position: N=+V or N=-V add, N=V set, N=xS scale, N=zero, N=mean "
                         "(repeat for several)")
    sr.add_argument("--max-new-tokens", type=_at_least(1), default=20, help="tokens to generate (default 20)")
    sr.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; else sample with --seed")
    sr.add_argument("--seed", type=int, default=0, help="the sampling seed")
    sr.add_argument("--no-error", action="store_true", help="leave the reconstruction error out")
    return sr


def _attribute_verb(sub):
    """`saekit attribute`'s arguments."""
    ab = _spliced_verb(sub, "attribute", _attribute, "the latents that drove the model's next-token logit of "
                       "--target (activation x gradient through the spliced model)",
                       "the text after which the next token is predicted")
    ab.add_argument("--target", required=True, help="one token, e.g. ' king'")
    ab.add_argument("--against", default=None, help="one token: attribute logit[target] - logit[against]")
    ab.add_argument("--limit", type=_at_least(1), default=20, help="rows to print")
    return ab


def _spliced_verb(sub, name: str, func, what: str, prompt: str):
    """A verb that runs the model with a run's dictionaries spliced in, with the arguments all such verbs take."""
    s = sub.add_parser(name, help=what)
    s.add_argument("run", help="a run folder or an SAE folder")
    s.add_argument("--prompt", required=True, help=prompt)
    s.add_argument("--hookpoint", default=None, help="the dictionary (needed when the run has several)")
    s.add_argument("--model", default=None, help="the model (default: the run's)")
    s.add_argument("--json", action="store_true", help="JSON instead of text")
    s.set_defaults(func=func, strict=True)
    return s


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "strict", False) and extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args, extra)
    except SaekitError as e:
        _close_bars()
        print(f"saekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a verb may say what was kept and how to continue
        _close_bars()
        print("saekit: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    return 0


def _close_bars() -> None:
    """Close the progress bars an error or Ctrl-C left open, so the message starts on its own line
    and no bar is redrawn after it."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
