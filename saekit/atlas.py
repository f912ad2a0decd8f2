"""A feature atlas: one SQLite file per run that says, for every latent of every hookpoint, how
often and how strongly it fires, on which contexts, what it writes to the logits, which latents
it resembles and an offline label (the token it is most characteristic of) with a score.

    build_atlas(run)                 -> RUN/atlas.sqlite, streamed from the SAE codes of the run's
                                        held-out activation cache (never a dense [tokens, latents])
    Atlas.open(path).card(latent)    -> one feature's card; .features(), .token(), .search(), .text()

Search (`Atlas.search`) is a Python regular expression registered as SQLite's REGEXP over the
labels and the top contexts' peak tokens. FTS5 is not used: it answers word queries, not regular
expressions, and its tokenizer drops the leading spaces and punctuation that BPE token labels
are made of; the tables it would index hold one row per latent, so a scan takes milliseconds.
"""

import json
import math
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saekit.errors import SaekitError
from saekit.run import choose_hookpoint

SCHEMA_VERSION = 1
ATLAS_FILE = "atlas.sqlite"
TOP, QUANTILES, HIST_BINS, WINDOW, N_LOGITS, N_NEIGHBOURS = 20, 5, 10, 8, 10, 10

SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE hookpoints (name TEXT PRIMARY KEY, n_latents INTEGER, d_in INTEGER, n_tokens INTEGER,
                         build_seconds REAL);
CREATE TABLE vocab (id INTEGER PRIMARY KEY, text TEXT);
CREATE TABLE features (hookpoint TEXT, latent INTEGER, n_fires INTEGER, density REAL, mean_act REAL, max_act REAL,
                       hist TEXT, label TEXT, label_token INTEGER, label_score REAL, label_precision REAL,
                       label_recall REAL, top_text TEXT, PRIMARY KEY (hookpoint, latent));
CREATE TABLE examples (hookpoint TEXT, latent INTEGER, kind TEXT, rank INTEGER, row INTEGER, max_act REAL,
                       peak INTEGER, peak_token INTEGER, tokens TEXT, acts TEXT);
CREATE INDEX examples_latent ON examples (hookpoint, latent, kind);
CREATE INDEX examples_peak ON examples (peak_token, kind);
CREATE TABLE logits (hookpoint TEXT, latent INTEGER, sign INTEGER, rank INTEGER, token INTEGER, value REAL);
CREATE INDEX logits_latent ON logits (hookpoint, latent);
CREATE TABLE neighbours (hookpoint TEXT, latent INTEGER, rank INTEGER, other INTEGER, cosine REAL);
CREATE INDEX neighbours_latent ON neighbours (hookpoint, latent);
"""


# -- building -------------------------------------------------------------------------------
def _merge_topk(top_v, top_r, vals, lats, rows, k):
    """Fold one batch of (value, latent, row) entries into per-latent running top-k [m, k]."""
    m = top_v.shape[0]
    o = torch.argsort(vals, descending=True, stable=True)
    o = o[torch.argsort(lats[o], stable=True)]
    lat, v, r = lats[o], vals[o], rows[o]
    _, counts = torch.unique_consecutive(lat, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(lat)) - torch.repeat_interleave(starts, counts)
    keep = rank < k
    cand_v = torch.full((m, k), -math.inf)
    cand_r = torch.full((m, k), -1, dtype=torch.long)
    cand_v[lat[keep], rank[keep]] = v[keep]
    cand_r[lat[keep], rank[keep]] = r[keep]
    all_v, all_r = torch.cat([top_v, cand_v], 1), torch.cat([top_r, cand_r], 1)
    best_v, pos = all_v.topk(k, dim=1)
    return best_v, all_r.gather(1, pos)


def _flat(code, offset):
    """Nonzero entries of one batch of codes: (values, latents, rows)."""
    vals, idx = code
    keep = vals > 0
    rows = torch.arange(offset, offset + len(vals)).unsqueeze(1).expand_as(vals)
    return vals[keep].float(), idx[keep].long(), rows[keep]


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


def _label(peaks: np.ndarray, freq: np.ndarray, n_rows: int) -> tuple[int, float] | None:
    """The token most characteristic of one latent's top peaks against its corpus frequency:
    argmax of c_t log((c_t / n) / p_t), p_t add-one smoothed. None without peaks."""
    peaks = peaks[peaks >= 0]
    if not len(peaks):
        return None
    toks, c = np.unique(peaks, return_counts=True)
    p = (freq[toks] + 1) / (n_rows + len(freq))
    gain = c * np.log((c / len(peaks)) / p)
    return int(toks[gain.argmax()]), float(gain.max())


@torch.no_grad()
def _build_hookpoint(db, run, h, ctx_tokens, ctx_mask, model, vocab, max_tokens, quiet):
    from saekit.codes import encode_batches

    t0 = time.perf_counter()
    sae = run.sae(h)
    m = sae.n_latents
    acts = run.activations(h)
    n_ctx, ctx_len = ctx_tokens.shape
    row_ctx, row_pos = ctx_mask.nonzero(as_tuple=True)  # the cache's row order
    row_tok = ctx_tokens[ctx_mask]
    n_avail = len(row_tok)

    # pass 1: counts, sums, maxima, running top-k (all rows, and rows of even contexts for the label)
    n_fires = torch.zeros(m, dtype=torch.float64)
    sums = torch.zeros(m, dtype=torch.float64)
    top_v, top_r = torch.full((m, TOP), -math.inf), torch.full((m, TOP), -1, dtype=torch.long)
    lab_v, lab_r = top_v.clone(), top_r.clone()
    n = 0
    for code in encode_batches(sae, acts, max_tokens):
        v, lat, r = _flat(code, n)
        n += len(code.values)
        if n > n_avail:
            raise SaekitError(f"the activation cache of {h} has more rows ({n}) than the run's held-out contexts "
                              f"give tokens ({n_avail}); the cache does not belong to this run")
        n_fires.index_add_(0, lat, torch.ones_like(v, dtype=torch.float64))
        sums.index_add_(0, lat, v.double())
        top_v, top_r = _merge_topk(top_v, top_r, v, lat, r, TOP)
        even = row_ctx[r] % 2 == 0
        lab_v, lab_r = _merge_topk(lab_v, lab_r, v[even], lat[even], r[even], TOP)
    if n == 0:
        raise SaekitError(f"no activations to build an atlas from for {h}")
    max_act = top_v[:, 0].clamp_min(0)

    # labels: from the top peaks of even contexts, scored on the rows of odd contexts
    toks_np = row_tok[:n].numpy()
    freq = np.bincount(toks_np, minlength=len(vocab)).astype(np.float64)
    odd_rows = (row_ctx[:n] % 2 == 1)
    odd_freq = np.bincount(toks_np[odd_rows.numpy()], minlength=len(vocab))
    lab_peaks = torch.where(lab_r >= 0, row_tok[lab_r.clamp_min(0)], -1).numpy()
    labels = [_label(lab_peaks[j], freq, n) for j in range(m)]
    label_tok = torch.tensor([lb[0] if lb else -1 for lb in labels])

    # pass 2: histograms, quantile samples, label hits on odd contexts
    hist = torch.zeros(m * HIST_BINS, dtype=torch.long)
    qkey = torch.full((m * QUANTILES,), torch.iinfo(torch.long).max, dtype=torch.long)
    odd_fires = torch.zeros(m, dtype=torch.long)
    odd_hits = torch.zeros(m, dtype=torch.long)
    s = 0
    for code in encode_batches(sae, acts, max_tokens):
        v, lat, r = _flat(code, s)
        s += len(code.values)
        frac = v / max_act[lat].clamp_min(1e-30)
        hist.index_add_(0, lat * HIST_BINS + (frac * HIST_BINS).long().clamp(0, HIST_BINS - 1),
                        torch.ones_like(lat))
        qb = (frac * QUANTILES).long().clamp(0, QUANTILES - 1)
        key = ((r * 2654435761) % (1 << 31)) * (1 << 32) + r  # a pseudo-random row per bin, row recoverable
        qkey.scatter_reduce_(0, lat * QUANTILES + qb, key, "amin")
        odd = odd_rows[r]
        odd_fires.index_add_(0, lat[odd], torch.ones_like(lat[odd]))
        odd_hits.index_add_(0, lat[odd], (row_tok[r[odd]] == label_tok[lat[odd]]).long())
    q_rows = torch.where(qkey == torch.iinfo(torch.long).max, -1, qkey % (1 << 32)).view(m, QUANTILES)

    # windows (±WINDOW around each example's row) and the latent's activation on each of their tokens
    rowmap = torch.full((n_ctx, ctx_len), -1, dtype=torch.long)
    rowmap[row_ctx[:n], row_pos[:n]] = torch.arange(n)
    ex = []  # (kind, rank, latent, row)
    for kind, rows in (("top", top_r), ("quantile", q_rows)):
        lat_i, rank_i = (rows >= 0).nonzero(as_tuple=True)
        ex += [(kind, int(k), int(j), int(r)) for j, k, r in zip(lat_i, rank_i, rows[lat_i, rank_i], strict=True)]
    ex_row = torch.tensor([e[3] for e in ex], dtype=torch.long)
    ex_lat = torch.tensor([e[2] for e in ex], dtype=torch.long)
    offs = torch.arange(-WINDOW, WINDOW + 1)
    pos = row_pos[ex_row].unsqueeze(1) + offs  # [E, 2W+1]
    inside = (pos >= 0) & (pos < ctx_len)
    posc = pos.clamp(0, ctx_len - 1)
    ctxs = row_ctx[ex_row].unsqueeze(1).expand_as(pos)
    wtok = ctx_tokens[ctxs, posc]
    wrow = torch.where(inside, rowmap[ctxs, posc], -1)
    wact = torch.zeros(wrow.shape)
    want = (wrow >= 0).nonzero(as_tuple=True)
    p_row, p_lat = wrow[want], ex_lat[want[0]]
    order = torch.argsort(p_row)
    p_row_s, p_lat_s = p_row[order], p_lat[order]
    p_val = torch.zeros(len(order))
    s = 0
    for code in encode_batches(sae, acts, max_tokens):
        lo, hi = torch.searchsorted(p_row_s, torch.tensor([s, s + len(code.values)])).tolist()
        for a in range(lo, hi, 65536):
            b = min(hi, a + 65536)
            loc = p_row_s[a:b] - s
            hit = code.indices[loc] == p_lat_s[a:b].unsqueeze(1)
            p_val[a:b] = (code.values[loc].float() * hit).sum(1)
        s += len(code.values)
    vals_back = torch.zeros(len(order))
    vals_back[order] = p_val
    wact[want] = vals_back

    # logit effects and decoder neighbours
    W = sae.W_dec.detach().float().cpu()
    W_U = _unembed(model) if model is not None else None
    logit_rows = []
    if W_U is not None and W_U.shape[0] == W.shape[1]:
        for a in range(0, m, 512):
            eff = W[a : a + 512] @ W_U
            tv, ti = eff.topk(N_LOGITS, dim=1)
            bv, bi = eff.topk(N_LOGITS, dim=1, largest=False)
            for j in range(len(eff)):
                logit_rows += [(h, a + j, 1, r, int(ti[j, r]), float(tv[j, r])) for r in range(N_LOGITS)]
                logit_rows += [(h, a + j, -1, r, int(bi[j, r]), float(bv[j, r])) for r in range(N_LOGITS)]
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    nb = min(N_NEIGHBOURS, m - 1)
    neigh_rows = []
    for a in range(0, m, 1024):
        cos = Wn[a : a + 1024] @ Wn.T
        cos[torch.arange(len(cos)), torch.arange(a, a + len(cos))] = -math.inf
        cv, ci = cos.topk(nb, dim=1)
        for j in range(len(cos)):
            neigh_rows += [(h, a + j, r, int(ci[j, r]), float(cv[j, r])) for r in range(nb)]

    # write
    peak_tok = row_tok[top_r.clamp_min(0)]
    ex_rows = []
    wtok_l, wact_l, inside_l = wtok.tolist(), wact.tolist(), inside.tolist()
    for e, (kind, rank, j, r) in enumerate(ex):
        keep = inside_l[e]
        t = [x for x, ok in zip(wtok_l[e], keep, strict=True) if ok]
        av = [round(x, 6) for x, ok in zip(wact_l[e], keep, strict=True) if ok]
        peak = WINDOW - keep.index(True)
        ex_rows.append((h, j, kind, rank, r, av[peak], peak, t[peak], json.dumps(t), json.dumps(av)))
    feat_rows = []
    hist_l = hist.view(m, HIST_BINS).tolist()
    for j in range(m):
        lb = labels[j]
        fires = odd_fires[j].item()
        hits = odd_hits[j].item()
        prec = hits / fires if lb and fires else None
        rec = hits / int(odd_freq[lb[0]]) if lb and odd_freq[lb[0]] else None
        f1 = 2 * prec * rec / (prec + rec) if prec and rec else (0.0 if lb else None)
        top_text = "\x1f".join(vocab[t] for t, r in zip(peak_tok[j].tolist(), top_r[j].tolist(), strict=True)
                               if r >= 0)
        cnt = int(n_fires[j])
        feat_rows.append((h, j, cnt, cnt / n, sums[j].item() / max(cnt, 1), float(max_act[j]),
                          json.dumps(hist_l[j]), vocab[lb[0]] if lb else None, lb[0] if lb else None, f1, prec, rec,
                          top_text))
    db.executemany("INSERT INTO features VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", feat_rows)
    db.executemany("INSERT INTO examples VALUES (?,?,?,?,?,?,?,?,?,?)", ex_rows)
    db.executemany("INSERT INTO logits VALUES (?,?,?,?,?,?)", logit_rows)
    db.executemany("INSERT INTO neighbours VALUES (?,?,?,?,?)", neigh_rows)
    secs = time.perf_counter() - t0
    db.execute("INSERT INTO hookpoints VALUES (?,?,?,?,?)", (h, m, sae.d_in, n, secs))
    if not quiet:
        print(f"atlas: {h}: {m} latents on {n:,} tokens in {secs:.1f} s", flush=True)


def build_atlas(run, tokens: int | None = None, out: str | Path | None = None, *, hookpoints=None, model=None,
                contexts=None, quiet: bool = True) -> Path:
    """Write the atlas of `run` (a Run or its folder) to `out` (default RUN/atlas.sqlite) from the
    first `tokens` rows of its held-out activation cache. `model` (default: the run's, loaded on
    CPU) gives the tokenizer and the unembedding; `contexts` ((tokens, mask) of the held-out split,
    default: rebuilt from the run's config) give each cache row its token and context."""
    from saekit.run import Run

    run = run if isinstance(run, Run) else Run.open(run)
    if run.bare:
        raise SaekitError(f"{run.path} is a bare SAE folder: an atlas needs a run with a held-out activation cache")
    if tokens is not None and tokens < 1:
        raise SaekitError(f"--tokens must be >= 1, got {tokens}")
    hps = [run.hookpoint(h) for h in hookpoints] if hookpoints else list(run.hookpoints)
    if model is None:
        from saekit.model import load_model

        model = load_model(run.model_name)
    if contexts is None:
        from saekit.pipeline import contexts as make_contexts

        contexts = make_contexts(run.config, model.tokenizer)["val"]
    ctx_tokens, ctx_mask = contexts
    out = Path(out) if out is not None else run.path / ATLAS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    vocab = _vocab(model.tokenizer)
    db = sqlite3.connect(tmp)
    try:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        meta = {"run": str(run.path.resolve()), "model": run.model_name, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                time.gmtime()), "tokens": tokens, "top": TOP, "quantiles": QUANTILES, "window": WINDOW}
        db.executemany("INSERT INTO meta VALUES (?,?)", [(k, json.dumps(v)) for k, v in meta.items()])
        db.executemany("INSERT INTO vocab VALUES (?,?)", list(enumerate(vocab)))
        for h in hps:
            _build_hookpoint(db, run, h, ctx_tokens, ctx_mask, model, vocab, tokens, quiet)
        db.commit()
    finally:
        db.close()
    tmp.replace(out)
    return out


def add_analyses(atlas_path: str | Path, run=None) -> dict:
    """Add what RUN/analysis holds to an atlas, without rebuilding it: cross-layer matches
    (RUN/analysis/matches/A__B.json -> table `matches`), geometry lobes and absorption
    (RUN/analysis/report.json or geometry.json / absorption.json -> feature columns `lobe`,
    `absorbs`). Returns what was added, per source. Running it again replaces the earlier values."""
    from saekit.matching import Match
    from saekit.run import Run

    atlas = Atlas.open(atlas_path)
    atlas.db.close()
    run = run if isinstance(run, Run) else Run.open(run if run is not None else atlas.meta["run"])
    hps = set(atlas.hookpoints)
    added = {"matches": 0, "lobe": 0, "absorbs": 0}
    db = sqlite3.connect(atlas.path)
    try:
        cols = {r[1] for r in db.execute("PRAGMA table_info(features)")}
        for col, typ in (("lobe", "INTEGER"), ("absorbs", "TEXT")):
            if col not in cols:
                db.execute(f"ALTER TABLE features ADD COLUMN {col} {typ}")
        db.execute("CREATE TABLE IF NOT EXISTS matches (hookpoint TEXT, latent INTEGER, other_hookpoint TEXT, "
                   "other_latent INTEGER, score REAL)")
        db.execute("CREATE INDEX IF NOT EXISTS matches_latent ON matches (hookpoint, latent)")
        db.execute("DELETE FROM matches")
        folder = run.path / "analysis" / "matches"
        for f in sorted(folder.glob("*__*.json")) if folder.is_dir() else []:
            a, b = f.stem.split("__", 1)
            if a not in hps:
                continue
            m = Match.load(f)
            ok = (m.b_for_a >= 0).nonzero().flatten()
            rows = [(a, int(i), b, int(m.b_for_a[i]), None if math.isnan(s) else float(s))
                    for i, s in zip(ok.tolist(), m.score[ok].tolist(), strict=True)]
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
    return added


# -- reading --------------------------------------------------------------------------------
@dataclass
class Card:
    """One feature: statistics, examples, logit effects, neighbours and label."""

    hookpoint: str
    latent: int
    density: float
    mean_act: float
    max_act: float
    hist: list[int]
    label: str | None
    label_score: float | None
    top_examples: "object"  # DataFrame: tokens, acts, peak, max_act, row (of the held-out cache)
    quantile_examples: "object"
    logits_top: "object"  # DataFrame: token, value
    logits_bottom: "object"
    neighbours: "object"  # DataFrame: latent, cosine, label
    matches: "object" = None  # DataFrame: other_hookpoint, other_latent, score (after add_analyses)
    lobe: int | None = None  # geometry co-occurrence lobe (after add_analyses)
    absorbs: str | None = None  # letters this latent absorbs (after add_analyses)

    def to_dict(self) -> dict:
        out = {}
        for k, v in self.__dict__.items():
            out[k] = v.to_dict(orient="records") if hasattr(v, "to_dict") else v
        return out


class Atlas:
    """Read access to an atlas file (see `build_atlas`)."""

    def __init__(self, path: Path, db: sqlite3.Connection):
        self.path, self.db = path, db
        self.meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        self.hookpoints = [r[0] for r in db.execute("SELECT name FROM hookpoints ORDER BY rowid")]
        self._vocab = None

    @classmethod
    def open(cls, path: str | Path) -> "Atlas":
        path = Path(path)
        if path.is_dir():
            path = path / ATLAS_FILE
        if not path.is_file():
            raise SaekitError(f"no atlas at {path}; build one with `saekit atlas build RUN`")
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            version = db.execute("SELECT version FROM schema_version").fetchone()
        except sqlite3.DatabaseError as e:
            raise SaekitError(f"{path} is not a saekit atlas ({e}); rebuild it with `saekit atlas build RUN`") from None
        if version is None or version[0] != SCHEMA_VERSION:
            got = None if version is None else version[0]
            raise SaekitError(f"{path} has atlas schema version {got}, this saekit reads version {SCHEMA_VERSION}; "
                              "rebuild it with `saekit atlas build RUN`")
        db.create_function("regexp", 2, _regexp, deterministic=True)
        return cls(path, db)

    # helpers
    @property
    def vocab(self) -> list[str]:
        if self._vocab is None:
            self._vocab = [t for (t,) in self.db.execute("SELECT text FROM vocab ORDER BY id")]
        return self._vocab

    def _hp(self, hookpoint: str | None) -> str:
        return choose_hookpoint(self.path, self.hookpoints, hookpoint)

    def _df(self, sql: str, args=()):
        import pandas as pd

        cur = self.db.execute(sql, args)
        return pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description])

    # queries
    def features(self, hookpoint: str | None = None):
        """DataFrame: hookpoint, latent, density, mean_act, max_act, label, label_score (all hookpoints if None)."""
        cols = "hookpoint, latent, density, mean_act, max_act, label, label_score"
        if hookpoint is None:
            return self._df(f"SELECT {cols} FROM features ORDER BY hookpoint, latent")
        return self._df(f"SELECT {cols} FROM features WHERE hookpoint = ? ORDER BY latent", (self._hp(hookpoint),))

    def card(self, latent: int, hookpoint: str | None = None) -> Card:
        h = self._hp(hookpoint)
        row = self.db.execute("SELECT density, mean_act, max_act, hist, label, label_score FROM features "
                              "WHERE hookpoint = ? AND latent = ?", (h, int(latent))).fetchone()
        if row is None:
            n = self.db.execute("SELECT n_latents FROM hookpoints WHERE name = ?", (h,)).fetchone()[0]
            raise SaekitError(f"latent {latent} is not in {h} (it has latents 0..{n - 1})")
        voc = self.vocab

        def examples(kind):
            df = self._df("SELECT tokens, acts, peak, max_act, row FROM examples WHERE hookpoint = ? AND latent = ? "
                          "AND kind = ? ORDER BY rank", (h, int(latent), kind))
            df["tokens"] = [[voc[t] for t in json.loads(x)] for x in df["tokens"]]
            df["acts"] = [json.loads(x) for x in df["acts"]]
            return df

        def logits(sign):
            df = self._df("SELECT token, value FROM logits WHERE hookpoint = ? AND latent = ? AND sign = ? "
                          "ORDER BY rank", (h, int(latent), sign))
            df["token"] = [voc[t] for t in df["token"]]
            return df

        neigh = self._df("SELECT n.other AS latent, n.cosine, f.label FROM neighbours n JOIN features f "
                         "ON f.hookpoint = n.hookpoint AND f.latent = n.other WHERE n.hookpoint = ? AND n.latent = ? "
                         "ORDER BY n.rank", (h, int(latent)))
        card = Card(h, int(latent), row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], examples("top"),
                    examples("quantile"), logits(1), logits(-1), neigh)
        if self._has_table("matches"):
            card.matches = self._df("SELECT other_hookpoint, other_latent, score FROM matches WHERE hookpoint = ? "
                                    "AND latent = ? ORDER BY other_hookpoint", (h, int(latent)))
            card.lobe, card.absorbs = self.db.execute("SELECT lobe, absorbs FROM features WHERE hookpoint = ? AND "
                                                      "latent = ?", (h, int(latent))).fetchone()
        return card

    def _has_table(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() \
            is not None

    def similar(self, latent: int, hookpoint: str | None = None):
        """The latent's nearest decoder directions: DataFrame latent, cosine, label."""
        return self.card(latent, hookpoint).neighbours

    def token(self, token: str, hookpoint: str | None = None):
        """Latents whose top contexts peak on `token` (one vocabulary entry, e.g. " king"), most peaks first:
        DataFrame hookpoint, latent, peaks, label, label_score."""
        ids = [i for (i,) in self.db.execute("SELECT id FROM vocab WHERE text = ?", (token,))]
        if not ids:
            raise SaekitError(f"{token!r} is not one token of the model's vocabulary")
        hs = [self._hp(hookpoint)] if hookpoint is not None else self.hookpoints
        marks = ",".join("?" * len(ids))
        return self._df(f"SELECT e.hookpoint, e.latent, COUNT(*) AS peaks, f.label, f.label_score FROM examples e "
                        f"JOIN features f ON f.hookpoint = e.hookpoint AND f.latent = e.latent WHERE e.kind = 'top' "
                        # unary + keeps SQLite on the peak-token index (the hookpoint index scans a layer)
                        f"AND e.peak_token IN ({marks}) AND +e.hookpoint IN ({','.join('?' * len(hs))}) "
                        "GROUP BY e.hookpoint, e.latent ORDER BY peaks DESC, f.label_score DESC", (*ids, *hs))

    def search(self, pattern: str, hookpoint: str | None = None):
        """Latents whose label or a top-context peak token matches the regular expression `pattern`."""
        try:
            re.compile(pattern)
        except re.error as e:
            raise SaekitError(f"bad regular expression {pattern!r}: {e}") from None
        hs = [self._hp(hookpoint)] if hookpoint is not None else self.hookpoints
        return self._df("SELECT hookpoint, latent, density, max_act, label, label_score FROM features "
                        f"WHERE (label REGEXP ? OR top_text REGEXP ?) AND hookpoint IN ({','.join('?' * len(hs))}) "
                        "ORDER BY label_score IS NULL, label_score DESC", (pattern, pattern, *hs))

    def top_by(self, column: str, n: int = 20, hookpoint: str | None = None, ascending: bool = False):
        allowed = ("density", "mean_act", "max_act", "label_score", "n_fires")
        if column not in allowed:
            raise SaekitError(f"cannot sort by {column!r}; choose one of {', '.join(allowed)}")
        hs = [self._hp(hookpoint)] if hookpoint is not None else self.hookpoints
        return self._df(f"SELECT hookpoint, latent, density, max_act, label, label_score FROM features WHERE "
                        f"hookpoint IN ({','.join('?' * len(hs))}) AND {column} IS NOT NULL "
                        f"ORDER BY {column} {'ASC' if ascending else 'DESC'} LIMIT ?", (*hs, n))

    def dead(self, hookpoint: str | None = None):
        """Latents that never fired on the atlas's tokens."""
        hs = [self._hp(hookpoint)] if hookpoint is not None else self.hookpoints
        return self._df(f"SELECT hookpoint, latent FROM features WHERE n_fires = 0 AND hookpoint IN "
                        f"({','.join('?' * len(hs))}) ORDER BY hookpoint, latent", hs)

    def text(self, text: str | list[int], hookpoint: str | None = None, min_act: float = 0.0, model=None):
        """Run the model and the SAEs on `text` (a string, or token ids), after a BOS token as in training:
        DataFrame position, token, hookpoint, latent, act, label (every active latent at every position,
        strongest first per position; position 0 is the BOS token)."""
        import pandas as pd

        from saekit.model import harvest, load_model
        from saekit.run import Run

        hs = [self._hp(hookpoint)] if hookpoint is not None else self.hookpoints
        run = Run.open(self.meta["run"])
        model = model if model is not None else load_model(self.meta["model"])
        tok = model.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = bos + (list(text) if not isinstance(text, str) else tok(text, add_special_tokens=False).input_ids)
        n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
        if n_ctx and len(ids) > n_ctx:
            raise SaekitError(f"the text is {len(ids)} tokens long; the model reads at most {n_ctx}")
        toks = torch.tensor([ids])
        mask = ~torch.isin(toks, torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long))
        positions = mask[0].nonzero().flatten().tolist()
        if not positions:
            raise SaekitError("the text has no tokens to read")
        acts = next(harvest(model, toks, mask, hs, batch_size=1))
        rows = []
        for h in hs:
            sae = run.sae(h)
            with torch.no_grad():
                vals, idx = sae.encode(acts[h])
            labels = dict(self.db.execute("SELECT latent, label FROM features WHERE hookpoint = ?", (h,)))
            for i, p in enumerate(positions):
                for v, j in sorted(zip(vals[i].tolist(), idx[i].tolist(), strict=True), reverse=True):
                    if v > min_act:
                        rows.append((p, tok.decode([ids[p]]), h, j, v, labels.get(j)))
        return pd.DataFrame(rows, columns=["position", "token", "hookpoint", "latent", "act", "label"])


def _regexp(pattern, value):
    return value is not None and re.search(pattern, value) is not None
