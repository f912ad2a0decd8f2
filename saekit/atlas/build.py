"""Building an atlas: encode a run's activation cache with its SAEs, sort the nonzero codes once,
and write every latent's statistics, examples, logit effects, neighbours and label (`build_atlas`);
add the results of the run's analyses to an atlas (`add_analyses`)."""

import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saekit.atlas.query import ATLAS_FILE, SCHEMA, SCHEMA_VERSION, Atlas
from saekit.errors import SaekitError
from saekit.io import Phases
from saekit.lock import FileLock

TOP, QUANTILES, HIST_BINS, WINDOW, N_LOGITS, N_NEIGHBOURS = 20, 5, 10, 8, 10, 10


# -- building -------------------------------------------------------------------------------
def _unembed(model) -> torch.Tensor | None:
    """The model's unembedding `[d_model, vocab]`, or None where it has none to give."""
    for get in (lambda: model.W_U, lambda: model.unembed.W_U, lambda: model.lm_head.weight.T):
        try:
            w = get()
        except AttributeError:
            continue
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            return w.detach().float().cpu()
    return None


def _vocab(tokenizer) -> list[str]:
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def _segments(keys: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For entries sorted by `keys` (ints in [0, n)): each key's count and each entry's rank in its key."""
    counts = torch.bincount(keys, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    return counts, torch.arange(len(keys)) - starts[keys]


def _label(peaks: np.ndarray, freq: np.ndarray, n_rows: int) -> tuple[int, float] | None:
    """The token most characteristic of one latent's top peaks against its corpus frequency:
    argmax of c_t log((c_t / n) / p_t), p_t add-one smoothed. None without peaks."""
    if not len(peaks):
        return None
    toks, c = np.unique(peaks, return_counts=True)
    p = (freq[toks] + 1) / (n_rows + len(freq))
    gain = c * np.log((c / len(peaks)) / p)
    return int(toks[gain.argmax()]), float(gain.max())


def _cooccurrence_neighbours(codes, n: int, block: int = 2048) -> tuple[np.ndarray, ...]:
    """Each latent's `n` most co-firing latents by Jaccard overlap of their firing tokens:
    (latent, rank, other, jaccard) arrays, best first per latent. From the sparse product FᵀF of the
    [tokens, latents] firing matrix (never dense), `block` latents' rows at a time (memory at most
    block x latents entries)."""
    F = codes.fires().astype(np.float32).tocsr()
    Ft = F.T.tocsr()
    fires = np.asarray(F.sum(0)).ravel()
    out = []
    for a in range(0, codes.n_latents, block):
        C = (Ft[a : a + block] @ F).tocoo()
        i, j, both = C.row + a, C.col, C.data
        off = i != j
        i, j, both = i[off], j[off], both[off]
        jac = both / (fires[i] + fires[j] - both)
        o = torch.argsort(torch.from_numpy(2.0 * i - jac)).numpy()  # jaccard in (0, 1]: by latent, then best first
        i, j, jac = i[o], j[o], jac[o]
        _, rank = _segments(torch.from_numpy(i.astype(np.int64)), codes.n_latents)
        keep = (rank < n).numpy()
        out.append((i[keep], rank[keep].numpy(), j[keep], jac[keep]))
    return tuple(np.concatenate(x) for x in zip(*out, strict=True))


@torch.no_grad()
def _build_hookpoint(db, run, h, split, rows, model, vocab, max_tokens, quiet):
    """One hookpoint's rows of every table; returns the encoder path its codes took. The codes of
    all read tokens are held in memory (12 bytes per token and code slot); every statistic is a
    sort or a scatter over their nonzeros."""
    from saekit.codes import encode_all

    t0 = time.perf_counter()
    sae = run.sae(h)
    m = sae.n_latents
    total = min(run.cache(split).n_tokens, max_tokens or math.inf)
    codes = encode_all(sae, run.activations(h, split), max_tokens, progress=None if quiet else f"atlas {h}",
                       total=total)
    n = codes.n_tokens
    ctx, pos, tok = (rows[f][:n].long() for f in ("_context", "_position", "_token"))
    say = Phases(f"atlas {h}", quiet)  # the steps after the encoding bar, each a few seconds to a minute
    say.step("sorting the codes, top contexts, labels")
    s = _statistics(codes, ctx, tok, m, len(vocab))
    say.step("context windows")
    windows = _windows(codes, s, ctx, pos, tok, m)
    say.step("logit effects, decoder and co-occurrence neighbours")
    W = sae.W_dec.detach().float().cpu()
    logit_rows, logit_hist = _logit_effects(h, W, model, m)
    neigh_rows = _neighbours(h, W, codes, m)
    say.step("writing the tables")
    db.executemany("INSERT INTO features VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   _feature_rows(h, s, tok, vocab, n, m, logit_hist))
    db.executemany("INSERT INTO examples VALUES (?,?,?,?,?,?,?,?,?,?)", _example_rows(h, s, windows))
    db.executemany("INSERT INTO logits VALUES (?,?,?,?,?,?)", logit_rows)
    db.executemany("INSERT INTO neighbours VALUES (?,?,?,?,?,?)", neigh_rows)
    if sae.cfg.crosscoder:  # a crosscoder or transcoder: each latent's decoder norm per target
        norms = sae.decoder_norms().float().cpu()  # [targets, m]
        db.executemany("INSERT INTO parts VALUES (?,?,?,?,?)", [
            (h, j, r, t, float(norms[r, j])) for r, t in enumerate(sae.targets) for j in range(m)])
    say.end()
    secs = time.perf_counter() - t0
    db.execute("INSERT INTO hookpoints VALUES (?,?,?,?,?)", (h, m, sae.d_in, n, secs))
    if not quiet:
        print(f"atlas: {h}: {m} latents on {n:,} tokens in {secs:.1f} s", flush=True)
    return sae.encoder_path


@dataclass
class _Stats:
    """One hookpoint's nonzero codes, ordered by latent then activation descending (`val`, `lat`,
    `row` per entry), and the per-latent statistics and example picks the atlas derives from them."""

    val: torch.Tensor
    lat: torch.Tensor
    row: torch.Tensor
    rank: torch.Tensor  # each entry's rank inside its latent
    n_fires: torch.Tensor
    sums: torch.Tensor
    max_act: torch.Tensor
    hist: torch.Tensor  # [m * HIST_BINS] over [0, max]
    top: torch.Tensor  # entries of the top examples (best token of TOP distinct contexts)
    quant: torch.Tensor  # entries of the quantile samples
    qbin: torch.Tensor  # each entry's quantile slice
    labels: list  # per latent: (token, score) or None
    odd_fires: torch.Tensor  # fires on the odd (scoring) contexts
    odd_hits: torch.Tensor  # of which on the label's token
    odd_freq: np.ndarray  # token counts of the odd contexts
    top_share: torch.Tensor  # the label's share of the top contexts' peaks
    q_share: list  # per latent and slice, the label's share of the slice's firing tokens
    n_ctx: int


def _statistics(codes, ctx: torch.Tensor, tok: torch.Tensor, m: int, n_vocab: int) -> _Stats:
    """Sort the nonzero codes; firing counts, maxima, histograms, top and quantile examples, labels."""
    n = codes.n_tokens
    flat = codes.values.flatten()
    nz = (flat > 0).nonzero().flatten()
    val, lat, row = flat[nz], codes.indices.flatten()[nz], nz // codes.values.shape[1]
    o = torch.argsort(val, descending=True, stable=True)
    o = o[torch.argsort(lat[o], stable=True)]
    val, lat, row = val[o], lat[o], row[o]
    n_fires, rank = _segments(lat, m)
    sums = torch.zeros(m, dtype=torch.float64).index_add_(0, lat, val.double())
    max_act = torch.zeros(m)
    max_act[lat[rank == 0]] = val[rank == 0]

    # top examples: the best token of each context, TOP distinct contexts per latent
    n_ctx = int(ctx.max()) + 1
    by_ctx = torch.argsort(lat * n_ctx + ctx[row], stable=True)  # keeps value order inside (latent, context)
    key = (lat * n_ctx + ctx[row])[by_ctx]
    first = torch.ones(len(key), dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    best = torch.zeros(len(lat), dtype=torch.bool)
    best[by_ctx[first]] = True
    b_idx = best.nonzero().flatten()  # in (latent, -value) order
    _, b_rank = _segments(lat[b_idx], m)
    top = b_idx[b_rank < TOP]
    # labels: from the top contexts among even contexts, scored on the rows of odd contexts
    even = b_idx[ctx[row[b_idx]] % 2 == 0]
    _, e_rank = _segments(lat[even], m)
    even = even[e_rank < TOP]
    toks_np = tok.numpy()
    freq = np.bincount(toks_np, minlength=n_vocab).astype(np.float64)
    bounds = torch.searchsorted(lat[even], torch.arange(m + 1)).tolist()
    peaks = tok[row[even]].numpy()
    labels = [_label(peaks[bounds[j] : bounds[j + 1]], freq, n) for j in range(m)]
    label_tok = torch.tensor([lb[0] if lb else -1 for lb in labels])
    odd = ctx[row] % 2 == 1
    odd_fires = torch.bincount(lat[odd], minlength=m)
    odd_hits = torch.bincount(lat[odd & (tok[row] == label_tok[lat])], minlength=m)
    odd_freq = np.bincount(toks_np[(ctx % 2 == 1).numpy()], minlength=n_vocab)

    # histogram over [0, max]; quantile samples: one pseudo-random token from each of QUANTILES
    # equal-count slices of the latent's activations (slice 0 holds the strongest)
    frac = val / max_act[lat].clamp_min(1e-30)
    hist = torch.zeros(m * HIST_BINS, dtype=torch.long).index_add_(
        0, lat * HIST_BINS + (frac * HIST_BINS).long().clamp(0, HIST_BINS - 1), torch.ones_like(lat))
    qbin = rank * QUANTILES // n_fires[lat].clamp_min(1)
    qkey = ((row * 2654435761) % (1 << 31)) * (1 << 32) + torch.arange(len(row))  # pseudo-random, entry recoverable
    pick = torch.full((m * QUANTILES,), torch.iinfo(torch.long).max).scatter_reduce_(
        0, lat * QUANTILES + qbin, qkey, "amin", include_self=True)
    quant = pick[pick != torch.iinfo(torch.long).max] % (1 << 32)
    # how far the label holds: its share of the top contexts' peaks and of each slice's firing tokens
    on_label = tok[row] == label_tok[lat]
    top_share = torch.bincount(lat[top], on_label[top].double(), minlength=m) / torch.bincount(lat[top], minlength=m)
    q_fires = torch.bincount(lat * QUANTILES + qbin, minlength=m * QUANTILES).view(m, QUANTILES)
    q_share = torch.bincount(lat * QUANTILES + qbin, on_label.double(), minlength=m * QUANTILES).view(m, QUANTILES)
    q_share = torch.where(q_fires > 0, q_share / q_fires.clamp_min(1), torch.nan).tolist()
    return _Stats(val, lat, row, rank, n_fires, sums, max_act, hist, top, quant, qbin, labels, odd_fires, odd_hits,
                  odd_freq, top_share, q_share, n_ctx)


def _windows(codes, s: _Stats, ctx: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor, m: int) -> tuple:
    """Context windows of the top and quantile examples: the tokens ±WINDOW around each example's
    row and the latent's value on each -> (entries, kinds, ranks, tokens, values, present)."""
    n = codes.n_tokens
    lat, row = s.lat, s.row
    ex = torch.cat([s.top, s.quant])
    ex_kind = ["top"] * len(s.top) + ["quantile"] * len(s.quant)
    ex_rank = torch.cat([_segments(lat[s.top], m)[1], s.qbin[s.quant]])
    ctx_len = int(pos.max()) + 1
    rowmap = torch.full((s.n_ctx, ctx_len), -1, dtype=torch.long)
    rowmap[ctx, pos] = torch.arange(n)
    wpos = pos[row[ex]].unsqueeze(1) + torch.arange(-WINDOW, WINDOW + 1)
    inside = (wpos >= 0) & (wpos < ctx_len)
    wrow = torch.where(inside, rowmap[ctx[row[ex]].unsqueeze(1), wpos.clamp(0, ctx_len - 1)], -1)
    present = wrow >= 0
    wr = wrow.clamp_min(0)
    wact = torch.zeros(wr.shape)
    for a in range(0, len(ex), 16384):  # [examples, window, k] pieces of the codes, a block at a time
        w = wr[a : a + 16384]
        hit = codes.indices[w] == lat[ex[a : a + 16384]].view(-1, 1, 1)
        wact[a : a + 16384] = (codes.values[w] * hit).sum(-1)
    wact *= present
    return ex, ex_kind, ex_rank, tok[wr], wact, present


def _logit_effects(h: str, W: torch.Tensor, model, m: int) -> tuple[list, list]:
    """Each latent's top and bottom N_LOGITS logit effects (rows of `logits`) and a histogram of
    its effects over the vocabulary (None without a model, or when the widths differ)."""
    W_U = _unembed(model) if model is not None else None
    logit_rows, logit_hist = [], [None] * m
    if W_U is None or W_U.shape[0] != W.shape[1]:
        return logit_rows, logit_hist
    for a in range(0, m, 512):
        eff = W[a : a + 512] @ W_U
        tv, ti = eff.topk(N_LOGITS, dim=1)
        bv, bi = eff.topk(N_LOGITS, dim=1, largest=False)
        lo, hi = bv[:, :1], tv[:, :1]
        b = ((eff - lo) / (hi - lo).clamp_min(1e-12) * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        counts = torch.zeros(len(eff), HIST_BINS, dtype=torch.long).scatter_add_(1, b, torch.ones_like(b))
        for j in range(len(eff)):
            logit_rows += [(h, a + j, 1, r, t, v) for r, (t, v) in enumerate(zip(ti[j].tolist(), tv[j].tolist(),
                                                                               strict=True))]
            logit_rows += [(h, a + j, -1, r, t, v) for r, (t, v) in enumerate(zip(bi[j].tolist(), bv[j].tolist(),
                                                                                strict=True))]
            logit_hist[a + j] = json.dumps({"lo": float(lo[j]), "hi": float(hi[j]), "counts": counts[j].tolist()})
    return logit_rows, logit_hist


def _neighbours(h: str, W: torch.Tensor, codes, m: int) -> list:
    """Rows of `neighbours`: each latent's nearest decoder rows and its strongest co-occurrences."""
    from saekit.analyze.geometry import top_neighbours

    if m <= 1:
        return []
    cos, ids = top_neighbours(W, N_NEIGHBOURS)
    neigh_rows = []
    for j, (cs, js) in enumerate(zip(cos.tolist(), ids.tolist(), strict=True)):
        neigh_rows += [(h, j, "decoder", r, o, c) for r, (o, c) in enumerate(zip(js, cs, strict=True))]
    neigh_rows += [(h, i, "cooccurrence", r, j, v) for i, r, j, v in
                   zip(*(x.tolist() for x in _cooccurrence_neighbours(codes, N_NEIGHBOURS)), strict=True)]
    return neigh_rows


def _example_rows(h: str, s: _Stats, windows: tuple) -> list:
    """Rows of `examples`: each example's window tokens and values (only the positions present)."""
    ex, ex_kind, ex_rank, wtok, wact, present = windows
    ex_rows = []
    lists = zip(ex_kind, ex_rank.tolist(), s.lat[ex].tolist(), s.row[ex].tolist(), s.val[ex].tolist(),
                wtok.tolist(), wact.tolist(), present.tolist(), strict=True)
    for kind, rk, j, r, v, wt, wa, keep in lists:
        t = [x for x, ok in zip(wt, keep, strict=True) if ok]
        av = [round(x, 6) for x, ok in zip(wa, keep, strict=True) if ok]
        peak = sum(keep[:WINDOW])
        ex_rows.append((h, j, kind, rk, r, v, peak, t[peak], json.dumps(t), json.dumps(av)))
    return ex_rows


def _feature_rows(h: str, s: _Stats, tok: torch.Tensor, vocab: list, n: int, m: int, logit_hist: list) -> list:
    """Rows of `features`: firing statistics, histograms, the label and how well it holds."""
    top_text = [[] for _ in range(m)]
    for j, t in zip(s.lat[s.top].tolist(), tok[s.row[s.top]].tolist(), strict=True):
        top_text[j].append(vocab[t])
    feat_rows = []
    hist_l = s.hist.view(m, HIST_BINS).tolist()
    for j in range(m):
        lb = s.labels[j]
        fires, hits = int(s.odd_fires[j]), int(s.odd_hits[j])
        prec = hits / fires if lb and fires else None
        rec = hits / int(s.odd_freq[lb[0]]) if lb and s.odd_freq[lb[0]] else None
        f1 = 2 * prec * rec / (prec + rec) if prec and rec else (0.0 if lb else None)
        cnt = int(s.n_fires[j])
        shares = (float(s.top_share[j]), json.dumps([None if x != x else round(x, 4) for x in s.q_share[j]])) if lb \
            else (None, None)
        feat_rows.append((h, j, cnt, cnt / n, s.sums[j].item() / max(cnt, 1), float(s.max_act[j]),
                          json.dumps(hist_l[j]), logit_hist[j], vocab[lb[0]] if lb else None, lb[0] if lb else None,
                          f1, prec, rec, *shares, "\x1f".join(top_text[j])))
    return feat_rows


def build_atlas(run, tokens: int | None = None, out: str | Path | None = None, *, split: str = "train",
                hookpoints=None, model=None, quiet: bool = True) -> Path:
    """Write the atlas of `run` (a Run or its folder) to `out` (default RUN/atlas.sqlite) from the
    first `tokens` rows of its `split` ("train" or "val") activation cache, which records each
    row's token, context and position. `model` (default: the run's, loaded on CPU) gives the
    tokenizer and the unembedding; it runs no forward pass."""
    from saekit.run import Run

    run = run if isinstance(run, Run) else Run.open(run)
    if run.bare:
        raise SaekitError(f"{run.path} is a bare SAE folder: an atlas needs a run with an activation cache")
    if tokens is not None and tokens < 1:
        raise SaekitError(f"--tokens must be >= 1, got {tokens}")
    if split not in ("train", "val"):
        raise SaekitError(f"--split must be train or val, got {split!r}")
    hps = [run.hookpoint(h) for h in hookpoints] if hookpoints else list(run.hookpoints)
    say = Phases("atlas", quiet)
    if model is None:
        from saekit.model import load_model

        say.step(f"loading {run.model_name} (tokenizer and unembedding)")
        model = load_model(run.model_name)
    say.step(f"reading the {split} cache's token positions")
    rows = run.cache(split).rows()
    out = Path(out) if out is not None else run.path / ATLAS_FILE
    # built in a temporary file, then renamed onto `out`: a reader that opens `out` gets the old
    # atlas or the new one, and one that holds it open keeps reading the old file
    tmp = out.with_name(out.name + ".tmp")
    vocab = _vocab(model.tokenizer)
    say.end()
    with _writing(out):  # one writer at a time (this creates out's folder)
        tmp.unlink(missing_ok=True)
        db = sqlite3.connect(tmp)
        try:
            db.executescript(SCHEMA)
            db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            meta = {"run": str(run.path.resolve()), "model": run.model_name,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "split": split, "tokens": tokens,
                    "top": TOP, "quantiles": QUANTILES, "window": WINDOW}
            db.executemany("INSERT INTO meta VALUES (?,?)", [(k, json.dumps(v)) for k, v in meta.items()])
            db.executemany("INSERT INTO vocab VALUES (?,?)", list(enumerate(vocab)))
            paths = {h: _build_hookpoint(db, run, h, split, rows, model, vocab, tokens, quiet) for h in hps}
            db.execute("INSERT INTO meta VALUES (?,?)", ("encoder_path", json.dumps(paths)))
            say.step(f"writing {out}")
            db.commit()
        finally:
            db.close()
        tmp.replace(out)
    say.end()
    return out


def _writing(atlas: Path) -> FileLock:
    """The lock every writer of the atlas file `atlas` holds (a build, `add_analyses`)."""
    return FileLock(atlas.with_name(atlas.name + ".lock"), f"the atlas {atlas} is being written")


def add_analyses(atlas_path: str | Path, run=None) -> dict:
    """Add what RUN/analysis holds to an atlas, without rebuilding it: cross-layer matches
    (RUN/analysis/matches/A__B.json -> table `matches`, both ways), geometry lobes and
    multi-dimensional clusters, and absorption (RUN/analysis/report.json or geometry.json /
    absorption.json -> feature columns `lobe`, `cluster`, `absorbs`). Returns what was added,
    per source. Running it again replaces the earlier values."""
    from saekit.matching import Match
    from saekit.run import Run

    atlas = Atlas.open(atlas_path)
    atlas.db.close()
    run = run if isinstance(run, Run) else Run.open(run if run is not None else atlas.meta["run"])
    hps = set(atlas.hookpoints)
    added = {"matches": 0, "lobe": 0, "cluster": 0, "absorbs": 0}
    lock = _writing(atlas.path)
    lock.acquire()  # not while a build is about to replace the file (the changes would be lost)
    db = sqlite3.connect(atlas.path)
    try:
        cols = {r[1] for r in db.execute("PRAGMA table_info(features)")}
        for col, typ in (("lobe", "INTEGER"), ("cluster", "INTEGER"), ("absorbs", "TEXT")):
            if col not in cols:
                db.execute(f"ALTER TABLE features ADD COLUMN {col} {typ}")
        db.execute("CREATE TABLE IF NOT EXISTS matches (hookpoint TEXT, latent INTEGER, other_hookpoint TEXT, "
                   "other_latent INTEGER, score REAL)")
        db.execute("CREATE INDEX IF NOT EXISTS matches_latent ON matches (hookpoint, latent)")
        db.execute("DELETE FROM matches")
        folder = run.path / "analysis" / "matches"
        for f in sorted(folder.glob("*__*.json")) if folder.is_dir() else []:
            a, b = f.stem.split("__", 1)
            if not {a, b} & hps:
                continue
            m = Match.load(f)
            ok = (m.b_for_a >= 0).nonzero().flatten()
            pairs = [(int(i), int(m.b_for_a[i]), None if math.isnan(s) else float(s))
                     for i, s in zip(ok.tolist(), m.score[ok].tolist(), strict=True)]
            rows = [(a, i, b, j, s) for i, j, s in pairs] if a in hps else []  # a's latents: where they go
            rows += [(b, j, a, i, s) for i, j, s in pairs] if b in hps else []  # b's: where they come from
            db.executemany("INSERT INTO matches VALUES (?,?,?,?,?)", rows)
            added["matches"] += len(rows)
        for name in ("report.json", "geometry.json", "absorption.json"):
            file = run.path / "analysis" / name
            if not file.is_file():
                continue
            try:
                res = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SaekitError(f"{file} is corrupt: {e}") from None
            for h in hps & set(res if isinstance(res, dict) else ()):
                entry = res[h] if isinstance(res[h], dict) else {}
                labels = ((entry.get("geometry") or {}).get("lobes") or {}).get("labels")
                if isinstance(labels, list):
                    db.executemany("UPDATE features SET lobe = ? WHERE hookpoint = ? AND latent = ?",
                                   [(int(x), h, j) for j, x in enumerate(labels)])
                    added["lobe"] += len(labels)
                multidim = (entry.get("geometry") or {}).get("multidim")
                if isinstance(multidim, list):  # multi-dimensional clusters, best first
                    db.execute("UPDATE features SET cluster = NULL WHERE hookpoint = ?", (h,))
                    rows = [(r, h, int(j)) for r, c in enumerate(multidim) if isinstance(c, dict)
                            for j in c.get("latents", [])]
                    db.executemany("UPDATE features SET cluster = ? WHERE hookpoint = ? AND latent = ?", rows)
                    added["cluster"] += len(rows)
                absorbing = (entry.get("absorption") or {}).get("absorbing_latents")
                if isinstance(absorbing, dict):
                    by_latent: dict[int, list[str]] = {}
                    for letter, latents in absorbing.items():
                        for j in latents:
                            by_latent.setdefault(int(j), []).append(letter)
                    db.execute("UPDATE features SET absorbs = NULL WHERE hookpoint = ?", (h,))
                    db.executemany("UPDATE features SET absorbs = ? WHERE hookpoint = ? AND latent = ?",
                                   [(",".join(sorted(v)), h, j) for j, v in by_latent.items()])
                    added["absorbs"] += len(by_latent)
        db.commit()
    finally:
        db.close()
        lock.release()
    return added


# -- reading --------------------------------------------------------------------------------
