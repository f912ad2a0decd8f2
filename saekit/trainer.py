"""Training: a set of named dictionaries (one SAE per hookpoint by default, or one crosscoder or
transcoder), all stepped on the same batches of activations.

One step per dictionary (Gao et al. 2024): scale each activation to unit RMS, read the sources,
sparse encode/decode the targets, the architecture's losses (`LOSSES`: FVU per target summed,
Matryoshka prefixes, AuxK on dead latents, the OrtSAE penalty, JumpReLU's L0), backward through
the sparse kernels, project the decoder-parallel gradient out, Adam, renormalise decoder rows.
Inputs are divided by a fixed per-activation scale during training; the saved dictionary has it
folded back in and acts on raw activations.
"""

import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saekit import distributed as dist
from saekit.config import TrainConfig, dictionaries, make_config, matryoshka_ends
from saekit.errors import SaekitError
from saekit.init import init_sae, init_thresholds
from saekit.kernels import selected_preacts, sparse_decode
from saekit.ortho import ortho_loss
from saekit.run import Run
from saekit.runtime import cpu_encoder_path, resolve_device
from saekit.sae import SAE, Crosscoder, SAEConfig, jumprelu_l0

INIT_SAMPLE = 16_384  # tokens for b_dec's geometric median and the input scale
JUMPRELU_THRESHOLD_LR = 10.0  # JumpReLU's log-threshold learning rate, relative to lr (see Trainer)
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
class StepState:
    """One dictionary's forward pass in a training step: what its losses read."""

    sae: SAE
    cfg: TrainConfig
    x: torch.Tensor  # [b, d_in] its sources side by side, in training units
    y: torch.Tensor  # [b, d_out] its targets (x itself when they are the sources)
    vals: torch.Tensor
    idx: torch.Tensor
    aux: dict  # what the encode rule left for the losses (JumpReLU's near-threshold pairs)
    denoms: list  # per target: the global batch's total variance
    B: int  # the global batch size
    dead: torch.Tensor
    step: int
    parallel: bool
    x_hat: torch.Tensor | None = None  # set by the reconstruction loss
    fvu: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # metrics of the other losses

def _fvu(y_hat: torch.Tensor, st: StepState) -> torch.Tensor:
    """The FVU of `y_hat` per target, summed: each target's squared error over its total variance."""
    if len(st.denoms) == 1:
        return F.mse_loss(y_hat, st.y, reduction="sum") / st.denoms[0].clamp_min(1e-12)
    targets = st.sae.cfg.target_names
    return sum(F.mse_loss(y_hat[:, sl], st.y[:, sl], reduction="sum") / d.clamp_min(1e-12)
               for sl, d in zip((st.sae.part_slice(t, True) for t in targets), st.denoms, strict=True))


def loss_fvu(st: StepState) -> torch.Tensor:
    """Reconstruction: FVU per target, summed (Gao et al. 2024; Lindsey et al. 2024 for several)."""
    st.x_hat = st.sae.decode(st.vals, st.idx, st.aux)
    st.fvu = _fvu(st.x_hat, st)
    return st.fvu


def loss_matryoshka(st: StepState) -> torch.Tensor:
    """Matryoshka (Bussmann et al. 2025): the mean over nested prefixes of latents of the FVU using
    only that prefix's latents (same codes, one encode). Each group's latents decode once; the
    prefixes are running sums of those partial decodes."""
    sae = st.sae
    ends = torch.tensor(sae.cfg.matryoshka_groups, device=st.idx.device)
    group = torch.bucketize(st.idx.contiguous(), ends, right=True)  # [b, k] the group of each slot
    x_hat, total = sae.b_dec, 0.0
    for g in range(len(ends)):
        x_hat = x_hat + sparse_decode(st.vals * (group == g), st.idx, sae.W_dec)
        total = total + _fvu(x_hat, st)
    st.x_hat = x_hat
    st.fvu = _fvu(x_hat.detach(), st)  # the full dictionary's, for the metrics
    return total / len(ends)


def loss_ortho(st: StepState) -> torch.Tensor | None:
    """OrtSAE (Korznikov et al. 2025), every `ortho_every` steps with weight n * gamma. A penalty on
    the (replicated) decoder alone: added by one process, whose gradient is summed."""
    cfg = st.cfg
    if cfg.ortho_penalty > 0 and st.step % cfg.ortho_every == 0 and (not st.parallel or dist.is_main()):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + st.step)
        return cfg.ortho_penalty * cfg.ortho_every * ortho_loss(st.sae.W_dec, g)
    return None


def loss_auxk(st: StepState) -> torch.Tensor | None:
    """AuxK (Gao et al. 2024): reconstruct the residual from the top-k_aux dead latents (no b_dec),
    weight auxk_alpha, scaled by min(n_dead / k_aux, 1); none while nothing is dead. Dead latents
    are ranked by their encoder pre-activations, or for the tied `mp` by their decoder rows'
    correlations with the residual (as one more pursuit step would)."""
    cfg, sae, dead = st.cfg, st.sae, st.dead
    if not len(dead) or cfg.auxk_alpha <= 0:
        return None
    err = (st.y - st.x_hat).detach()
    if st.parallel:  # the residual's total variance over the global batch
        denom = dist.all_reduce((err - dist.all_reduce(err.sum(0)) / st.B).pow(2).sum())
    else:
        denom = (err - err.mean(0)).pow(2).sum()
    k_aux = cfg.k_aux or sae.d_in // 2
    if sae.cfg.architecture == "mp":  # tied pursuit: the dead rows' correlations with the residual itself
        x, c, W, b = err, torch.zeros_like(sae.b_dec), sae.W_dec[dead], err.new_zeros(len(dead))
    else:
        x, c, W, b = st.x, sae.centre().detach(), sae.W_enc[dead], sae.b_enc[dead]
    with torch.no_grad():
        vals, idx = torch.addmm(b, x - c, W.T).topk(min(k_aux, len(dead)), dim=1, sorted=False)
    vals = selected_preacts(x, c, W, b, idx, vals).relu()
    err_hat = sparse_decode(vals, dead[idx], sae.W_dec)
    scale = min(len(dead) / k_aux, 1.0)
    aux = scale * (err_hat - err).pow(2).sum() / denom.clamp_min(1e-12)
    st.extra["aux_loss"] = aux
    return cfg.auxk_alpha * aux


def loss_l0(st: StepState) -> torch.Tensor | None:
    """JumpReLU's sparsity (Rajamanoharan et al. 2024): l0_coeff times the active latents per token
    (over the global batch), its threshold gradient through the straight-through estimator. On
    the FVU's scale a firing pays off when it removes more than l0_coeff of its token's share of
    the variance. With `target_l0` the coefficient is l0_coeff * (L0 / target_l0 - 1) at the
    batch's L0, the gradient of l0_coeff * target_l0 / 2 * (L0 / target_l0 - 1)^2 (the quadratic
    of dictionary_learning's JumpReLU trainer): it lowers the L0 above the target, raises it below."""
    cfg = st.cfg
    if cfg.l0_coeff <= 0:
        return None
    count = jumprelu_l0(st.sae, st.vals, st.idx, st.aux)
    if cfg.target_l0 is None:
        return cfg.l0_coeff * count / st.B
    l0 = count.detach() / st.B  # this process's share of the global batch's L0
    l0 = dist.all_reduce(l0) if st.parallel else l0
    return cfg.l0_coeff * (l0 / cfg.target_l0 - 1) * count / st.B


# The loss terms of each architecture, summed in this order (a term may be absent in a step).
LOSSES = {
    "topk": (loss_fvu, loss_ortho, loss_auxk),
    "batchtopk": (loss_fvu, loss_ortho, loss_auxk),
    "matryoshka": (loss_matryoshka, loss_ortho, loss_auxk),
    "jumprelu": (loss_fvu, loss_ortho, loss_l0),
    "mp": (loss_fvu, loss_ortho, loss_auxk),
}


class Trainer:
    """Holds the dictionaries, their optimizers and per-latent firing statistics.

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
        device = dist.local_device(device)
        self.cfg, self.total_steps, self.device = cfg, total_steps, device
        self.step = 0
        self.tokens = 0  # tokens trained on (skipped batches excluded)
        self.skipped = 0  # batches skipped for NaN/Inf (on_nonfinite: skip)
        self.saes: dict[str, SAE] = {}
        self.parts: dict[str, tuple[list[str], list[str]]] = {}  # name -> (sources, targets)
        self.opts: dict[str, torch.optim.Adam] = {}
        self.scales: dict[str, float] = {}  # per activation name
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self.init_reports: dict[str, dict] = {}
        # BatchTopK threshold: bias-corrected EMA (decay 0.999) of the smallest kept value from
        # step 1000 on (Bussmann et al.), or from the lr-decay phase in shorter runs: the cut
        # drifts while the lr is high, and a lagging average would under-fire at inference.
        self.threshold_start = min(1000, int(cfg.decay_start * total_steps) if total_steps else 1000)
        g = torch.Generator().manual_seed(cfg.seed)
        # the CPU encoder path, fixed for the run (a resume takes the stored one; see saekit.runtime)
        path = cpu_encoder_path()
        if self.parallel:
            path = dist.broadcast_object(path)
        for name, (sources, targets) in dictionaries(cfg).items():
            if not set(sources + targets) <= set(dims):
                continue
            self.parts[name] = (sources, targets)
            parts = list(dict.fromkeys(sources + targets))
            xs = {n: sample[n].float() for n in parts}
            ok = torch.stack([t.isfinite().all(1) for t in xs.values()]).all(0)
            if not ok.any():  # NaN/Inf rows say nothing about the scale or the geometry
                raise SaekitError(f"every activation of {', '.join(map(repr, parts))} in the initialisation sample is "
                                  "NaN or Inf" if len(parts) > 1 else f"every activation of hookpoint {name!r} in the "
                                  "initialisation sample is NaN or Inf")
            xs = {n: t[ok] for n, t in xs.items()}
            for n, t in xs.items():  # unit RMS; with several parts, of each one's deviations from its mean,
                t = t - t.mean(0) if len(parts) > 1 else t  # so a large offset does not shrink one part's features
                self.scales[n] = float(t.pow(2).sum(1).mean().div(dims[n]).sqrt().clamp_min(1e-8))
            m = cfg.n_latents or cfg.expansion * max(dims[n] for n in sources)
            groups = matryoshka_ends(cfg.matryoshka_groups, m) if cfg.architecture == "matryoshka" else None
            k = min(cfg.k, m) if cfg.architecture == "jumprelu" else cfg.k  # its k: only the starting L0
            if cfg.sources is None:
                scfg = SAEConfig(dims[name], m, k, cfg.architecture, hookpoint=name, model=cfg.model,
                                 matryoshka_groups=groups, encoder_path=path, mp_threshold=cfg.mp_threshold)
            else:
                scfg = SAEConfig(sum(dims[n] for n in sources), m, k, cfg.architecture, model=cfg.model,
                                 matryoshka_groups=groups, sources=sources, targets=targets,
                                 dims={n: dims[n] for n in parts}, encoder_path=path)
            sae = SAE(scfg, device=device).make_trainable(cfg.jumprelu_bandwidth)
            if device.type == "cuda":
                sae.matmul_dtype = torch.bfloat16
            x = self._concat(xs, sources)
            y = self._concat(xs, targets) if targets != sources else None
            self.init_reports[name] = init_sae(sae, x, cfg.init, g, cfg.subspace_rank, cfg.subspace_variance, y)
            if cfg.architecture == "jumprelu":
                init_thresholds(sae, x, cfg.k)
            if self.parallel:  # the same start everywhere, whatever each process was given
                dist.broadcast_params(sae)
                sae.batch_cut = dist.batch_cut
            self.saes[name] = sae
            lr = cfg.lr or 2e-4 / math.sqrt(m / 2**14)
            # Adam moves log(theta) by about lr per step: JUMPRELU_THRESHOLD_LR times that lets the
            # thresholds travel in runs of hundreds of steps, not only hundreds of thousands
            groups = [{"params": [p for n, p in sae.named_parameters() if n != "log_threshold"]}]
            if hasattr(sae, "log_threshold"):
                groups.append({"params": [sae.log_threshold], "lr": lr * JUMPRELU_THRESHOLD_LR})
            self.opts[name] = torch.optim.Adam(groups, lr=lr, eps=6.25e-10, fused=True)
            self.stats[name] = {
                "tokens_since_fired": torch.zeros(m, dtype=torch.long, device=device),
                "first_fired": torch.full((m,), -1, dtype=torch.long, device=device),
                "last_fired": torch.full((m,), -1, dtype=torch.long, device=device),
                "threshold_ema": torch.zeros(2, dtype=torch.float64, device=device),  # [ema, n]
            }
        if self.parallel:
            self.scales = dist.broadcast_object(self.scales)

    def _concat(self, xs: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        """Activations `xs` of `names`, each divided by its scale, side by side."""
        parts = [xs[n] / self.scales[n] for n in names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    # -- one step -------------------------------------------------------------------------
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
        """One optimisation step on `batch = {hookpoint: [B, d]}`; returns metrics per dictionary.

        fvu, l0 and aux_loss stay 0-dim device tensors (`float()` them to read): on a GPU the
        host syncs of a step are the lists of dead latents and one finiteness check.

        Every dictionary's loss is computed before any update: if an input or a loss holds NaN
        or Inf, no parameter, optimizer state or firing statistic changes; the batch is then
        skipped (returns {}) or training stops with a SaekitError, per `on_nonfinite`."""
        cfg, par = self.cfg, self.parallel
        lr_f = lr_factor(self.step, self.total_steps, cfg.warmup_steps, cfg.decay_start)
        pending, checks = {}, []
        for name, sae in self.saes.items():
            sources, targets = self.parts[name]
            B = len(batch[sources[0]])  # the global batch; under data parallelism this process takes a slice
            xs = {n: (dist.shard(batch[n]) if par else batch[n]).to(self.device, torch.float32, non_blocking=True)
                  for n in dict.fromkeys(sources + targets)}
            x = self._concat(xs, sources)
            y = x if targets == sources else self._concat(xs, targets)
            aux = {}
            vals, idx = sae.encode(x, aux)
            denoms = []
            for t in targets:
                yt = y[:, sae.part_slice(t, True)] if len(targets) > 1 else y
                if par:  # the global batch's total variance: this slice's error sum over it adds up to FVU
                    denoms.append(dist.all_reduce((yt - dist.all_reduce(yt.sum(0)) / B).pow(2).sum()))
                else:
                    denoms.append((yt - yt.mean(0)).pow(2).sum())
            st = self.stats[name]
            with torch.no_grad():  # masked updates, not boolean indexing: no host sync
                active = (vals > 1e-3).reshape(-1).float()
                counts = torch.zeros(sae.n_latents, device=self.device).index_add_(0, idx.reshape(-1), active)
                fired = (dist.all_reduce(counts) if par else counts) > 0
                since = (st["tokens_since_fired"] + B).masked_fill_(fired, 0)  # committed after the check
                dead = (since >= cfg.dead_tokens).nonzero().squeeze(1)
            state = StepState(sae, cfg, x, y, vals, idx, aux, denoms, B, dead, self.step, par)
            loss = None
            for term in LOSSES[sae.cfg.architecture]:
                part = term(state)
                if part is not None:
                    loss = part if loss is None else loss + part
            finite = x.isfinite().all() if y is x else x.isfinite().all() & y.isfinite().all()
            checks += [finite, loss.isfinite()]
            pending[name] = (B, state, loss, fired, since)

        ok = torch.stack(checks)
        if par:  # a NaN in any slice skips (or stops) the step everywhere
            ok = dist.all_reduce(ok.float(), "min") > 0
        ok = ok.tolist()  # one host sync for every dictionary
        for i, name in enumerate(pending):
            if not (ok[2 * i] and ok[2 * i + 1]):
                self._nonfinite(name, "activations" if not ok[2 * i] else "loss")
                self.step += 1  # the batch index still advances: a resume sees the same batches
                return {}

        metrics = {}
        for name, (B, state, loss, fired, since) in pending.items():
            sae, st, vals = self.saes[name], self.stats[name], state.vals
            with torch.no_grad():
                st["tokens_since_fired"].copy_(since)
                st["last_fired"].masked_fill_(fired, self.step)
                st["first_fired"].masked_fill_(fired & (st["first_fired"] < 0), self.step)
                if sae.cfg.architecture in ("batchtopk", "matryoshka") and self.step >= self.threshold_start:
                    self._update_threshold(sae, st["threshold_ema"], vals)
            opt = self.opts[name]
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
            sae.sync_threshold()
            fvu = state.fvu
            aux = state.extra.get("aux_loss", torch.zeros((), device=self.device))
            parts = torch.stack([fvu.detach(), (vals > 0).sum().to(fvu.dtype), aux.detach().to(fvu.dtype)])
            if par:
                dist.all_reduce(parts)
            metrics[name] = {
                "fvu": parts[0],
                "l0": parts[1] / B,
                "dead_fraction": len(state.dead) / sae.n_latents,
                "aux_loss": parts[2],
                "lr": opt.param_groups[0]["lr"],
            }
        self.tokens += next(iter(pending.values()))[0]
        self.step += 1
        return metrics

    def _nonfinite(self, name: str, what: str) -> None:
        sources, targets = self.parts[name]
        parts = list(dict.fromkeys(sources + targets))
        which = f"hookpoint {name!r}" if parts == [name] else f"dictionary {name!r} ({', '.join(parts)})"
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
        return next(iter(self.saes.values())).encoder_path

    # -- results and checkpoints ------------------------------------------------------------
    def final_sae(self, name: str) -> SAE:
        """A copy of the dictionary acting on raw (unscaled) activations, in eval mode (a
        `Crosscoder` when the config names sources)."""
        src = self.saes[name]
        sae = (Crosscoder if src.cfg.sources else SAE)(SAEConfig(**asdict(src.cfg)), device=self.device)
        sae.load_state_dict({k: v for k, v in src.state_dict().items() if k != "log_threshold"})
        sources, targets = self.parts[name]
        scales = {n: self.scales[n] for n in sources + targets}
        return sae.fold_input_scales(scales).eval().requires_grad_(False)

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
                "skipped": self.skipped, "encoder_path": next(iter(self.saes.values())).cfg.encoder_path}
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
        for h, (sources, targets) in self.parts.items():
            scale = {"input_scale": self.scales[h]} if sources == targets == [h] else \
                {"input_scales": {n: self.scales[n] for n in dict.fromkeys(sources + targets)}}
            info = {**scale, "step": self.step, "init": self.init_reports[h], **(extra or {})}
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
                and all(isinstance(scales.get(h), float) for h in self.scales)):
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
        self.step, self.scales = meta["step"], {h: scales[h] for h in self.scales}
        tokens, skipped = meta.get("tokens"), meta.get("skipped")
        self.tokens = tokens if isinstance(tokens, int) else self.step * self.cfg.batch_size  # older states
        self.skipped = skipped if isinstance(skipped, int) else 0
        for p, (h, state) in adam.items():
            self.opts[h].state[p] = state
        path = cpu_encoder_path(meta.get("encoder_path"))  # SAEKIT_ENCODER may still override it
        for h, sae in self.saes.items():
            sae.cfg.encoder_path = path
            with torch.no_grad():
                for n, p in sae.named_parameters():
                    p.copy_(tensors[f"{h}/param/{n}"])
            for n in self.stats[h]:
                self.stats[h][n] = tensors[f"{h}/stats/{n}"]
            ema = self.stats[h]["threshold_ema"]
            if ema[1] > 0:
                sae.cfg.threshold = float(ema[0] / (1 - 0.999 ** ema[1]))
            sae.sync_threshold()


def run_steps(trainer: Trainer, batches: Iterable[dict[str, torch.Tensor]], quiet: bool = False,
              on_log=None, on_checkpoint=None) -> None:
    """Drive `trainer` over `batches` with a progress bar (tokens/s, FVU, L0, dead %).

    `on_log(step, metrics)` runs every `log_every` steps and `on_checkpoint()` every
    `checkpoint_every` steps (both optional).
    """
    cfg = trainer.cfg
    bar = tqdm(total=trainer.total_steps, initial=trainer.step, disable=quiet, desc="train", unit="step",
               dynamic_ncols=True)
    dead = f"dead({tqdm.format_sizeof(cfg.dead_tokens)} tok)"  # unfired in the last dead_tokens training tokens
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
                                **{dead: f"{100 * first['dead_fraction']:.1f}%"})
            if on_log:
                on_log(trainer.step, {"tokens_per_s": speed, "tokens": trainer.tokens,
                                      "skipped_batches": trainer.skipped, "encoder_path": trainer.encoder_path,
                                      **metrics})
        if on_checkpoint and trainer.step % cfg.checkpoint_every == 0:
            on_checkpoint()
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
