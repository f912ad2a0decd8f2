"""Training: a set of named dictionaries (one SAE per hookpoint by default, or one crosscoder or
transcoder), all stepped on the same batches of activations.

One step per dictionary (Gao et al. 2024): scale each activation to unit RMS, read the sources,
sparse encode/decode the targets, the family's losses (saekit.families: FVU per target summed,
Matryoshka prefixes, AuxK on dead latents, the OrtSAE penalty, JumpReLU's L0), backward through
the sparse kernels, project the decoder-parallel gradient out, Adam, renormalise decoder rows,
the family's per-step hook (BatchTopK's inference threshold, JumpReLU's stored thresholds).
Inputs are divided by a fixed per-activation scale during training; the saved dictionary has it
folded back in and acts on raw activations.
"""

import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import chain

import torch
from tqdm.auto import tqdm

from saekit import distributed as dist
from saekit.config import TrainConfig, dictionaries, make_config, matryoshka_ends
from saekit.errors import SaekitError
from saekit.families import FAMILIES, StepState
from saekit.init import init_sae
from saekit.run import Run
from saekit.runtime import cpu_encoder_path, resolve_device
from saekit.sae import SAE, Crosscoder, SAEConfig

INIT_SAMPLE = 16_384  # tokens for b_dec's geometric median and the input scale
# Out-of-memory errors of the devices (torch < 2.5 has only the CUDA one); a CPU allocation
# failure is a RuntimeError ("can't allocate memory"), checked by message in `run_steps`.
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def lr_factor(step: int, total: int | None, warmup: int, decay_start: float) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last (1 - decay_start); 0 past the end."""
    f = min(1.0, (step + 1) / max(warmup, 1))
    if total:
        start = int(decay_start * total)
        if step >= start:
            f = min(f, max(total - step, 0) / max(total - start, 1))
    return f


@dataclass
class Dictionary:
    """One dictionary in training: the model (a `Crosscoder` when it reads named sources), what it
    reads and writes, its optimizer, its per-latent firing statistics and its init report."""

    sae: SAE
    sources: list[str]
    targets: list[str]
    opt: torch.optim.Adam
    stats: dict[str, torch.Tensor]
    init_report: dict

    @property
    def names(self) -> list[str]:
        """Every activation it reads or writes, once each."""
        return list(dict.fromkeys(self.sources + self.targets))


class Trainer:
    """Holds the dictionaries (one `Dictionary` record each) and the input scales.

    Data parallel inside an initialised process group of several processes (unless
    `data_parallel=False`): every process is given the same global batches, trains on its own
    contiguous slice of each, and the sums that make up the losses, the gradients, the firing
    counts and BatchTopK's cut are taken over the global batch, so every process holds the
    parameters one process would have after the same global batches.

    `dims` maps activation names (hookpoints) to widths; the dictionaries trained are those of
    `cfg` (`saekit.config.dictionaries`) whose sources and targets are all in `dims`."""

    def __init__(self, cfg: TrainConfig, dims: dict[str, int], sample: dict[str, torch.Tensor],
                 total_steps: int | None, device: torch.device, data_parallel: bool | None = None):
        self.parallel = dist.active() if data_parallel is None else data_parallel and dist.active()
        if self.parallel and cfg.batch_size < dist.world():
            raise SaekitError(f"batch_size {cfg.batch_size} is smaller than the {dist.world()} processes training it")
        self.cfg, self.total_steps, self.device = cfg, total_steps, dist.local_device(device)
        self.step = 0
        self.tokens = 0  # tokens trained on (skipped batches excluded)
        self.skipped = 0  # batches skipped for NaN/Inf (on_nonfinite: skip)
        self.scales: dict[str, float] = {}  # per activation name
        self.dicts: dict[str, Dictionary] = {}
        g = torch.Generator().manual_seed(cfg.seed)
        # the CPU encoder path, fixed for the run (a resume takes the stored one; see saekit.runtime)
        path = cpu_encoder_path()
        if self.parallel:
            path = dist.broadcast_object(path)
        for name, (sources, targets) in dictionaries(cfg).items():
            if set(sources + targets) <= set(dims):
                self.dicts[name] = self._build(name, sources, targets, dims, sample, g, path)
        if self.parallel:
            self.scales = dist.broadcast_object(self.scales)

    # each dictionary's model, optimizer and statistics by name (views of the records)
    saes = property(lambda self: {n: d.sae for n, d in self.dicts.items()})
    opts = property(lambda self: {n: d.opt for n, d in self.dicts.items()})
    stats = property(lambda self: {n: d.stats for n, d in self.dicts.items()})

    def _sample(self, name: str, names: list[str], dims: dict[str, int], sample: dict[str, torch.Tensor]):
        """The sample's finite rows of `names`; sets each one's input scale (unit RMS)."""
        xs = {n: sample[n].float() for n in names}
        ok = torch.stack([t.isfinite().all(1) for t in xs.values()]).all(0)
        if not ok.any():  # NaN/Inf rows say nothing about the scale or the geometry
            raise SaekitError(f"every activation of {', '.join(map(repr, names))} in the initialisation sample is "
                              "NaN or Inf" if len(names) > 1 else f"every activation of hookpoint {name!r} in the "
                              "initialisation sample is NaN or Inf")
        xs = {n: t[ok] for n, t in xs.items()}
        for n, t in xs.items():  # unit RMS; with several parts, of each one's deviations from its mean,
            t = t - t.mean(0) if len(names) > 1 else t  # so a large offset does not shrink one part's features
            self.scales[n] = float(t.pow(2).sum(1).mean().div(dims[n]).sqrt().clamp_min(1e-8))
        return xs

    def _build(self, name: str, sources: list[str], targets: list[str], dims: dict[str, int],
               sample: dict[str, torch.Tensor], g: torch.Generator, path: str) -> Dictionary:
        """One dictionary, initialised on the sample, with its optimizer and statistics."""
        cfg, device = self.cfg, self.device
        names = list(dict.fromkeys(sources + targets))
        xs = self._sample(name, names, dims, sample)
        m = cfg.n_latents or cfg.expansion * max(dims[n] for n in sources)
        fam = FAMILIES[cfg.architecture]
        groups = matryoshka_ends(cfg.matryoshka_groups, m) if "matryoshka_groups" in fam.options else None
        k = cfg.k if fam.k_bounded else min(cfg.k, m)  # unbounded: k is only the starting L0
        if not cfg.crosscoder:
            scfg = SAEConfig(dims[name], m, k, cfg.architecture, hookpoint=name, model=cfg.model,
                             matryoshka_groups=groups, encoder_path=path, mp_threshold=cfg.mp_threshold)
        else:
            scfg = SAEConfig(sum(dims[n] for n in sources), m, k, cfg.architecture, model=cfg.model,
                             matryoshka_groups=groups, sources=sources, targets=targets,
                             dims={n: dims[n] for n in names}, encoder_path=path)
        sae = (Crosscoder if scfg.crosscoder else SAE)(scfg, device=device).make_trainable(cfg.jumprelu_bandwidth)
        if device.type == "cuda":
            sae.matmul_dtype = torch.bfloat16
        x = self._concat(xs, sources)
        y = self._concat(xs, targets) if targets != sources else None
        report = init_sae(sae, x, cfg.init, g, cfg.subspace_rank, cfg.subspace_variance, y)
        if fam.init:
            fam.init(sae, x, cfg.k)
        if self.parallel:  # the same start everywhere, whatever each process was given
            dist.broadcast_params(sae)
            sae.batch_cut = dist.batch_cut
        lr = cfg.lr or 2e-4 / math.sqrt(m / 2**14)
        # a family's own parameters may take their own lr (JumpReLU's log-thresholds: Adam moves
        # log(theta) by about lr per step, 10x lets them travel in runs of hundreds of steps)
        named = dict(sae.named_parameters())
        groups = [{"params": [p for n, p in named.items() if n not in fam.lr_scale]}]
        groups += [{"params": [named[n]], "lr": lr * f} for n, f in fam.lr_scale.items()]
        stats = {
            "tokens_since_fired": torch.zeros(m, dtype=torch.long, device=device),
            "first_fired": torch.full((m,), -1, dtype=torch.long, device=device),
            "last_fired": torch.full((m,), -1, dtype=torch.long, device=device),
            "threshold_ema": torch.zeros(2, dtype=torch.float64, device=device),  # [ema, n]
        }
        opt = torch.optim.Adam(groups, lr=lr, eps=6.25e-10, fused=True)
        return Dictionary(sae, sources, targets, opt, stats, report)

    def _concat(self, xs: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        """Activations `xs` of `names`, each divided by its scale, side by side."""
        parts = [xs[n] / self.scales[n] for n in names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    # -- one step -------------------------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, float | torch.Tensor]]:
        """One optimisation step on `batch = {hookpoint: [B, d]}`; returns metrics per dictionary.

        fvu, l0 and aux_loss stay 0-dim device tensors (`float()` them to read): on a GPU the
        host syncs of a step are the lists of dead latents and one finiteness check.

        Every dictionary's loss is computed (`forward`) before any update: if an input or a loss
        holds NaN or Inf, no parameter, optimizer state or firing statistic changes; the batch is
        then skipped (returns {}) or training stops with a SaekitError, per `on_nonfinite`."""
        states = {name: self.forward(d, batch) for name, d in self.dicts.items()}
        ok = torch.stack([c for st in states.values() for c in st.checks])
        if self.parallel:  # a NaN in any slice skips (or stops) the step everywhere
            ok = dist.all_reduce(ok.float(), "min") > 0
        ok = ok.tolist()  # one host sync for every dictionary
        for i, name in enumerate(states):
            if not (ok[2 * i] and ok[2 * i + 1]):
                self._nonfinite(name, "activations" if not ok[2 * i] else "loss")
                self.step += 1  # the batch index still advances: a resume sees the same batches
                return {}
        lr_f = lr_factor(self.step, self.total_steps, self.cfg.warmup_steps, self.cfg.decay_start)
        metrics = {name: self.update(self.dicts[name], st, lr_f) for name, st in states.items()}
        self.tokens += next(iter(states.values())).B
        self.step += 1
        return metrics

    def forward(self, d: Dictionary, batch: dict[str, torch.Tensor]) -> StepState:
        """One dictionary's forward pass on `batch`: its code, losses, the latents that fire and
        the checks (finite inputs, finite loss), nothing committed."""
        cfg, par, sae = self.cfg, self.parallel, d.sae
        B = len(batch[d.sources[0]])  # the global batch; under data parallelism this process takes a slice
        xs = {n: (dist.shard(batch[n]) if par else batch[n]).to(self.device, torch.float32, non_blocking=True)
              for n in d.names}
        x = self._concat(xs, d.sources)
        y = x if d.targets == d.sources else self._concat(xs, d.targets)
        aux = {}
        vals, idx = sae.encode(x, aux)
        denoms = []
        for t in d.targets:
            yt = y[:, sae.part_slice(t, True)] if len(d.targets) > 1 else y
            if par:  # the global batch's total variance: this slice's error sum over it adds up to FVU
                denoms.append(dist.all_reduce((yt - dist.all_reduce(yt.sum(0)) / B).pow(2).sum()))
            else:
                denoms.append((yt - yt.mean(0)).pow(2).sum())
        with torch.no_grad():  # masked updates, not boolean indexing: no host sync
            active = (vals > 1e-3).reshape(-1).float()
            counts = torch.zeros(sae.n_latents, device=self.device).index_add_(0, idx.reshape(-1), active)
            fired = (dist.all_reduce(counts) if par else counts) > 0
            since = (d.stats["tokens_since_fired"] + B).masked_fill_(fired, 0)  # committed by `update`
            dead = (since >= cfg.dead_tokens).nonzero().squeeze(1)
        st = StepState(sae, cfg, x, y, vals, idx, aux, denoms, B, dead, self.step, par,
                       total_steps=self.total_steps, fired=fired, since=since)
        for term in sae.family.losses:
            part = term(st)
            if part is not None:
                st.loss = part if st.loss is None else st.loss + part
        finite = x.isfinite().all() if y is x else x.isfinite().all() & y.isfinite().all()
        st.checks = [finite, st.loss.isfinite()]
        return st

    def update(self, d: Dictionary, st: StepState, lr_f: float) -> dict[str, float | torch.Tensor]:
        """Commit one dictionary's step: firing statistics, backward, decoder-radial gradient out,
        Adam at `lr_f` times its lr, unit-norm decoder rows, the family's hook; its metrics."""
        sae, stats, opt = d.sae, d.stats, d.opt
        with torch.no_grad():
            stats["tokens_since_fired"].copy_(st.since)
            stats["last_fired"].masked_fill_(st.fired, self.step)
            stats["first_fired"].masked_fill_(st.fired & (stats["first_fired"] < 0), self.step)
        opt.zero_grad(set_to_none=True)
        st.loss.backward()
        if self.parallel:
            dist.all_reduce_grads(sae.parameters())
        with torch.no_grad():  # keep decoder rows on the unit sphere: drop the radial gradient
            W, G = sae.W_dec, sae.W_dec.grad
            G.addcmul_(torch.linalg.vecdot(G, W)[:, None], W, value=-1)
        for group in opt.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * lr_f
        opt.step()
        sae.normalize_decoder()
        if sae.family.after_step:
            sae.family.after_step(st, stats)
        fvu = st.fvu
        aux = st.extra.get("aux_loss", torch.zeros((), device=self.device))
        sums = torch.stack([fvu.detach(), (st.vals > 0).sum().to(fvu.dtype), aux.detach().to(fvu.dtype)])
        if self.parallel:
            dist.all_reduce(sums)
        return {"fvu": sums[0], "l0": sums[1] / st.B, "dead_fraction": len(st.dead) / sae.n_latents,
                "aux_loss": sums[2], "lr": opt.param_groups[0]["lr"]}

    def _nonfinite(self, name: str, what: str) -> None:
        names = self.dicts[name].names
        which = f"hookpoint {name!r}" if names == [name] else f"dictionary {name!r} ({', '.join(names)})"
        where = f"NaN or Inf in the {what} of {which} at step {self.step}"
        if self.cfg.on_nonfinite == "stop":
            raise SaekitError(f"{where}; stopped before the update (the last checkpoint is intact; "
                              "on_nonfinite: skip skips such batches)")
        self.skipped += 1
        if not self.parallel or dist.is_main():  # data parallel: every process skips; one says so
            print(f"saekit: {where}: batch skipped, no update", file=sys.stderr)

    @property
    def encoder_path(self) -> str:
        """The numeric path the encoders take (the same for every hookpoint; see SAE.encoder_path)."""
        return next(iter(self.dicts.values())).sae.encoder_path

    # -- results and checkpoints ------------------------------------------------------------
    def final_sae(self, name: str) -> SAE:
        """A copy of the dictionary acting on raw (unscaled) activations, in eval mode (a
        `Crosscoder` when the config names sources)."""
        d = self.dicts[name]
        sae = type(d.sae)(SAEConfig(**asdict(d.sae.cfg)), device=self.device)
        stored = sae.state_dict()  # the training-only parameters stay behind
        sae.load_state_dict({k: v for k, v in d.sae.state_dict().items() if k in stored})
        return sae.fold_input_scales({n: self.scales[n] for n in d.names}).eval().requires_grad_(False)

    def save(self, run: Run, extra: dict | None = None) -> None:
        """Folded SAEs to the run's SAE folders, then the whole training state in one atomic file."""
        tensors, meta = self.state(run)
        self.save_saes(run, extra)
        run.save_state(tensors, meta)

    def save_sharded(self, run: Run, extra: dict | None = None) -> None:
        """`save` when each process of a group trains its own hookpoints: every process writes its
        SAE folders, the main process one training state holding every hookpoint; all must call."""
        tensors, meta = self.state(run)
        self.save_saes(run, extra)
        parts = dist.gather_objects(({k: t.detach().cpu() for k, t in tensors.items()}, meta))
        if parts is not None:
            tensors = {k: t for part, _ in parts for k, t in part.items()}
            meta = {**meta, "scales": {h: s for _, m in parts for h, s in m["scales"].items()},
                    "skipped": max(m["skipped"] for _, m in parts)}
            run.save_state(tensors, meta)
        dist.barrier()

    def state(self, run: Run) -> tuple[dict[str, torch.Tensor], dict]:
        """The training state (tensors by name, metadata); refuses one holding NaN or Inf."""
        tensors = {}
        meta = {"step": self.step, "total_steps": self.total_steps, "scales": self.scales, "tokens": self.tokens,
                "skipped": self.skipped, "encoder_path": next(iter(self.dicts.values())).sae.cfg.encoder_path}
        for h, d in self.dicts.items():
            for n, p in d.sae.named_parameters():
                tensors[f"{h}/param/{n}"] = p.detach()
                for key, t in d.opt.state.get(p, {}).items():
                    tensors[f"{h}/adam/{n}/{key}"] = t.reshape(-1) if t.ndim == 0 else t
            for n, t in d.stats.items():
                tensors[f"{h}/stats/{n}"] = t
        floats = [k for k, t in tensors.items() if t.is_floating_point()]
        finite = torch.stack([tensors[k].isfinite().all() for k in floats]).tolist()
        bad = [k for k, ok in zip(floats, finite, strict=True) if not ok]
        if bad:  # a NaN checkpoint would poison every resume: keep the last good one
            h = bad[0].split("/", 1)[0]
            raise SaekitError(f"not writing a checkpoint at step {self.step}: hookpoint {h!r} holds NaN or Inf "
                              f"({bad[0]}); the last checkpoint in {run.path} is kept")
        return tensors, meta

    def save_saes(self, run: Run, extra: dict | None = None) -> None:
        for h, d in self.dicts.items():
            scale = {"input_scale": self.scales[h]} if d.sources == d.targets == [h] else \
                {"input_scales": {n: self.scales[n] for n in d.names}}
            info = {**scale, "step": self.step, "init": d.init_report, **(extra or {})}
            self.final_sae(h).save(run.sae_dir(h), extra=info)

    def load(self, run: Run) -> None:
        """Restore the state written by `save` (the SAEs must have been built with the same config)."""
        tensors, meta = run.load_state(self.device)
        file = run.path / "state.safetensors"
        want = {f"{h}/param/{n}": p for h, d in self.dicts.items() for n, p in d.sae.named_parameters()}
        want |= {f"{h}/stats/{n}": t for h, d in self.dicts.items() for n, t in d.stats.items()}
        missing = [k for k, t in want.items()
                   if tensors.get(k) is None or tensors[k].shape != t.shape or tensors[k].dtype != t.dtype]
        if missing:
            raise SaekitError(f"{run.path} holds a training state of another config (e.g. {missing[:1]} is missing "
                              "or shaped differently); start a new run")
        scales = meta.get("scales")
        if not (isinstance(meta.get("step"), int) and isinstance(scales, dict)
                and all(isinstance(scales.get(h), float) for h in self.scales)):
            raise SaekitError(f"{file} is corrupt (bad step or input scales in its metadata); start a new run")
        adam = {}
        for h, d in self.dicts.items():
            for n, p in d.sae.named_parameters():
                state = {key.rsplit("/", 1)[1]: t for key, t in tensors.items() if key.startswith(f"{h}/adam/{n}/")}
                if state and (set(state) != {"step", "exp_avg", "exp_avg_sq"} or state["step"].numel() != 1
                              or state["exp_avg"].shape != p.shape or state["exp_avg_sq"].shape != p.shape):
                    raise SaekitError(f"{file} holds a bad optimizer state for {h}/{n}; start a new run")
                if state:
                    state["step"] = state["step"].reshape(())
                    adam[p] = (d.opt, state)
        self.step, self.scales = meta["step"], {h: scales[h] for h in self.scales}
        tokens, skipped = meta.get("tokens"), meta.get("skipped")
        self.tokens = tokens if isinstance(tokens, int) else self.step * self.cfg.batch_size  # older states
        self.skipped = skipped if isinstance(skipped, int) else 0
        for p, (opt, state) in adam.items():
            opt.state[p] = state
        path = cpu_encoder_path(meta.get("encoder_path"))  # SAEKIT_ENCODER may still override it
        for h, d in self.dicts.items():
            d.sae.cfg.encoder_path = path
            with torch.no_grad():
                for n, p in d.sae.named_parameters():
                    p.copy_(tensors[f"{h}/param/{n}"])
            for n in d.stats:
                d.stats[n] = tensors[f"{h}/stats/{n}"]
            if d.sae.family.resume:
                d.sae.family.resume(d.sae, d.stats)


def run_steps(trainer: Trainer, batches: Iterable[dict[str, torch.Tensor]], quiet: bool = False,
              on_log=None, on_checkpoint=None) -> None:
    """Drive `trainer` over `batches` with a progress bar (tokens/s, FVU, L0, dead %).

    `on_log(step, metrics)` runs every `log_every` steps and at the last step, also when the
    batches end before `total_steps` (a stream whose corpus ended), and `on_checkpoint()` every
    `checkpoint_every` steps (both optional).
    """
    cfg = trainer.cfg
    bar = tqdm(total=trainer.total_steps, initial=trainer.step, disable=quiet, desc="train", unit="step",
               dynamic_ncols=True)
    dead = f"dead({tqdm.format_sizeof(cfg.dead_tokens)} tok)"  # unfired in the last dead_tokens training tokens
    t0, tokens, logged, metrics = time.perf_counter(), 0, trainer.step, None

    def log(metrics):
        metrics = {h: {k: float(v) for k, v in m.items()} for h, m in metrics.items()}
        speed = tokens / (time.perf_counter() - t0)
        if metrics:  # {} after a skipped batch
            first = next(iter(metrics.values()))
            bar.set_postfix(tok_s=f"{speed:,.0f}", fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}",
                            **{dead: f"{100 * first['dead_fraction']:.1f}%"})
        if on_log:
            on_log(trainer.step, {"tokens_per_s": speed, "tokens": trainer.tokens, "skipped_batches": trainer.skipped,
                                  "encoder_path": trainer.encoder_path, **metrics})
        return trainer.step

    for batch in batches:
        try:
            metrics = trainer.train_step(batch)
        except (MemoryError, RuntimeError) as e:
            if not isinstance(e, MemoryError | _OOM) and "can't allocate memory" not in str(e):
                raise
            raise SaekitError(f"out of memory at training step {trainer.step} (batch_size {cfg.batch_size}, "
                              f"{next(iter(trainer.saes.values())).n_latents} latents); lower --batch_size (or "
                              "--expansion / --n_latents) and rerun; --resume continues from the last checkpoint"
                              ) from None
        tokens += len(next(iter(batch.values())))
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == trainer.total_steps:
            logged = log(metrics)
        if on_checkpoint and trainer.step % cfg.checkpoint_every == 0:
            on_checkpoint()
    if metrics is not None and logged != trainer.step:  # the batches ended early
        log(metrics)
    bar.close()


def _rebatch(parts: Iterable[dict[str, torch.Tensor]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Regroup a stream of `{name: [n, d]}` dicts (the same names and n in each) into batches of
    `batch_size` rows (the last may be short)."""
    buf: dict[str, list[torch.Tensor]] = {}
    n = 0
    for part in parts:
        for t in part.values():
            if not isinstance(t, torch.Tensor) or t.ndim != 2:
                raise SaekitError(f"activations must be [batch, d_in] tensors, got "
                                  f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if buf and set(part) != set(buf) or len({len(t) for t in part.values()}) > 1:
            raise SaekitError(f"every batch must hold the same names ({sorted(buf) or sorted(part)}) with the same "
                              f"number of rows (one per token, aligned), got {({k: len(t) for k, t in part.items()})}")
        for name, t in part.items():
            buf.setdefault(name, []).append(t)
        n += len(next(iter(part.values())))
        while n >= batch_size:
            cat = {name: torch.cat(ts) for name, ts in buf.items()}
            yield {name: t[:batch_size] for name, t in cat.items()}
            buf, n = {name: [t[batch_size:]] for name, t in cat.items()}, n - batch_size
    if n:
        yield {name: torch.cat(ts) for name, ts in buf.items()}


def fit(activations: torch.Tensor | dict[str, torch.Tensor] | Iterable, n_latents: int | None = None,
        k: int | None = None, seed: int = 0, quiet: bool = True, sources: list[str] | None = None,
        targets: list[str] | None = None, model: str | None = None, hookpoint: str | None = None,
        **options) -> SAE:
    """Train a dictionary on activations you bring and return it (acting on raw activations).

    `activations` is an `[N, d_in]` tensor (an SAE), or `{name: [N, d_name]}` tensors of the same N
    tokens, row t the same token in each (a `Crosscoder` reading `sources` and writing `targets`,
    both every name by default: a transcoder is `sources=["a"], targets=["b"]`). A tensor (or dict)
    is shuffled each epoch, `epochs` passes (the TrainConfig default: 3); any iterable of `[batch,
    d_in]` tensors (or of such dicts) is read once in the order given. `n_latents` defaults to
    `expansion` times the (widest source's) width; `k` to TrainConfig's (JumpReLU needs none).
    Leaves the process as it found it (thread count, allocator). `options` are TrainConfig keys:
    batch_size, lr, epochs, architecture, dead_tokens, k_aux, l0_coeff, device, ...
    Training runs on `device` (default: CUDA when present); the result comes back on the
    activations' device. Called in every process of an initialised process group, with the same
    activations in each, training is data parallel (each process takes a slice of every batch)
    and every process gets the same result. `model` and `hookpoint` say where the activations came
    from; the result records them (None when not given: analyses that need a model then ask for one).
    """
    named = isinstance(activations, dict)
    if isinstance(activations, torch.Tensor) or named:
        acts = activations if named else {"x": activations}
        for name, t in acts.items():
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or len(t) == 0:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise SaekitError(f"activations{f' of {name!r}' if named else ''} must be a non-empty [N, d_in] "
                                  f"tensor, got {shape}")
        if len({len(t) for t in acts.values()}) > 1:
            counts = {n: len(t) for n, t in acts.items()}
            raise SaekitError(f"the activations hold different token counts ({counts}); "
                              "a crosscoder needs one row per token in every source and target, aligned")
        first = next(iter(acts.values()))
        cfg = _fit_config(acts, named, n_latents, k, seed, sources, targets, options)
        N = len(first)
        B = min(cfg.batch_size, N)
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(N, generator=g)[:INIT_SAMPLE]
        sample = {n: t[pick] for n, t in acts.items()}
        total = cfg.epochs * (N // B)

        def stream():
            for _ in range(cfg.epochs):
                perm = torch.randperm(N, generator=g)
                for s in range(N // B):
                    yield {n: t[perm[s * B : (s + 1) * B]] for n, t in acts.items()}
    else:
        parts = iter(activations)
        head = next(parts, None)
        named = isinstance(head, dict)
        parts = chain([head], parts) if head is not None else iter(())
        cfg = _fit_config(head if named else {"x": head}, named, n_latents, k, seed, sources, targets, options) \
            if head is not None else None
        it = _rebatch((p if named else {"x": p} for p in parts), cfg.batch_size if cfg else 1)
        sample = next(it, None)
        if sample is None:
            raise SaekitError("activations is empty")
        first, total = next(iter(sample.values())), None

        def stream():
            return chain([sample], it)

    device = resolve_device(cfg.device)
    dims = {n: t.shape[1] for n, t in sample.items()}
    trainer = Trainer(cfg, dims, sample, total, device)
    run_steps(trainer, stream(), quiet=quiet)
    sae = trainer.final_sae(next(iter(trainer.saes))).to(first.device)
    sae.cfg.model, sae.cfg.hookpoint = model, None if named else hookpoint
    return sae


def _fit_config(acts: dict, named: bool, n_latents, k, seed, sources, targets, options) -> TrainConfig:
    """The TrainConfig of a `fit` call on `acts` (names checked against sources and targets)."""
    values = {"seed": seed, "log_every": 10**9, **options}
    values |= {"n_latents": n_latents} if n_latents is not None else {}
    values |= {"k": k} if k is not None else {}
    if named:
        unknown = [n for n in (sources or []) + (targets or []) if n not in acts]
        if unknown:
            raise SaekitError(f"sources/targets {unknown} are not among the activations' names {sorted(acts)}")
        values |= {"sources": list(sources or acts), "targets": list(targets or acts)}
    else:
        if sources is not None or targets is not None:
            raise SaekitError("sources= and targets= name the keys of a dict of activations; pass a dict")
        values["hookpoints"] = ["x"]
    return make_config(TrainConfig, values)
