"""Evaluation (spec §9): reconstruction metrics on held-out activations and downstream loss
with the SAE spliced into the model."""

from collections.abc import Iterable

import torch

from saekit.sae import SAE


@torch.no_grad()
def reconstruction_metrics(sae: SAE, batches: Iterable[torch.Tensor], dense_threshold: float = 0.1) -> dict:
    """FVU, MSE, L0, cosine, L2 ratio, dead and dense shares over a stream of `[B, d]`.

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 with the mean over the whole stream;
    a latent is dead if it never fires, dense if it fires on more than `dense_threshold`.
    """
    dev = sae.W_dec.device
    n, sse, sum_x, sum_x2, l0, cos, ratio = 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    counts = torch.zeros(sae.n_latents, dtype=torch.long, device=dev)
    for x in batches:
        x = x.to(dev, torch.float32)
        vals, idx = sae.encode(x)
        x_hat = sae.decode(vals, idx)
        active = vals > 0
        counts += torch.bincount(idx[active], minlength=sae.n_latents)
        n += len(x)
        sse += float((x - x_hat).pow(2).sum())
        sum_x = sum_x + x.double().sum(0)
        sum_x2 += float(x.double().pow(2).sum())
        l0 += float(active.sum())
        cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=1).sum())
        ratio += float((x_hat.norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).sum())
    if n == 0:
        raise ValueError("no activations to evaluate")
    total_var = sum_x2 - float(sum_x.pow(2).sum()) / n
    density = counts.double() / n
    return {
        "n_tokens": n,
        "fvu": sse / total_var,
        "explained_variance": 1 - sse / total_var,
        "mse": sse / (n * sae.d_in),
        "l0": l0 / n,
        "cosine": cos / n,
        "l2_ratio": ratio / n,
        "dead_fraction": float((counts == 0).double().mean()),
        "dense_fraction": float((density > dense_threshold).double().mean()),
        "dense_fraction_1pct": float((density > 0.01).double().mean()),
    }


def splice(sae: SAE, mask: torch.Tensor):
    """Hook replacement: the SAE's reconstruction at positions where `mask` [b, pos] is True
    (BOS/special positions, which the SAE never saw, keep their activations)."""

    def replace(acts: torch.Tensor) -> torch.Tensor:
        out = acts.clone()
        m = mask.to(acts.device)
        out[m] = sae(acts[m].flatten(1)).view_as(acts[m]).to(acts.dtype)
        return out

    return replace


def zero_ablate(mask: torch.Tensor):
    def replace(acts: torch.Tensor) -> torch.Tensor:
        return acts.masked_fill(mask.to(acts.device).view(*mask.shape, *[1] * (acts.ndim - 2)), 0)

    return replace
