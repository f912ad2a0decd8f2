"""Evaluation metrics: reconstruction on held-out activations (FVU, MSE, L0, cosine, L2 ratio,
latent density) and downstream loss with the SAE spliced into the model (CE, KL, loss
recovered; the splice is `saekit.splice`'s). `saekit.pipeline.evaluate_run` applies them to a run."""

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from saekit.activations import Activations, batches
from saekit.errors import SaekitError
from saekit.model import logprobs
from saekit.sae import SAE
from saekit.splice import reconstruct, zero_ablate


def firing_counts(vals: torch.Tensor, idx: torch.Tensor, n_latents: int) -> torch.Tensor:
    """`[m]` how many rows of a sparse code (`vals`, `idx` `[B, k]`) each latent is active on."""
    return torch.bincount(idx[vals > 0], minlength=n_latents)


def density_summary(density: torch.Tensor, dense_threshold: float = 0.1) -> dict:
    """Dead (density 0), dense (> dense_threshold) and > 1 % shares of per-latent densities `[m]`."""
    return {"dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > dense_threshold).double().mean()),
            "dense_fraction_1pct": float((density > 0.01).double().mean())}


def _pairs(sae: SAE, stream) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [B, d_in], targets [B, d_out]) batches: an SAE's activations twice, or a crosscoder's
    sources and targets side by side from a stream of `{name: [B, d]}` dicts."""
    if not sae.cfg.crosscoder:
        for x in batches(stream, sae.d_in):
            yield x, x
        return
    for part in stream:
        if not isinstance(part, dict):
            raise SaekitError("a crosscoder is evaluated on batches of {name: activations} (Run.dictionary_batches)")
        part = {n: t.float() for n, t in part.items()}
        yield sae.concat(part), sae.concat(part, sae.targets)


@torch.no_grad()
def reconstruction_metrics(sae: SAE, stream: Activations, dense_threshold: float = 0.1) -> dict:
    """FVU, MSE, L0, cosine, L2 ratio, dead and dense shares over `[N, d]` or a stream of `[B, d]`
    (a crosscoder: `{name: [B, d]}` batches; its FVU is over the targets side by side, and
    `fvu/<target>` each target's own).

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 with the mean over the whole stream;
    a latent is dead if it never fires, dense if it fires on more than `dense_threshold`.
    `explained_variance_saebench` is SAEBench's figure (sae-bench 0.6.0, for comparing with
    published numbers): 1 - E||x - x_hat||^2 / (E||x||^2 - (E||x||^2 / d)^2), a variance about
    zero rather than the mean, so it reads higher than 1 - FVU.
    """
    dev = sae.W_dec.device
    names = sae.cfg.target_names
    cols = [sae.part_slice(t, True) for t in names]
    n, l0, cos, ratio = 0, 0.0, 0.0, 0.0
    sse, sum_x2 = torch.zeros(len(names), dtype=torch.float64), torch.zeros(len(names), dtype=torch.float64)
    sum_x = torch.zeros(sae.cfg.d_out, dtype=torch.float64, device=dev)
    counts = torch.zeros(sae.n_latents, dtype=torch.long, device=dev)
    for x, y in _pairs(sae, stream):
        x, y = x.to(dev, torch.float32), y.to(dev, torch.float32)
        vals, idx = sae.encode(x)
        x_hat = sae.decode_concat(vals, idx)
        active = vals > 0
        counts += firing_counts(vals, idx, sae.n_latents)
        n += len(x)
        err = (y - x_hat).pow(2).sum(0).double().cpu()
        sq = y.double().pow(2).sum(0).cpu()
        sse += torch.stack([err[c].sum() for c in cols])
        sum_x = sum_x + y.double().sum(0)
        sum_x2 += torch.stack([sq[c].sum() for c in cols])
        l0 += float(active.sum())
        cos += float(torch.nn.functional.cosine_similarity(y, x_hat, dim=1).sum())
        ratio += float((x_hat.norm(dim=1) / y.norm(dim=1).clamp_min(1e-12)).sum())
    if n == 0:
        raise SaekitError("no activations to evaluate")
    sum_x = sum_x.cpu()
    var = sum_x2 - torch.stack([sum_x[c].pow(2).sum() for c in cols]) / n  # per target
    fvu = float(sse.sum()) / float(var.sum())
    ms = sum_x2.sum() / n  # E||x||^2
    out = {
        "n_tokens": n,
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "explained_variance_saebench": 1 - float(sse.sum() / n) / float(ms - (ms / sae.cfg.d_out) ** 2),
        "mse": float(sse.sum()) / (n * sae.cfg.d_out),
        "l0": l0 / n,
        "cosine": cos / n,
        "l2_ratio": ratio / n,
        **density_summary(counts.double() / n, dense_threshold),
    }
    if sae.cfg.crosscoder:
        out |= {f"fvu/{t}": float(sse[i] / var[i]) for i, t in enumerate(names)}
    return out


CE_CONVENTIONS = ("saekit", "saebench")


@torch.no_grad()
def downstream_metrics(model, sae: SAE, hookpoint: str, tokens: torch.Tensor, mask: torch.Tensor,
                       batch_size: int = 4, progress: str | None = None, convention: str = "saekit") -> dict:
    """Next-token CE with clean activations, the SAE's reconstruction spliced in, and zeros;
    loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean); KL(clean || spliced).

    `convention` "saekit": the SAE (or zeros) replaces the activations at real tokens only (BOS
    keeps its own, which no SAE saw in training); CE and KL average over positions whose target
    is a real token. "saebench": SAEBench's core evaluation (sae-bench 0.6.0), for comparing with
    published numbers: every position is replaced, BOS included; CE averages over positions whose
    input is a real token, KL too (the last position included). With `progress`, a progress bar
    of that name over the contexts (three forward passes each).
    """
    if convention not in CE_CONVENTIONS:
        raise SaekitError(f"unknown CE convention {convention!r}; choose from {', '.join(CE_CONVENTIONS)}")
    saebench = convention == "saebench"
    sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n_ce = n_kl = 0
    for s in tqdm(range(0, len(tokens), batch_size), disable=progress is None, desc=progress, unit="batch"):
        toks, m = tokens[s : s + batch_size], mask[s : s + batch_size]
        at = torch.ones_like(m) if saebench else m  # where the SAE (or zeros) replaces the activations
        tgt = toks[:, 1:].unsqueeze(-1)
        keep_ce = m[:, :-1] if saebench else m[:, 1:]
        keep_kl = m if saebench else torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], 1)
        lp = {
            "clean": logprobs(model, toks).cpu(),
            "sae": logprobs(model, toks, hookpoint, reconstruct(sae, at)).cpu(),
            "zero": logprobs(model, toks, hookpoint, zero_ablate(at)).cpu(),
        }
        for name, v in lp.items():
            sums[f"ce_{name}"] += float(-(v[:, :-1].gather(-1, tgt).squeeze(-1))[keep_ce].sum())
        p_clean = lp["clean"].exp()
        for name in ("sae", "zero"):
            sums[f"kl_{name}"] += float((p_clean * (lp["clean"] - lp[name])).sum(-1)[keep_kl].sum())
        n_ce += int(keep_ce.sum())
        n_kl += int(keep_kl.sum())
    out = {k: v / (n_kl if k.startswith("kl") else n_ce) for k, v in sums.items()}
    gap = out["ce_zero"] - out["ce_clean"]
    out["loss_recovered"] = (out["ce_zero"] - out["ce_sae"]) / gap if gap > 0 else float("nan")
    return out
