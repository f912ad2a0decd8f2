"""Dead and dense latents: per-latent firing density over a token stream, the dead and dense
shares, a log10-density histogram, and — given a run's firing history
(`saekit.Run.firing_history`) — which dead latents never fired at all (dead at init) and which
fired early and then died."""

from dataclasses import dataclass

import torch

from saekit.analyze.common import Activations, Result, batches
from saekit.errors import SaekitError
from saekit.evaluate import density_summary, firing_counts
from saekit.run import FiringHistory
from saekit.sae import SAE


@dataclass
class DeadResult(Result):
    n_tokens: int
    n_latents: int
    density: torch.Tensor  # [m] fraction of tokens on which each latent is active
    n_dead: int
    dead_fraction: float  # density 0 over the tokens
    dense_fraction: float  # density > dense_threshold
    dense_fraction_1pct: float  # density > 0.01
    dense_threshold: float
    hist_edges: list[float]  # log10-density bin edges (live latents only; dead are n_dead)
    hist_counts: list[int]
    # with a firing history: the dead latents split by what happened during training
    dead_at_init: int | None = None  # never fired in any training step
    died_in_training: int | None = None  # fired during training, silent here
    died_last_fired_median: float | None = None  # median last training step they fired at
    training_steps: int | None = None
    dead_by_training_rule: int | None = None  # silent for >= dead_tokens when training ended


@torch.no_grad()
def dead(sae: SAE, activations: Activations, dense_threshold: float = 0.1, max_tokens: int | None = None,
         history: FiringHistory | None = None, bins: int = 40, batch_size: int = 4096) -> DeadResult:
    """Firing density of every latent of `sae` over `activations` (a `[N, d_in]` tensor or an
    iterable of `[batch, d_in]` tensors), streamed: only an `[m]` counter is kept."""
    m = sae.n_latents
    dev = sae.W_dec.device
    counts = torch.zeros(m, dtype=torch.long, device=dev)
    n = 0
    for x in batches(activations, sae.d_in, batch_size, max_tokens):
        vals, idx = sae.encode(x.to(dev))
        counts += firing_counts(vals, idx, m)
        n += len(x)
    if n == 0:
        raise SaekitError("no activations to analyse")
    density = (counts.double() / n).cpu()
    live = density[density > 0].log10()
    lo = min(float(live.min()) if len(live) else 0.0, torch.tensor(1.0 / n).log10().item())
    edges = torch.linspace(lo, 0.0, bins + 1, dtype=torch.float64)
    hist = torch.histogram(live, edges).hist if len(live) else torch.zeros(bins)
    is_dead = density == 0
    out = DeadResult(
        n_tokens=n, n_latents=m, density=density.float(), n_dead=int(is_dead.sum()),
        **density_summary(density, dense_threshold),
        dense_threshold=dense_threshold, hist_edges=edges.tolist(), hist_counts=hist.long().tolist(),
    )
    if history is not None:
        if len(history.first_fired) != m:
            raise SaekitError(f"firing history has {len(history.first_fired)} latents, the SAE {m}")
        never = history.first_fired < 0
        died = is_dead & ~never
        out.dead_at_init = int((is_dead & never).sum())
        out.died_in_training = int(died.sum())
        out.died_last_fired_median = float(history.last_fired[died].double().median()) if died.any() else None
        out.training_steps = history.step
        if history.tokens_since_fired is not None and history.dead_tokens is not None:
            out.dead_by_training_rule = int((history.tokens_since_fired >= history.dead_tokens).sum())
    return out
