"""Training: one SAE per hookpoint, all stepped on the same batches of activations.

One step per hookpoint (Gao et al. 2024): scale x to unit RMS, sparse encode/decode, FVU loss plus
AuxK on dead latents, backward through the sparse kernels, project the decoder-parallel
gradient out, Adam, renormalise decoder rows. Inputs are divided by a fixed per-hookpoint
scale during training; the saved SAE has it folded back in and acts on raw activations.
"""

import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from itertools import chain

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saekit import distributed as dist
from saekit.config import TrainConfig, make_config
from saekit.errors import SaekitError
from saekit.init import init_sae
from saekit.kernels import selected_preacts, sparse_decode
from saekit.ortho import ortho_loss
from saekit.run import Run
from saekit.runtime import resolve_device
from saekit.sae import SAE, SAEConfig

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


class Trainer:
    """Holds the SAEs, their optimizers and per-latent firing statistics.

    Data parallel inside an initialised process group of several processes (unless
    `data_parallel=False`): every process is given the same global batches, trains on its own
    contiguous slice of each, and the sums that make up the losses, the gradients, the firing
    counts and BatchTopK's cut are taken over the global batch, so every process holds the
    parameters one process would have after the same global batches."""

    def __init__(self, cfg: TrainConfig, dims: dict[str, int], sample: dict[str, torch.Tensor],
                 total_steps: int | None, device: torch.device, data_parallel: bool | None = None):
        self.parallel = dist.active() if data_parallel is None else data_parallel and dist.active()
        if self.parallel and cfg.batch_size < dist.world():
            raise SaekitError(f"batch_size {cfg.batch_size} is smaller than the {dist.world()} processes training it")
        device = dist.local_device(device)
        self.cfg, self.total_steps, self.device = cfg, total_steps, device
        self.step = 0
        self.tokens = 0  # tokens trained on (skipped batches excluded)
        self.skipped = 0  # batches skipped for NaN/Inf (on_nonfinite: skip)
        self.saes: dict[str, SAE] = {}
        self.opts: dict[str, torch.optim.Adam] = {}
        self.scales: dict[str, float] = {}
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self.init_reports: dict[str, dict] = {}
        # BatchTopK threshold: bias-corrected EMA (decay 0.999) of the smallest kept value from
        # step 1000 on (Bussmann et al.), or from the lr-decay phase in shorter runs: the cut
        # drifts while the lr is high, and a lagging average would under-fire at inference.
        self.threshold_start = min(1000, int(cfg.decay_start * total_steps) if total_steps else 1000)
        g = torch.Generator().manual_seed(cfg.seed)
        for h, d in dims.items():
            m = cfg.n_latents or cfg.expansion * d
            sae = SAE(SAEConfig(d, m, cfg.k, cfg.architecture, hookpoint=h, model=cfg.model), device=device)
            if device.type == "cuda":
                sae.matmul_dtype = torch.bfloat16
            x = sample[h].float()
            x = x[x.isfinite().all(1)]  # NaN/Inf rows say nothing about the scale or the geometry
            if len(x) == 0:
                raise SaekitError(f"every activation of hookpoint {h!r} in the initialisation sample is NaN or Inf")
            self.scales[h] = float(x.pow(2).sum(1).mean().div(d).sqrt().clamp_min(1e-8))
            self.init_reports[h] = init_sae(sae, x / self.scales[h], cfg.init, g, cfg.subspace_rank,
                                            cfg.subspace_variance)
            if self.parallel:  # the same start everywhere, whatever each process was given
                dist.broadcast_params(sae)
                sae.batch_cut = dist.batch_cut
            self.saes[h] = sae
            lr = cfg.lr or 2e-4 / math.sqrt(m / 2**14)
            self.opts[h] = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10, fused=True)
            self.stats[h] = {
                "tokens_since_fired": torch.zeros(m, dtype=torch.long, device=device),
                "first_fired": torch.full((m,), -1, dtype=torch.long, device=device),
                "last_fired": torch.full((m,), -1, dtype=torch.long, device=device),
                "threshold_ema": torch.zeros(2, dtype=torch.float64, device=device),  # [ema, n]
            }
        if self.parallel:
            self.scales = dist.broadcast_object(self.scales)

    # -- one step -------------------------------------------------------------------------
    def _aux_loss(self, sae: SAE, x: torch.Tensor, err: torch.Tensor, dead: torch.Tensor,
                  denom: torch.Tensor | None = None) -> torch.Tensor:
        """AuxK: reconstruct the residual from the top-k_aux dead latents (no b_dec).

        `denom`: the residual's total variance when `err` is a slice of a larger batch."""
        k_aux = self.cfg.k_aux or sae.d_in // 2
        b_dec = sae.b_dec.detach()
        W, b = sae.W_enc[dead], sae.b_enc[dead]
        with torch.no_grad():
            vals, idx = torch.addmm(b, x - b_dec, W.T).topk(min(k_aux, len(dead)), dim=1, sorted=False)
        vals = selected_preacts(x, b_dec, W, b, idx, vals).relu()
        err_hat = sparse_decode(vals, dead[idx], sae.W_dec)
        scale = min(len(dead) / k_aux, 1.0)
        if denom is None:
            denom = (err - err.mean(0)).pow(2).sum()
        return scale * (err_hat - err).pow(2).sum() / denom.clamp_min(1e-12)

    def _update_threshold(self, sae: SAE, ema: torch.Tensor, vals: torch.Tensor) -> None:
        kept = vals[vals > 0]
        if self.parallel:  # the smallest kept value of the global batch
            low = kept.min() if len(kept) else torch.tensor(math.inf, device=vals.device, dtype=vals.dtype)
            low = dist.all_reduce(low.reshape(1), "min")[0]
            if low.isfinite():
                ema[0] = 0.999 * ema[0] + 0.001 * low
                ema[1] += 1
                sae.cfg.threshold = float(ema[0] / (1 - 0.999 ** ema[1]))
        elif len(kept):
            ema[0] = 0.999 * ema[0] + 0.001 * kept.min()
            ema[1] += 1
            sae.cfg.threshold = float(ema[0] / (1 - 0.999 ** ema[1]))

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, float | torch.Tensor]]:
        """One optimisation step on `batch = {hookpoint: [B, d]}`; returns metrics per hookpoint.

        fvu, l0 and aux_loss stay 0-dim device tensors (`float()` them to read): on a GPU the
        host syncs of a step are the lists of dead latents and one finiteness check.

        Every hookpoint's loss is computed before any update: if an input or a loss holds NaN
        or Inf, no parameter, optimizer state or firing statistic changes; the batch is then
        skipped (returns {}) or training stops with a SaekitError, per `on_nonfinite`."""
        cfg, par = self.cfg, self.parallel
        lr_f = lr_factor(self.step, self.total_steps, cfg.warmup_steps, cfg.decay_start)
        pending, checks = {}, []
        for h, sae in self.saes.items():
            B = len(batch[h])  # the global batch; under data parallelism this process takes a slice
            x = (dist.shard(batch[h]) if par else batch[h]).to(self.device, torch.float32, non_blocking=True)
            x = x / self.scales[h]
            vals, idx = sae.encode(x)
            x_hat = sae.decode(vals, idx)
            if par:  # the global batch's total variance: this slice's error sum over it adds up to FVU
                denom = dist.all_reduce((x - dist.all_reduce(x.sum(0)) / B).pow(2).sum())
            else:
                denom = (x - x.mean(0)).pow(2).sum()
            fvu = F.mse_loss(x_hat, x, reduction="sum") / denom.clamp_min(1e-12)

            st = self.stats[h]
            with torch.no_grad():  # masked updates, not boolean indexing: no host sync
                active = (vals > 1e-3).reshape(-1).float()
                counts = torch.zeros(sae.n_latents, device=self.device).index_add_(0, idx.reshape(-1), active)
                fired = (dist.all_reduce(counts) if par else counts) > 0
                since = (st["tokens_since_fired"] + B).masked_fill_(fired, 0)  # committed after the check
                dead = (since >= cfg.dead_tokens).nonzero().squeeze(1)
            loss = fvu
            # A penalty on the (replicated) decoder alone: added by one process, whose gradient is summed.
            if cfg.ortho_penalty > 0 and self.step % cfg.ortho_every == 0 and (not par or dist.is_main()):
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
                loss = loss + cfg.ortho_penalty * cfg.ortho_every * ortho_loss(sae.W_dec, g)
            aux = torch.zeros((), device=self.device)
            if len(dead) and cfg.auxk_alpha > 0:
                err = (x - x_hat).detach()
                err_denom = dist.all_reduce((err - dist.all_reduce(err.sum(0)) / B).pow(2).sum()) if par else None
                aux = self._aux_loss(sae, x, err, dead, err_denom)
                loss = loss + cfg.auxk_alpha * aux
            checks += [x.isfinite().all(), loss.isfinite()]
            pending[h] = (B, vals, fired, since, dead, fvu, aux, loss)

        ok = torch.stack(checks)
        if par:  # a NaN in any slice skips (or stops) the step everywhere
            ok = dist.all_reduce(ok.float(), "min") > 0
        ok = ok.tolist()  # one host sync for every hookpoint
        for i, h in enumerate(pending):
            if not (ok[2 * i] and ok[2 * i + 1]):
                self._nonfinite(h, "activations" if not ok[2 * i] else "loss")
                self.step += 1  # the batch index still advances: a resume sees the same batches
                return {}

        metrics = {}
        for h, (B, vals, fired, since, dead, fvu, aux, loss) in pending.items():
            sae, st = self.saes[h], self.stats[h]
            with torch.no_grad():
                st["tokens_since_fired"].copy_(since)
                st["last_fired"].masked_fill_(fired, self.step)
                st["first_fired"].masked_fill_(fired & (st["first_fired"] < 0), self.step)
                if sae.cfg.architecture == "batchtopk" and self.step >= self.threshold_start:
                    self._update_threshold(sae, st["threshold_ema"], vals)
            opt = self.opts[h]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if par:
                dist.all_reduce_grads(sae.parameters())
            with torch.no_grad():  # keep decoder rows on the unit sphere: drop the radial gradient
                W, G = sae.W_dec, sae.W_dec.grad
                G.addcmul_(torch.linalg.vecdot(G, W)[:, None], W, value=-1)
            for group in opt.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * lr_f
            opt.step()
            sae.normalize_decoder()
            parts = torch.stack([fvu.detach(), (vals > 0).sum().to(fvu.dtype), aux.detach().to(fvu.dtype)])
            if par:
                dist.all_reduce(parts)
            metrics[h] = {
                "fvu": parts[0],
                "l0": parts[1] / B,
                "dead_fraction": len(dead) / sae.n_latents,
                "aux_loss": parts[2],
                "lr": opt.param_groups[0]["lr"],
            }
        self.tokens += next(iter(pending.values()))[0]
        self.step += 1
        return metrics

    def _nonfinite(self, hookpoint: str, what: str) -> None:
        where = f"NaN or Inf in the {what} of hookpoint {hookpoint!r} at step {self.step}"
        if self.cfg.on_nonfinite == "stop":
            raise SaekitError(f"{where}; stopped before the update (the last checkpoint is intact; "
                              "on_nonfinite: skip skips such batches)")
        self.skipped += 1
        if not self.parallel or dist.is_main():  # data parallel: every process skips; one says so
            print(f"saekit: {where}: batch skipped, no update", file=sys.stderr)

    # -- results and checkpoints ------------------------------------------------------------
    def final_sae(self, hookpoint: str) -> SAE:
        """A copy of the SAE acting on raw (unscaled) activations, in eval mode."""
        src = self.saes[hookpoint]
        sae = SAE(SAEConfig(**asdict(src.cfg)), device=self.device)
        sae.load_state_dict(src.state_dict())
        return sae.fold_input_scale(self.scales[hookpoint]).eval().requires_grad_(False)

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
                "skipped": self.skipped}
        for h, sae in self.saes.items():
            for n, p in sae.named_parameters():
                tensors[f"{h}/param/{n}"] = p.detach()
                for key, t in self.opts[h].state.get(p, {}).items():
                    tensors[f"{h}/adam/{n}/{key}"] = t.reshape(-1) if t.ndim == 0 else t
            for n, t in self.stats[h].items():
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
        for h in self.saes:
            info = {"input_scale": self.scales[h], "step": self.step, "init": self.init_reports[h], **(extra or {})}
            self.final_sae(h).save(run.sae_dir(h), extra=info)

    def load(self, run: Run) -> None:
        """Restore the state written by `save` (the SAEs must have been built with the same config)."""
        tensors, meta = run.load_state(self.device)
        file = run.path / "state.safetensors"
        want = {f"{h}/param/{n}": p for h, sae in self.saes.items() for n, p in sae.named_parameters()}
        want |= {f"{h}/stats/{n}": t for h, st in self.stats.items() for n, t in st.items()}
        missing = [k for k, t in want.items()
                   if tensors.get(k) is None or tensors[k].shape != t.shape or tensors[k].dtype != t.dtype]
        if missing:
            raise SaekitError(f"{run.path} holds a training state of another config (e.g. {missing[:1]} is missing "
                              "or shaped differently); start a new run")
        scales = meta.get("scales")
        if not (isinstance(meta.get("step"), int) and isinstance(scales, dict)
                and all(isinstance(scales.get(h), float) for h in self.saes)):
            raise SaekitError(f"{file} is corrupt (bad step or input scales in its metadata); start a new run")
        adam = {}
        for h, sae in self.saes.items():
            for n, p in sae.named_parameters():
                state = {key.rsplit("/", 1)[1]: t for key, t in tensors.items() if key.startswith(f"{h}/adam/{n}/")}
                if state and (set(state) != {"step", "exp_avg", "exp_avg_sq"} or state["step"].numel() != 1
                              or state["exp_avg"].shape != p.shape or state["exp_avg_sq"].shape != p.shape):
                    raise SaekitError(f"{file} holds a bad optimizer state for {h}/{n}; start a new run")
                if state:
                    state["step"] = state["step"].reshape(())
                    adam[p] = (h, state)
        self.step, self.scales = meta["step"], {h: scales[h] for h in self.saes}
        tokens, skipped = meta.get("tokens"), meta.get("skipped")
        self.tokens = tokens if isinstance(tokens, int) else self.step * self.cfg.batch_size  # older states
        self.skipped = skipped if isinstance(skipped, int) else 0
        for p, (h, state) in adam.items():
            self.opts[h].state[p] = state
        for h, sae in self.saes.items():
            with torch.no_grad():
                for n, p in sae.named_parameters():
                    p.copy_(tensors[f"{h}/param/{n}"])
            for n in self.stats[h]:
                self.stats[h][n] = tensors[f"{h}/stats/{n}"]
            ema = self.stats[h]["threshold_ema"]
            if ema[1] > 0:
                sae.cfg.threshold = float(ema[0] / (1 - 0.999 ** ema[1]))


def run_steps(trainer: Trainer, batches: Iterable[dict[str, torch.Tensor]], quiet: bool = False,
              on_log=None, on_checkpoint=None) -> None:
    """Drive `trainer` over `batches` with a progress bar (tokens/s, FVU, L0, dead %).

    `on_log(step, metrics)` runs every `log_every` steps and `on_checkpoint()` every
    `checkpoint_every` steps (both optional).
    """
    cfg = trainer.cfg
    bar = tqdm(total=trainer.total_steps, initial=trainer.step, disable=quiet, unit="step", dynamic_ncols=True)
    t0, tokens = time.perf_counter(), 0
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
            metrics = {h: {k: float(v) for k, v in m.items()} for h, m in metrics.items()}
            speed = tokens / (time.perf_counter() - t0)
            if metrics:  # {} after a skipped batch
                first = next(iter(metrics.values()))
                bar.set_postfix(tok_s=f"{speed:,.0f}", fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}",
                                dead=f"{100 * first['dead_fraction']:.1f}%")
            if on_log:
                on_log(trainer.step, {"tokens_per_s": speed, "tokens": trainer.tokens,
                                      "skipped_batches": trainer.skipped, **metrics})
        if on_checkpoint and trainer.step % cfg.checkpoint_every == 0:
            on_checkpoint()
    bar.close()


def _rebatch(tensors: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Regroup a stream of `[n, d]` tensors into `[batch_size, d]` batches (last may be short)."""
    buf, n = [], 0
    for t in tensors:
        if t.ndim != 2:
            raise SaekitError(f"activations must be [batch, d_in] tensors, got shape {tuple(t.shape)}")
        buf.append(t)
        n += len(t)
        while n >= batch_size:
            cat = torch.cat(buf)
            yield cat[:batch_size]
            buf, n = [cat[batch_size:]], n - batch_size
    if n:
        yield torch.cat(buf)


def fit(activations: torch.Tensor | Iterable[torch.Tensor], n_latents: int, k: int, seed: int = 0,
        quiet: bool = True, **options) -> SAE:
    """Train an SAE on activations you bring and return it (acting on raw activations).

    `activations` is an `[N, d_in]` tensor, shuffled each epoch, `epochs` passes (the
    TrainConfig default: 3), or any iterable of `[batch, d_in]` tensors, one pass in the order
    given. Leaves the process as it found it (thread count, allocator). `options` are
    TrainConfig keys: batch_size, lr, epochs, architecture, dead_tokens, k_aux, device, ...
    Training runs on `device` (default: CUDA when present); the SAE comes back on the
    activations' device. Called in every process of an initialised process group, with the same
    activations in each, training is data parallel (each process takes a slice of every batch)
    and every process gets the same SAE.
    """
    cfg = make_config(TrainConfig, {"n_latents": n_latents, "k": k, "seed": seed, "hookpoints": ["x"],
                                    "log_every": 10**9, **options})
    device = resolve_device(cfg.device)
    B = cfg.batch_size
    if isinstance(activations, torch.Tensor):
        if activations.ndim != 2 or len(activations) == 0:
            raise SaekitError(f"activations must be a non-empty [N, d_in] tensor, got shape {tuple(activations.shape)}")
        N = len(activations)
        B = min(B, N)
        g = torch.Generator().manual_seed(seed)
        sample = activations[torch.randperm(N, generator=g)[:INIT_SAMPLE]]
        total = cfg.epochs * (N // B)

        def stream():
            for _ in range(cfg.epochs):
                perm = torch.randperm(N, generator=g)
                for s in range(N // B):
                    yield activations[perm[s * B : (s + 1) * B]]
    else:
        it = _rebatch(activations, B)
        first = next(it, None)
        if first is None:
            raise SaekitError("activations is empty")
        sample, total = first, None

        def stream():
            return chain([first], it)

    trainer = Trainer(cfg, {"x": sample.shape[1]}, {"x": sample}, total, device)
    run_steps(trainer, ({"x": x} for x in stream()), quiet=quiet)
    return trainer.final_sae("x").to(sample.device)
