"""The `saekit train` and `saekit eval` pipelines: text -> tokens -> cached activations -> SAEs
-> evaluation. Each stage lives in its own module (data, model, activations, trainer,
evaluate); the run folder belongs to `saekit.run.Run`; this module only wires them together.
"""

import sys
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch

from saekit import data, saebench
from saekit import distributed as dist
from saekit import model as lm
from saekit.activations import ActivationCache, ShuffledBatches, build_cache, cache_path, merge_parts, resume_point
from saekit.config import TrainConfig, dictionaries, parse_source
from saekit.data import contexts
from saekit.errors import SaekitError
from saekit.evaluate import downstream_metrics, reconstruction_metrics
from saekit.io import Phases, figure, md_table
from saekit.lock import POLL_S, FileLock
from saekit.run import EVAL, Run
from saekit.runtime import resolve_device
from saekit.stream import StreamedBatches
from saekit.trainer import INIT_SAMPLE, Trainer, run_steps


def activation_cache(cfg: TrainConfig, models, split: str, tokens, mask, quiet: bool = False) -> ActivationCache:
    """The cached activations of one split, harvested now if no finished cache exists. `models`:
    the config's model, or `{name: model}` by `source_models` when sources name other models.

    Every process (of a process group, or the only one) harvests its own contiguous slice of the
    contexts into its own part of the cache, continuing the part a killed harvest left; the main
    process then ties the parts together in context order. The cache holds the same rows in the
    same order at any number of processes, and any number can read it."""
    path = cache_path(cfg, split)
    cache = _finished(path)
    if dist.broadcast_object(cache is not None):  # the main process's view: all harvest, or none
        return cache or ActivationCache.open(path)
    lock = _job_lock(path.with_name(path.name + ".lock"), f"the activation cache {path} is being harvested")
    try:
        cache = _finished(path) if dist.is_main() else None  # another command may have finished it meanwhile
        if dist.broadcast_object(cache is not None):
            return cache or ActivationCache.open(path)
        return _harvest(cfg, models, split, tokens, mask, path, quiet)
    finally:
        if lock is not None:
            lock.release()


def _finished(path: Path) -> ActivationCache | None:
    try:
        return ActivationCache.open(path)
    except SaekitError:
        return None


def _job_lock(file: Path, doing: str) -> FileLock | None:
    """`file`'s lock, taken by the main process for its whole process group (None on the others),
    so two commands or torchrun jobs never write one cache at once while the processes of one job
    do. The group waits in short rounds, one collective each, which no collective timeout cuts."""
    lock = FileLock(file, doing) if dist.is_main() else None
    while not dist.broadcast_object(lock.acquire(timeout=POLL_S) if lock else None):
        pass
    return lock


def _harvest(cfg: TrainConfig, models, split: str, tokens, mask, path: Path, quiet: bool) -> ActivationCache:
    """Every process's share of the harvest into its part of the cache at `path`, then the parts
    merged. Each model runs on the same contexts; their rows are stored side by side."""
    r, world, b = dist.rank(), dist.world(), cfg.harvest_batch
    lo, hi = len(tokens) * r // world, len(tokens) * (r + 1) // world
    share = {"contexts": [lo, hi], "harvest_batch": b}  # a part of other bounds or batches starts afresh
    done = resume_point(path, r, share)
    start = lo + done * b
    toks, m = tokens[start:hi], mask[start:hi]
    models = models if isinstance(models, dict) else {None: models}
    streams = [_named(lm.harvest(models[name], toks, m, [parse_source(h)[2] for h in hooks], batch_size=b,
                                 progress=not quiet and i == 0, desc=f"harvest {split}"), hooks)
               for i, (name, hooks) in enumerate(source_models(cfg).items())]
    acts = ({k: v for part in parts for k, v in part.items()} for parts in zip(*streams, strict=True))
    firsts = range(0, len(toks), b)
    chunks = ({**a, **row_fields(toks[s : s + b], m[s : s + b], start + s)} for a, s in zip(acts, firsts, strict=True))
    dist.together(lambda: build_cache(path, chunks, share, chunks_done=done, part=r))
    meta = {"model": cfg.model, "dataset": cfg.dataset, "split": split, "ctx_len": cfg.ctx_len,
            "data_seed": cfg.data_seed, "n_contexts": len(tokens), "processes": world}
    dist.main_first(lambda: merge_parts(path, world, meta))
    return ActivationCache.open(path)


def _named(batches, names: list[str]):
    """A model's harvested batches with each hookpoint renamed to its source name (same order)."""
    for acts in batches:
        yield {n: a for n, a in zip(names, acts.values(), strict=True)}


def row_fields(tokens: torch.Tensor, mask: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
    """The cache's row fields of contexts `first, first + 1, ...`: context index, position and token
    id of every kept position, row-major as `harvest` keeps them."""
    context, position = mask.nonzero(as_tuple=True)
    return {"_context": context + first, "_position": position, "_token": tokens[mask]}


def prepare(cfg: TrainConfig, quiet: bool = False):
    """Load the model (and the other models or snapshots that sources name), check hookpoints and
    tokenizers, and make sure both activation caches exist (in a process group, every process
    calls this and harvests its share)."""
    for name, hooks in source_models(cfg).items():  # a wrong layer is named before any weights load
        lm.check_layers(name or cfg.model, [parse_source(h)[2] for h in hooks])
    device = str(resolve_device(cfg.device))
    model = lm.load_model(cfg.model, device=device)
    models = {None: model}
    for name, hooks in source_models(cfg).items():
        if name is not None:
            models[name] = lm.load_model(name, device=device)
            if models[name].tokenizer.get_vocab() != model.tokenizer.get_vocab():
                raise SaekitError(f"source model {name} has another tokenizer than {cfg.model}: a dictionary over "
                                  "several models reads the same tokens in each, so their vocabularies must agree")
        lm.check_hookpoints(models[name], [parse_source(h)[2] for h in hooks])
    if cfg.activations == "stream" and len(models) > 1:
        raise SaekitError("activations: stream forwards the config's model only; sources read from other models "
                          "need activations: cache")
    ctx = contexts(cfg, model.tokenizer)
    caches = {s: activation_cache(cfg, models if len(models) > 1 else model, s, *ctx[s], quiet=quiet) for s in ctx}
    return model, ctx, caches


def stream_batches(cfg: TrainConfig, model, hookpoints: list[str], n_val: int) -> StreamedBatches:
    """The training batches of `activations: stream`: the contexts after the `n_val` held-out ones,
    forwarded through `model` at `hookpoints` as they are needed."""
    def train_contexts():
        texts = data.load_texts(cfg.dataset, text_field=cfg.text_field)
        return islice(data.iter_contexts(texts, model.tokenizer, cfg.ctx_len, cfg.data_seed), n_val, None)

    def forward(tokens, mask):
        return next(lm.harvest(model, tokens, mask, hookpoints, batch_size=len(tokens)))

    return StreamedBatches(train_contexts, forward, hookpoints, cfg.n_tokens, cfg.batch_size, cfg.seed,
                           cfg.buffer_tokens, cfg.harvest_batch)


def source_models(cfg: TrainConfig) -> dict[str | None, list[str]]:
    """The names a config harvests, grouped by the model they are read from: None for the config's
    model, else `model` or `model@revision` (see `saekit.config.parse_source`)."""
    groups: dict[str | None, list[str]] = {}
    for h in cfg.hookpoints:
        model, revision, _ = parse_source(h)
        groups.setdefault(model and (f"{model}@{revision}" if revision else model), []).append(h)
    return groups


def finished_caches(cfg: TrainConfig) -> dict[str, ActivationCache] | None:
    """Both activation caches of `cfg` when they are complete (no model needed), else None."""
    try:
        return {s: ActivationCache.open(cache_path(cfg, s)) for s in ("train", "val")}
    except SaekitError:
        return None


def init_sample(cache: ActivationCache, hookpoints: list[str], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The rows a run initialises from: the first `INIT_SAMPLE` tokens of the training cache (for the
    geometric median and the input scale), or, for `init: data`, whose decoder rows are sample rows,
    `INIT_SAMPLE` rows the seed draws over the whole cache, so that two seeds start on different rows
    (from one shared pool of the first tokens they would share most of their starting rows)."""
    if cfg.init == "data":
        return cache.sample(hookpoints, INIT_SAMPLE, cfg.seed)
    return {h: cache.tensor(h, INIT_SAMPLE) for h in hookpoints}


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> Path:
    """Train one SAE per hookpoint as configured, evaluate them, return the run folder.

    With `resume`, `cfg` must match the stored config of the run at `cfg.out` (except the
    settings that do not change what is trained). The model is loaded only to harvest missing
    activations and, at the end, to evaluate: training starts at once from finished caches.

    Under torchrun (WORLD_SIZE/RANK in the environment) or in an initialised process group, the
    processes train together: data parallel (every process takes a slice of each global batch),
    or with `shard_hookpoints` each process its own hookpoints. Missing caches are harvested by all
    processes, each its own contexts (the model is loaded only then); the main process writes the
    run folder and evaluates while the others wait.

    A run that is complete is not trained again, with `resume` or when the command that made it
    is given again (same config): it says so and, unless it was stopped while evaluating, stops
    (`saekit eval RUN` re-evaluates). Given again for an unfinished run, it asks for --resume."""
    dist.init_from_env(cfg.device)
    main = dist.is_main()
    again = not resume and Run.holds_run(cfg.out)  # the same command again, e.g. the README's first one
    run = Run.for_resume(cfg.out, asdict(cfg), again=again) if resume or again else None
    cfg = run.config if run else cfg
    quiet = quiet or not main

    src = _data_source(cfg, quiet)
    step = (run.checkpoint() or {}).get("step") if run else None
    if isinstance(step, int) and step >= src.total:  # nothing left to train
        evaluated = (run.path / EVAL).is_file()
        if main:
            print(f"saekit: {run.path} is complete (step {step} of {src.total}); "
                  + (f"`saekit eval {run.path}` re-evaluates it" if evaluated else "evaluating it"), file=sys.stderr)
        if not evaluated:  # stopped while evaluating
            dist.main_first(lambda: evaluate_run(run, model=src.model, caches=src.caches, ctx=src.ctx, quiet=quiet))
        return run.path
    if again:
        raise SaekitError(f"{run.path} holds an unfinished run (step {step} of {src.total}); continue it with "
                          f"`saekit train --out {run.path} --resume`, or choose another --out")
    trainer, run = _trainer(cfg, run, src)
    _train_steps(cfg, trainer, run, src, quiet)
    dist.main_first(lambda: evaluate_run(run, model=src.model, caches=src.caches, ctx=src.ctx, quiet=quiet))
    return run.path


@dataclass
class _Source:
    """A run's training data: the batches of this process's hookpoints (read from the cache, or
    streamed from the model's forward), and what its evaluation reuses (the model and held-out
    contexts when they were loaded, the caches)."""

    caches: dict[str, ActivationCache]
    hookpoints: list[str]
    batches: ShuffledBatches | StreamedBatches
    total: int  # steps of the whole run
    sharded: bool  # each process trains its own dictionaries (shard_hookpoints)
    model: object = None
    ctx: dict | None = None

    def init_sample(self, cfg: TrainConfig) -> dict[str, torch.Tensor]:
        """The rows the dictionaries initialise from: a stream's first rows (forwarded again on a
        resume), else `init_sample` of the training cache."""
        if isinstance(self.batches, StreamedBatches):
            return self.batches.sample(INIT_SAMPLE, cfg.seed if cfg.init == "data" else None)
        return init_sample(self.caches["train"], self.hookpoints, cfg)


def _data_source(cfg: TrainConfig, quiet: bool) -> _Source:
    """This process's batches: from the activation caches (harvested now if missing), or from a
    stream of the model's forward (`activations: stream`)."""
    model = ctx = None
    stream = cfg.activations == "stream"
    if stream and cfg.shard_hookpoints and dist.active():
        raise SaekitError("shard_hookpoints with activations: stream would have every process forward every context "
                          "(the forward is what a stream costs); train data parallel (the default) or cache")
    caches = None if stream else finished_caches(cfg)
    if dist.broadcast_object(caches is None):  # the main process's view: all harvest, or none
        model, ctx, caches = prepare(cfg, quiet)
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
    if stream:  # every process forwards its share of the stream
        batches = stream_batches(cfg, model, hookpoints, len(ctx["val"][0]))
    else:
        train_cache = caches["train"]
        missing = [h for h in hookpoints if h not in train_cache.hookpoints]
        if missing:
            raise SaekitError(f"the activation cache {train_cache.path} holds no {missing}; delete it to harvest again")
        batches = ShuffledBatches(train_cache, hookpoints, cfg.batch_size, cfg.seed, cfg.buffer_tokens)
    model = model if dist.is_main() else None  # only the main process evaluates
    return _Source(caches, hookpoints, batches, cfg.epochs * batches.steps_per_epoch, sharded, model, ctx)


def _trainer(cfg: TrainConfig, run: Run | None, src: _Source) -> tuple[Trainer, Run]:
    """The Trainer, restored from the run's last checkpoint if there is one, and the run folder
    (created now for a new run)."""
    sample = src.init_sample(cfg)
    dims = {h: sample[h].shape[1] for h in src.hookpoints}
    if isinstance(src.batches, StreamedBatches) and cfg.epochs > 1 and dist.is_main():
        print(f"saekit: activations: stream forwards the model over the {cfg.n_tokens:,} training tokens again in "
              f"each of {cfg.epochs} epochs ({cfg.epochs}x the forwards of one); activations: cache forwards them "
              "once and reads them from disk after, which is faster when the disk holds them", file=sys.stderr)
    trainer = Trainer(cfg, dims, sample, src.total, resolve_device(cfg.device), data_parallel=not src.sharded)
    if run and run.has_state:
        trainer.load(run)
        if dist.is_main():
            run.truncate_metrics(trainer.step)
            print(f"saekit: resuming {run.path} from step {trainer.step} of {src.total}", file=sys.stderr)
    else:  # a new run, or one that stopped before its first checkpoint
        run = dist.main_first(lambda: Run.create(cfg)) or Run.open(cfg.out)
    return trainer, run


def _train_steps(cfg: TrainConfig, trainer: Trainer, run: Run, src: _Source, quiet: bool) -> None:
    """Train to the end, logging metrics (and collapse figures) and checkpointing as configured."""
    main, sharded = dist.is_main(), src.sharded
    log = _wandb_logger(cfg, run.path) if main else None

    def on_log(step, metrics):
        prev = (step - 1) // cfg.log_every * cfg.log_every  # the previous logged step
        if (main or sharded) and cfg.collapse_every and step // cfg.collapse_every > prev // cfg.collapse_every:
            from saekit.analyze.collapse import decoder_collapse  # pandas/scipy: only when asked for

            for h, sae in trainer.saes.items():  # a multiple of collapse_every was reached since then
                if h in metrics:  # not after a skipped batch
                    metrics[h]["collapse"] = decoder_collapse(sae).summary()
        if sharded:  # every process's hookpoints, in one line
            gathered = dist.gather_objects({h: m for h, m in metrics.items() if h in trainer.saes})
            if gathered is not None:
                metrics = {**metrics, **{h: m for one in gathered for h, m in one.items()}}
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

    run_steps(trainer, src.batches.batches(trainer.step, cfg.epochs), quiet=quiet, on_log=on_log, on_checkpoint=save)
    save()


# What eval.json's figures measure, written beside them (README, "Evaluation conventions").
CONVENTIONS = {
    "fvu": "sum ||x - x_hat||^2 / sum ||x - mean||^2 over the held-out tokens, centred on their mean; "
           "explained_variance = 1 - fvu; explained_variance_saebench is SAEBench's (variance about zero)",
    "ce": "mean next-token CE over positions whose target is a real token; the SAE (or zeros) replaces the "
          "activations at real tokens only, BOS and special positions keep theirs (SAEBench replaces every "
          "position, BOS included, and averages over positions whose input is not BOS, EOS or padding)",
}


def evaluate_run(run: Run | str | Path, model=None, caches=None, ctx=None, quiet: bool = False,
                 n_contexts: int | None = None, activations: str | None = None, model_name: str | None = None,
                 format: str = "saekit") -> dict:
    """Evaluate every SAE of a run on its held-out split (RUN/eval.json, a table on stdout).

    A bare SAE folder is evaluated on `activations` (reconstruction), and, when a model is
    known (`model_name` or the SAE's own record), on the default corpus's held-out contexts
    spliced into that model (downstream loss). `format="saebench"` also writes each SAE's
    figures in sae-bench's core schema, its CE and KL measured under SAEBench's convention
    (RUN/saebench/core/saekit_<hookpoint>_eval_results.json; see saekit.saebench)."""
    if format not in ("saekit", "saebench"):
        raise SaekitError(f"unknown eval format {format!r}; choose from saekit, saebench")
    run = run if isinstance(run, Run) else Run.open(run)
    if format == "saebench" and run.crosscoder:
        raise SaekitError("sae-bench's core schema holds SAEs read and written at one hookpoint; "
                          f"{run.path} holds a crosscoder or transcoder")
    cfg = run.config
    if run.bare:
        if activations is None:
            raise SaekitError(f"{run.path} is a bare SAE folder: pass --activations PATH (a cache folder or a "
                              ".safetensors file of its hookpoint's activations)")
        name = model_name or run.model_name
        cfg = TrainConfig(model=name, hookpoints=run.hookpoints) if name else None
    say = Phases("eval", quiet)
    spliced = [] if run.crosscoder else run.hookpoints  # crosscoders: reconstruction only
    if activations is not None:  # activations of another width are refused before any model loads
        from saekit.activations import check_width

        for h in spliced:
            check_width(run.activations(h, path=activations), run.sae(h).cfg.d_in)
    if cfg is not None and model is None and spliced:
        device = resolve_device(cfg.device)
        say.step(f"loading {cfg.model}")
        model = lm.load_model(cfg.model, device=str(device))
        lm.check_hookpoints(model, spliced)
        say.step("held-out contexts")
        ctx = contexts(cfg, model.tokenizer)
    n_ctx = n_contexts or (cfg.eval_contexts if cfg else 0)
    results = {}
    for h in run.hookpoints:
        device = next(model.parameters()).device if model is not None else None
        sae = run.sae(h, device=device)
        if run.crosscoder:  # a crosscoder or transcoder: reconstruction of each target
            results[h] = reconstruction_metrics(sae, run.dictionary_batches(h, path=activations))
            continue
        acts = run.activations(h, path=activations) if caches is None or activations else caches["val"].batches(h)
        say.step(f"{h}: reconstruction on the held-out activations")
        results[h] = reconstruction_metrics(sae, acts)
        say.end()
        if model is not None:
            tokens, mask = ctx["val"]
            results[h] |= downstream_metrics(model, sae, h, tokens[:n_ctx], mask[:n_ctx],
                                             progress=None if quiet else f"eval {h}: downstream loss")
        results[h]["encoder_path"] = sae.encoder_path
        results[h]["conventions"] = CONVENTIONS
        if format == "saebench":
            ce = None if model is None else downstream_metrics(
                model, sae, h, tokens[:n_ctx], mask[:n_ctx], convention="saebench",
                progress=None if quiet else f"eval {h}: downstream loss, SAEBench's convention")
            run.write_json(f"saebench/core/saekit_{h}_eval_results.json",
                           saebench.core(results[h], ce, sae, h, cfg.model if cfg else None,
                                         dataset=cfg.dataset if cfg else "", context_size=cfg.ctx_len if cfg else 0,
                                         n_contexts=min(n_ctx, len(tokens)) if ce else 0))
    run.write_json(EVAL, results)
    print(md_table([{"metric": k, **{h: figure(k, r[k]) for h, r in results.items()}}
                    for k in next(iter(results.values())) if k != "conventions"]))
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
