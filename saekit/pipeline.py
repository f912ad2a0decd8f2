"""The `saekit train` pipeline: text -> tokens -> cached activations -> SAEs -> evaluation.

Each stage lives in its own module (data, model, activations, trainer, evaluate); this one
only wires them together for a TrainConfig and owns the run folder:
    RUN/config.json          the config (a resume must match it)
    RUN/metrics.jsonl        one line per logged step
    RUN/<hookpoint>/         cfg.json + sae.safetensors (acts on raw activations)
    RUN/state.safetensors    everything --resume needs (params, Adam, counters, step)
    RUN/eval.json            evaluation results
"""

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from saekit import data, model as lm
from saekit.activations import ActivationCache, ShuffledBatches, build_cache, cache_key, resume_point
from saekit.analyze.collapse import decoder_collapse
from saekit.config import TrainConfig, make_config
from saekit.errors import SaekitError
from saekit.evaluate import evaluate_run
from saekit.trainer import INIT_SAMPLE, STATE_FILE, Trainer, resolve_device, run_steps

# Keys that may change between a run and its resume without changing what is trained.
RESUMABLE_CHANGES = {"device", "log_every", "checkpoint_every", "wandb", "harvest_batch", "eval_contexts", "cache_dir",
                     "collapse_every"}


def cache_root(cfg: TrainConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else lm.saekit_cache() / "activations"


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


def cache_path(cfg: TrainConfig, split: str) -> Path:
    """Folder of the activation cache of one split (no model needed to find it)."""
    key = cache_key(model=cfg.model, dataset=cfg.dataset, text_field=cfg.text_field, ctx_len=cfg.ctx_len,
                    n_tokens=cfg.n_tokens, val_tokens=cfg.val_tokens, seed=cfg.seed,
                    hookpoints=sorted(cfg.hookpoints), split=split)
    return cache_root(cfg) / key


def activation_cache(cfg: TrainConfig, model, split: str, tokens, mask, quiet: bool = False) -> ActivationCache:
    """The cached activations of one split, harvested now if no finished cache exists."""
    path = cache_path(cfg, split)
    try:
        return ActivationCache.open(path)
    except SaekitError:
        pass
    done = resume_point(path)
    start = done * cfg.harvest_batch
    chunks = lm.harvest(model, tokens[start:], mask[start:], cfg.hookpoints, batch_size=cfg.harvest_batch,
                        progress=not quiet, desc=f"harvest {split}")
    meta = {"model": cfg.model, "dataset": cfg.dataset, "split": split, "ctx_len": cfg.ctx_len, "seed": cfg.seed,
            "n_contexts": len(tokens)}
    return build_cache(path, chunks, meta, chunks_done=done)


def prepare(cfg: TrainConfig, quiet: bool = False):
    """Load the model, check hookpoints, and make sure both activation caches exist."""
    device = resolve_device(cfg.device)
    model = lm.load_model(cfg.model, device=str(device))
    lm.check_hookpoints(model, cfg.hookpoints)
    ctx = contexts(cfg, model.tokenizer)
    caches = {s: activation_cache(cfg, model, s, *ctx[s], quiet=quiet) for s in ("train", "val")}
    return model, ctx, caches


def _check_run_folder(cfg: TrainConfig, run: Path, resume: bool) -> None:
    saved = run / "config.json"
    if not resume:
        if saved.exists():
            raise SaekitError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
        return
    if not saved.exists() or not (run / STATE_FILE).exists():
        raise SaekitError(f"nothing to resume in {run} (no config.json / {STATE_FILE})")
    old = json.loads(saved.read_text())
    new = asdict(cfg)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise SaekitError(f"cannot resume {run} with a different config ({changes}); use the saved config or a new --out")


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> Path:
    """Train one SAE per hookpoint as configured, evaluate them, return the run folder."""
    run = Path(cfg.out)
    _check_run_folder(cfg, run, resume)
    model, ctx, caches = prepare(cfg, quiet)
    train_cache = caches["train"]
    batches = ShuffledBatches(train_cache, cfg.hookpoints, cfg.batch_size, cfg.seed, cfg.buffer_tokens)
    total = cfg.epochs * batches.steps_per_epoch
    sample = {h: train_cache.tensor(h, INIT_SAMPLE) for h in cfg.hookpoints}
    dims = {h: train_cache.dim(h) for h in cfg.hookpoints}
    trainer = Trainer(cfg, dims, sample, total, resolve_device(cfg.device))
    run.mkdir(parents=True, exist_ok=True)
    metrics_file = run / "metrics.jsonl"
    if resume:
        trainer.load(run)
        kept = [ln for ln in metrics_file.read_text().splitlines() if json.loads(ln)["step"] <= trainer.step] \
            if metrics_file.exists() else []
        metrics_file.write_text("".join(ln + "\n" for ln in kept))
    else:
        (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        metrics_file.write_text("")
    log = _wandb_logger(cfg, run)

    def on_log(step, metrics):
        prev = (step - 1) // cfg.log_every * cfg.log_every  # the previous logged step
        if cfg.collapse_every and step // cfg.collapse_every > prev // cfg.collapse_every:
            for h, sae in trainer.saes.items():  # a multiple of collapse_every was reached since then
                metrics[h]["collapse"] = decoder_collapse(sae).summary()
        with metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if log:
            log(step, metrics)

    run_steps(trainer, batches.batches(trainer.step, cfg.epochs), quiet=quiet, on_log=on_log,
              on_checkpoint=lambda: trainer.save(run))
    trainer.save(run)
    evaluate_run(run, model=model, caches=caches, ctx=ctx, quiet=quiet)
    return run


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


def load_run_config(run: str | Path) -> TrainConfig:
    file = Path(run) / "config.json"
    if not file.is_file():
        raise SaekitError(f"{run} is not a saekit run folder (no config.json)")
    return make_config(TrainConfig, json.loads(file.read_text()))
