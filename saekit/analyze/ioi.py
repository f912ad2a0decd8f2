"""Indirect object identification (IOI; Wang et al. 2022) on any model saekit loads: prompts,
the model's own task figure, activations at the prompt's name and answer positions, linear
probes per layer, and the readout `saekit.analyze.supervised` evaluates dictionaries with.

A prompt ("When Mary and John went to the store, John gave a drink to" -> " Mary") has the
attributes of Makelov et al. (ICLR 2025): `io` (the indirect object, the answer), `s` (the
subject, named twice; the distractor) and `order` ("ABB": IO named first, "BAB": S first).
Names are single tokens with a leading space on the model's tokenizer; a fixed quarter of
them is held out (`names="test"`). Every prompt starts with BOS, as saekit's training contexts do.
"""

import random
from dataclasses import dataclass, replace

import pandas as pd
import torch

from saekit.errors import SaekitError
from saekit.model import harvest, logits_at

ATTRIBUTES = ("io", "s", "order")
NAMES = ("Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "Michael", "David", "Emma", "Anna", "Paul",
         "Mark", "Lisa", "Kate", "Jack", "Peter", "Laura", "Daniel", "Rachel", "Chris", "Steve", "Ryan", "Kevin",
         "Adam", "Jessica", "Andrew", "Eric", "Amy", "Susan", "Robert", "Linda")
# {A} is named first; {S} is the repeated subject (= A in BAB order, = B in ABB order).
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
)
PLACES = ("store", "park", "school", "garden", "hospital", "restaurant", "station", "office")
OBJECTS = ("drink", "book", "ring", "bone", "basketball", "computer", "necklace", "snack")
POSITIONS = ("end", "io", "s1", "s2")  # the answer position, and where each name is written


def names(tokenizer, split: str = "train") -> list[str]:
    """The NAMES that are one token with a leading space on `tokenizer`; "test" is every 4th of
    them, "train" the rest, "all" both."""
    if split not in ("train", "test", "all"):
        raise SaekitError(f"names split must be train, test or all, got {split!r}")
    ok = [n for n in NAMES if len(tokenizer.encode(" " + n, add_special_tokens=False)) == 1]
    if len(ok) < 8:
        raise SaekitError(f"only {len(ok)} of saekit's IOI names are single tokens on this tokenizer; need 8")
    return ok if split == "all" else [n for k, n in enumerate(ok) if (k % 4 == 3) == (split == "test")]


@dataclass
class IOIPrompts:
    labels: pd.DataFrame  # io, s, order, template, place, object (one row per prompt)
    tokens: torch.Tensor  # [n, L] right-padded token ids
    where: dict  # position name -> [n] token index (end, io, s1, s2)
    answer: torch.Tensor  # [n] token id of " IO"
    distractor: torch.Tensor  # [n] token id of " S"

    def __len__(self) -> int:
        return len(self.labels)

    def texts(self) -> list[str]:
        return [_text(r) for r in self.labels.itertuples()]


def _text(r) -> str:
    a, b = (r.io, r.s) if r.order == "ABB" else (r.s, r.io)
    return TEMPLATES[r.template].format(A=a, B=b, S=r.s, place=r.place, object=r.object)


def render(tokenizer, labels: pd.DataFrame) -> IOIPrompts:
    """Tokenise the prompts that `labels` describe (columns io, s, order, template, place, object)."""
    labels = labels.reset_index(drop=True)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids, where = [], {p: [] for p in POSITIONS}
    for r in labels.itertuples():
        t = bos + enc(_text(r))
        io, s = enc(" " + r.io)[0], enc(" " + r.s)[0]
        at_io, at_s = [k for k, x in enumerate(t) if x == io], [k for k, x in enumerate(t) if x == s]
        if len(at_io) != 1 or len(at_s) != 2:
            raise SaekitError(f"cannot find the names of {_text(r)!r} as single tokens in its tokenisation")
        ids.append(t)
        for p, k in zip(POSITIONS, (len(t) - 1, at_io[0], *at_s), strict=True):
            where[p].append(k)
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    width = max(map(len, ids))
    tokens = torch.tensor([t + [pad] * (width - len(t)) for t in ids])
    tok1 = lambda col: torch.tensor([enc(" " + n)[0] for n in labels[col]])  # noqa: E731
    return IOIPrompts(labels, tokens, {p: torch.tensor(v) for p, v in where.items()}, tok1("io"), tok1("s"))


def ioi_prompts(tokenizer, n: int, seed: int = 0, split: str = "train") -> IOIPrompts:
    """`n` IOI prompts: templates, places, objects and orders drawn uniformly with `seed`; names
    (two distinct, from the `split` of `names`) balanced: every run of len(pool) prompts names
    each name once as IO and once as S (so a supervised dictionary fitted on n >= len(pool)
    prompts has a vector for every name), in shuffled order."""
    pool = names(tokenizer, split)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % len(pool) == 0:
            shift = rng.randrange(1, len(pool))
        io, s = pool[i % len(pool)], pool[(i + shift) % len(pool)]
        rows.append({"io": io, "s": s, "order": rng.choice(("ABB", "BAB")), "template": rng.randrange(len(TEMPLATES)),
                     "place": rng.choice(PLACES), "object": rng.choice(OBJECTS)})
    rng.shuffle(rows)
    return render(tokenizer, pd.DataFrame(rows))


EDITS = ("io", "swap")  # a new IO name; IO and S exchanged (the answer becomes the old S)


def counterfactuals(tokenizer, prompts: IOIPrompts, edit: str, seed: int = 0, split: str = "train") -> IOIPrompts:
    """The same prompts with one edit whose answer differs: "io" (another IO name from `split`,
    neither IO nor S) or "swap" (IO and S exchanged). Template, place, object, order are kept."""
    lab = prompts.labels.copy()
    if edit == "io":
        rng, pool = random.Random(seed), names(tokenizer, split)
        lab["io"] = [rng.choice([n for n in pool if n not in (io, s)]) for io, s in zip(lab.io, lab.s, strict=True)]
    elif edit == "swap":
        lab["io"], lab["s"] = prompts.labels.s, prompts.labels.io
    else:
        raise SaekitError(f"unknown IOI edit {edit!r}; choose from {', '.join(EDITS)}")
    return render(tokenizer, lab)


def concat(*parts: IOIPrompts) -> IOIPrompts:
    """One prompt set from several (tokens re-padded to the widest)."""
    width = max(p.tokens.shape[1] for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731  (after the end: never read)
    return IOIPrompts(pd.concat([p.labels for p in parts], ignore_index=True),
                      torch.cat([pad(p.tokens) for p in parts]),
                      {k: torch.cat([p.where[k] for p in parts]) for k in POSITIONS},
                      torch.cat([p.answer for p in parts]), torch.cat([p.distractor for p in parts]))


def subset(prompts: IOIPrompts, rows: torch.Tensor) -> IOIPrompts:
    return replace(prompts, labels=prompts.labels.iloc[rows.tolist()].reset_index(drop=True),
                   tokens=prompts.tokens[rows], where={k: v[rows] for k, v in prompts.where.items()},
                   answer=prompts.answer[rows], distractor=prompts.distractor[rows])


@torch.no_grad()
def task_figure(model, prompts: IOIPrompts, batch_size: int = 32) -> dict:
    """The model's IOI figure: mean (and std) logit difference IO - S at the last position, the
    share of prompts with IO above S, the share where IO is the top token of the vocabulary, and
    each prompt's logit difference (`per_prompt`)."""
    lds, top = [], []
    for s in range(0, len(prompts), batch_size):
        rows = torch.arange(s, min(s + batch_size, len(prompts)))
        lp = logits_at(model, prompts.tokens[rows], prompts.where["end"][rows]).cpu()
        lds.append(lp.gather(1, prompts.answer[rows, None]).squeeze(1) - lp.gather(1, prompts.distractor[rows, None])
                   .squeeze(1))
        top.append(lp.argmax(1) == prompts.answer[rows])
    ld, top = torch.cat(lds), torch.cat(top)
    return {"prompts": len(prompts), "logit_diff": float(ld.mean()), "logit_diff_std": float(ld.std()),
            "accuracy": float((ld > 0).float().mean()), "top1": float(top.float().mean()), "per_prompt": ld.tolist()}


@torch.no_grad()
def site_acts(model, prompts: IOIPrompts, hookpoints: list[str], positions: tuple[str, ...] = ("end",),
              batch_size: int = 32) -> dict[tuple[str, str], torch.Tensor]:
    """`{(hookpoint, position): [n, d]}` activations at each prompt's named position."""
    mask = torch.ones_like(prompts.tokens, dtype=torch.bool)
    out = {(h, p): [] for h in hookpoints for p in positions}
    for s, batch in zip(range(0, len(prompts), batch_size),
                        harvest(model, prompts.tokens, mask, hookpoints, batch_size), strict=True):
        rows = torch.arange(s, min(s + batch_size, len(prompts)))
        for h in hookpoints:
            a = batch[h].view(len(rows), prompts.tokens.shape[1], -1)
            for p in positions:
                out[h, p].append(a[rows - s, prompts.where[p][rows]])
    return {k: torch.cat(v) for k, v in out.items()}


def readout(model, prompts: IOIPrompts, hookpoint: str, position: str = "end", batch_size: int = 32):
    """The readout `saekit.analyze.supervised` takes: `(x [n, d], rows [n]) -> [n, vocab]`
    logits at the answer position of `prompts[rows]` with the activation at
    `hookpoint`, `position` replaced by `x` (spliced with the same hooks as the SAE evaluation)."""

    def read(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(rows), batch_size):
            r, xs = rows[s : s + batch_size], x[s : s + batch_size]
            at, b = prompts.where[position][r], torch.arange(len(r))

            def put(act: torch.Tensor, at=at, b=b, xs=xs) -> torch.Tensor:
                act = act.clone()
                act[b, at] = xs.to(act.device, act.dtype).view_as(act[b, at])
                return act

            out.append(logits_at(model, prompts.tokens[r], prompts.where["end"][r], hookpoint, put).cpu())
        return torch.cat(out)

    return read


def probe_table(acts: dict[tuple[str, str], torch.Tensor], labels: pd.DataFrame, train_share: float = 0.75,
                seed: int = 0) -> pd.DataFrame:
    """Held-out accuracy of a logistic-regression probe (scikit-learn, standardised inputs) per
    attribute for each `(hookpoint, position)` in `acts`, with the majority-class baseline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[: int(train_share * n)].numpy(), perm[int(train_share * n) :].numpy()
    rows = []
    for (h, p), x in acts.items():
        row = {"hookpoint": h, "position": p}
        for a in ATTRIBUTES:
            y = labels[a].to_numpy()
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
            clf.fit(x[tr].numpy(), y[tr])
            row[a] = float((clf.predict(x[te].numpy()) == y[te]).mean())
            row[f"{a} majority"] = float(pd.Series(y[te]).value_counts(normalize=True).iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)
