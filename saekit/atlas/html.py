"""HTML views of an atlas: a static export (`saekit atlas export ATLAS DIR`: index.html with a
searchable feature list, one page per feature) and a local read-only server (`saekit atlas serve`,
loopback only, GET only) that also runs the model: the latents on a text, a steer box on each card
and an attribution view (`saekit.intervene`). Every string from the atlas and the request is
HTML-escaped; prompts are bounded (MAX_PROMPT characters, the model's context in tokens)."""

import html
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

from saekit.atlas.query import Atlas
from saekit.errors import SaekitError

STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:70em}table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}.ctx{font-family:monospace;white-space:pre-wrap}
.peak{outline:1px solid #000}.num{text-align:right}.charts{display:flex;gap:2em}.hist rect{fill:#e07000}
figure{margin:0}figcaption{font-size:80%;color:#555}"""

FILTER_JS = """const q=document.getElementById('q');q.addEventListener('input',()=>{let re;
try{re=new RegExp(q.value,'i')}catch(e){return}
for(const tr of document.querySelectorAll('#features tbody tr')){tr.hidden=!re.test(tr.dataset.text)}});"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{STYLE}</style>"
            f"</head><body>{body}{js}</body></html>")


def _shade(act: float, max_act: float) -> str:
    a = 0.0 if max_act <= 0 else max(0.0, min(1.0, act / max_act))
    return f"background:rgba(255,120,0,{a:.2f})"


def _svg_bars(values: list[float], tips: list[str], title: str, caption: str) -> str:
    """A small inline SVG bar chart, one bar per value, with a tooltip each."""
    w, h, top = 240, 60, max(max(values, default=0), 1e-30)
    bw = w / max(len(values), 1)
    bars = "".join(f"<rect x='{i * bw:.1f}' y='{h - h * v / top:.1f}' width='{max(bw - 1, 0.5):.1f}' "
                   f"height='{h * v / top:.1f}'><title>{_e(t)}</title></rect>"
                   for i, (v, t) in enumerate(zip(values, tips, strict=True)))
    return (f"<figure class='hist'><svg width='{w}' height='{h}' role='img' aria-label='{_e(title)}'>{bars}</svg>"
            f"<figcaption>{_e(title)}: {_e(caption)}</figcaption></figure>")


def _bars(counts: list[int], lo: float, hi: float, title: str) -> str:
    """A histogram over [lo, hi]."""
    return _svg_bars(counts, [str(c) for c in counts], title, f"{lo:.3g} … {hi:.3g}")


def _part_bars(parts, title: str) -> str:
    """One bar per named part (a crosscoder latent's decoder norm per target), names in the tooltips."""
    return _svg_bars(list(parts.norm), [f"{p}: {v:.3g}" for p, v in zip(parts.part, parts.norm, strict=True)],
                     title, f"{parts.part.iloc[0]} … {parts.part.iloc[-1]}")


def card_path(hookpoint: str, latent: int) -> str:
    """A feature page's path relative to the export root (and the server's URL path)."""
    return f"feature/{quote(hookpoint, safe='')}/{int(latent)}.html"


MAX_PROMPT = 1000  # characters of a prompt the server takes
STEER_TOKENS = 20  # tokens a steer box generates
STATIC_NOTE = ("<p><em>Steering and attribution run the model: they are on the pages <code>saekit atlas serve</code> "
               "serves, not on this static export.</em></p>")


def _steer_box(c, steer: dict | None) -> str:
    """A card's steer form (GET to the card itself) and, given `steer` (q, v), both continuations."""
    q, v = (steer or {}).get("q", ""), (steer or {}).get("v", "+8")
    form = (f"<h2>Steer</h2><form method='get'><input name='q' size='50' maxlength='{MAX_PROMPT}' value='{_e(q)}' "
            f"placeholder='a prompt to continue'> latent {c.latent} <input name='v' size='6' value='{_e(v)}' "
            "title='+V or -V adds, V sets, xS scales, zero or mean ablates'> <button>steer</button></form>")
    if not steer:
        return form
    from saekit.intervene import steer as run_steer

    res = run_steer(steer["run"], q, [f"{c.latent}={v}"], c.hookpoint, STEER_TOKENS, model=steer["model"])
    moves = "".join(f"<tr><td><code>{_e(repr(t))}</code></td><td class='num'>{a:.4f}</td><td class='num'>{b:.4f}</td>"
                    f"</tr>" for t, a, b in zip(res.next_token.token, res.next_token.p_clean, res.next_token.p_steered,
                                                strict=True))
    return (form + f"<table id='steer'><tr><th>clean</th><td class='ctx'>{_e(q)}<b>{_e(res.clean)}</b></td></tr>"
            f"<tr><th>steered</th><td class='ctx'>{_e(q)}<b>{_e(res.steered)}</b></td></tr></table>"
            "<p>next token, largest moves:</p><table><tr><th>token</th><th>p clean</th><th>p steered</th></tr>"
            f"{moves}</table>")


def render_card(atlas: Atlas, latent: int, hookpoint: str | None = None, root: str = "../../",
                steer: dict | None = None, serve: bool = False) -> str:
    """A feature's page; `serve`: with a steer box (`steer`: run, model, q, v to answer it)."""
    c = atlas.card(latent, hookpoint)

    def contexts(df) -> str:
        rows = []
        for toks, acts, peak, m in zip(df.tokens, df.acts, df.peak, df.max_act, strict=True):
            spans = "".join(f"<span class='{'peak' if i == peak else ''}' style='{_shade(a, c.max_act)}' "
                            f"title='{a:.3f}'>{_e(t)}</span>" for i, (t, a) in enumerate(zip(toks, acts, strict=True)))
            rows.append(f"<tr><td class='num'>{m:.3f}</td><td class='ctx'>{spans}</td></tr>")
        return "<table>" + "".join(rows) + "</table>" if rows else "<p>none</p>"

    def tokens(df) -> str:
        return ", ".join(f"<code>{_e(repr(t))}</code> ({v:+.2f})" for t, v in zip(df.token, df.value, strict=True))

    def links(hookpoints, latents, scores, labels=None) -> str:
        labels = [None] * len(latents) if labels is None else labels
        out = ", ".join(f"<a href='{root}{card_path(h, j)}'>{_e(h) + ' ' if h != c.hookpoint else ''}{int(j)}</a> "
                        f"({sc:.2f}{'' if lb is None else ', ' + _e(repr(lb))})"
                        for h, j, sc, lb in zip(hookpoints, latents, scores, labels, strict=True))
        return out or "none"

    def same(df):
        return [c.hookpoint] * len(df)

    score = "" if c.label_score is None else f" (score {c.label_score:.3f})"
    tags = (("lobe", c.lobe), ("cluster", c.cluster), ("absorbs", c.absorbs))
    extra = "".join(f", {name} {_e(v)}" for name, v in tags if v is not None)
    charts = _bars(c.hist, 0.0, c.max_act, "activations when firing")
    if c.logit_hist:
        lh = c.logit_hist
        charts += _bars(lh["counts"], lh["lo"], lh["hi"], "logit effects on the vocabulary")
    if c.part_norms is not None:
        charts += _part_bars(c.part_norms, "decoder norm per target")
    matches = ""
    if c.matches is not None:
        matches = ("<h2>Cross-layer matches</h2><p>"
                   f"{links(c.matches.other_hookpoint, c.matches.other_latent, c.matches.score.fillna(0))}</p>")
    n, o = c.neighbours, c.cooccurrence
    decoder, cooc = links(same(n), n.latent, n.cosine, n.label), links(same(o), o.latent, o.jaccard, o.label)
    body = (f"<p><a href='{root}index.html'>all features</a></p>"
            f"<h1>{_e(c.hookpoint)} latent {c.latent}</h1>"
            + (_steer_box(c, steer) if serve else STATIC_NOTE) +
            f"<p>label <code>{_e(repr(c.label))}</code>{_e(score)}; density {c.density:.4g}, mean activation "
            f"{c.mean_act:.4g}, max {c.max_act:.4g}{extra}</p><p>{_e(c.label_note())}</p>"
            f"<div class='charts'>{charts}</div>"
            f"<h2>Top contexts</h2>{contexts(c.top_examples)}"
            f"<h2>Across the activation range</h2>{contexts(c.quantile_examples)}"
            f"<h2>Logit effects</h2><p>promotes: {tokens(c.logits_top)}</p><p>suppresses: {tokens(c.logits_bottom)}</p>"
            f"<h2>Nearest decoder directions</h2><p>{decoder}</p><h2>Fires with</h2><p>{cooc}</p>{matches}")
    return _page(f"{c.hookpoint} {c.latent}", body)


def render_text(atlas: Atlas, text: str, model, root: str = "", per_token: int = 5) -> str:
    """The latents active on each token of `text`, strongest first (serve mode: runs the model)."""
    df = atlas.text(text, model=model)
    rows = []
    for p, g in df.groupby("position", sort=True):
        g = g.head(per_token)
        lats = ", ".join(f"<a href='{root}{card_path(h, j)}'>{int(j)}</a> ({a:.2f}"
                         f"{'' if lb is None else ', ' + _e(repr(lb))})"
                         for h, j, a, lb in zip(g.hookpoint, g.latent, g.act, g.label, strict=True))
        rows.append(f"<tr><td class='num'>{int(p)}</td><td class='ctx'>{_e(g.token.iloc[0])}</td><td>{lats}</td></tr>")
    body = (f"<p><a href='{root}index.html'>all features</a></p><h1>Latents on your text</h1>"
            f"{TEXT_FORM.format(_e(text))}"
            "<table id='text'><thead><tr><th>position</th><th>token</th><th>latents (activation, label)</th></tr>"
            "</thead><tbody>" + "".join(rows) + "</tbody></table>")
    return _page("Latents on your text", body)


TEXT_FORM = ("<form action='text.html' method='get'><input name='q' size='60' value='{}' "
             "placeholder='type text: which latents fire on it'> <button>run</button></form>")
ATTRIBUTE_FORM = ("<form action='attribute.html' method='get'><input name='q' size='50' value='{}' "
                  "placeholder='a prompt: which latents drive its next token'> target <input name='target' "
                  "size='8' value='{}' placeholder=\"' king'\"> against <input name='against' size='8' value='{}'> "
                  "<button>attribute</button></form>")


def render_attribution(q: str, target: str, against: str, res=None, hookpoint: str | None = None,
                       root: str = "", rows: int = 30) -> str:
    """The attribution form and, given `res` (a `saekit.intervene.Attribution` of the latents at
    `hookpoint`), its strongest rows linked to their cards."""
    body = (f"<p><a href='{root}index.html'>all features</a></p><h1>Attribution</h1>"
            + ATTRIBUTE_FORM.format(_e(q), _e(target), _e(against)))
    if res is not None:
        trs = "".join(f"<tr><td class='num'>{int(p)}</td><td class='ctx'>{_e(t)}</td><td><a href='{root}"
                      f"{card_path(hookpoint, j)}'>{int(j)}</a></td><td class='num'>{a:.3f}</td>"
                      f"<td class='num'>{x:+.4f}</td><td><code>{'' if lb is None else _e(repr(lb))}</code></td></tr>"
                      for p, t, j, a, x, lb in res.table.head(rows).itertuples(index=False, name=None))
        body += (f"<p>logit difference {res.metric:.4g}; the error term's attribution {res.error:.4g} (share "
                 f"{res.error_share:.1%})</p><table id='attribution'><thead><tr><th>position</th><th>token</th>"
                 "<th>latent</th><th>activation</th><th>attribution</th><th>label</th></tr></thead><tbody>"
                 + trs + "</tbody></table>")
    return _page("Attribution", body)


def render_index(atlas: Atlas, hookpoint: str | None = None, root: str = "", serve: bool = False) -> str:
    f = atlas.features(hookpoint)
    rows = []
    for h, j, d, m, lb, s in zip(f.hookpoint, f.latent, f.density, f.max_act, f.label, f.label_score, strict=True):
        text = f"{h} {j} {'' if lb is None else lb}"
        sc = "" if s is None or s != s else f"{s:.3f}"
        rows.append(f"<tr data-text='{_e(text)}'><td>{_e(h)}</td><td><a href='{root}{card_path(h, j)}'>{int(j)}</a>"
                    f"</td><td class='num'>{d:.4g}</td><td class='num'>{m:.4g}</td><td><code>"
                    f"{_e(repr(lb)) if lb is not None else ''}</code></td><td class='num'>{sc}</td></tr>")
    body = ("<h1>Feature atlas</h1>" + (TEXT_FORM.format("") + ATTRIBUTE_FORM.format("", "", "") if serve else "")
            + "<p><input id='q' placeholder='filter: regular expression over hookpoint, "
            "latent, label' size='50'></p><table id='features'><thead><tr><th>hookpoint</th><th>latent</th>"
            "<th>density</th><th>max</th><th>label</th><th>label score</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")
    return _page("Feature atlas", body, FILTER_JS)


def export_html(atlas_path: str | Path, out: str | Path | None = None, hookpoint: str | None = None,
                quiet: bool = True) -> Path:
    """Write a static site: OUT/index.html and OUT/feature/<hookpoint>/<latent>.html (a progress
    bar over the pages unless `quiet`). OUT defaults to `site/` beside the atlas file (inside its
    run folder, not wherever the command ran)."""
    from tqdm.auto import tqdm

    atlas = Atlas.open(atlas_path)
    out = Path(out) if out is not None else atlas.path.parent / "site"
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(render_index(atlas, hookpoint), encoding="utf-8")
    f = atlas.features(hookpoint)
    for h, j in tqdm(zip(f.hookpoint, f.latent, strict=True), total=len(f), disable=quiet, desc="atlas pages",
                     unit="page"):
        file = out / card_path(h, j)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(render_card(atlas, int(j), h), encoding="utf-8")
    return out


class _Handler(BaseHTTPRequestHandler):
    atlas: Atlas  # one open atlas for every request (it keeps its vocabulary, SAEs and model), used
    lock: threading.Lock  # by one request at a time
    model = None  # answers text queries; None: the atlas's own model, loaded on the first one

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: str, kind: str = "text/html; charset=utf-8"):
        data = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                                    "script-src 'unsafe-inline'")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's name)
        url, kind = urlparse(self.path), "text/html; charset=utf-8"
        with self.lock:
            try:
                code, body = 200, self._answer(url)
                if url.path == "/search.json":
                    kind = "application/json"
                elif body is None:
                    code, body = 404, _page("not found", f"<p>nothing at {_e(url.path)}</p>")
            except SaekitError as e:
                code = 404 if url.path.startswith("/feature/") and not url.query else 400
                body = _page("cannot answer", f"<p>{_e(e)}</p>")
        self._send(code, body, kind)

    def _answer(self, url) -> str | None:
        """The body for `url` (None: nothing there)."""
        args = {k: v[0] for k, v in parse_qs(url.query).items()}
        q = args.get("q", "")
        if len(q) > MAX_PROMPT:
            raise SaekitError(f"the prompt is {len(q):,} characters; the page takes at most {MAX_PROMPT:,}")
        if url.path in ("/", "/index.html"):
            return render_index(self.atlas, serve=True)
        if url.path == "/text.html":
            return render_text(self.atlas, q, self._model())
        if url.path == "/attribute.html":
            target, against, res = args.get("target", ""), args.get("against", ""), None
            h = self.atlas._hp(args.get("h"))
            if q:
                from saekit.intervene import attribute

                res = attribute(self.atlas.meta["run"], q, target, against or None, h, model=self._model())
            return render_attribution(q, target, against, res, h)
        if url.path == "/search.json":
            return self.atlas.search(q).to_json(orient="records")
        m = re.fullmatch(r"/feature/([^/]+)/(\d+)\.html", url.path)
        if m is None:
            return None
        steer = {"run": self.atlas.meta["run"], "model": self._model(), "q": q, "v": args.get("v", "+8")} if q else None
        return render_card(self.atlas, int(m.group(2)), unquote(m.group(1)), steer=steer, serve=True)

    def _model(self):
        """The model that answers text, steer and attribution queries (loaded on the first one)."""
        if type(self).model is None:
            from saekit.model import load_model

            type(self).model = load_model(self.atlas.meta["model"])
        return type(self).model


def make_server(atlas_path: str | Path, port: int = 8000, model=None) -> ThreadingHTTPServer:
    """A read-only server of the atlas on 127.0.0.1:`port` (0: any free port); call serve_forever().
    `model` answers text queries (default: the atlas's model, loaded on the first one)."""
    handler = type("AtlasHandler", (_Handler,), {"atlas": Atlas.open(atlas_path, shared=True),  # fails now if bad
                                                 "lock": threading.Lock(), "model": model})
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve_in_thread(atlas_path: str | Path, port: int = 0, model=None) -> ThreadingHTTPServer:
    server = make_server(atlas_path, port, model)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

