"""The `saekit train` and `saekit eval` pipelines: text -> tokens -> cached activations -> SAEs
-> evaluation. Each stage lives in its own module (data, model, activations, trainer,
evaluate); the run folder belongs to `saekit.run.Run`; this module only wires them together.
"""

import math
from dataclasses import asdict
from pathlib import Path

import torch

from saekit import data
from saekit import distributed as dist
from saekit import model as lm
from saekit.activations import ActivationCache, ShuffledBatches, build_cache, cache_path, merge_parts, resume_point
from saekit.config import TrainConfig, dictionaries, parse_source
from saekit.errors import SaekitError
from saekit.evaluate import downstream_metrics, reconstruction_metrics
from saekit.io import md_table
from saekit.run import EVAL, Run
from saekit.runtime import resolve_device
from saekit.trainer import INIT_SAMPLE, Trainer, run_steps


def contexts(cfg: TrainConfig, tokenizer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Packed token contexts and masks: {"train": ..., "val": ...}, disjoint and seeded."""
    texts = data.load_texts(cfg.dataset, text_field=cfg.text_field)
    tokens, mask = data.pack_contexts(texts, tokenizer, cfg.ctx_len, cfg.n_tokens + cfg.val_tokens, cfg.seed)
    n_val = max(1, math.ceil(cfg.val_tokens / max(1.0, float(mask.sum()) / len(mask))))
    if n_val >= len(tokens):
        raise SaekitError(f"dataset {cfg.dataset!r} is too small: {int(mask.sum())} tokens for "
                          f"n_tokens={cfg.n_tokens} plus val_tokens={cfg.val_tokens}")
    (tt, tm), (vt, vm) = data.split_contexts(tokens, mask, n_val, cfg.seed)
    return {"train": (tt, tm), "val": (vt, vm)}


def activation_cache(cfg: TrainConfig, model, split: str, tokens, mask, quiet: bool = False) -> ActivationCache:
    """The cached activations of one split, harvested now if no finished cache exists.

    Every process (of a process group, or the only one) harvests its own contiguous slice of the
    contexts into its own part of the cache, continuing the part a killed harvest left; the main
    process then ties the parts together in context order. The cache holds the same rows in the
    same order at any number of processes, and any number can read it."""
    path = cache_path(cfg, split)
    try:
        cache = ActivationCache.open(path)
    except SaekitError:
        cache = None
    if dist.broadcast_object(cache is not None):  # the main process's view: all harvest, or none
        return cache or ActivationCache.open(path)
    r, world, b = dist.rank(), dist.world(), cfg.harvest_batch
    lo, hi = len(tokens) * r // world, len(tokens) * (r + 1) // world
    share = {"contexts": [lo, hi], "harvest_batch": b}  # a part of other bounds or batches starts afresh
    done = resume_point(path, r, share)
    start = lo + done * b
    toks, m = tokens[start:hi], mask[start:hi]
    acts = lm.harvest(model, toks, m, cfg.hookpoints, batch_size=b, progress=not quiet, desc=f"harvest {split}")
    firsts = range(0, len(toks), b)
    chunks = ({**a, **row_fields(toks[s : s + b], m[s : s + b], start + s)} for a, s in zip(acts, firsts, strict=True))
    dist.together(lambda: build_cache(path, chunks, share, chunks_done=done, part=r))
    meta = {"model": cfg.model, "dataset": cfg.dataset, "split": split, "ctx_len": cfg.ctx_len, "seed": cfg.seed,
            "n_contexts": len(tokens), "processes": world}
    dist.main_first(lambda: merge_parts(path, world, meta))
    return ActivationCache.open(path)


def row_fields(tokens: torch.Tensor, mask: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
    """The cache's row fields of contexts `first, first + 1, ...`: context index, position and token
    id of every kept position, row-major as `harvest` keeps them."""
    context, position = mask.nonzero(as_tuple=True)
    return {"_context": context + first, "_position": position, "_token": tokens[mask]}


def prepare(cfg: TrainConfig, quiet: bool = False):
    """Load the model, check hookpoints, and make sure both activation caches exist (in a process
    group, every process calls this and harvests its share)."""
    check_sources(cfg)
    device = resolve_device(cfg.device)
    model = lm.load_model(cfg.model, device=str(device))
    lm.check_hookpoints(model, cfg.hookpoints)
    ctx = contexts(cfg, model.tokenizer)
    caches = {s: activation_cache(cfg, model, s, *ctx[s], quiet=quiet) for s in ("train", "val")}
    return model, ctx, caches


def check_sources(cfg: TrainConfig) -> None:
    """Refuse sources and targets that this saekit cannot harvest: other models or snapshots."""
    other = [n for n in (cfg.sources or []) + (cfg.targets or []) if parse_source(n)[0] is not None]
    if other:
        raise SaekitError(f"sources {other} name another model or snapshot (model@revision:hookpoint); saekit "
                          f"harvests the hookpoints of the config's model ({cfg.model}) only: name hookpoints")


def finished_caches(cfg: TrainConfig) -> dict[str, ActivationCache] | None:
    """Both activation caches of `cfg` when they are complete (no model needed), else None."""
    try:
        return {s: ActivationCache.open(cache_path(cfg, s)) for s in ("train", "val")}
    except SaekitError:
        return None


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> Path:
    """Train one SAE per hookpoint as configured, evaluate them, return the run folder.

    With `resume`, `cfg` must match the stored config of the run at `cfg.out` (except the
    settings that do not change what is trained). The model is loaded only to harvest missing
    activations and, at the end, to evaluate: training starts at once from finished caches.

    Under torchrun (WORLD_SIZE/RANK in the environment) or in an initialised process group, the
    processes train together: data parallel (every process takes a slice of each global batch),
    or with `shard_hookpoints` each process its own hookpoints. Missing caches are harvested by all
    processes, each its own contexts (the model is loaded only then); the main process writes the
    run folder and evaluates while the others wait."""
    dist.init_from_env(cfg.device)
    main = dist.is_main()
    run = Run.for_resume(cfg.out, asdict(cfg)) if resume else None
    cfg = run.config if run else cfg
    quiet = quiet or not main

    model = ctx = None
    caches = finished_caches(cfg)
    if dist.broadcast_object(caches is None):  # the main process's view: all harvest, or none
        model, ctx, caches = prepare(cfg, quiet)
        model = model if main else None  # only the main process evaluates
    elif caches is None:
        raise SaekitError(f"the activation caches of {cfg.out} are not readable from process {dist.rank()}; "
                          "with several nodes, cache_dir must be on a file system every node shares")
    sharded = cfg.shard_hookpoints and dist.active()
    names = list(dictionaries(cfg))
    mine = names[dist.rank() :: dist.world()] if sharded else names
    if not mine:
        raise SaekitError(f"shard_hookpoints: {dist.world()} processes for {len(names)} dictionaries; "
                          "start at most one process per hookpoint")
    hookpoints = list(dict.fromkeys(h for n in mine for part in dictionaries(cfg)[n] for h in part))
    train_cache = caches["train"]
    missing = [h for h in hookpoints if h not in train_cache.hookpoints]
    if missing:
        raise SaekitError(f"the activation cache {train_cache.path} holds no {missing}; delete it to harvest again")
    batches = ShuffledBatches(train_cache, hookpoints, cfg.batch_size, cfg.seed, cfg.buffer_tokens)
    total = cfg.epochs * batches.steps_per_epoch
    sample = {h: train_cache.tensor(h, INIT_SAMPLE) for h in hookpoints}
    dims = {h: train_cache.dim(h) for h in hookpoints}
    trainer = Trainer(cfg, dims, sample, total, resolve_device(cfg.device), data_parallel=not sharded)
    if run and run.has_state:
        trainer.load(run)
        if main:
            run.truncate_metrics(trainer.step)
    else:  # a new run, or one that stopped before its first checkpoint
        run = dist.main_first(lambda: Run.create(cfg)) or Run.open(cfg.out)
    log = _wandb_logger(cfg, run.path) if main else None

    def on_log(step, metrics):
        prev = (step - 1) // cfg.log_every * cfg.log_every  # the previous logged step
        if (main or sharded) and cfg.collapse_every and step // cfg.collapse_every > prev // cfg.collapse_every:
            from saekit.analyze.collapse import decoder_collapse  # pandas/scipy: only when asked for

            for h, sae in trainer.saes.items():  # a multiple of collapse_every was reached since then
                if h in metrics:  # not after a skipped batch
                    metrics[h]["collapse"] = decoder_collapse(sae).summary()
        if sharded:  # every process's hookpoints, in one line
            parts = dist.gather_objects({h: m for h, m in metrics.items() if h in trainer.saes})
            if parts is not None:
                metrics = {**metrics, **{h: m for part in parts for h, m in part.items()}}
        if not main:
            return
        run.log_metrics(step, metrics)
        if log:
            log(step, metrics)

    def save():
        if sharded:
            trainer.save_sharded(run)
        else:
            dist.main_first(lambda: trainer.save(run))

    run_steps(trainer, batches.batches(trainer.step, cfg.epochs), quiet=quiet, on_log=on_log, on_checkpoint=save)
    save()
    dist.main_first(lambda: evaluate_run(run, model=model, caches=caches, ctx=ctx, quiet=quiet))
    return run.path


def evaluate_run(run: Run | str | Path, model=None, caches=None, ctx=None, quiet: bool = False,
                 n_contexts: int | None = None, activations: str | None = None, model_name: str | None = None) -> dict:
    """Evaluate every SAE of a run on its held-out split (RUN/eval.json, a table on stdout).

    A bare SAE folder is evaluated on `activations` (reconstruction), and, when a model is
    known (`model_name` or the SAE's own record), on the default corpus's held-out contexts
    spliced into that model (downstream loss)."""
    run = run if isinstance(run, Run) else Run.open(run)
    cfg = run.config
    if run.bare:
        if activations is None:
            raise SaekitError(f"{run.path} is a bare SAE folder: pass --activations PATH (a cache folder or a "
                              ".safetensors file of its hookpoint's activations)")
        name = model_name or run.model_name
        cfg = TrainConfig(model=name, hookpoints=run.hookpoints) if name else None
    spliced = [h for h in run.hookpoints if run.parts(h) is None]  # crosscoders: reconstruction only
    if cfg is not None and model is None and spliced:
        device = resolve_device(cfg.device)
        model = lm.load_model(cfg.model, device=str(device))
        lm.check_hookpoints(model, spliced)
        ctx = contexts(cfg, model.tokenizer)
    n_ctx = n_contexts or (cfg.eval_contexts if cfg else 0)
    results = {}
    for h in run.hookpoints:
        device = next(model.parameters()).device if model is not None else None
        sae = run.sae(h, device=device)
        if run.parts(h) is not None:  # a crosscoder or transcoder: reconstruction of each target
            results[h] = reconstruction_metrics(sae, run.dictionary_batches(h, path=activations))
            continue
        acts = run.activations(h, path=activations) if caches is None or activations else caches["val"].batches(h)
        results[h] = reconstruction_metrics(sae, acts)
        if model is not None:
            tokens, mask = ctx["val"]
            results[h] |= downstream_metrics(model, sae, h, tokens[:n_ctx], mask[:n_ctx])
    run.write_json(EVAL, results)
    print(md_table([{"metric": k, **{h: r[k] for h, r in results.items()}} for k in next(iter(results.values()))]))
    return results


def _wandb_logger(cfg: TrainConfig, run: Path):
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise SaekitError("wandb: true but the wandb package is not installed (pip install wandb)") from None
    wb = wandb.init(project="saekit", name=run.name, config=asdict(cfg), dir=str(run))

    def log(step, metrics):
        flat = {f"{h}/{k}": v for h, m in metrics.items() if isinstance(m, dict) for k, v in m.items()}
        wb.log({**flat, "tokens_per_s": metrics["tokens_per_s"]}, step=step)

    return log
