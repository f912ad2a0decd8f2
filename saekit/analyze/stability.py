"""How much two SAEs trained on the same activations agree (Paulo & Belrose 2025, "Sparse
Autoencoders Trained on the Same Data Learn Different Features").

The latents are matched one-to-one (`saekit.matching.match`, exact or sparse-candidate
assignment) on their decoder rows, and separately on their encoder rows; a latent is *shared* at
threshold t when its matched partner's row has cosine >= t with its own. Shared fractions are of
the smaller SAE's latents, the most that can be matched. A latent is shared *as a whole*
(`shared_both_t`, Paulo & Belrose's reading of a shared latent) when its decoder-matched partner
agrees at >= t on the decoder row and on the encoder row; that share counts only latents alive in
both SAEs (firing on the given tokens; without tokens every latent counts) and is of the smaller
number of living latents, so dead rows neither add nor dilute. On held-out tokens, each
decoder-matched pair's co-firing is the Jaccard index of the two latents' firing sets (over the
pairs where either fires). The null is A matched against a random dictionary of B's size (random
unit decoder and encoder rows, all alive): each share and the mean matched cosine that matching
alone gives with nothing shared.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from saekit.analyze.common import Activations, Result
from saekit.analyze.crosslayer import cofiring
from saekit.codes import encode_all
from saekit.errors import SaekitError
from saekit.io import figure, md_table
from saekit.matching import Match, match
from saekit.run import Run
from saekit.sae import SAE, SAEConfig

THRESHOLDS = (0.7, 0.9)


@dataclass
class StabilityResult(Result):
    n_latents_a: int
    n_latents_b: int
    solver: str  # the matching's solver ("exact" or "sparse" under "auto")
    decoder: dict  # matched decoder cosines: mean, quantiles, shared_0.7, shared_0.9
    encoder: dict  # the same for encoder rows, matched on their own
    both: dict  # shared_both_0.7, shared_both_0.9 (of the living latents), n_alive_a, n_alive_b
    null: dict  # against a random dictionary: mean (decoder cosine), shared_t, encoder_shared_t, shared_both_t
    cofiring: dict | None = None  # Jaccard of the decoder-matched pairs' firing sets (crosslayer.cofiring)

    def to_dict(self) -> dict:
        d = super().to_dict()
        return {"shared_0.7": self.decoder["shared_0.7"], "shared_0.9": self.decoder["shared_0.9"],
                **{f"shared_both_{t}": self.both[f"shared_both_{t}"] for t in THRESHOLDS}, **d}


def _rows_sae(rows: torch.Tensor, k: int) -> SAE:
    """An SAE whose decoder rows are `rows [m, d]`, so the decoder matching pairs any set of rows."""
    sae = SAE(SAEConfig(rows.shape[1], rows.shape[0], min(k, rows.shape[0])))
    with torch.no_grad():
        sae.W_dec.copy_(rows)
    return sae


def _summary(m: Match) -> dict:
    s = m.score[m.b_for_a >= 0].double()
    q = s.quantile(torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)).tolist()
    return {"mean": float(s.mean()), "p10": q[0], "p25": q[1], "median": q[2], "p75": q[3], "p90": q[4],
            **{f"shared_{t}": m.shared(t) for t in THRESHOLDS}}


def _both(dec: Match, enc_a: torch.Tensor, enc_b: torch.Tensor, alive_a: torch.Tensor,
          alive_b: torch.Tensor) -> dict:
    """Shares of the latents alive in both SAEs whose decoder-matched partner agrees at >= t on the
    decoder row and on the (unit) encoder row; of the smaller number of living latents."""
    ok = (dec.b_for_a >= 0) & alive_a & alive_b[dec.b_for_a.clamp(min=0)]
    enc_cos = (enc_a[ok] * enc_b[dec.b_for_a[ok]]).sum(1)
    n = max(1, min(int(alive_a.sum()), int(alive_b.sum())))
    return {**{f"shared_both_{t}": float(((dec.score[ok] >= t) & (enc_cos >= t)).sum()) / n for t in THRESHOLDS},
            "n_alive_a": int(alive_a.sum()), "n_alive_b": int(alive_b.sum())}


def stability(sae_a: SAE, sae_b: SAE, activations: Activations | None = None, max_tokens: int | None = None,
              solver: str = "auto", candidates: int = 16, seed: int = 0) -> StabilityResult:
    """Agreement of two SAEs of one hookpoint (see the module docstring). `activations` (a tensor,
    or a stream that can be read twice: both SAEs read the same tokens) adds co-firing and decides
    which latents are alive (fire at least once on them) for the whole-latent share."""
    if sae_a.d_in != sae_b.d_in:
        raise SaekitError(f"stability compares two SAEs of one hookpoint, but d_in differs ({sae_a.d_in} vs "
                          f"{sae_b.d_in}); saekit.match(..., method='activations') compares across widths")
    unit = lambda w: torch.nn.functional.normalize(w.detach().float().cpu(), dim=1)  # noqa: E731
    wa, wb = unit(sae_a.W_enc), unit(sae_b.W_enc)
    dec = match(sae_a, sae_b, "decoder", solver, candidates, fold="norm")
    enc = match(_rows_sae(wa, sae_a.k), _rows_sae(wb, sae_b.k), "decoder", solver, candidates, fold="norm")
    alive_a, alive_b = torch.ones(sae_a.n_latents, dtype=torch.bool), torch.ones(sae_b.n_latents, dtype=torch.bool)
    cofire = None
    if activations is not None:
        ca, cb = encode_all(sae_a, activations, max_tokens), encode_all(sae_b, activations, max_tokens)
        if ca.n_tokens != cb.n_tokens:
            raise SaekitError("the activation stream gave the two SAEs different tokens; pass a tensor or a "
                              "stream that can be read twice")
        alive_a, alive_b = ca.counts() > 0, cb.counts() > 0
        cofire = {"n_tokens": ca.n_tokens, **cofiring(ca, cb, dec.b_for_a)}
    g = torch.Generator().manual_seed(1_000_003 + seed)  # not the stream of a plain seed-0 generator
    rand_dec, rand_enc = (unit(torch.randn(sae_b.n_latents, sae_b.d_in, generator=g)) for _ in range(2))
    null_dec = match(sae_a, _rows_sae(rand_dec, sae_b.k), "decoder", solver, candidates, fold="norm")
    null_enc = match(_rows_sae(wa, sae_a.k), _rows_sae(rand_enc, sae_b.k), "decoder", solver, candidates, fold="norm")
    null = {"mean": float(null_dec.score[null_dec.b_for_a >= 0].mean()),
            **{f"shared_{t}": null_dec.shared(t) for t in THRESHOLDS},
            **{f"encoder_shared_{t}": null_enc.shared(t) for t in THRESHOLDS},
            **{k: v for k, v in _both(null_dec, wa, rand_enc, alive_a, torch.ones_like(alive_b)).items()
               if k.startswith("shared_both")}}
    return StabilityResult(sae_a.n_latents, sae_b.n_latents, dec.solver, _summary(dec), _summary(enc),
                           _both(dec, wa, wb, alive_a, alive_b), null, cofire)


def run_stability(run_a: Run | str | Path, run_b: Run | str | Path, hookpoint: str | None = None,
                  activations: str | None = None, max_tokens: int | None = None) -> StabilityResult:
    """`stability` of the SAEs of one hookpoint in two runs (e.g. two seeds of one config), with
    co-firing on `activations` (a cache folder or .safetensors file) or run A's held-out cache."""
    a, b = (r if isinstance(r, Run) else Run.open(r) for r in (run_a, run_b))
    h = a.hookpoint(hookpoint)
    sae_b = b.sae(None if b.bare else h)
    acts = a.activations(h, path=activations) if activations or not a.bare else None
    return stability(a.sae(h), sae_b, acts, max_tokens)


def markdown(name_b: str, s: dict) -> list[str]:
    """Report lines for a `StabilityResult.to_dict()` against run `name_b`."""
    rows = [{"rows": part, **{k: s[part][k] for k in ("mean", "p10", "median", "p90", "shared_0.7", "shared_0.9")}}
            for part in ("decoder", "encoder")]
    lines = [f"### Seed stability against `{name_b}`", "", md_table(rows), "",
             f"Shared as a whole (decoder and encoder cosine >= 0.7 / 0.9): {figure('shared', s['shared_both_0.7'])} / "
             f"{figure('shared', s['shared_both_0.9'])} of the living latents ({s['both']['n_alive_a']} and "
             f"{s['both']['n_alive_b']} alive); against a random dictionary "
             f"{figure('shared', s['null']['shared_both_0.7'])} / {figure('shared', s['null']['shared_both_0.9'])}, "
             f"mean matched decoder cosine {s['null']['mean']:.4g} "
             f"({s['solver']} matching)."]
    if c := s.get("cofiring"):
        lines.append(f"Co-firing on {c['n_tokens']} held-out tokens: mean Jaccard {c['mean_jaccard']:.4g} over "
                     f"{c['pairs']} pairs that fire, {figure('share', c['share_jaccard_ge_0.5'])} of them >= 0.5.")
    return lines + [""]
