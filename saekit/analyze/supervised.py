"""Supervised feature dictionaries, and an SAE judged against one on a task with known attributes
(Makelov, Lange & Nanda, ICLR 2025, "Towards Principled Evaluations of Sparse Autoencoders for
Interpretability and Control").

  `supervised_dictionary`  centred conditional means u_{a,v} = E[x | a = v] - E[x] of labelled activations;
  `approximation`          the task figure when the activation is replaced by each reconstruction;
  `control`                how many SAE latent edits move the model's answer as an attribute edit does;
  `interpretability`       the best single latent per attribute value as a classifier of that value,
                           with the two failure modes (occlusion, over-splitting) counted;
  `compare`                all three for one SAE next to one supervised dictionary.

The axes are pure functions over a *readout*: `readout(x [n, d], rows [n]) -> logits [n, V]`, the
model's answer-position logits for prompts `rows` when their activation at the site is replaced
by `x`. `saekit.analyze.ioi` builds one on a real model; the tests build one from a matrix.
"""

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch

from saekit.analyze.common import Result
from saekit.errors import SaekitError
from saekit.sae import SAE

Readout = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Interpretability thresholds (stated in the README and in every result).
PRECISION = 0.8  # a latent "tracks" a value when it fires mostly on it ...
RECALL = 0.5  # ... and on at least half of its examples
PIECE_RECALL = 0.05  # a piece of an over-split value covers at least 5 % of its examples
# Control: latent edits tried, as a schedule of cumulative counts (the count reported is the first
# schedule entry at which the answer follows, an upper bound on the exact smallest count).
EDIT_SCHEDULE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class SupervisedDictionary(Result):
    """Mean activation plus one vector per (attribute, value); see `supervised_dictionary`."""

    mean: torch.Tensor  # [d]
    vectors: dict  # (attribute, value) -> [d]
    counts: dict  # (attribute, value) -> examples it was fitted on

    @property
    def attributes(self) -> list[str]:
        return list(dict.fromkeys(a for a, _ in self.vectors))

    def _vector(self, attribute: str, value) -> torch.Tensor:
        if (attribute, value) not in self.vectors:
            raise SaekitError(f"the supervised dictionary has no vector for {attribute} = {value!r} "
                              "(a value it was not fitted on)")
        return self.vectors[attribute, value]

    def reconstruct(self, labels: pd.DataFrame) -> torch.Tensor:
        """`[n, d]` mean + sum_a u_{a, v_a} for each row of `labels` (one column per attribute)."""
        missing = [a for a in self.attributes if a not in labels.columns]
        if missing:
            raise SaekitError(f"labels lack the attribute(s) {missing} of the supervised dictionary")
        out = self.mean.expand(len(labels), -1).clone()
        for a in self.attributes:
            out += torch.stack([self._vector(a, v) for v in labels[a]]) if len(labels) else 0
        return out

    def edit(self, x: torch.Tensor, source: pd.DataFrame, target: pd.DataFrame) -> torch.Tensor:
        """`x [n, d]` with every attribute whose value differs between `source` and `target` rows
        swapped: x - u_{a, v_source} + u_{a, v_target}."""
        out = x.clone()
        for i, (s, t) in enumerate(zip(source[self.attributes].itertuples(index=False),
                                       target[self.attributes].itertuples(index=False), strict=True)):
            for a, vs, vt in zip(self.attributes, s, t, strict=True):
                if vs != vt:
                    out[i] += self._vector(a, vt) - self._vector(a, vs)
        return out

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(),
                "vectors": [{"attribute": a, "value": v, "count": self.counts[a, v], "norm": float(u.norm()),
                             "vector": u.tolist()} for (a, v), u in self.vectors.items()]}


def supervised_dictionary(acts: torch.Tensor, labels: pd.DataFrame) -> SupervisedDictionary:
    """Fit the supervised dictionary of `acts [N, d]` labelled by `labels` (a DataFrame, one row
    per activation, one column per categorical attribute): the mean E[x] and the centred
    conditional means u_{a,v} = E[x | a = v] - E[x] (Makelov et al.'s mean-based dictionary).
    Reconstruction: x_hat = mean + sum_a u_{a, v_a}."""
    if not isinstance(labels, pd.DataFrame) or labels.shape[1] == 0:
        raise SaekitError("labels must be a pandas DataFrame with one column per attribute")
    if acts.ndim != 2 or len(acts) == 0:
        raise SaekitError(f"activations must be a non-empty [N, d] tensor, got shape {tuple(acts.shape)}")
    if len(labels) != len(acts):
        raise SaekitError(f"labels have {len(labels)} rows but there are {len(acts)} activations; give one label "
                          "row per activation")
    if labels.isna().any().any():
        raise SaekitError(f"labels have missing values in {list(labels.columns[labels.isna().any()])}")
    x = acts.double()
    mean = x.mean(0)
    vectors, counts = {}, {}
    for a in labels.columns:
        codes, values = pd.factorize(labels[a], sort=True)
        if len(values) < 2:
            raise SaekitError(f"attribute {a!r} has a single value ({values[0]!r}); an attribute needs at least two "
                              "values to have a direction")
        idx = torch.as_tensor(codes)
        sums = torch.zeros(len(values), x.shape[1], dtype=x.dtype).index_add_(0, idx, x)
        n = torch.bincount(idx, minlength=len(values))
        for j, v in enumerate(values.tolist()):
            vectors[a, v] = (sums[j] / n[j] - mean).to(acts.dtype)
            counts[a, v] = int(n[j])
    return SupervisedDictionary(mean.to(acts.dtype), vectors, counts)


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor) -> torch.Tensor:
    """`[n]` logit of the answer minus that of the distractor."""
    return (logits.gather(1, answer[:, None]) - logits.gather(1, distractor[:, None])).squeeze(1)


def approximation(readout: Readout, acts: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor,
                  reconstructions: dict[str, torch.Tensor], clean: torch.Tensor | None = None) -> pd.DataFrame:
    """One row per reconstruction (plus "clean" and "mean ablation"): mean logit difference, the
    share with a positive one, the share of the clean-vs-mean-ablation gap recovered
    ((LD_x_hat - LD_mean) / (LD_clean - LD_mean): sufficiency), the KL(clean || replaced) at the
    answer position, and necessity: the recovered share when x is replaced by
    x - x_hat + E[x_hat] (the reconstruction mean-ablated; near 0 when the reconstruction carries
    what the task needs). `clean`: `readout(acts, all rows)` when already computed."""
    rows = torch.arange(len(acts))
    clean = (readout(acts, rows) if clean is None else clean).float().log_softmax(-1)
    mean = readout(acts.mean(0).expand_as(acts), rows).float().log_softmax(-1)
    ld_clean, ld_mean = logit_diff(clean, answer, distractor), logit_diff(mean, answer, distractor)
    gap = float(ld_clean.mean() - ld_mean.mean())

    def recovered(ld: torch.Tensor) -> float:
        return float(ld.mean() - ld_mean.mean()) / gap if gap != 0 else float("nan")

    def row(name: str, lp: torch.Tensor) -> dict:
        ld = logit_diff(lp, answer, distractor)
        kl = (clean.exp() * (clean - lp)).sum(-1)
        return {"dictionary": name, "logit_diff": float(ld.mean()), "accuracy": float((ld > 0).float().mean()),
                "recovered": recovered(ld), "kl": float(kl.mean())}

    out = [row("clean", clean), row("mean ablation", mean)]
    for name, x_hat in reconstructions.items():
        r = row(name, readout(x_hat, rows).float().log_softmax(-1))
        ablated = readout(acts - x_hat + x_hat.mean(0), rows).float().log_softmax(-1)
        r["necessity_recovered"] = recovered(logit_diff(ablated, answer, distractor))
        out.append(r)
    return pd.DataFrame(out)


def _follows(logits: torch.Tensor, candidates: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`[n]` bool: the target token's logit beats every other candidate's (`candidates [n, c]`)."""
    t = logits.gather(1, target[:, None])
    other = logits.gather(1, candidates).masked_fill(candidates == target[:, None], float("-inf"))
    return (t > other.max(1, keepdim=True).values).squeeze(1)


def _dense_codes(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """`[n, m]` dense latent activations (small n only)."""
    vals, idx = sae.encode(x.to(sae.W_dec.dtype))
    return torch.zeros(len(x), sae.n_latents, dtype=vals.dtype).scatter_add_(1, idx, vals)


def _greedy_edits(z: torch.Tensor, z_target: torch.Tensor, W_dec: torch.Tensor, steps: int) -> torch.Tensor:
    """`[s, d]` cumulative latent edits (s = min(steps, latents that differ)) moving code `z [m]`
    toward `z_target [m]`: each step sets one more latent to its target value, choosing the
    latent whose change brings the decoded code closest (L2) to the target's decoding."""
    diff = (z_target - z).nonzero().squeeze(1)
    deltas = (z_target - z)[diff, None] * W_dec[diff]  # [c, d] what changing each latent adds
    r = deltas.sum(0)  # still to add
    done = torch.zeros(len(diff), dtype=torch.bool)
    out, cur = [], torch.zeros(W_dec.shape[1], dtype=W_dec.dtype)
    for _ in range(min(steps, len(diff))):
        gain = (2 * deltas @ r - deltas.pow(2).sum(1)).masked_fill(done, float("-inf"))
        j = int(gain.argmax())
        done[j] = True
        cur, r = cur + deltas[j], r - deltas[j]
        out.append(cur)
    return torch.stack(out) if out else W_dec.new_zeros(0, W_dec.shape[1])


@torch.no_grad()
def control(readout: Readout, acts: torch.Tensor, labels: pd.DataFrame, answer: torch.Tensor,
            distractor: torch.Tensor, pairs: torch.Tensor, sae: SAE | None, sup: SupervisedDictionary,
            max_edits: int = 64, clean: torch.Tensor | None = None) -> dict:
    """Edit prompt i's activation so that the model answers as counterfactual prompt j does, for
    each pair (i, j) in `pairs [P, 2]` (rows of `acts` / `labels`; j differs from i in some
    attributes and has another answer). Success: the counterfactual's answer beats the answer
    and distractor of both prompts. Only pairs the model gets right cleanly (both prompts) count.

    Supervised: x_i - u_{a, v_i} + u_{a, v_j} for every attribute that differs.
    SAE (greedy, as Makelov et al.): set latents of i's code to j's values one at a time (the
    one that brings the decoding closest to j's first), keeping the SAE's error term; the count
    is the first entry of `EDIT_SCHEDULE` at which the answer follows (<= `max_edits`; -1 when
    it never does). "Full swap": every differing latent set at once, x_i + x_hat_j - x_hat_i.
    `clean`: `readout(acts, all rows)` when already computed.
    """
    i, j = pairs[:, 0], pairs[:, 1]
    cands = torch.stack([answer[i], distractor[i], answer[j], distractor[j]], 1)
    ok_i = _follows(readout(acts[i], i) if clean is None else clean[i], cands, answer[i])
    ok_j = _follows(readout(acts[j], j) if clean is None else clean[j], cands, answer[j])
    valid = (ok_i & ok_j).nonzero().squeeze(1)
    out = {"pairs": len(pairs), "valid_pairs": len(valid)}
    if len(valid) == 0:
        return out
    i, j, cands = i[valid], j[valid], cands[valid]
    edited = sup.edit(acts[i], labels.iloc[i.tolist()], labels.iloc[j.tolist()])
    out["supervised_success"] = float(_follows(readout(edited, i), cands, answer[j]).float().mean())
    if sae is None:
        return out
    z, zt = _dense_codes(sae, acts[i]), _dense_codes(sae, acts[j])
    paths = [_greedy_edits(z[p], zt[p], sae.W_dec.to(acts.dtype), max_edits) for p in range(len(i))]
    lengths = torch.tensor([len(p) for p in paths])
    edits, prev = torch.full((len(i),), -1), 0
    for s in (s for s in EDIT_SCHEDULE if s <= max_edits):
        todo = ((edits < 0) & (lengths > prev)).nonzero().squeeze(1)
        prev = s
        if len(todo) == 0:
            continue
        used = lengths[todo].clamp_max(s)
        x = acts[i[todo]] + torch.stack([paths[p][u - 1] for p, u in zip(todo.tolist(), used.tolist(), strict=True)])
        hit = _follows(readout(x, i[todo]), cands[todo], answer[j[todo]])
        edits[todo[hit]] = used[hit]
    full = acts[i] + sae(acts[j].to(sae.W_dec.dtype)).to(acts.dtype) - sae(acts[i].to(sae.W_dec.dtype)).to(acts.dtype)
    won = edits[edits > 0].float()
    out.update(sae_success=float((edits > 0).float().mean()), sae_edits=edits.tolist(),
               sae_median_edits=float(won.median()) if len(won) else float("nan"),
               sae_latents_differing=float((zt != z).sum(1).float().median()),
               sae_full_swap_success=float(_follows(readout(full, i), cands, answer[j]).float().mean()))
    return out


@torch.no_grad()
def interpretability(sae: SAE, acts: torch.Tensor, labels: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each attribute value against every latent as a classifier ("fires" predicts "a = v").

    Per value: the best latent by F1 and its precision and recall; `tracked` when some latent
    has precision >= PRECISION and recall >= RECALL; `over_split` when not tracked but at least
    two latents each have precision >= PRECISION and recall >= PIECE_RECALL on it and together
    (fired by any) reach recall >= RECALL. Per attribute: the share of its values tracked and
    over-split, and `occluded` when fewer than half its values are tracked or over-split while
    another attribute has at least half tracked (the SAE represents attributes at this site,
    but not this one). Returns (per-value table, per-attribute table).
    """
    fires = (_dense_codes(sae, acts) > 0).float()  # [N, m]
    n_fire = fires.sum(0)  # [m]
    rows = []
    for a in labels.columns:
        for v in sorted(labels[a].unique().tolist()):
            y = torch.tensor((labels[a] == v).to_numpy(), dtype=torch.float32)
            tp = y @ fires  # [m]
            prec, rec = tp / n_fire.clamp_min(1), tp / y.sum()
            f1 = 2 * tp / (n_fire + y.sum())
            best = int(f1.argmax())
            pieces = ((prec >= PRECISION) & (rec >= PIECE_RECALL)).nonzero().squeeze(1)
            union = float((fires[:, pieces].amax(1) * y).sum() / y.sum()) if len(pieces) else 0.0
            tracked = bool(((prec >= PRECISION) & (rec >= RECALL)).any())
            rows.append({"attribute": a, "value": v, "examples": int(y.sum()), "best_latent": best,
                         "precision": float(prec[best]), "recall": float(rec[best]), "f1": float(f1[best]),
                         "tracked": tracked, "pieces": len(pieces), "pieces_recall": union,
                         "over_split": not tracked and len(pieces) >= 2 and union >= RECALL})
    values = pd.DataFrame(rows)
    per = values.groupby("attribute", sort=False).agg(values=("value", "size"), tracked=("tracked", "mean"),
                                                      over_split=("over_split", "mean"), best_f1=("f1", "mean"))
    covered = per.tracked + per.over_split
    per["occluded"] = [bool(c < 0.5 and (per.tracked.drop(a) >= 0.5).any()) for a, c in covered.items()]
    return values, per.reset_index()


@dataclass
class DictionaryComparison(Result):
    """The three axes for one SAE next to the supervised dictionary at one site."""

    approximation: pd.DataFrame
    control: dict  # edit name -> `control` output
    values: pd.DataFrame | None  # `interpretability` per value (None without an SAE)
    attributes: pd.DataFrame | None  # `interpretability` per attribute
    thresholds: dict


def compare(readout: Readout, acts: torch.Tensor, labels: pd.DataFrame, answer: torch.Tensor,
            distractor: torch.Tensor, sup: SupervisedDictionary, sae: SAE | None = None,
            pairs: dict[str, torch.Tensor] | None = None, max_edits: int = 64,
            interp: tuple[torch.Tensor, pd.DataFrame] | None = None) -> DictionaryComparison:
    """Approximation, control (for each named set of counterfactual `pairs`) and interpretability
    of `sae` next to `sup` on held-out `acts [N, d]` with their `labels` (`sup` fitted on others).
    `interp`: other (activations, labels) to measure interpretability on (e.g. a larger set)."""
    attrs = sup.attributes
    with torch.no_grad():
        recs = {"supervised": sup.reconstruct(labels[attrs]).to(acts.dtype)}
        if sae is not None:
            recs["sae"] = sae(acts.to(sae.W_dec.dtype)).to(acts.dtype)
    clean = readout(acts, torch.arange(len(acts)))
    approx = approximation(readout, acts, answer, distractor, recs, clean)
    ctrl = {name: control(readout, acts, labels[attrs], answer, distractor, p, sae, sup, max_edits, clean)
            for name, p in (pairs or {}).items()}
    ia, il = interp if interp is not None else (acts, labels)
    values, per = interpretability(sae, ia, il[attrs]) if sae is not None else (None, None)
    return DictionaryComparison(approx, ctrl, values, per, {"precision": PRECISION, "recall": RECALL,
                                                           "piece_recall": PIECE_RECALL, "max_edits": max_edits})
