"""Which latent of SAE B is latent i of SAE A: one-to-one matching of two dictionaries.

`match(a, b)` pairs latents by one of two similarities:

- `method="decoder"` — SAE Match (Balagansky et al. 2025): fold a per-latent scale into each
  SAE (`fold`), then minimise the summed squared distance between the paired folded decoder
  rows (optionally with the encoder rows and biases appended). Needs the same `d_in`.
- `method="activations"` — Lan et al. 2024: codes of both SAEs on the same tokens, z-scored;
  the similarity is the correlation of the pair over those tokens. Works across `d_in`
  (two models, or two hookpoints of different width).

Solvers: `exact` is `scipy.optimize.linear_sum_assignment` on the full cost matrix (O(m³),
m² memory: practical to ~16k latents); `sparse` keeps each row's and each column's top
`candidates` neighbours (two blocked passes, never the m×m matrix; bf16 where A's encoder path
is bf16 (saekit.runtime), exact fp32 costs on the kept edges), removes duplicate edges and
runs `scipy.sparse.csgraph.min_weight_full_bipartite_matching`, with a costly private dummy
edge per row so that a full matching always exists: the result is the cheapest matching of
most latents the candidate graph allows, and the latents it leaves out are matched exactly
among themselves (`fallback`). `argmax` gives each A latent
its most similar B latent (not one-to-one, Lan et al.'s rule); `auto` is exact up to 8,192²
pairs, sparse above. With widths m_a ≠ m_b the smaller side is matched completely and the
surplus latents of the larger side get -1.
"""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy import sparse as sp
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from saekit.activations import Activations
from saekit.codes import Codes, encode_all
from saekit.errors import SaekitError
from saekit.io import atomic_write
from saekit.run import Run, is_sae_folder
from saekit.runtime import FP32, cpu_encoder_path
from saekit.sae import SAE

Method = Literal["decoder", "activations"]
Solver = Literal["auto", "exact", "sparse", "argmax"]
EXACT_MAX_PAIRS = 8192 * 8192  # `auto` solves exactly up to this many pairs (exact: about 10 s at 8k)
BLOCK = 2048  # rows of the similarity matrix computed at once


# -- folding -----------------------------------------------------------------------------------
class FoldedSAE:
    """An SAE with a per-latent scale `s` folded in: `W_dec' = diag(s) W_dec`,
    `W_enc' = diag(1/s) W_enc`, `b_enc' = b_enc / s`, codes `z' = z / s`.

    The output `Σ z'_i W_dec'[i] + b_dec` equals the SAE's. Latents are still selected on the
    unfolded pre-activations (for TopK a per-latent scale would otherwise change which k
    win; for a threshold θ_i the folded threshold is θ_i / s_i, the same test)."""

    def __init__(self, sae: SAE, scale: torch.Tensor):
        if scale.shape != (sae.n_latents,) or not bool((scale > 0).all()):
            raise SaekitError(f"a fold scale must be positive with shape [{sae.n_latents}]")
        self.sae, self.scale = sae, scale.to(sae.W_dec)
        s = self.scale.detach()[:, None]
        self.W_dec, self.W_enc = sae.W_dec.detach() * s, sae.W_enc.detach() / s
        self.b_enc, self.b_dec = sae.b_enc.detach() / self.scale, sae.b_dec.detach()

    @torch.no_grad()
    def encode(self, x: torch.Tensor):
        vals, idx = self.sae.encode(x)
        return vals / self.scale[idx], idx

    @torch.no_grad()
    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bk,bkd->bd", values, self.W_dec[indices]) + self.b_dec

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))


def fold_scale(sae: SAE, codes: "Codes | None" = None, how: str = "auto") -> torch.Tensor:
    """The per-latent scale to fold into `sae`.

    `"threshold"` (JumpReLU, SAE Match's choice): each latent's threshold θ_i, so that every
    folded latent fires at 1. `"norm"` (data-free): 1/‖W_dec[i]‖, so folded decoder rows are
    unit vectors and the codes carry all of the magnitude. For saekit's unit-norm TopK decoders
    this is the identity and decoder matching compares directions; a BatchTopK (and Matryoshka,
    whose codes are BatchTopK's) threshold is one number for all latents, so folding it would
    not change the assignment. `"auto"` (default):
    threshold for JumpReLU SAEs with positive thresholds, norm otherwise. `"mean"` (needs codes):
    each latent's mean value when active, so a folded row is the latent's typical contribution
    to the output (a never-active latent keeps scale 1). It weights pairs by magnitude, and made
    the exact assignment several times slower on real layers, so it is opt-in."""
    theta = sae.threshold if "threshold" in sae.family.tensors else None  # per-latent (JumpReLU)
    if how == "auto":
        how = "threshold" if theta is not None and bool((theta > 0).all()) else "norm"
    if how == "threshold":
        if theta is None or not bool((theta > 0).all()):
            raise SaekitError("fold='threshold' needs a JumpReLU SAE with positive per-latent thresholds")
        return theta.detach().float().clone()
    if how == "norm":
        return 1 / sae.W_dec.detach().norm(dim=1).clamp_min(1e-12)
    if how == "mean":
        if codes is None:
            raise SaekitError("fold='mean' needs codes (activations) of the SAE")
        s = codes.mean_active()
        return torch.where(s > 0, s, torch.ones_like(s))
    raise SaekitError(f"fold must be 'auto', 'threshold', 'norm' or 'mean', got {how!r}")


def fold(sae: SAE, scale: torch.Tensor | None = None) -> FoldedSAE:
    """`sae` with `scale` (default: the data-free `fold_scale`) folded in."""
    return FoldedSAE(sae, fold_scale(sae) if scale is None else scale)


# -- similarity spaces ---------------------------------------------------------------------------
# Each space gives `gain(rows, cols, transpose, fast)`: a block of the [m_a, m_b] similarity to
# maximise (rows of B against A when `transpose`; `fast` may use bf16 and drop per-row constants,
# for a per-row top-k only), `pair_gain(i, j)` exactly for listed pairs, and `score(i, j)` to report.
class _Decoder:
    """Gain = −(squared distance) between folded rows; score = cosine of the decoder rows."""

    def __init__(self, fa: FoldedSAE, fb: FoldedSAE, use_encoder: bool):
        def rows(f):
            parts = [f.W_dec] + ([f.W_enc, f.b_enc[:, None]] if use_encoder else [])
            return torch.cat(parts, 1).float().cpu()

        self.x = rows(fa), rows(fb)
        self.n = tuple((x**2).sum(1) for x in self.x)
        # bf16 candidates only where A's encoder path is bf16 (its run's, or this CPU's: saekit.runtime)
        fast = torch.float32 if cpu_encoder_path(fa.sae.cfg.encoder_path) == FP32 else torch.bfloat16
        self.x_fast = tuple(x.to(fast) for x in self.x)
        self.da, self.db = (torch.nn.functional.normalize(f.W_dec.float().cpu(), dim=1) for f in (fa, fb))
        self.m_a, self.m_b = (len(x) for x in self.x)

    def gain(self, rows, cols=slice(None), transpose: bool = False, fast: bool = False) -> torch.Tensor:
        u, v = (1, 0) if transpose else (0, 1)
        if fast:  # for a per-row top-k: one fused matmul in the fast dtype, the row constant left out
            x = self.x_fast
            return torch.addmm(-self.n[v][None, cols].to(x[u].dtype), x[u][rows], x[v][cols].T, alpha=2)
        return 2 * self.x[u][rows] @ self.x[v][cols].T - self.n[u][rows, None] - self.n[v][None, cols]

    def pair_gain(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        out = np.empty(len(i))
        for s in range(0, len(i), 65536):
            a, b = torch.from_numpy(i[s : s + 65536]), torch.from_numpy(j[s : s + 65536])
            out[s : s + 65536] = (2 * (self.x[0][a] * self.x[1][b]).sum(1) - self.n[0][a] - self.n[1][b]).numpy()
        return out

    def score(self, ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
        return (self.da[ia] * self.db[ib]).sum(1)


class _Correlation:
    """Gain = score = Pearson correlation of two latents' values over the same tokens, from
    sparse code products (a never-firing latent correlates 0 with everything)."""

    def __init__(self, ca: Codes, cb: Codes):
        if ca.n_tokens != cb.n_tokens:
            raise SaekitError(f"activation matching needs codes on the same tokens; got {ca.n_tokens} and "
                              f"{cb.n_tokens} tokens")
        self.n = ca.n_tokens
        csr = ca.csr(), cb.csr()
        self.by_latent = tuple(c.T.tocsr() for c in csr)  # [m, N]
        self.by_token = tuple(c.tocsc() for c in csr)  # [N, m]
        mom = ca.moments(), cb.moments()
        self.mu = tuple(m for m, _ in mom)
        self.inv_sd = tuple(np.where(s > 0, 1 / np.where(s > 0, s, 1), 0.0) for _, s in mom)
        self.m_a, self.m_b = ca.n_latents, cb.n_latents

    def gain(self, rows, cols=slice(None), transpose: bool = False, fast: bool = False) -> torch.Tensor:
        rows, cols = (x.numpy() if isinstance(x, torch.Tensor) else x for x in (rows, cols))
        u, v = (1, 0) if transpose else (0, 1)
        cov = (self.by_latent[u][rows] @ self.by_token[v][:, cols]).toarray() / self.n
        cov -= np.outer(self.mu[u][rows], self.mu[v][cols])
        return torch.from_numpy((cov * np.outer(self.inv_sd[u][rows], self.inv_sd[v][cols])).astype(np.float32))

    def pair_gain(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        prod = np.asarray(self.by_latent[0][i].multiply(self.by_latent[1][j]).sum(1)).ravel() / self.n
        return (prod - self.mu[0][i] * self.mu[1][j]) * self.inv_sd[0][i] * self.inv_sd[1][j]

    def score(self, ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.pair_gain(ia.numpy(), ib.numpy())).float()


def _blocks(m: int):
    return (slice(s, min(s + BLOCK, m)) for s in range(0, m, BLOCK))


# -- solvers -------------------------------------------------------------------------------------
def _exact(space) -> tuple[torch.Tensor, dict]:
    cost = np.empty((space.m_a, space.m_b), np.float32)
    for r in _blocks(space.m_a):
        cost[r] = -space.gain(r).numpy()
    rows, cols = linear_sum_assignment(cost)
    out = torch.full((space.m_a,), -1, dtype=torch.long)
    out[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return out, {}


def _argmax(space) -> tuple[torch.Tensor, dict]:
    return torch.cat([space.gain(r).argmax(1) for r in _blocks(space.m_a)]), {}


def topk_edges(space, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate edges (i, j) with their exact gains: each A latent's top-c B latents and each B
    latent's top-c A latents (two blocked passes, never the m_a × m_b matrix), duplicates removed."""
    parts = []
    for transpose, m, other in ((False, space.m_a, space.m_b), (True, space.m_b, space.m_a)):
        for r in _blocks(m):
            near = space.gain(r, transpose=transpose, fast=True).topk(min(c, other), dim=1).indices
            mine = torch.arange(r.start, r.stop).repeat_interleave(near.shape[1])
            parts.append((near.flatten(), mine) if transpose else (mine, near.flatten()))
    i, j = (torch.cat([p[k] for p in parts]) for k in (0, 1))
    # one copy of each edge: summing duplicates (as a sparse matrix would) changes their costs
    key = np.unique((i * space.m_b + j).numpy())
    i, j = key // space.m_b, key % space.m_b
    return i, j, space.pair_gain(i, j)


def _sparse(space, candidates: int, fallback: str) -> tuple[torch.Tensor, dict]:
    i, j, gain = topk_edges(space, candidates)
    cost = gain.max() - gain + 1e-6  # positive: the graph keeps no explicit zeros
    # Each row also gets a private dummy column costing more than any swap of real edges, so a
    # full matching always exists and the solution is the cheapest maximum-cardinality matching
    # of the candidate graph; rows left on a dummy go to `fallback`.
    penalty = 2 * min(space.m_a, space.m_b) * cost.max() + 1
    diag = np.arange(space.m_a)
    graph = sp.csr_matrix((np.concatenate([cost, np.full(space.m_a, penalty)]),
                           (np.concatenate([i, diag]), np.concatenate([j, space.m_b + diag]))),
                          shape=(space.m_a, space.m_b + space.m_a))
    rows, cols = min_weight_full_bipartite_matching(graph)
    real = cols < space.m_b
    rows, cols = rows[real], cols[real]
    out = torch.full((space.m_a,), -1, dtype=torch.long)
    info = {"edges": int(len(i)), "candidates": candidates, "fallback": fallback, "n_fallback": 0,
            "n_unmatched_in_candidates": int(min(space.m_a, space.m_b) - len(rows))}
    out[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    left_a = torch.from_numpy(np.setdiff1d(np.arange(space.m_a), rows))
    left_b = torch.from_numpy(np.setdiff1d(np.arange(space.m_b), cols))
    if fallback == "exact" and len(left_a) * len(left_b) > EXACT_MAX_PAIRS:
        info["fallback"] = f"none: {len(left_a)} x {len(left_b)} left over, too many to solve exactly"
    elif fallback == "exact" and len(left_a) and len(left_b):
        g = torch.cat([space.gain(left_a[s : s + BLOCK], left_b) for s in range(0, len(left_a), BLOCK)])
        r, c = linear_sum_assignment(-g.numpy())
        out[left_a[r]] = left_b[c]
        info["n_fallback"] = int(len(r))
    return out, info


# -- the result -----------------------------------------------------------------------------------
@dataclass
class Match:
    """A matching of the latents of A to those of B."""

    b_for_a: torch.Tensor  # [m_a] int64: the matched latent of B, -1 = none
    score: torch.Tensor  # [m_a] float32: decoder cosine or activation correlation; nan where -1
    m_b: int
    method: str
    solver: str
    info: dict = field(default_factory=dict)

    @property
    def m_a(self) -> int:
        return len(self.b_for_a)

    @property
    def a_for_b(self) -> torch.Tensor:
        """[m_b]: the A latent matched to each B latent, -1 = none (one-to-one solvers)."""
        out = torch.full((self.m_b,), -1, dtype=torch.long)
        ok = self.b_for_a >= 0
        out[self.b_for_a[ok]] = torch.nonzero(ok).flatten()
        return out

    @property
    def table(self):
        import pandas as pd

        ok = self.b_for_a >= 0
        return pd.DataFrame({"latent_a": torch.nonzero(ok).flatten().numpy(), "latent_b": self.b_for_a[ok].numpy(),
                             "score": self.score[ok].numpy()})

    def then(self, other: "Match") -> "Match":
        """A→C through B: this match (A→B) followed by `other` (B→C). Scores are left nan;
        `pair_scores` measures the composed pairs directly."""
        if other.m_a != self.m_b:
            raise SaekitError(f"cannot chain: this match ends in {self.m_b} latents, the next starts from {other.m_a}")
        b = self.b_for_a
        c = torch.where(b >= 0, other.b_for_a[b.clamp_min(0)], -1)
        return Match(c, torch.full((self.m_a,), math.nan), other.m_b, self.method, f"{self.solver}+{other.solver}",
                     {"chain": [self.info.get("a"), self.info.get("b"), other.info.get("b")]})

    def to_dict(self) -> dict:
        s = self.score.tolist()
        return {"method": self.method, "solver": self.solver, "m_a": self.m_a, "m_b": self.m_b, "info": self.info,
                "b_for_a": self.b_for_a.tolist(), "score": [None if math.isnan(x) else x for x in s]}

    def shared(self, t: float) -> float:
        """Fraction of the smaller side's latents matched at score >= t (Paulo & Belrose 2025's "shared")."""
        return float((self.score[self.b_for_a >= 0] >= t).sum()) / min(self.m_a, self.m_b)

    def summary(self) -> dict:
        ok = self.b_for_a >= 0
        s = self.score[ok]
        q = s.quantile(torch.tensor([0.1, 0.5, 0.9])).tolist() if len(s) else [math.nan] * 3
        return {"matched": int(ok.sum()), "m_a": self.m_a, "m_b": self.m_b, "mean score": float(s.mean()),
                "p10": q[0], "median": q[1], "p90": q[2], **{f"shared_{t}": self.shared(t) for t in (0.7, 0.9)}}

    def save(self, path: str | Path) -> Path:
        """`.json` (everything) or `.parquet` (the table, the rest in its metadata)."""
        path = Path(path)
        if path.suffix == ".json":
            atomic_write(path, lambda p: p.write_text(json.dumps(self.to_dict())))
        elif path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            meta = {k: v for k, v in self.to_dict().items() if k not in ("b_for_a", "score")}
            t = pa.table({"latent_a": np.arange(self.m_a), "latent_b": self.b_for_a.numpy(),
                          "score": self.score.numpy()})
            t = t.replace_schema_metadata({"saekit_match": json.dumps(meta)})
            atomic_write(path, lambda p: pq.write_table(t, p))
        else:
            raise SaekitError(f"save a match as .json or .parquet, not {path.suffix or 'no suffix'} ({path})")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Match":
        path = Path(path)
        try:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                t = pq.read_table(path)
                d = json.loads(t.schema.metadata[b"saekit_match"])
                d["b_for_a"], d["score"] = t["latent_b"].to_pylist(), t["score"].to_pylist()
            else:
                d = json.loads(path.read_text())
            return cls(torch.tensor(d["b_for_a"], dtype=torch.long),
                       torch.tensor([math.nan if x is None else x for x in d["score"]], dtype=torch.float32),
                       d["m_b"], d["method"], d["solver"], d.get("info", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SaekitError(f"{path} is not a readable saekit match file ({e})") from None


# -- the entry point -------------------------------------------------------------------------------
def _space(a: SAE, b: SAE, method: str, codes, activations, max_tokens, fold_how: str, use_encoder: bool):
    if method == "decoder":
        if a.d_in != b.d_in:
            raise SaekitError(f"decoder matching compares rows in one space, but d_in differs ({a.d_in} vs {b.d_in}); "
                              "use method='activations' with both models' activations on the same tokens")
        if codes is None and activations is not None and fold_how == "mean":
            codes = (encode_all(a, activations[0], max_tokens), encode_all(b, activations[1], max_tokens))
        ca, cb = codes if codes is not None else (None, None)
        return _Decoder(FoldedSAE(a, fold_scale(a, ca, fold_how)), FoldedSAE(b, fold_scale(b, cb, fold_how)),
                        use_encoder)
    if method == "activations":
        if codes is None:
            if activations is None:
                raise SaekitError("method='activations' needs activations=(acts_a, acts_b) on the same tokens "
                                  "(or codes=(codes_a, codes_b))")
            codes = (encode_all(a, activations[0], max_tokens), encode_all(b, activations[1], max_tokens))
        return _Correlation(*codes)
    raise SaekitError(f"method must be 'decoder' or 'activations', got {method!r}")


def match(a: SAE, b: SAE, method: Method = "decoder", solver: Solver = "auto", candidates: int = 16, *,
          activations: tuple[Activations, Activations] | None = None, codes: tuple[Codes, Codes] | None = None,
          max_tokens: int | None = None, fold: str = "auto", use_encoder: bool = False,
          min_score: float | None = None, fallback: Literal["exact", "none"] = "exact") -> Match:
    """Match the latents of `a` to those of `b` (see the module docstring).

    `activations` (two streams over the same tokens) or precomputed `codes` feed the
    activation method, and the decoder method's `fold="mean"` (see `fold_scale`). `min_score` unmatches
    pairs scoring at or below it (Lan et al. drop correlations ≤ 0.1). `fallback`: latents the
    sparse candidate graph cannot match all at once are matched exactly among themselves
    ("exact") or left -1 ("none"); `info["n_fallback"]` counts them."""
    if solver not in ("auto", "exact", "sparse", "argmax"):
        raise SaekitError(f"solver must be auto, exact, sparse or argmax, got {solver!r}")
    if candidates < 1:
        raise SaekitError(f"candidates must be >= 1, got {candidates}")
    t0 = time.perf_counter()
    space = _space(a, b, method, codes, activations, max_tokens, fold, use_encoder)
    if solver == "auto":
        solver = "exact" if space.m_a * space.m_b <= EXACT_MAX_PAIRS else "sparse"
    if solver == "exact":
        b_for_a, info = _exact(space)
    elif solver == "argmax":
        b_for_a, info = _argmax(space)
    else:
        b_for_a, info = _sparse(space, candidates, fallback)
    ok = b_for_a >= 0
    score = torch.full((space.m_a,), math.nan)
    score[ok] = space.score(torch.nonzero(ok).flatten(), b_for_a[ok]).float()
    if min_score is not None:
        drop = ok & ~(score > min_score)
        b_for_a[drop], score[drop] = -1, math.nan
        info["n_below_min_score"] = int(drop.sum())
    info |= {"a": a.cfg.hookpoint, "b": b.cfg.hookpoint, "seconds": round(time.perf_counter() - t0, 3)}
    return Match(b_for_a, score, space.m_b, method, solver, info)


def nearest(a: SAE, b: SAE) -> Match:
    """The plain cosine top-1 pairing of decoder rows (not one-to-one): a baseline."""
    return match(a, b, "decoder", "argmax", fold="norm")


def pair_scores(a: SAE, b: SAE, b_for_a: torch.Tensor) -> torch.Tensor:
    """Decoder cosine of each pair (i, b_for_a[i]); nan where -1 (e.g. for a chained match)."""
    da, db = (torch.nn.functional.normalize(s.W_dec.detach().float().cpu(), dim=1) for s in (a, b))
    ok = b_for_a >= 0
    out = torch.full((len(b_for_a),), math.nan)
    out[ok] = (da[ok] * db[b_for_a[ok]]).sum(1)
    return out


def _side(spec: str) -> tuple[Run, str, SAE]:
    """(run, hookpoint, SAE) of one side of a match: an SAE folder (inside a run folder, that
    run's), or a run folder with one hookpoint."""
    path = Path(spec)
    if is_sae_folder(path) and (path.parent / "config.json").is_file():
        run, h = Run.open(path.parent), path.name
    else:
        run = Run.open(path)
        h = run.hookpoint()
    return run, h, run.sae(h)


def match_saes(a: str, b: str, method: Method = "decoder", solver: Solver = "auto", candidates: int = 16, *,
               min_score: float | None = None, tokens: int = 32768, activations: tuple = (None, None),
               out: str | Path | None = None, force: bool = False) -> tuple[Match, Path]:
    """`match` the SAEs of folders `a` and `b` (SAE folders, or run folders of one hookpoint) and
    save it to `out`, by default A's run's analysis/matches/<A hookpoint>__<B run>@<B hookpoint>.json
    (just <B hookpoint> within A's run); refuses an existing file unless `force`. With method
    activations, both SAEs encode the same `tokens` tokens: their runs' held-out caches, or
    `activations` (a path for each side)."""
    (run_a, ha, sae_a), (run_b, hb, sae_b) = _side(a), _side(b)
    b_name = hb if run_b.path.resolve() == run_a.path.resolve() else f"{run_b.path.resolve().name}@{hb}"
    out = Path(out) if out else run_a.analysis_dir / "matches" / f"{ha}__{b_name}.json"
    if out.exists() and not force:
        raise SaekitError(f"{out} exists; pass --force to overwrite it or --out PATH to write elsewhere")
    codes = None
    if method == "activations":
        acts_a, acts_b = (run.activations(h, path=p) if p or not run.bare else None
                          for run, h, p in ((run_a, ha, activations[0]), (run_b, hb, activations[1])))
        if acts_a is None or acts_b is None:
            raise SaekitError("--method activations needs both SAEs' activations on the same tokens: SAEs of one run "
                              "(its held-out cache), or --activations-a and --activations-b")
        codes = (encode_all(sae_a, acts_a, tokens), encode_all(sae_b, acts_b, tokens))
    m = match(sae_a, sae_b, method, solver, candidates, codes=codes, min_score=min_score)
    out.parent.mkdir(parents=True, exist_ok=True)
    m.save(out)
    return m, out
