"""The atlas file: its schema, and read access (`Atlas`: cards, tables, search; `Card`).

Search (`Atlas.search`) is a Python regular expression registered as SQLite's REGEXP over the
labels and the top contexts' peak tokens. FTS5 is not used: it answers word queries, not regular
expressions, and its tokenizer drops the leading spaces and punctuation that BPE token labels
are made of; the tables it would index hold one row per latent, so a scan takes milliseconds.
"""

import functools
import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import torch

from saekit.errors import SaekitError
from saekit.run import ATLAS_FILE, choose_hookpoint

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE hookpoints (name TEXT PRIMARY KEY, n_latents INTEGER, d_in INTEGER, n_tokens INTEGER,
                         build_seconds REAL);
CREATE TABLE vocab (id INTEGER PRIMARY KEY, text TEXT);
CREATE TABLE features (hookpoint TEXT, latent INTEGER, n_fires INTEGER, density REAL, mean_act REAL, max_act REAL,
                       hist TEXT, logit_hist TEXT, label TEXT, label_token INTEGER, label_score REAL,
                       label_precision REAL, label_recall REAL, label_top_share REAL, label_quantile_share TEXT,
                       top_text TEXT, PRIMARY KEY (hookpoint, latent));
CREATE TABLE examples (hookpoint TEXT, latent INTEGER, kind TEXT, rank INTEGER, row INTEGER, max_act REAL,
                       peak INTEGER, peak_token INTEGER, tokens TEXT, acts TEXT);
CREATE INDEX examples_latent ON examples (hookpoint, latent, kind);
CREATE INDEX examples_peak ON examples (peak_token, kind);
CREATE TABLE logits (hookpoint TEXT, latent INTEGER, sign INTEGER, rank INTEGER, token INTEGER, value REAL);
CREATE INDEX logits_latent ON logits (hookpoint, latent);
CREATE TABLE neighbours (hookpoint TEXT, latent INTEGER, kind TEXT, rank INTEGER, other INTEGER, score REAL);
CREATE INDEX neighbours_latent ON neighbours (hookpoint, latent, kind);
CREATE TABLE parts (hookpoint TEXT, latent INTEGER, rank INTEGER, part TEXT, norm REAL);
CREATE INDEX parts_latent ON parts (hookpoint, latent);
"""


@dataclass
class Card:
    """One feature: statistics, examples, logit effects, neighbours and label."""

    hookpoint: str
    latent: int
    density: float
    mean_act: float
    max_act: float
    hist: list[int]  # activations in HIST_BINS equal bins of [0, max_act]
    logit_hist: dict | None  # {"lo", "hi", "counts"}: W_dec[i] @ W_U over the vocabulary
    label: str | None
    label_score: float | None  # F1 of "fires" against "the label token is here" (odd contexts)
    # how far the label holds, from the top down: its share of the top contexts' peak tokens, and
    # of the firing tokens in each of QUANTILES equal-count slices of the activations, strongest
    # first. A label can describe the bulk of the firing while the top contexts are about else.
    label_top_share: float | None
    label_quantile_share: list[float] | None
    top_examples: "object"  # DataFrame: tokens, acts, peak, max_act, row (of the held-out cache)
    quantile_examples: "object"
    logits_top: "object"  # DataFrame: token, value
    logits_bottom: "object"
    neighbours: "object"  # DataFrame: latent, cosine, label (nearest decoder rows)
    cooccurrence: "object"  # DataFrame: latent, jaccard, label (latents firing on the same tokens)
    matches: "object" = None  # DataFrame: other_hookpoint, other_latent, score (after add_analyses)
    lobe: int | None = None  # geometry co-occurrence lobe (after add_analyses)
    cluster: int | None = None  # multi-dimensional feature cluster, 0 = best scored (after add_analyses)
    absorbs: str | None = None  # letters this latent absorbs (after add_analyses)
    part_norms: "object" = None  # DataFrame: part, norm (a crosscoder's decoder norm per target, in order)

    def label_note(self) -> str:
        """Where the label holds, in words: its share of the top contexts and of each activation slice."""
        if self.label is None:
            return "no label (the latent fired in none of the contexts labels are chosen from)"
        n_top = len(self.top_examples)
        slices = ", ".join("-" if x is None else f"{100 * x:.0f} %" for x in self.label_quantile_share)
        hits = round(self.label_top_share * n_top)
        return (f"{self.label!r} is the peak token of {hits} of the {n_top} top contexts, and of {slices} of the "
                f"firing tokens in {len(self.label_quantile_share)} equal-count slices of the activations (strongest "
                "first)")

    def to_dict(self) -> dict:
        out = {}
        for k, v in self.__dict__.items():
            out[k] = v.to_dict(orient="records") if hasattr(v, "to_dict") else v
        return out

    def to_text(self) -> str:
        """The card as `saekit atlas query --feature` prints it: label, statistics, top contexts
        (the peak token in [[ ]]), logit effects, neighbours, added analyses and matches."""
        score = "none" if self.label_score is None else f"{self.label_score:.3g}"
        lines = [f"{self.hookpoint} latent {self.latent}: label {self.label!r} (score {score}), "
                 f"density {self.density:.4g}, mean {self.mean_act:.4g}, max {self.max_act:.4g}",
                 f"label: {self.label_note()}"]
        tags = (("lobe", self.lobe), ("cluster", self.cluster), ("absorbs letters", self.absorbs))
        added = [f"{k} {v}" for k, v in tags if v is not None]
        if added:  # from `saekit atlas add`
            lines.append("analyses: " + ", ".join(added))
        lines.append("top contexts:")
        ex = self.top_examples
        for toks, acts, peak in zip(ex.tokens, ex.acts, ex.peak, strict=True):
            text = "".join(f"[[{t}]]" if i == peak else t for i, t in enumerate(toks))
            lines.append(f"  {acts[peak]:8.3f}  {text!r}")
        lines.append("promotes: " + ", ".join(repr(t) for t in self.logits_top.token))
        lines.append("suppresses: " + ", ".join(repr(t) for t in self.logits_bottom.token))
        lines.append("neighbours: " + ", ".join(f"{j} ({c:.2f})" for j, c in zip(self.neighbours.latent,
                                                                                 self.neighbours.cosine, strict=True)))
        if self.matches is not None and len(self.matches):
            lines.append("matched to: " + ", ".join(f"{h} {j} ({sc:.2f})" for h, j, sc in
                                                    self.matches.itertuples(index=False, name=None)))
        return "\n".join(lines)


def _readable(query):
    """Turn what a damaged atlas file makes SQLite or the decoding of its rows raise into one
    SaekitError naming the file."""
    @functools.wraps(query)
    def wrapped(self, *args, **kwargs):
        try:
            return query(self, *args, **kwargs)
        except (sqlite3.Error, ValueError, IndexError, TypeError, KeyError) as e:
            raise SaekitError(f"{self.path} cannot be read ({type(e).__name__}: {e}); it may be damaged: rebuild it "
                              "with `saekit atlas build RUN`") from None
    return wrapped


class Atlas:
    """Read access to an atlas file (see `build_atlas`)."""

    def __init__(self, path: Path, db: sqlite3.Connection):
        self.path, self.db = path, db
        self.meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        self.hookpoints = [r[0] for r in db.execute("SELECT name FROM hookpoints ORDER BY rowid")]
        self._vocab, self._model, self._saes, self._labels = None, None, {}, {}

    @classmethod
    def open(cls, path: str | Path, shared: bool = False) -> "Atlas":
        """The atlas at `path` (a file or the run folder holding one), read-only. `shared`: usable
        from several threads, one at a time (the caller holds a lock)."""
        path = Path(path)
        if path.is_dir():
            path = path / ATLAS_FILE
        if not path.is_file():
            raise SaekitError(f"no atlas at {path}; build one with `saekit atlas build RUN`")
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=not shared)
            version = db.execute("SELECT version FROM schema_version").fetchone()
        except (sqlite3.DatabaseError, ValueError) as e:  # ValueError: text that is not UTF-8
            raise SaekitError(f"{path} is not a saekit atlas ({e}); rebuild it with `saekit atlas build RUN`") from None
        if version is None or version[0] != SCHEMA_VERSION:
            got = None if version is None else version[0]
            raise SaekitError(f"{path} has atlas schema version {got}, this saekit reads version {SCHEMA_VERSION}; "
                              "rebuild it with `saekit atlas build RUN`")
        db.create_function("regexp", 2, _regexp, deterministic=True)
        try:
            return cls(path, db)
        except (sqlite3.Error, ValueError, TypeError) as e:
            raise SaekitError(f"{path} cannot be read ({e}); it may be damaged: rebuild it with "
                              "`saekit atlas build RUN`") from None

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
    @_readable
    def features(self, hookpoint: str | None = None):
        """DataFrame: hookpoint, latent, density, mean_act, max_act, label, label_score (all hookpoints if None)."""
        cols = "hookpoint, latent, density, mean_act, max_act, label, label_score"
        if hookpoint is None:
            return self._df(f"SELECT {cols} FROM features ORDER BY hookpoint, latent")
        return self._df(f"SELECT {cols} FROM features WHERE hookpoint = ? ORDER BY latent", (self._hp(hookpoint),))

    @_readable
    def card(self, latent: int, hookpoint: str | None = None) -> Card:
        h = self._hp(hookpoint)
        row = self.db.execute("SELECT density, mean_act, max_act, hist, logit_hist, label, label_score, "
                              "label_top_share, label_quantile_share FROM features WHERE hookpoint = ? AND latent = ?",
                              (h, int(latent))).fetchone()
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

        def neighbours(kind, score):
            return self._df(f"SELECT n.other AS latent, n.score AS {score}, f.label FROM neighbours n JOIN features f "
                            "ON f.hookpoint = n.hookpoint AND f.latent = n.other WHERE n.hookpoint = ? AND "
                            "n.latent = ? AND n.kind = ? ORDER BY n.rank", (h, int(latent), kind))

        card = Card(h, int(latent), row[0], row[1], row[2], json.loads(row[3]), row[4] and json.loads(row[4]), row[5],
                    row[6], row[7], row[8] and json.loads(row[8]), examples("top"), examples("quantile"), logits(1),
                    logits(-1), neighbours("decoder", "cosine"), neighbours("cooccurrence", "jaccard"))
        if self._has_table("parts"):  # atlases built before crosscoders have no such table
            norms = self._df("SELECT part, norm FROM parts WHERE hookpoint = ? AND latent = ? ORDER BY rank",
                             (h, int(latent)))
            card.part_norms = norms if len(norms) else None
        if self._has_table("matches"):
            card.matches = self._df("SELECT other_hookpoint, other_latent, score FROM matches WHERE hookpoint = ? "
                                    "AND latent = ? ORDER BY other_hookpoint", (h, int(latent)))
            card.lobe, card.cluster, card.absorbs = self.db.execute(
                "SELECT lobe, cluster, absorbs FROM features WHERE hookpoint = ? AND latent = ?", (h, int(latent))
            ).fetchone()
        return card

    def _has_table(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() \
            is not None

    def similar(self, latent: int, hookpoint: str | None = None):
        """The latent's nearest decoder directions: DataFrame latent, cosine, label."""
        return self.card(latent, hookpoint).neighbours

    @_readable
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

    @_readable
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

    @_readable
    def top_by(self, column: str, n: int = 20, hookpoint: str | None = None, ascending: bool = False):
        allowed = ("density", "mean_act", "max_act", "label_score", "n_fires")
        if column not in allowed:
            raise SaekitError(f"cannot sort by {column!r}; choose one of {', '.join(allowed)}")
        hs = [self._hp(hookpoint)] if hookpoint is not None else self.hookpoints
        return self._df(f"SELECT hookpoint, latent, density, max_act, label, label_score FROM features WHERE "
                        f"hookpoint IN ({','.join('?' * len(hs))}) AND {column} IS NOT NULL "
                        f"ORDER BY {column} {'ASC' if ascending else 'DESC'} LIMIT ?", (*hs, n))

    @_readable
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
        if model is None:
            if self._model is None:
                self._model = load_model(self.meta["model"])
            model = self._model
        tok = model.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = bos + (list(text) if not isinstance(text, str) else tok(text, add_special_tokens=False).input_ids)
        n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
        if n_ctx and len(ids) > n_ctx:
            raise SaekitError(f"the text is {len(ids)} tokens long; the model reads at most {n_ctx}")
        if any(not 0 <= i < len(tok) for i in ids):
            raise SaekitError(f"token ids must lie in 0..{len(tok) - 1}")
        toks = torch.tensor([ids])
        mask = ~torch.isin(toks, torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long))
        positions = mask[0].nonzero().flatten().tolist()
        if not positions:
            raise SaekitError("the text has no tokens to read")
        acts = next(harvest(model, toks, mask, hs, batch_size=1))
        words = [tok.decode([ids[p]]) for p in positions]
        rows = []
        for h in hs:
            if h not in self._saes:  # the SAE and its labels, once per atlas
                self._saes[h] = Run.open(self.meta["run"]).sae(h)
                self._labels[h] = dict(self.db.execute("SELECT latent, label FROM features WHERE hookpoint = ?", (h,)))
            labels = self._labels[h]
            with torch.no_grad():
                vals, idx = self._saes[h].encode(acts[h])
            for p, w, vs, js in zip(positions, words, vals.tolist(), idx.tolist(), strict=True):
                rows += [(p, w, h, j, v, labels.get(j)) for v, j in sorted(zip(vs, js, strict=True), reverse=True)
                         if v > min_act]
        return pd.DataFrame(rows, columns=["position", "token", "hookpoint", "latent", "act", "label"])


def _regexp(pattern, value):
    return value is not None and re.search(pattern, value) is not None
