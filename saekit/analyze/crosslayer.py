"""Cross-layer evaluation of a matching (SAE Match, Balagansky et al. 2025), and the chain
report of a multi-layer run.

- layer skip: encode layer t's activations with SAE_t, send each latent to its match in
  SAE_{t+1}, decode with SAE_{t+1}'s decoder; the explained variance of layer t+1's
  activations, and the next-token loss when that reconstruction replaces layer t+1.
- co-firing: per matched pair, the Jaccard overlap of the tokens each latent fires on.
- similarity decay: the decoder cosine of matched pairs at layer distance 1, 2, ...: both
  the direct match of t to t+d and the chain t→t+1→…→t+d.

Each is set against three baselines: identity (latent i to latent i), the plain cosine top-1
pairing (`saekit.matching.nearest`, not one-to-one), and, on the explained-variance and Δloss
measures, the residual baseline: layer t's activations themselves as the prediction of layer
t+1, no SAE (what any dictionary-based skip has to beat on a residual stream).
"""

import math
from pathlib import Path

import numpy as np
import torch

from saekit.activations import Activations, batches
from saekit.analyze.universality import universality
from saekit.codes import Codes, encode_all
from saekit.errors import SaekitError
from saekit.io import atomic_write, md_table
from saekit.matching import Match, match, nearest, pair_scores
from saekit.run import Run
from saekit.sae import SAE


def skip_decode(a: SAE, b: SAE, b_for_a: torch.Tensor, x_a: torch.Tensor) -> torch.Tensor:
    """Layer t+1 predicted from layer t: `Σ_i z_i W_dec^B[π(i)] + b_dec^B` with `π = b_for_a`;
    unmatched latents (-1) drop out."""
    return _skip(b, b_for_a, *a.encode(x_a))


def _skip(b: SAE, b_for_a: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    tgt = b_for_a.to(idx.device)[idx]
    return b.decode(vals * (tgt >= 0), tgt.clamp_min(0))


@torch.no_grad()
def layer_skip(a: SAE, b: SAE, b_for_a: torch.Tensor, acts_a: Activations | Codes, acts_b: Activations,
               max_tokens: int | None = None) -> float:
    """Explained variance of layer t+1's activations by `skip_decode` (same tokens in both
    streams). `acts_a` may be A's codes on those tokens (`saekit.codes.Codes`), saving the encode."""
    codes = iter(acts_a) if isinstance(acts_a, Codes) else (
        a.encode(x) for x in batches(acts_a, a.d_in, max_tokens=max_tokens))
    return _explained_variance(((_skip(b, b_for_a, vals, idx), xb) for (vals, idx), xb in
                                zip(codes, batches(acts_b, b.d_in, max_tokens=max_tokens), strict=False)))


@torch.no_grad()
def residual_skip(acts_a: Activations, acts_b: Activations, d_in: int, max_tokens: int | None = None) -> float:
    """Explained variance of layer t+1's activations by layer t's own (the residual baseline:
    no SAE; same tokens in both streams, both `d_in` wide)."""
    return _explained_variance(zip(batches(acts_a, d_in, max_tokens=max_tokens),
                                   batches(acts_b, d_in, max_tokens=max_tokens), strict=False))


def _explained_variance(pairs) -> float:
    """1 - SSE / total variance of the targets over (prediction, target) batches."""
    sse = sq = s1 = 0.0
    n = 0
    for pred, xb in pairs:
        if len(pred) != len(xb):
            raise SaekitError("layer skip needs both hookpoints' activations on the same tokens")
        sse += float(((xb - pred) ** 2).sum())
        sq += float((xb.double() ** 2).sum())
        s1 = s1 + xb.double().sum(0)
        n += len(xb)
    if n == 0:
        raise SaekitError("no activations for the layer skip")
    total = sq - float((s1**2).sum()) / n
    return 1 - sse / total


@torch.no_grad()
def layer_skip_loss(model, a: SAE, b: SAE, pairings: dict[str, torch.Tensor | None], hook_a: str, hook_b: str,
                    tokens: torch.Tensor, mask: torch.Tensor, batch_size: int = 4, residual: bool = False) -> dict:
    """Next-token CE with layer `hook_b` replaced by the layer skip from `hook_a`, one entry
    per pairing (`None` means SAE B's own reconstruction of `hook_b`), minus the clean CE; with
    `residual`, also `dloss_residual`: `hook_b` replaced by `hook_a`'s activations themselves.
    Positions outside `mask` (BOS, padding) keep their activations."""
    from saekit.model import logprobs
    from saekit.splice import reconstruct

    names = [*pairings, *(["residual"] if residual else [])]
    sums = dict.fromkeys(["clean", *names], 0.0)
    n = 0
    for s in range(0, len(tokens), batch_size):
        toks, m = tokens[s : s + batch_size], mask[s : s + batch_size]
        tgt, keep = toks[:, 1:].unsqueeze(-1), m[:, 1:]
        store = {}

        def grab(act, store=store):
            store["x"] = act
            return act

        runs = {"clean": logprobs(model, toks)}
        for name in names:
            pi = pairings.get(name)
            if name in pairings and pi is None:
                runs[name] = logprobs(model, toks, hook_b, reconstruct(b, m))
                continue

            def put(act, pi=pi, m=m, store=store):
                out = act.clone()
                mm = m.to(act.device)
                x = store["x"][mm]
                out[mm] = (x if pi is None else skip_decode(a, b, pi, x.float())).to(act.dtype)
                return out

            runs[name] = logprobs(model, toks, hooks=((hook_a, grab), (hook_b, put)))
        for name, lp in runs.items():
            sums[name] += float(-(lp[:, :-1].cpu().gather(-1, tgt).squeeze(-1))[keep].sum())
        n += int(keep.sum())
    ce = {k: v / n for k, v in sums.items()}
    return {"ce_clean": ce["clean"], **{f"dloss_{k}": ce[k] - ce["clean"] for k in names}}


def cofiring(ca: Codes, cb: Codes, b_for_a: torch.Tensor) -> dict:
    """Per matched pair (i, π(i)) with i or π(i) firing: Jaccard overlap of their firing tokens.
    Returns the mean and the share of pairs with overlap ≥ 0.5."""
    fa, fb = ca.fires().tocsc().astype(np.float32), cb.fires().tocsc().astype(np.float32)
    ok = (b_for_a >= 0).numpy()
    ia, ib = np.flatnonzero(ok), b_for_a.numpy()[ok]
    both = np.asarray(fa[:, ia].multiply(fb[:, ib]).sum(0)).ravel()
    either = np.asarray(fa[:, ia].sum(0)).ravel() + np.asarray(fb[:, ib].sum(0)).ravel() - both
    live = either > 0
    j = both[live] / either[live]
    return {"pairs": int(live.sum()), "mean_jaccard": float(j.mean()) if len(j) else math.nan,
            "share_jaccard_ge_0.5": float((j >= 0.5).mean()) if len(j) else math.nan}


def similarity_decay(saes: list[SAE], matches: dict[tuple[int, int], Match]) -> list[dict]:
    """Mean decoder cosine of matched pairs at each layer distance: direct matches (t, t+d)
    where present, and chains of consecutive matches."""
    rows = []
    for d in range(1, len(saes)):
        direct, chained = [], []
        for t in range(len(saes) - d):
            if (t, t + d) in matches:
                direct.append(float(matches[(t, t + d)].score.nanmean()))
            m = matches[(t, t + 1)]
            for u in range(t + 1, t + d):
                m = m.then(matches[(u, u + 1)])
            chained.append(float(pair_scores(saes[t], saes[t + d], m.b_for_a).nanmean()))
        rows.append({"distance": d, "direct": float(np.mean(direct)) if direct else math.nan,
                     "chained": float(np.mean(chained)), "pairs of layers": len(chained)})
    return rows


def chain_report(run: str | Path | Run, max_tokens: int | None = 32768, n_contexts: int | None = None,
                 solver: str = "auto", direct: bool = True, candidates: int = 64, n_shuffles: int = 100,
                 quiet: bool = False) -> dict:
    """Match every pair of consecutive hookpoints of `run` with `solver` (and, with `direct`,
    every other pair with the sparse solver and `candidates` neighbours), evaluate the
    consecutive matches, and write RUN/analysis/matching.{json,md,png} and
    RUN/analysis/matches/<a>__<b>.json. `n_contexts` held-out contexts feed the Δloss
    (default: the run's eval_contexts; 0 skips it)."""
    run = run if isinstance(run, Run) else Run.open(run)
    hooks = run.hookpoints
    if len(hooks) < 2:
        raise SaekitError(f"{run.path} has one hookpoint; a chain needs SAEs on at least two")
    say = (lambda *a: None) if quiet else print
    saes = [run.sae(h) for h in hooks]
    acts = [run.activations(h) for h in hooks]
    codes = [encode_all(s, x, max_tokens) for s, x in zip(saes, acts, strict=True)]
    pairs = [(t, u) for t in range(len(hooks)) for u in range(t + 1, len(hooks)) if direct or u == t + 1]
    matches = {}
    for t, u in pairs:
        # distances >= 2 only feed the decay curve: the sparse solver is a few times faster there
        how = {"solver": solver} if u == t + 1 else {"solver": "sparse", "candidates": candidates}
        matches[(t, u)] = m = match(saes[t], saes[u], codes=(codes[t], codes[u]), **how)
        say(f"matched {hooks[t]} -> {hooks[u]}: mean cosine {m.score.nanmean():.3f} ({m.info['seconds']} s)")
    model = ctx = None
    n_ctx = run.config.eval_contexts if n_contexts is None and run.config else (n_contexts or 0)
    if n_ctx:
        from saekit.data import contexts
        from saekit.model import load_model

        model = load_model(run.model_name)
        ctx = contexts(run.config, model.tokenizer)["val"]
    layers = []
    for t in range(len(hooks) - 1):
        a, b, m = saes[t], saes[t + 1], matches[(t, t + 1)]
        top1 = nearest(a, b).b_for_a
        ident = torch.arange(a.n_latents) if a.n_latents == b.n_latents else None
        pis = {"match": m.b_for_a, "top1": top1, **({"identity": ident} if ident is not None else {})}
        row = {"a": hooks[t], "b": hooks[t + 1], "cos_match": float(m.score.nanmean()),
               "cos_top1": float(pair_scores(a, b, top1).nanmean())}
        for name, pi in pis.items():
            row[f"ev_{name}"] = layer_skip(a, b, pi, codes[t], acts[t + 1], max_tokens)
        row["ev_sae_b"] = layer_skip(b, b, torch.arange(b.n_latents), codes[t + 1], acts[t + 1], max_tokens)
        residual = a.d_in == b.d_in
        if residual:
            row["ev_residual"] = residual_skip(acts[t], acts[t + 1], a.d_in, max_tokens)
        for name in ("match", "top1"):
            row |= {f"cofire_{name}_{k}": v for k, v in cofiring(codes[t], codes[t + 1], pis[name]).items()
                    if k != "pairs"}
        if model is not None:
            tokens, mask = ctx[0][:n_ctx], ctx[1][:n_ctx]
            row |= layer_skip_loss(model, a, b, {**pis, "sae_b": None}, hooks[t], hooks[t + 1], tokens, mask,
                                   residual=residual)
        u = universality(a, b, m.b_for_a, n_shuffles=n_shuffles)
        row |= {"svcca": u.svcca, "svcca_p": u.svcca_p, "svcca_null": u.svcca_null, "rsa": u.rsa, "rsa_p": u.rsa_p,
                "rsa_null": u.rsa_null}
        layers.append(row)
        say(f"evaluated {hooks[t]} -> {hooks[t + 1]}")
    gen = torch.Generator().manual_seed(0)
    floor = float(np.mean([float(pair_scores(saes[t], saes[t + 1], torch.randint(saes[t + 1].n_latents,
                                                                                 (saes[t].n_latents,), generator=gen))
                                 .nanmean()) for t in range(len(hooks) - 1)]))
    out = {"run": str(run.path), "hookpoints": hooks, "tokens": codes[0].n_tokens, "contexts": n_ctx,
           "decay": similarity_decay(saes, matches), "shuffled_cosine": floor, "layers": layers,
           "matches": {f"{hooks[t]}__{hooks[u]}": m.summary() for (t, u), m in matches.items()}}
    with run.writing_analysis():
        mdir = run.analysis_dir / "matches"
        mdir.mkdir(exist_ok=True)
        for (t, u), m in matches.items():
            m.save(mdir / f"{hooks[t]}__{hooks[u]}.json")
        run.write_json("analysis/matching.json", out)
        md = markdown(out, _plot(out, run.analysis_dir / "matching.png"))
        atomic_write(run.analysis_dir / "matching.md", lambda p: p.write_text(md))
    if not quiet:
        print(md)
    return out


def markdown(out: dict, plot: str | None) -> str:
    f = lambda v: f"{v:.4g}" if isinstance(v, float) else v  # noqa: E731
    layer_cols = [("a", "layer t"), ("b", "layer t+1"), ("cos_match", "cos match"), ("cos_top1", "cos top-1"),
                  ("ev_match", "EV skip match"), ("ev_identity", "EV identity"), ("ev_top1", "EV top-1"),
                  ("ev_residual", "EV residual"), ("ev_sae_b", "EV SAE t+1"), ("dloss_match", "Δloss match"),
                  ("dloss_identity", "Δloss identity"), ("dloss_top1", "Δloss top-1"),
                  ("dloss_residual", "Δloss residual"), ("dloss_sae_b", "Δloss SAE t+1"),
                  ("cofire_match_mean_jaccard", "co-fire match"), ("cofire_top1_mean_jaccard", "co-fire top-1")]
    uni_cols = [("a", "layer t"), ("b", "layer t+1"), ("svcca", "SVCCA"), ("svcca_null", "SVCCA shuffled"),
                ("svcca_p", "p (SVCCA)"), ("rsa", "RSA"), ("rsa_null", "RSA shuffled"), ("rsa_p", "p (RSA)")]
    table = lambda cols: md_table([{h: f(r.get(k, "")) for k, h in cols} for r in out["layers"]])  # noqa: E731
    lines = [f"# Cross-layer matching of `{out['run']}`", "",
             f"{len(out['hookpoints'])} hookpoints, codes on {out['tokens']} held-out tokens, Δloss on "
             f"{out['contexts']} contexts. Decoder matching (SAE Match, data-free folding); consecutive "
             "layers with the exact solver (up to 8,192 latents), direct matches at distance >= 2 with the sparse "
             "solver.", "",
             "## Similarity against layer distance (mean decoder cosine of matched pairs)", "",
             md_table([{k: f(v) for k, v in r.items()} for r in out["decay"]]), "",
             f"Shuffled pairs (floor): {out['shuffled_cosine']:.4g}.", "",
             "## Layer skip: encode at t, permute, decode with t+1", "", table(layer_cols), "",
             "EV: explained variance of layer t+1's activations. Δloss: next-token CE minus the clean CE "
             "with layer t+1 replaced. Baselines: identity pairing, plain top-1 cosine pairing (not one-to-one), "
             "and residual (layer t's activations as layer t+1's, no SAE).", "",
             "## Universality of consecutive dictionaries", "", table(uni_cols), ""]
    if plot:
        lines += [f"![similarity against layer distance]({plot})", ""]
    return "\n".join(lines)


def _plot(out: dict, file: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    d = [r["distance"] for r in out["decay"]]
    ax.plot(d, [r["chained"] for r in out["decay"]], "o-", label="chained t→t+1→…")
    if any(not math.isnan(r["direct"]) for r in out["decay"]):
        ax.plot(d, [r["direct"] for r in out["decay"]], "s--", label="direct t→t+d")
    ax.axhline(out["shuffled_cosine"], color="grey", lw=1, label="shuffled pairs")
    ax.set(xlabel="layer distance", ylabel="mean decoder cosine of matched pairs", title="Similarity against depth")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # distances are whole layers
    ax.legend()
    fig.tight_layout()
    atomic_write(file, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return file.name
