"""Feature absorption (Chanin et al. 2024) on first-letter spelling, under two protocols.

`protocol="saebench"` is SAEBench's (Karvonen et al. 2025; sae-bench 0.6.0) written out here: every
single-token alphabetic word (with or without a leading space, single letters too), prompts of 10
solved examples after a newline, a letter probe trained on raw activations in minibatches (50
epochs of Adam, lr 1e-2 decaying to 1e-5, weight decay 1e-4), main latents from an L1 probe on the
raw latent values followed by k-sparse logistic probes, and scores on fresh prompts of the held-out
words. benchmarks/saebench_parity.py runs sae-bench itself beside it on the same SAE and words.

`protocol="saekit"` (the default) is a cheaper, deterministic variant: words of two or more letters
after a space, 4 solved examples, full-batch probes from zero on centred activations, k-sparse
probing on unit-RMS latents, and scores on the probe's own held-out activations. Its figures are
not SAEBench's and read lower on the same SAE: every step before the per-token metric (words,
prompts, probes, main latents, scored activations) differs. Use it to compare SAEs with each
other, SAEBench's to compare with published figures.

Three separable parts:
  `first_letter_data`, `saebench_data`   model-driven: the words, their prompts, activations at the word;
  `letter_probe`, `main_latents`          the ground-truth probe and the k-sparse probing on SAE codes
                                          (`saebench_probe`, `saebench_main_latents` for SAEBench's);
  `absorption_scores`                     the metric core: given activations, unit probe directions,
                                          main latents and the SAE, the absorption fraction and full
                                          absorption per token (the same under both protocols).
`absorption_from_data` / `saebench_from_data` tie the last two together; `absorption` runs
either protocol on a model.
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
from saekit.saebench import envelope

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPT = " has the first letter:"  # "{word} has the first letter: {L}" (Chanin et al.)
PROTOCOLS = ("saekit", "saebench")
SAEBENCH_ICL = 10  # solved examples per SAEBench prompt


@dataclass
class FirstLetterData:
    words: list[str]  # single-token words, with their leading space
    letters: torch.Tensor  # [n] first letter, 0..25
    acts: torch.Tensor  # [n, d] activation at the word token
    train: torch.Tensor  # [n] bool: probe-training split (80 %); the rest is held out
    fresh: torch.Tensor | None = None  # [n_test, d] the held-out words again, under fresh prompts (SAEBench)


@torch.no_grad()
def first_letter_data(model, hookpoint: str, n_words: int = 3000, n_icl: int = 4, train_share: float = 0.8,
                      seed: int = 0, batch_size: int = 32, progress: bool = False) -> FirstLetterData:
    """Activations at `hookpoint` for `n_words` vocabulary tokens that are a space and 2+ letters.

    Each prompt is BOS, `n_icl` solved examples `"{w} has the first letter: {W[0]}"` drawn from
    the training words, then the word itself. The activation is read at the word, the last
    token: what follows it in the full task prompt cannot change it (causal attention).
    """
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
    acts = _word_acts(model, hookpoint, prompts, batch_size, progress)
    return FirstLetterData(
        words=[w for _, w in words],
        letters=torch.tensor([LETTERS.index(w[1].lower()) for _, w in words]),
        acts=acts,
        train=torch.arange(len(words)) < n_train,
    )


@torch.no_grad()
def _word_acts(model, hookpoint: str, prompts: list[list[int]], batch_size: int = 32,
               progress: bool = False) -> torch.Tensor:
    """`[n, d]` activations at `hookpoint` on the last token of each prompt (token ids)."""
    from saekit.model import last_layer

    stop = last_layer([hookpoint])
    tok = model.tokenizer
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
    return torch.cat(acts)


def saebench_words(tok, n_words: int | None = None, seed: int = 0) -> list[tuple[int, str]]:
    """SAEBench's vocabulary as `(id, text)` by id: every token made of letters only after an
    optional leading space, single letters included; `n_words` of them drawn with `seed` (None: all)."""
    words = [(i, w) for i in range(len(tok)) if re.fullmatch(r" ?[A-Za-z]+", w := tok.decode([i]))]
    if n_words is not None and n_words < len(words):
        words = sorted(random.Random(seed).sample(words, n_words))
    return words


@torch.no_grad()
def saebench_data(model, hookpoint: str, n_words: int | None = 3000, seed: int = 0, train_share: float = 0.8,
                  words: list[tuple[int, str]] | None = None, batch_size: int = 32,
                  progress: bool = False) -> FirstLetterData:
    """SAEBench's first-letter data: `saebench_words` (or `words`, `(id, text)` pairs; then
    `n_words` is unused), shuffled with `seed` and split 80/20; each word's prompt
    is BOS, a newline, 10 solved examples `"{w} has the first letter: {W}"` + newline from its own
    split, then the word. `fresh` holds the held-out words again under new prompts whose examples
    come from all the words: SAEBench scores absorption on these, not on the probe's activations."""
    tok = model.tokenizer
    words = saebench_words(tok, n_words, seed) if words is None else words
    if len(words) < 5 * 26:
        raise SaekitError(f"{len(words)} alphabetic words are too few for SAEBench's protocol (need {5 * 26})")
    rng = random.Random(seed)
    words = rng.sample(words, len(words))
    n_train = int(train_share * len(words))
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    suffix, newline = enc(PROMPT), enc("\n")
    answer = {c: enc(" " + c.upper()) for c in LETTERS}
    start = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + newline
    first = [LETTERS.index(w.strip()[0].lower()) for _, w in words]

    def prompt(n: int, pool: range) -> list[int]:
        ids = list(start)
        for s in [s for s in rng.sample(pool, SAEBENCH_ICL + 1) if s != n][:SAEBENCH_ICL]:
            ids += [words[s][0], *suffix, *answer[LETTERS[first[s]]], *newline]
        return ids + [words[n][0]]

    train, test = range(n_train), range(n_train, len(words))
    prompts = [prompt(n, train if n < n_train else test) for n in range(len(words))]
    prompts += [prompt(n, range(len(words))) for n in test]
    acts = _word_acts(model, hookpoint, prompts, batch_size, progress)
    return FirstLetterData(words=[w for _, w in words], letters=torch.tensor(first), acts=acts[: len(words)],
                           train=torch.arange(len(words)) < n_train, fresh=acts[len(words) :])


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


def _fit_minibatch(X: torch.Tensor, Y: torch.Tensor, batch_size: int, weight_decay: float, l1: float = 0.0,
                   epochs: int = 50, lr: float = 1e-2, end_lr: float = 1e-5,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic probes trained as SAEBench trains them: from a seeded `nn.Linear`
    start, shuffled minibatches, Adam with L2 `weight_decay`, lr decaying exponentially from `lr`
    to `end_lr` over the epochs, BCE with positive weight neg/pos, plus `l1` times the mean over
    probes of |w|_1. X `[n, f]`, Y `[n, c]` bool; returns W `[c, f]`, b `[c]`."""
    g = torch.Generator().manual_seed(seed)
    n, f = X.shape
    bound = f**-0.5  # nn.Linear's default initialisation
    W = ((torch.rand(Y.shape[1], f, generator=g) * 2 - 1) * bound).requires_grad_()
    b = ((torch.rand(Y.shape[1], generator=g) * 2 - 1) * bound).requires_grad_()
    Yf = Y.float()
    pos_weight = (n - Yf.sum(0)) / Yf.sum(0)
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(end_lr / lr) ** (1 / epochs))
    with torch.enable_grad(), torch_threads(1):  # small ops: one thread is faster on a busy machine
        for _ in range(epochs):
            for rows in torch.randperm(n, generator=g).split(batch_size):
                loss = F.binary_cross_entropy_with_logits(X[rows] @ W.T + b, Yf[rows], pos_weight=pos_weight)
                if l1:
                    loss = loss + l1 * W.abs().sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    return W.detach(), b.detach()


def saebench_probe(data: FirstLetterData, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SAEBench's ground truth: 26 one-vs-rest logistic probes on the raw activations of the
    training words (batches of 64, weight decay 1e-4). Returns W `[26, d]`, b `[26]`."""
    Y = F.one_hot(data.letters, 26).bool()
    return _fit_minibatch(data.acts[data.train], Y[data.train], batch_size=64, weight_decay=1e-4, seed=seed)


def _dense_codes(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """`[n, m]` SAE codes of `x [n, d]` with their raw values."""
    vals, idx = sae.encode(x.to(sae.W_dec.device))
    return torch.zeros(len(x), sae.n_latents).scatter_add_(1, idx.cpu(), vals.float().cpu())


@torch.no_grad()
def saebench_main_latents(sae: SAE, data: FirstLetterData, l1: float = 0.01, max_k: int = 10, f1_jump: float = 0.03,
                          seed: int = 0) -> tuple[list[list[int]], torch.Tensor]:
    """SAEBench's k-sparse probing: per letter, rank latents by an L1 probe on the raw latent
    values (one batch of up to 4,096 words, weight decay 1e-6), fit class-balanced logistic
    regressions (scikit-learn, C = 1) on the top k = 1..max_k, and keep adding latents while
    held-out F1 rises by more than `f1_jump`. Returns the main latents per letter and the F1 `[max_k, 26]`."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    Z = _dense_codes(sae, data.acts)
    tr, te = data.train, ~data.train
    Ztr, Zte = Z[tr], Z[te]
    Y = F.one_hot(data.letters, 26).bool()
    W, _ = _fit_minibatch(Ztr, Y[tr], batch_size=4096, weight_decay=1e-6, l1=l1, seed=seed)
    ranked = W.topk(min(max_k, sae.n_latents), dim=1).indices  # [26, max_k]
    f1 = torch.zeros(ranked.shape[1], 26, dtype=torch.float64)
    for c in range(26):
        y = Y[tr, c].numpy()
        if y.all() or not y.any():
            continue  # one class only: no probe, F1 0
        for k in range(1, ranked.shape[1] + 1):
            cols = ranked[c, :k]
            with warnings.catch_warnings(), threadpool_limits(1):  # tiny fits: one BLAS thread is ~10x faster
                warnings.simplefilter("ignore", ConvergenceWarning)
                lr = LogisticRegression(max_iter=500, class_weight="balanced").fit(Ztr[:, cols].numpy(), y)
            pred = torch.from_numpy(lr.decision_function(Zte[:, cols].numpy()) > 0)
            f1[k - 1, c] = _f1(pred[:, None], Y[te, c : c + 1]).nan_to_num(0)[0]
    main = []
    for c in range(26):
        k = 1
        while k < len(f1) and f1[k, c] > f1[k - 1, c] + f1_jump:
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
    protocol: str = "saekit"  # "saekit" or "saebench" (see the module docstring)
    hookpoint: str | None = None
    min_letters: int = 20
    l1: float = 0.01
    max_k: int = 10
    f1_jump: float = 0.03
    seed: int = 0


def absorption_from_data(sae: SAE, data: FirstLetterData, f1_threshold: float = 0.6, min_letters: int = 20,
                         l1: float = 0.01, max_k: int = 10, f1_jump: float = 0.03,
                         progress: bool = False) -> AbsorptionResult:
    """saekit's protocol on collected first-letter data: probe, k-sparse probing and the
    absorption metric, averaged per letter over held-out tokens on which the probe is a true
    positive. Deterministic: the probes start at zero and train full-batch. `progress`: a line per step."""
    _check(sae, data)
    say = Phases("absorption", quiet=not progress)
    say.step("ground-truth letter probes")
    directions, probe_f1, pred = letter_probe(data)
    say.end()
    kept = _kept(probe_f1 >= f1_threshold, f"F1 >= {f1_threshold}", min_letters)
    say.step(f"k-sparse probing of the SAE's latents (k = 1..{max_k})")
    main, _ = main_latents(sae, data, l1, max_k, f1_jump)
    say.step("absorption scores")
    letters = data.letters[~data.train]
    tp = pred[torch.arange(len(letters)), letters]  # [n_test] the probe fires for the true letter
    scores = absorption_scores(sae, data.acts[~data.train][tp], letters[tp], directions, main)
    say.end()
    res = _result(sae, data, kept, probe_f1, main, letters[tp], scores, f1_threshold, "saekit")
    res.min_letters, res.l1, res.max_k, res.f1_jump = min_letters, l1, max_k, f1_jump
    return res


def saebench_from_data(sae: SAE, data: FirstLetterData, f1_threshold: float = 0.6, min_letters: int = 20,
                       l1: float = 0.01, max_k: int = 10, f1_jump: float = 0.03, seed: int = 0,
                       progress: bool = False) -> AbsorptionResult:
    """SAEBench's protocol on `saebench_data`: its probe (letters kept where held-out F1 >
    `f1_threshold`), its k-sparse probing, and the metric on the fresh prompts of the held-out
    words on which the probe is a true positive, averaged per letter. `seed` seeds the probes."""
    _check(sae, data)
    if data.fresh is None or len(data.fresh) != int((~data.train).sum()):
        raise SaekitError("SAEBench's protocol scores fresh prompts of the held-out words: use saebench_data")
    say = Phases("absorption", quiet=not progress)
    say.step("ground-truth letter probes (SAEBench)")
    W, b = saebench_probe(data, seed)
    letters = data.letters[~data.train]
    pred = _logits(data.acts[~data.train], W, b) > 0
    probe_f1 = _f1(pred, F.one_hot(letters, 26).bool()).nan_to_num(0)
    say.end()
    kept = _kept(probe_f1 > f1_threshold, f"F1 > {f1_threshold}", min_letters)
    say.step(f"k-sparse probing of the SAE's latents (SAEBench, k = 1..{max_k})")
    main, _ = saebench_main_latents(sae, data, l1, max_k, f1_jump, seed)
    say.step("absorption scores on fresh prompts")
    tp = pred[torch.arange(len(letters)), letters]
    scores = absorption_scores(sae, data.fresh[tp], letters[tp], F.normalize(W, dim=1), main)
    say.end()
    res = _result(sae, data, kept, probe_f1, main, letters[tp], scores, f1_threshold, "saebench")
    res.min_letters, res.l1, res.max_k, res.f1_jump, res.seed = min_letters, l1, max_k, f1_jump, seed
    return res


def _check(sae: SAE, data: FirstLetterData) -> None:
    if data.acts.shape[1] != sae.d_in:
        raise SaekitError(f"activations have d={data.acts.shape[1]}, the SAE expects d_in={sae.d_in}")


def _kept(passed: torch.Tensor, rule: str, min_letters: int) -> list[int]:
    """The letters whose probe passed `rule`, or an error when fewer than `min_letters` did."""
    kept = passed.nonzero().squeeze(1).tolist()
    if len(kept) < min_letters:
        raise SaekitError(
            f"only {len(kept)} letters have a probe {rule} (need {min_letters}); "
            "use more words (--words), a later layer, or lower the F1 threshold / minimum letters "
            "(--f1-threshold / --min-letters)")
    return kept


def _result(sae: SAE, data: FirstLetterData, kept: list[int], probe_f1: torch.Tensor, main: list[list[int]],
            letters: torch.Tensor, scores: TokenAbsorption, f1_threshold: float, protocol: str) -> AbsorptionResult:
    """Per-letter table and means over the kept letters of the scored tokens' `letters`."""
    rows, absorbing = [], {}
    for c in kept:
        on = letters == c
        frac, full = scores.fraction[on], scores.full[on]
        counts = torch.bincount(scores.absorbers[on][scores.absorbers[on] >= 0], minlength=sae.n_latents)
        order = counts.argsort(descending=True)[: int((counts > 0).sum())]
        absorbing[LETTERS[c]] = order.tolist()
        rows.append({"letter": LETTERS[c], "probe_f1": float(probe_f1[c]), "n_tokens": int(on.sum()),
                     "main_latents": main[c], "absorption_fraction": float(frac.mean()) if len(frac) else float("nan"),
                     "full_absorption": float(full.float().mean()) if len(full) else float("nan"),
                     "n_absorbed": int((frac > 0).sum())})
    table = pd.DataFrame(rows)
    return AbsorptionResult(
        mean_absorption_fraction=float(table["absorption_fraction"].mean()),
        mean_full_absorption=float(table["full_absorption"].mean()),
        n_letters=len(kept), table=table, absorbing_latents=absorbing,
        probe_f1={LETTERS[c]: float(probe_f1[c]) for c in range(26)}, n_words=len(data.words),
        f1_threshold=f1_threshold, protocol=protocol,
    )


def absorption(sae: SAE, model, hookpoint: str | None = None, n_words: int = 3000, n_icl: int = 4,
               f1_threshold: float = 0.6, min_letters: int = 20, seed: int = 0, progress: bool = False,
               protocol: str = "saekit", **options) -> AbsorptionResult:
    """First-letter absorption of `sae` at `hookpoint` (default: the SAE's own) of `model`, a
    TransformerBridge with a tokenizer, under `protocol` ("saekit" or "saebench", see the module
    docstring; `n_icl` is saekit's). `options`: l1, max_k, f1_jump (see `absorption_from_data`)."""
    hookpoint = hookpoint or sae.cfg.hookpoint
    if hookpoint is None:
        raise SaekitError("the SAE names no hookpoint: pass hookpoint=")
    if protocol not in PROTOCOLS:
        raise SaekitError(f"unknown absorption protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
    if protocol == "saebench":
        data = saebench_data(model, hookpoint, n_words, seed=seed, progress=progress)
        res = saebench_from_data(sae, data, f1_threshold, min_letters, seed=seed, progress=progress, **options)
    else:
        data = first_letter_data(model, hookpoint, n_words, n_icl, seed=seed, progress=progress)
        res = absorption_from_data(sae, data, f1_threshold, min_letters, progress=progress, **options)
    res.hookpoint, res.seed = hookpoint, seed
    return res


def saebench_output(res: AbsorptionResult, sae: SAE, model_name: str | None = None) -> dict:
    """`res` (SAEBench's protocol) in sae-bench's absorption output schema (eval_type_id
    "absorption_first_letter"), so that SAEBench's tools read it beside their own results."""
    import statistics

    if res.protocol != "saebench":
        raise SaekitError("sae-bench's output schema holds SAEBench's protocol: run it with protocol='saebench'")
    t = res.table
    n_split = [len(m) for m in t["main_latents"]]
    details = [{"first_letter": r.letter, "mean_absorption_fraction": r.absorption_fraction,
                "full_absorption_rate": r.full_absorption,
                "num_full_absorption": round(r.full_absorption * r.n_tokens), "num_probe_true_positives": r.n_tokens,
                "num_split_features": n} for r, n in zip(t.itertuples(), n_split, strict=True)]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    frac, full = list(t["absorption_fraction"]), list(t["full_absorption"])
    config = {"random_seed": res.seed, "f1_jump_threshold": res.f1_jump, "max_k_value": res.max_k,
              "prompt_template": "{word} has the first letter:", "prompt_token_pos": -6,
              "llm_batch_size": 32, "llm_dtype": "float32", "k_sparse_probe_l1_decay": res.l1,
              "k_sparse_probe_batch_size": 4096, "k_sparse_probe_num_epochs": 50,
              "min_GT_probe_f1": res.f1_threshold, "min_feats_for_eval": res.min_letters,
              "eval_k_sparse_probe_batch_size": 24, "precalc_k_sparse_probe_sae_acts": True}
    metrics = {"mean": {
        "mean_absorption_fraction_score": res.mean_absorption_fraction,
        "mean_full_absorption_score": res.mean_full_absorption,
        "mean_num_split_features": statistics.mean(n_split), "std_dev_absorption_fraction_score": sd(frac),
        "std_dev_full_absorption_score": sd(full), "std_dev_num_split_features": sd(n_split)}}
    return envelope("absorption_first_letter", config, metrics, details, sae, res.hookpoint, model_name)
