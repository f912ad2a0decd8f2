"""HTML views of an atlas: a static export (`saekit atlas export ATLAS DIR`: index.html with a
searchable feature list, one page per feature) and a local read-only server (`saekit atlas serve`,
loopback only, GET only). Every string from the atlas is HTML-escaped."""

import html
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

from saekit.atlas import Atlas
from saekit.errors import SaekitError

STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:70em}table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}.ctx{font-family:monospace;white-space:pre-wrap}
.peak{outline:1px solid #000}.num{text-align:right}"""

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


def card_path(hookpoint: str, latent: int) -> str:
    """A feature page's path relative to the export root (and the server's URL path)."""
    return f"feature/{quote(hookpoint, safe='')}/{int(latent)}.html"


def render_card(atlas: Atlas, latent: int, hookpoint: str | None = None, root: str = "../../") -> str:
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

    neigh = ", ".join(f"<a href='{root}{card_path(c.hookpoint, j)}'>{int(j)}</a> ({cos:.2f}, {_e(repr(lb))})"
                      for j, cos, lb in zip(c.neighbours.latent, c.neighbours.cosine, c.neighbours.label, strict=True))
    score = "" if c.label_score is None else f" (score {c.label_score:.3f})"
    body = (f"<p><a href='{root}index.html'>all features</a></p>"
            f"<h1>{_e(c.hookpoint)} latent {c.latent}</h1>"
            f"<p>label <code>{_e(repr(c.label))}</code>{_e(score)}; density {c.density:.4g}, mean activation "
            f"{c.mean_act:.4g}, max {c.max_act:.4g}; histogram {_e(c.hist)}</p>"
            f"<h2>Top contexts</h2>{contexts(c.top_examples)}"
            f"<h2>Across the activation range</h2>{contexts(c.quantile_examples)}"
            f"<h2>Logit effects</h2><p>promotes: {tokens(c.logits_top)}</p><p>suppresses: {tokens(c.logits_bottom)}</p>"
            f"<h2>Nearest decoder directions</h2><p>{neigh}</p>")
    return _page(f"{c.hookpoint} {c.latent}", body)


def render_index(atlas: Atlas, hookpoint: str | None = None, root: str = "") -> str:
    f = atlas.features(hookpoint)
    rows = []
    for h, j, d, m, lb, s in zip(f.hookpoint, f.latent, f.density, f.max_act, f.label, f.label_score, strict=True):
        text = f"{h} {j} {'' if lb is None else lb}"
        sc = "" if s is None or s != s else f"{s:.3f}"
        rows.append(f"<tr data-text='{_e(text)}'><td>{_e(h)}</td><td><a href='{root}{card_path(h, j)}'>{int(j)}</a>"
                    f"</td><td class='num'>{d:.4g}</td><td class='num'>{m:.4g}</td><td><code>"
                    f"{_e(repr(lb)) if lb is not None else ''}</code></td><td class='num'>{sc}</td></tr>")
    body = ("<h1>Feature atlas</h1><p><input id='q' placeholder='filter: regular expression over hookpoint, "
            "latent, label' size='50'></p><table id='features'><thead><tr><th>hookpoint</th><th>latent</th>"
            "<th>density</th><th>max</th><th>label</th><th>label score</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")
    return _page("Feature atlas", body, FILTER_JS)


def export_html(atlas_path: str | Path, out: str | Path, hookpoint: str | None = None) -> Path:
    """Write a static site: OUT/index.html and OUT/feature/<hookpoint>/<latent>.html."""
    atlas = Atlas.open(atlas_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(render_index(atlas, hookpoint), encoding="utf-8")
    f = atlas.features(hookpoint)
    for h, j in zip(f.hookpoint, f.latent, strict=True):
        file = out / card_path(h, j)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(render_card(atlas, int(j), h), encoding="utf-8")
    return out


class _Handler(BaseHTTPRequestHandler):
    atlas_path: Path

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
        atlas = Atlas.open(self.atlas_path)  # one connection per request: sqlite objects stay in their thread
        try:
            url = urlparse(self.path)
            if url.path in ("/", "/index.html"):
                return self._send(200, render_index(atlas))
            m = re.fullmatch(r"/feature/([^/]+)/(\d+)\.html", url.path)
            if m:
                return self._send(200, render_card(atlas, int(m.group(2)), unquote(m.group(1))))
            if url.path == "/search.json":
                q = parse_qs(url.query).get("q", [""])[0]
                return self._send(200, atlas.search(q).to_json(orient="records"), "application/json")
            return self._send(404, _page("not found", f"<p>nothing at {_e(url.path)}</p>"))
        except SaekitError as e:
            return self._send(404, _page("not found", f"<p>{_e(e)}</p>"))
        finally:
            atlas.db.close()


def make_server(atlas_path: str | Path, port: int = 8000) -> ThreadingHTTPServer:
    """A read-only server of the atlas on 127.0.0.1:`port` (0: any free port); call serve_forever()."""
    Atlas.open(atlas_path).db.close()  # fail now on a missing or old atlas
    handler = type("AtlasHandler", (_Handler,), {"atlas_path": Path(atlas_path)})
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve_in_thread(atlas_path: str | Path, port: int = 0) -> ThreadingHTTPServer:
    server = make_server(atlas_path, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

