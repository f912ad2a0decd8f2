"""Feature absorption (Chanin et al. 2024, the SAEBench variant) on first-letter spelling.

Three separable parts:
  `first_letter_data`      model-driven: single-token words, ICL prompts, activation at the word;
  `letter_probe`, `main_latents`   the ground-truth probe and the k-sparse probing on SAE codes;
  `absorption_scores`      the metric core: given activations, unit probe directions, main
                           latents and the SAE, the absorption fraction and full absorption per token.
`absorption_from_data` ties the last two together; `absorption` runs everything on a model.
"""

import random
import re
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saekit.analyze.common import Result
from saekit.errors import SaekitError
from saekit.io import Phases
from saekit.runtime import torch_threads
from saekit.sae import SAE

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPT = " has the first letter:"  # "{word} has the first letter: {L}" (Chanin et al.)


@dataclass
class FirstLetterData:
    words: list[str]  # single-token words, with their leading space
    letters: torch.Tensor  # [n] first letter, 0..25
    acts: torch.Tensor  # [n, d] activation at the word token
    train: torch.Tensor  # [n] bool: probe-training split (80 %); the rest is held out


@torch.no_grad()
def first_letter_data(model, hookpoint: str, n_words: int = 3000, n_icl: int = 4, train_share: float = 0.8,
                      seed: int = 0, batch_size: int = 32, progress: bool = False) -> FirstLetterData:
    """Activations at `hookpoint` for `n_words` vocabulary tokens that are a space and 2+ letters.

    Each prompt is BOS, `n_icl` solved examples `"{w} has the first letter: {W[0]}"` drawn from
    the training words, then the word itself. The activation is read at the word, the last
    token: what follows it in the full task prompt cannot change it (causal attention).
    """
    from saekit.model import last_layer

    tok = model.tokenizer
    vocab = [(i, tok.decode([i])) for i in range(len(tok))]
    words = sorted((i, w) for i, w in vocab if re.fullmatch(r" [A-Za-z]{2,}", w))
    if len(words) < 2 * 26:
        raise SaekitError(f"the tokenizer has only {len(words)} alphabetic single-token words with a leading space")
    rng = random.Random(seed)
    rng.shuffle(words)
    words = words[:n_words]
    n_train = int(train_share * len(words))
    if n_train <= n_icl:
        raise SaekitError(f"n_words={n_words} leaves {n_train} training words, too few for {n_icl} ICL examples")
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    suffix, newline = enc(PROMPT), enc("\n")
    answer = {c: enc(" " + c.upper()) for c in LETTERS}
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    prompts = []
    for n, (i, _w) in enumerate(words):
        shots = [s for s in rng.sample(range(n_train), n_icl + 1) if s != n][:n_icl]
        ids = list(bos)
        for s in shots:
            j, sw = words[s]
            ids += [j, *suffix, *answer[sw[1].lower()], *newline]
        prompts.append(ids + [i])
    stop = last_layer([hookpoint])
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    device = next(model.parameters()).device
    acts = []
    for s in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="first-letter prompts", unit="batch"):
        chunk = prompts[s : s + batch_size]
        width = max(map(len, chunk))  # right-padded: the pad tokens come after the word
        toks = torch.tensor([p + [pad] * (width - len(p)) for p in chunk], device=device)
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n == hookpoint,
                                        stop_at_layer=None if stop is None else stop + 1)
        at = torch.tensor([len(p) - 1 for p in chunk], device=device)
        acts.append(cache[hookpoint][torch.arange(len(chunk), device=device), at].flatten(1).float().cpu())
    return FirstLetterData(
        words=[w for _, w in words],
        letters=torch.tensor([LETTERS.index(w[1].lower()) for _, w in words]),
        acts=torch.cat(acts),
        train=torch.arange(len(words)) < n_train,
    )


def _fit_logistic(X: torch.Tensor, Y: torch.Tensor, l1: float = 0.0, l2: float = 1e-4, steps: int = 400,
                  lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic regression, class-balanced, full-batch Adam (deterministic on CPU).

    X: `[n, f]` shared features (dense or sparse COO) or `[c, n, f]` per-class features;
    Y: `[n, c]` bool. Loss per class: balanced BCE (mean over n) + l1 |w|_1 + l2 |w|^2.
    Gradients are written out (no autograd), so a sparse X costs O(nnz * c) per step. The
    steps are small ops: one thread runs them ~50x faster than two on a busy 2-core machine.
    Returns W [c, f], b [c].
    """
    n, c = Y.shape
    Yf = Y.float()
    pw = (n - Yf.sum(0)) / Yf.sum(0).clamp_min(1)  # [c] positive-class weight
    XT = X.t().coalesce() if X.is_sparse else None  # [f, n]
    W = torch.zeros(c, X.shape[-1])
    b = torch.zeros(c)
    opt = torch.optim.Adam([W, b], lr=lr)
    with torch_threads(1):
        for _ in range(steps):
            p = torch.sigmoid(_logits(X, W, b))  # [n, c]
            G = (p * (1 + (pw - 1) * Yf) - pw * Yf) / n  # d loss / d logits
            gW = (XT @ G).T if XT is not None else (G.T @ X if X.ndim == 2 else torch.einsum("nc,cnf->cf", G, X))
            W.grad = gW + l1 * W.sign() + 2 * l2 * W
            b.grad = G.sum(0)
            opt.step()
    return W, b


def _logits(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, c] logits of shared features `X [n, f]` (dense or sparse) or per-class `X [c, n, f]`."""
    return (torch.einsum("cnf,cf->nc", X, W) if X.ndim == 3 else X @ W.T) + b


def _f1(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-column F1 of bool `[n, c]` predictions (NaN where a column has no positives at all)."""
    tp = (pred & true).sum(0).double()
    denom = pred.sum(0) + true.sum(0)
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.nan)


def letter_probe(data: FirstLetterData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ground truth: a 26-way one-vs-rest logistic probe on the model's activations.

    Returns unit probe directions `[26, d]` (in activation space), held-out F1 `[26]` and the
    held-out predictions `[n_test, 26]` (bool).
    """
    x = data.acts
    mu = x[data.train].mean(0)
    scale = (x[data.train] - mu).pow(2).sum(1).mean().sqrt().clamp_min(1e-12)  # one scalar: directions keep their angle
    xs = (x - mu) / scale
    Y = F.one_hot(data.letters, 26).bool()
    W, b = _fit_logistic(xs[data.train], Y[data.train])
    test = ~data.train
    pred = _logits(xs[test], W, b) > 0
    return F.normalize(W, dim=1), _f1(pred, Y[test]), pred


def _codes(sae: SAE, x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Sparse COO `[n, m]` SAE codes of `x [n, d]`, each latent scaled to unit RMS over `train` rows."""
    vals, idx = sae.encode(x.to(sae.W_dec.device))
    vals, idx = vals.cpu(), idx.cpu()
    rows = torch.arange(len(x))[:, None].expand_as(idx)
    keep = vals > 0
    rows, idx, vals = rows[keep], idx[keep], vals[keep]
    sq = torch.zeros(sae.n_latents).index_add_(0, idx[train[rows]], vals[train[rows]].pow(2))
    rms = (sq / int(train.sum())).sqrt().clamp_min(1e-12)  # [m]
    return torch.sparse_coo_tensor(torch.stack([rows, idx]), vals / rms[idx], (len(x), sae.n_latents),
                                   check_invariants=True).coalesce()


@torch.no_grad()
def main_latents(sae: SAE, data: FirstLetterData, l1: float = 0.01, max_k: int = 10,
                 f1_jump: float = 0.03) -> tuple[list[list[int]], torch.Tensor]:
    """k-sparse probing on SAE codes: per letter, rank latents by an L1-regularised probe,
    fit probes on the top k = 1..max_k, and keep adding latents while held-out F1 rises by at
    least `f1_jump`. Returns the main latents per letter and the F1 `[max_k, 26]` per k."""
    Z = _codes(sae, data.acts, data.train)  # [n, m]
    tr, te = data.train, ~data.train
    Y = F.one_hot(data.letters, 26).bool()
    Ztr = torch.index_select(Z, 0, tr.nonzero().squeeze(1)).coalesce()  # [n_train, m]
    W, _ = _fit_logistic(Ztr, Y[tr], l1=l1, l2=0.0)
    ranked = W.topk(min(max_k, sae.n_latents), dim=1).indices  # [26, max_k]
    cols = torch.sparse.mm(Z, F.one_hot(ranked.flatten(), sae.n_latents).float().T)  # [n, 26 * max_k] dense
    cols = cols.view(len(data.acts), 26, -1).permute(1, 0, 2)  # [26, n, max_k]
    f1 = torch.empty(ranked.shape[1], 26, dtype=torch.float64)
    for k in range(1, ranked.shape[1] + 1):
        Wk, bk = _fit_logistic(cols[:, tr, :k].contiguous(), Y[tr])
        f1[k - 1] = _f1(_logits(cols[:, te, :k].contiguous(), Wk, bk) > 0, Y[te])
    main = []
    for c in range(26):
        k = 1
        while k < len(f1) and f1[k, c] - f1[k - 1, c] >= f1_jump:
            k += 1
        main.append(ranked[c, :k].tolist())
    return main, f1


@dataclass
class TokenAbsorption:
    a: torch.Tensor  # [n] x . p_hat
    main_proj: torch.Tensor  # [n] sum of proj_i over the main latents
    fraction: torch.Tensor  # [n] absorption fraction
    full: torch.Tensor  # [n] bool: fully absorbed
    absorbers: torch.Tensor  # [n, 3] the top absorbing latents where fraction > 0 (else -1)


@torch.no_grad()
def absorption_scores(sae: SAE, acts: torch.Tensor, letters: torch.Tensor, directions: torch.Tensor,
                      main: list[list[int]], absorber_cos: float = 0.1, full_cos: float = 0.025,
                      min_ratio: float = 0.4) -> TokenAbsorption:
    """The metric core for tokens `acts [n, d]` of first letters `letters [n]`, unit
    probe directions `directions [26, d]` and the main latents of each letter.

    proj_i = z_i cos(W_dec[i], p_hat). Absorption fraction: 0 if main >= a or sum(top-3
    absorbers) / a < min_ratio, else 1 if main <= 0, else min(s, a - main) / (min(s, a - main) + main)
    with s = sum(top-3), absorbers being non-main latents with cos >= absorber_cos and proj > 0.
    Full absorption: every main latent inactive, the top projecting latent has cos >= full_cos,
    a > 0 and proj_top / a >= min_ratio.
    """
    dev = sae.W_dec.device
    acts, letters, directions = acts.to(dev).float(), letters.to(dev), directions.to(dev).float()
    vals, idx = sae.encode(acts)  # [n, k]
    is_main = torch.zeros(26, sae.n_latents, dtype=torch.bool, device=dev)
    for c, lat in enumerate(main):
        is_main[c, lat] = True
    in_main = is_main[letters[:, None], idx]  # [n, k]
    cos = (F.normalize(sae.W_dec[idx], dim=-1) * directions[letters][:, None, :]).sum(-1)  # [n, k]
    proj = vals * cos
    active = vals > 1e-8
    a = (acts * directions[letters]).sum(1)
    main_proj = (proj * in_main).sum(1)
    cand = ~in_main & (cos >= absorber_cos) & (proj > 0) & active
    top3, at3 = torch.where(cand, proj, 0).topk(min(3, idx.shape[1]), dim=1)
    s = top3.sum(1)
    a_pos = a.clamp_min(1e-12)
    part = torch.minimum(s, a - main_proj)
    fraction = torch.where(main_proj <= 0, 1.0, (part / (part + main_proj).clamp_min(1e-12)).clamp(0, 1))
    fraction = torch.where((a <= 0) | (main_proj >= a) | (s / a_pos < min_ratio), 0.0, fraction)
    top_proj, top_at = torch.where(active, proj, -torch.inf).max(1)
    top_cos = cos.gather(1, top_at[:, None]).squeeze(1)
    full = ~(in_main & active).any(1) & (top_cos >= full_cos) & (a > 0) & (top_proj / a_pos >= min_ratio)
    absorbers = torch.where((top3 > 0) & (fraction > 0)[:, None], idx.gather(1, at3), -1)
    return TokenAbsorption(a.cpu(), main_proj.cpu(), fraction.cpu(), full.cpu(), absorbers.cpu())


@dataclass
class AbsorptionResult(Result):
    mean_absorption_fraction: float  # mean over kept letters of the per-letter mean
    mean_full_absorption: float
    n_letters: int  # letters whose probe passed the F1 threshold
    table: pd.DataFrame  # one row per kept letter
    absorbing_latents: dict[str, list[int]]  # letter -> absorbing latents, most frequent first
    probe_f1: dict[str, float]  # held-out F1 of the ground-truth probe, all letters
    n_words: int
    f1_threshold: float
    hookpoint: str | None = None


def absorption_from_data(sae: SAE, data: FirstLetterData, f1_threshold: float = 0.6, min_letters: int = 20,
                         l1: float = 0.01, max_k: int = 10, f1_jump: float = 0.03,
                         progress: bool = False) -> AbsorptionResult:
    """Probe, k-sparse probing and the absorption metric on collected first-letter data; the
    metric is averaged per letter over held-out tokens on which the probe is a true positive.
    Deterministic: the probes start at zero and train full-batch. `progress`: a line per step."""
    if data.acts.shape[1] != sae.d_in:
        raise SaekitError(f"activations have d={data.acts.shape[1]}, the SAE expects d_in={sae.d_in}")
    say = Phases("absorption", quiet=not progress)
    say.step("ground-truth letter probes")
    directions, probe_f1, pred = letter_probe(data)
    say.end()
    kept = [c for c in range(26) if probe_f1[c] >= f1_threshold]
    if len(kept) < min_letters:
        raise SaekitError(
            f"only {len(kept)} letters have a probe F1 >= {f1_threshold} (need {min_letters}); "
            "use more words (--words), a later layer, or lower the F1 threshold / minimum letters "
            "(--f1-threshold / --min-letters)")
    say.step(f"k-sparse probing of the SAE's latents (k = 1..{max_k})")
    main, _ = main_latents(sae, data, l1, max_k, f1_jump)
    say.step("absorption scores")
    test = ~data.train
    letters = data.letters[test]
    tp = pred[torch.arange(len(letters)), letters]  # [n_test] the probe fires for the true letter
    scores = absorption_scores(sae, data.acts[test][tp], letters[tp], directions, main)
    rows, absorbing = [], {}
    for c in kept:
        on = letters[tp] == c
        frac, full = scores.fraction[on], scores.full[on]
        counts = torch.bincount(scores.absorbers[on][scores.absorbers[on] >= 0], minlength=sae.n_latents)
        order = counts.argsort(descending=True)[: int((counts > 0).sum())]
        absorbing[LETTERS[c]] = order.tolist()
        rows.append({"letter": LETTERS[c], "probe_f1": float(probe_f1[c]), "n_tokens": int(on.sum()),
                     "main_latents": main[c], "absorption_fraction": float(frac.mean()) if len(frac) else float("nan"),
                     "full_absorption": float(full.float().mean()) if len(full) else float("nan"),
                     "n_absorbed": int((frac > 0).sum())})
    table = pd.DataFrame(rows)
    say.end()
    return AbsorptionResult(
        mean_absorption_fraction=float(table["absorption_fraction"].mean()),
        mean_full_absorption=float(table["full_absorption"].mean()),
        n_letters=len(kept), table=table, absorbing_latents=absorbing,
        probe_f1={LETTERS[c]: float(probe_f1[c]) for c in range(26)}, n_words=len(data.words),
        f1_threshold=f1_threshold,
    )


def absorption(sae: SAE, model, hookpoint: str | None = None, n_words: int = 3000, n_icl: int = 4,
               f1_threshold: float = 0.6, min_letters: int = 20, seed: int = 0, progress: bool = False,
               **options) -> AbsorptionResult:
    """First-letter absorption of `sae` at `hookpoint` (default: the SAE's own) of `model`, a
    TransformerBridge with a tokenizer. `options`: l1, max_k, f1_jump (see `absorption_from_data`)."""
    hookpoint = hookpoint or sae.cfg.hookpoint
    if hookpoint is None:
        raise SaekitError("the SAE names no hookpoint: pass hookpoint=")
    data = first_letter_data(model, hookpoint, n_words, n_icl, seed=seed, progress=progress)
    res = absorption_from_data(sae, data, f1_threshold, min_letters, progress=progress, **options)
    res.hookpoint = hookpoint
    return res
