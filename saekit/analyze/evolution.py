"""How a crosscoder's latents live across its sources: per-latent decoder-norm trajectories, and
for an ordered series of pre-training snapshots when each latent forms (Ge et al. 2026,
"Evolution of Concepts in Language Model Pre-Training").

A crosscoder has one decoder per source, so `||W_dec[s, i]||` says how much of latent i source s
holds. Rules, with `threshold` = 0.5 by default (a latent's maximum is over its sources):
- present in s: the norm at s is at least threshold x the maximum;
- emergence: the first source from which the latent stays present to the last source (a norm
  that passes half its maximum only in passing, before it stays, does not count); -1 when the
  latent is not present at the last source (it faded, or rose and fell again) or has no norm;
- initial: present at the first source (for snapshots: at initialisation);
- fading: initial, and its norm at the last source below threshold x its norm at the first
  (the initialisation features that training dissolves);
- for layers: `n_present` counts the sources holding the latent (one layer or many).

Units of a crosscoder's norms. "activations" (default): each source's decoder norm in that
source's own units, so a feature whose part of the activations stays the same keeps its norm.
"normalised": in the training units, each source divided by its RMS, which keeps the norms
comparable when the activations' scale itself drifts across snapshots (residual norms grow in
pre-training); there a norm is the feature's share of its snapshot, and it falls when other
features form: a feature on from the first snapshot while later ones triple the RMS reads as
fading and never emerging. The rule cannot tell such dilution from fading in either unit alone;
choose the unit whose constant means "the feature did not change".

Complexity proxy (with codes and the token id of every row): `unigram`, the held-out R^2 of the
best predictor of a latent's activation from the current token alone (its mean activation on
that token). Fit on even rows, scored on odd rows and the reverse, averaged: near 1 for a
single-token latent, near 0 for one whose firing depends on the context, not the token; not
given for latents firing on fewer than `min_fires` rows.
"""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from saekit.codes import Codes
from saekit.errors import SaekitError
from saekit.io import atomic_write

# saekit.codes.Codes, (values, indices) [N, k] each, or dense [N, n_latents]
CodesLike = Codes | tuple[torch.Tensor, torch.Tensor] | torch.Tensor
# a crosscoder's decoder norms in each source's own activation units, or in its training units
UNITS = ("activations", "normalised")


def _norms(cc_or_norms, names: Sequence[str] | None, units: str) -> tuple[np.ndarray, list[str]]:
    """[n_sources, n_latents] float64 norms (a crosscoder's in `units`) and their source names."""
    if units not in UNITS:
        raise SaekitError(f"units must be one of {UNITS}, got {units!r}")
    if hasattr(cc_or_norms, "decoder_norms"):
        norms = cc_or_norms.decoder_norms()  # in training units: each source over its scale
        if units == "activations":
            scales = getattr(getattr(cc_or_norms, "cfg", None), "part_scales", None) or {}
            norms = norms * torch.tensor([scales.get(t, 1.0) for t in cc_or_norms.targets], dtype=norms.dtype)[:, None]
        names = list(names) if names is not None else list(cc_or_norms.targets)
    else:
        norms = cc_or_norms
    norms = torch.as_tensor(norms).detach().double().cpu().numpy() if not isinstance(norms, np.ndarray) \
        else norms.astype(np.float64)
    if norms.ndim != 2:
        raise SaekitError(f"decoder norms must be [n_sources, n_latents], got shape {tuple(norms.shape)}")
    names = [f"s{i}" for i in range(len(norms))] if names is None else list(names)
    if len(names) != len(norms):
        raise SaekitError(f"{len(names)} names for {len(norms)} sources")
    if len(set(names)) != len(names):
        raise SaekitError(f"source names must be distinct: {names}")
    if not np.isfinite(norms).all() or (norms < 0).any():
        raise SaekitError("decoder norms must be finite and non-negative")
    return norms, names


def emergence_points(norms: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per latent, the first source from which its norm stays >= threshold x its maximum to the
    last source; -1 when it is below that at the last source or its maximum is 0. `norms`
    [n_sources, n_latents]."""
    top = norms.max(0)
    present = (norms >= threshold * top) & (top > 0)
    # stays[s] = present at s and at every later source: a reversed cumulative AND
    stays = np.flip(np.logical_and.accumulate(np.flip(present, 0), 0), 0)
    return np.where(stays[-1], stays.argmax(0), -1)


def _firing(codes: CodesLike, n_latents: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, latents, values) of the non-zero codes."""
    if isinstance(codes, Codes):
        codes = (codes.values, codes.indices)
    if isinstance(codes, tuple):
        values, indices = (torch.as_tensor(c) for c in codes)
        if values.shape != indices.shape or values.ndim != 2:
            raise SaekitError("codes (values, indices) must both be [N, k]")
        rows = torch.arange(len(values)).unsqueeze(1).expand_as(values)
        keep = values != 0
        return rows[keep], indices[keep].long(), values[keep].double()
    codes = torch.as_tensor(codes)
    if codes.ndim != 2 or codes.shape[1] != n_latents:
        raise SaekitError(f"dense codes must be [N, {n_latents}], got {tuple(codes.shape)}")
    rows, lat = codes.nonzero(as_tuple=True)
    return rows, lat, codes[rows, lat].double()


def unigram_r2(codes: CodesLike, tokens: torch.Tensor, n_latents: int) -> np.ndarray:
    """Per latent, the held-out R^2 of predicting its activation by its mean on the current token
    (fit on even rows, scored on odd rows and the reverse; the two R^2 averaged). Tokens unseen
    in the fitting half are predicted by the latent's mean there. NaN for a latent that is
    constant in a scoring half. Sparse: costs O(non-zero codes + vocabulary)."""
    tokens = torch.as_tensor(tokens).long().flatten()
    rows, lat, val = _firing(codes, n_latents)
    if rows.numel() and int(rows.max()) >= len(tokens):
        raise SaekitError(f"codes have rows beyond the {len(tokens)} token ids")
    n_vocab = int(tokens.max()) + 1 if len(tokens) else 1
    fold_of_row = torch.arange(len(tokens)) % 2
    r2 = []
    for fit in (0, 1):
        score = 1 - fit
        f_nz, s_nz = fold_of_row[rows] == fit, fold_of_row[rows] == score
        count_fit = torch.bincount(tokens[fold_of_row == fit], minlength=n_vocab).double()  # [vocab]
        count_score = torch.bincount(tokens[fold_of_row == score], minlength=n_vocab).double()
        n_fit, n_score = float(count_fit.sum()), float(count_score.sum())
        # mean activation per (token, latent) in the fitting half, on the keys that fire there
        keys = tokens[rows[f_nz]] * n_latents + lat[f_nz]
        uniq, inv = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, val[f_nz])
        u_tok, u_lat = uniq // n_latents, uniq % n_latents
        mean_tok = sums / count_fit[u_tok]
        mu = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, lat[f_nz], val[f_nz]) / max(n_fit, 1)
        unseen = count_fit == 0
        # SSE = sum a^2 - 2 sum a * pred + sum pred^2 over the scoring rows
        s_keys = tokens[rows[s_nz]] * n_latents + lat[s_nz]
        pos = torch.searchsorted(uniq, s_keys).clamp(max=max(len(uniq) - 1, 0))
        hit = (uniq[pos] == s_keys) if len(uniq) else torch.zeros_like(s_keys, dtype=torch.bool)
        pred = torch.where(hit, mean_tok[pos] if len(uniq) else 0.0, 0.0)
        pred = torch.where(unseen[tokens[rows[s_nz]]], mu[lat[s_nz]], pred)
        v = val[s_nz]
        sum_a = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, lat[s_nz], v)
        sum_a2 = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, lat[s_nz], v * v)
        sum_ap = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, lat[s_nz], v * pred)
        sum_p2 = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, u_lat, count_score[u_tok] * mean_tok**2)
        sum_p2 += float(count_score[unseen].sum()) * mu**2
        sse = sum_a2 - 2 * sum_ap + sum_p2
        sst = sum_a2 - sum_a**2 / max(n_score, 1)
        r2.append(torch.where(sst > 1e-12 * (1 + sum_a2), 1 - sse / sst, torch.nan))
    return torch.stack(r2).mean(0).numpy()


def evolution(cc_or_norms, names: Sequence[str] | None = None, codes: CodesLike | None = None,
              tokens: torch.Tensor | None = None, threshold: float = 0.5, min_fires: int = 20,
              units: str = "activations") -> pd.DataFrame:
    """One row per latent of a crosscoder (anything with `.decoder_norms()` and `.targets`) or of
    decoder norms `[n_sources, n_latents]` (`names` name the sources, default s0, s1, ...).

    Columns: `latent`; `emergence` (index into the sources, -1 if never: rules in the module
    docstring); `peak` (source of the largest norm); `max_norm`; `n_present`; `initial`;
    `fading`; `norm:<source>` per source, in source order; with `codes` (`saekit.codes.Codes`,
    (values, indices) or dense, one row per token) and `tokens` (the token id of each row): `frequency` (share of rows
    where the latent fires) and `unigram` (held-out R^2 of a per-token predictor; NaN for a latent
    firing on fewer than `min_fires` rows, where the R^2 of a handful of tokens says nothing).
    `units` (a crosscoder's norms; see the module docstring): "activations" or "normalised"."""
    if not 0 < threshold < 1:
        raise SaekitError(f"threshold must be in (0, 1), got {threshold}")
    norms, names = _norms(cc_or_norms, names, units)
    top = norms.max(0)
    present = (norms >= threshold * top) & (top > 0)
    initial = present[0]
    df = pd.DataFrame({
        "latent": np.arange(norms.shape[1]),
        "emergence": emergence_points(norms, threshold),
        "peak": norms.argmax(0),
        "max_norm": top,
        "n_present": present.sum(0),
        "initial": initial,
        "fading": initial & (norms[-1] < threshold * norms[0]),
    })
    if (codes is None) != (tokens is None):
        raise SaekitError("the unigram proxy needs both codes and tokens")
    if codes is not None:
        rows, lat, _ = _firing(codes, norms.shape[1])
        n = len(torch.as_tensor(tokens).flatten())
        fires = torch.bincount(lat, minlength=norms.shape[1]).numpy()
        df["frequency"] = fires / max(n, 1)
        df["unigram"] = np.where(fires >= min_fires, unigram_r2(codes, tokens, norms.shape[1]), np.nan)
    for name, col in zip(names, norms, strict=True):
        df[f"norm:{name}"] = col
    return df


def summary(df: pd.DataFrame) -> dict:
    """Counts behind the evolution story: latents per emergence point, never-emerged, initial and
    fading latents, and (with the unigram column) the Spearman correlation between emergence and
    unigram R^2 over emerged latents (negative: token-level latents form earlier)."""
    n_src = sum(c.startswith("norm:") for c in df.columns)
    emerged = df[df["emergence"] >= 0]
    out = {"n_latents": len(df), "emerged": len(emerged), "never": int((df["emergence"] < 0).sum()),
           "initial": int(df["initial"].sum()), "fading": int(df["fading"].sum()),
           "per_source": np.bincount(emerged["emergence"], minlength=n_src).tolist(),
           "single_source": int((df["n_present"] == 1).sum()), "median_emergence": (
               float(emerged["emergence"].median()) if len(emerged) else math.nan)}
    if "unigram" in df and len(emerged) > 2:
        ok = emerged[emerged["unigram"].notna()]
        out["spearman_emergence_unigram"] = float(spearmanr(ok["emergence"], ok["unigram"]).statistic) \
            if len(ok) > 2 else math.nan
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SaekitError("plots need matplotlib: pip install 'saekit[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def plot_emergence(df: pd.DataFrame, path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Histogram of emergence points (one bar per source, labelled by `labels` or the source
    names), with the never-emerged count and the fading ones in the title."""
    plt = _pyplot()
    names = [c[5:] for c in df.columns if c.startswith("norm:")]
    labels = list(labels) if labels is not None else names
    s = summary(df)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.4 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), s["per_source"])
    ax.set_xticks(range(len(names)), labels, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="latents", title=f"Emergence of {s['emerged']} latents ({s['never']} never, "
                                   f"{s['fading']} initial and fading)")
    return _save(fig, path, plt)


def plot_trajectories(df: pd.DataFrame, path: str | Path, x: Sequence[float] | None = None, n: int = 60,
                      seed: int = 0, xlabel: str = "source") -> Path:
    """Decoder-norm trajectories (each latent's norms over its maximum) of `n` sampled latents,
    coloured by emergence point, with the median of emerged and fading latents in black.
    `x` places the sources (e.g. snapshot steps; a log axis when all are positive after +1)."""
    plt = _pyplot()
    cols = [c for c in df.columns if c.startswith("norm:")]
    rel = df[cols].to_numpy() / np.maximum(df["max_norm"].to_numpy()[:, None], 1e-30)
    xs = np.arange(len(cols)) if x is None else np.asarray(x, dtype=float)
    log = x is not None and (xs + 1 > 0).all()
    xs = xs + 1 if log else xs
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(df), size=min(n, len(df)), replace=False) if len(df) else []
    cmap = plt.get_cmap("viridis")
    em = df["emergence"].to_numpy()
    for i in pick:
        color = "lightgrey" if em[i] < 0 else cmap(em[i] / max(1, len(cols) - 1))
        ax.plot(xs, rel[i], color=color, lw=0.7, alpha=0.8)
    for mask, style, label in ((em >= 0, "-", "median, emerged"), (df["fading"].to_numpy(), "--", "median, fading")):
        if mask.any():
            ax.plot(xs, np.median(rel[mask], 0), "k" + style, lw=2, label=f"{label} ({int(mask.sum())})")
    if log:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel + (" + 1" if log else ""), ylabel="decoder norm / its maximum",
           title="Decoder-norm trajectories (colour: emergence point)")
    ax.legend(fontsize=8)
    return _save(fig, path, plt)
