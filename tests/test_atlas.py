"""The feature atlas: a hand-built run whose latents fire exactly on planted tokens (labels, token,
search, cards, logit effects, bad inputs), then a tiny real run of the offline model (recorded
peaks agree with re-encoding, `text` finds the latent at its peak, the CLI)."""

import html
import json
import sqlite3

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saekit import cli
from saekit.activations import build_cache, cache_path
from saekit.atlas import Atlas, build_atlas
from saekit.config import TrainConfig
from saekit.errors import SaekitError
from saekit.run import Run
from saekit.sae import SAE, SAEConfig

HOOK = "blocks.0.hook_resid_post"
V, D, M, N_CTX, CTX = 60, 8, 8, 40, 32
PLANTED = {0: 11, 1: 22, 2: 33, 3: 44}  # latent -> the only token it fires on; latents 4..7 never fire
NAMES = {11: " king", 22: " queen", 33: " castle", 44: " sword"}


class FakeTokenizer:
    bos_token_id = 0
    all_special_ids = [0]

    def __len__(self):
        return V

    def decode(self, ids):
        return "".join(NAMES.get(i, f"<{i}>") for i in ids)


class FakeModel:
    tokenizer = FakeTokenizer()

    def __init__(self):
        self.W_U = torch.zeros(D, V)
        for j, t in PLANTED.items():
            self.W_U[j, t], self.W_U[j, t + 1] = 5.0, -5.0


def planted_run(root, **dictionary):
    """An empty run of the planted model's hookpoints (or `sources=`) and N_CTX random contexts
    of CTX tokens, each starting with the special token 0: (cfg, run, tokens, mask, generator)."""
    cfg = TrainConfig(**(dictionary or {"hookpoints": [HOOK]}), out=str(root / "run"), cache_dir=str(root / "cache"),
                      n_tokens=1000, val_tokens=100, ctx_len=CTX)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, V, (N_CTX, CTX), generator=g)
    tokens[:, 0] = 0
    return cfg, Run.create(cfg), tokens, tokens != 0, g


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    cfg, run, tokens, mask, g = planted_run(tmp_path_factory.mktemp("planted"))
    rows = tokens[mask]
    acts = 0.3 * torch.rand(len(rows), D, generator=g)  # below the encoder's bias: never fires
    for j, t in PLANTED.items():
        hit = rows == t
        acts[hit, j] = 1.0 + torch.rand(int(hit.sum()), generator=g)
    sae = SAE(SAEConfig(d_in=D, n_latents=M, k=M, architecture="relu", hookpoint=HOOK))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(M, D))
        sae.W_dec.copy_(torch.eye(M, D) + 0.01 * torch.arange(M * D).view(M, D) / (M * D))
        sae.b_enc.fill_(-0.5)
    sae.save(run.path / HOOK)
    ctx, pos = mask.nonzero(as_tuple=True)
    build_cache(cache_path(cfg, "train"), iter([{HOOK: acts, "_context": ctx, "_position": pos, "_token": rows}]),
                {"model": cfg.model})
    path = build_atlas(run, model=FakeModel())
    return Atlas.open(path), tokens, mask, acts


def _content(path) -> dict:
    """Every table of an atlas file, sorted, without build times and the build's date."""
    db = sqlite3.connect(path)
    out = {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
           for t in ("features", "examples", "logits", "neighbours", "vocab")}
    out["meta"] = {k: v for k, v in db.execute("SELECT key, value FROM meta") if k != "built"}
    out["hookpoints"] = db.execute("SELECT name, n_latents, d_in, n_tokens FROM hookpoints").fetchall()
    db.close()
    return out


def test_builds_under_either_cpu_decision_agree_when_the_run_records_its_encoder_path(tmp_path, monkeypatch):
    """The CPU encoder path comes from the run (the SAE's cfg.json), not from how this CPU looks
    now: two builds with the bf16 capability check forced each way give the same atlas, which
    records the path. Without a recorded path the two builds differ (the test can tell)."""
    monkeypatch.delenv("SAEKIT_ENCODER", raising=False)
    d, m, n_ctx = 64, 256, 64
    cfg = TrainConfig(hookpoints=[HOOK], out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), n_tokens=1000,
                      val_tokens=100, ctx_len=CTX)
    run = Run.create(cfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, V, (n_ctx, CTX), generator=g)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    ctx, pos = mask.nonzero(as_tuple=True)
    acts = torch.randn(int(mask.sum()), d, generator=g) * 3
    build_cache(cache_path(cfg, "train"), iter([{HOOK: acts, "_context": ctx, "_position": pos,
                                                  "_token": tokens[mask]}]), {"model": cfg.model})
    model = FakeModel()
    model.W_U = torch.randn(d, V, generator=g)
    sae = SAE(SAEConfig(d_in=d, n_latents=m, k=8, hookpoint=HOOK))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(m, generator=g))
    contents = {}
    for path in (None, "bf16+fp32-rescore", "fp32"):
        sae.cfg.encoder_path = path
        sae.save(run.path / HOOK)
        for bf16 in (True, False):
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda bf16=bf16: bf16)
            contents[path, bf16] = _content(build_atlas(run, model=model, out=tmp_path / f"{path}{bf16}.sqlite"))
    assert contents[None, True] != contents[None, False]
    assert json.loads(contents[None, True]["meta"]["encoder_path"]) == {HOOK: "bf16+fp32-rescore"}
    assert json.loads(contents[None, False]["meta"]["encoder_path"]) == {HOOK: "fp32"}
    for recorded in ("bf16+fp32-rescore", "fp32"):
        assert contents[recorded, True] == contents[recorded, False]
        assert json.loads(contents[recorded, True]["meta"]["encoder_path"]) == {HOOK: recorded}


def test_planted_labels_and_features(planted):
    atlas, *_ = planted
    f = atlas.features()
    assert list(f.columns) == ["hookpoint", "latent", "density", "mean_act", "max_act", "label", "label_score"]
    assert len(f) == M
    for j, t in PLANTED.items():
        row = f[f.latent == j].iloc[0]
        assert row.label == NAMES[t] and row.label_score == pytest.approx(1.0)
    assert (f[f.latent >= 4].density == 0).all() and f[f.latent >= 4].label.isna().all()
    assert list(atlas.dead().latent) == [4, 5, 6, 7]


def test_planted_token_search_card(planted):
    atlas, tokens, mask, acts = planted
    assert atlas.token(" queen").latent.tolist() == [1]
    assert set(atlas.search(r"^ (king|sword)$").latent) == {0, 3}
    card = atlas.card(2)
    assert card.label == " castle"
    top, rows = card.top_examples, tokens[mask]
    ctx_of_row = mask.nonzero()[:, 0]
    castle = (rows == 33).nonzero().flatten()
    value = acts[castle, 2] - 0.5  # the latent's activation on each " castle" token
    # one example per context (its strongest " castle"), strongest contexts first
    best = {}
    for r, v in zip(castle.tolist(), value.tolist(), strict=True):
        c = int(ctx_of_row[r])
        if c not in best or v > best[c][1]:
            best[c] = (r, v)
    want = sorted(best.values(), key=lambda rv: -rv[1])[:20]
    assert top.row.tolist() == [r for r, _ in want]
    assert top.max_act.tolist() == pytest.approx([v for _, v in want])
    for t, a, p, m in zip(top.tokens, top.acts, top.peak, top.max_act, strict=True):
        assert t[p] == " castle" and a[p] == pytest.approx(m, abs=1e-5)
    assert card.max_act == pytest.approx(float(value.max()))
    # quantile examples: one from each of 5 equal-count slices of the sorted activations
    q, ranked = card.quantile_examples, value.sort(descending=True).values.tolist()
    assert len(q) == 5
    for i, m in enumerate(q.max_act):
        assert m in [pytest.approx(v) for v in ranked[i * len(ranked) // 5 : (i + 1) * len(ranked) // 5 + 1]]
    assert card.logits_top.token[0] == " castle" and card.logits_bottom.token[0] == "<34>"
    assert len(card.neighbours) == 7 and 2 not in set(card.neighbours.latent)
    assert json.dumps(card.to_dict())  # plain data
    assert sum(card.hist) == int((rows == 33).sum())


def test_add_analyses_without_rebuild(planted, tmp_path):
    from saekit.atlas import add_analyses
    from saekit.matching import Match

    atlas, *_ = planted
    run = Run.open(atlas.meta["run"])
    copy = tmp_path / "atlas.sqlite"
    copy.write_bytes(atlas.path.read_bytes())
    other = "blocks.1.hook_resid_post"
    (run.analysis_dir / "matches").mkdir()
    Match(torch.tensor([3, 2, 1, 0, -1, -1, -1, -1]), torch.tensor([0.9, 0.8, 0.7, 0.6] + [float("nan")] * 4), M,
          "decoder", "exact").save(run.analysis_dir / "matches" / f"{HOOK}__{other}.json")
    below = "blocks.-1.hook_resid_post"  # a layer before the atlas's: its matches arrive at HOOK
    Match(torch.tensor([0, -1, -1, -1, -1, -1, -1, -1]), torch.tensor([0.5] + [float("nan")] * 7), M,
          "decoder", "exact").save(run.analysis_dir / "matches" / f"{below}__{HOOK}.json")
    run.write_json("analysis/report.json", {HOOK: {"geometry": {"lobes": {"labels": [0, 0, 1, 1, -1, -1, -1, -1]},
                                                                "multidim": [{"latents": [2, 3]}, {"latents": [0]}]},
                                                   "absorption": {"absorbing_latents": {"k": [0], "q": [1, 0]}}}})
    assert add_analyses(copy, run) == {"matches": 5, "lobe": M, "cluster": 3, "absorbs": 2}
    card = Atlas.open(copy).card(0)
    assert card.matches.sort_values("other_hookpoint").to_dict("records") == [
        {"other_hookpoint": below, "other_latent": 0, "score": pytest.approx(0.5)},
        {"other_hookpoint": other, "other_latent": 3, "score": pytest.approx(0.9)}]
    assert card.lobe == 0 and card.absorbs == "k,q" and card.cluster == 1
    assert Atlas.open(copy).card(3).cluster == 0 and Atlas.open(copy).card(5).cluster is None
    assert add_analyses(copy, run)["matches"] == 5  # again: replaced, not added twice
    assert len(Atlas.open(copy).card(1).matches) == 1


def test_export_defaults_beside_the_atlas(planted, tmp_path, capsys):
    import shutil

    atlas, *_ = planted
    (tmp_path / "run").mkdir()
    shutil.copy(atlas.path, tmp_path / "run" / "atlas.sqlite")
    assert cli.main(["atlas", "export", str(tmp_path / "run" / "atlas.sqlite")]) == 0
    assert (tmp_path / "run" / "site" / "index.html").is_file()
    assert f"written to {tmp_path / 'run' / 'site'}/index.html" in capsys.readouterr().out


def test_export_and_serve_escape_everything(planted, tmp_path):
    import urllib.error
    import urllib.request

    from saekit.atlas.html import STATIC_NOTE, serve_in_thread

    atlas, *_ = planted
    assert cli.main(["atlas", "export", str(atlas.path), str(tmp_path / "site")]) == 0
    index = (tmp_path / "site" / "index.html").read_text()
    assert "feature/blocks.0.hook_resid_post/2.html" in index and "&#x27; castle&#x27;" in index
    page = (tmp_path / "site" / "feature" / HOOK / "2.html").read_text()
    assert "castle" in page and "&lt;34&gt;" in page and "<34>" not in page  # vocab "<34>" is escaped
    server = serve_in_thread(atlas.path)
    try:
        assert server.server_address[0] == "127.0.0.1"
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/feature/{HOOK}/2.html") as r:  # the static page plus a steer box
            served = r.read().decode()
        assert r.status == 200 and STATIC_NOTE in page and "<button>steer</button>" in served
        assert served.split("<h2>Top contexts")[1] == page.split("<h2>Top contexts")[1]
        with urllib.request.urlopen(f"{base}/search.json?q=castle") as r:
            assert [x["latent"] for x in json.loads(r.read())] == [2]
        for path, code in (("/feature/x/1.html", 404), (f"/feature/{HOOK}/99.html", 404), ("/<script>", 404)):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + path)
            assert e.value.code == code and b"<script>" not in e.value.read()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(base + "/", data=b"x", method="POST"))
        assert e.value.code == 501
    finally:
        server.shutdown()
        server.server_close()


def test_pages_in_a_headless_browser(planted, tmp_path):
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    from saekit.atlas.html import export_html, serve_in_thread

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromedriver are not installed")
    atlas, *_ = planted
    export_html(atlas.path, tmp_path / "site")
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium")
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    server = serve_in_thread(atlas.path)
    try:
        starts = ((tmp_path / "site" / "index.html").as_uri(), f"http://127.0.0.1:{server.server_address[1]}/")
        for n, start in enumerate(starts):
            driver.get(start)
            rows = driver.find_elements(By.CSS_SELECTOR, "#features tbody tr")
            assert len(rows) == M
            driver.find_element(By.ID, "q").send_keys("castle")
            shown = [r for r in rows if r.is_displayed()]
            assert len(shown) == 1 and "castle" in shown[0].text
            shown[0].find_element(By.TAG_NAME, "a").click()
            assert driver.title == f"{HOOK} 2"
            peaks = driver.find_elements(By.CSS_SELECTOR, "span.peak")
            assert peaks and all(p.get_attribute("textContent") == " castle" for p in peaks)
            assert driver.save_screenshot(str(tmp_path / f"card{n}.png"))  # kept for a look: pytest --basetemp
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


def test_bad_inputs(planted, tmp_path):
    atlas, *_ = planted
    with pytest.raises(SaekitError, match="latent 99 is not in"):
        atlas.card(99)
    with pytest.raises(SaekitError, match="not one token"):
        atlas.token(" dragonfly")
    with pytest.raises(SaekitError, match="bad regular expression"):
        atlas.search("(")
    with pytest.raises(SaekitError, match="no atlas at"):
        Atlas.open(tmp_path / "missing.sqlite")
    old = tmp_path / "old.sqlite"
    old.write_bytes(atlas.path.read_bytes())
    with sqlite3.connect(old) as db:
        db.execute("UPDATE schema_version SET version = 0")
    with pytest.raises(SaekitError, match="schema version 0"):
        Atlas.open(old)
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database")
    with pytest.raises(SaekitError, match="not a saekit atlas"):
        Atlas.open(junk)
    # a run whose cache records no token ids (bare activations) cannot give an atlas its contexts
    run = Run.open(atlas.meta["run"])
    cfg = TrainConfig(**{**vars(run.config), "cache_dir": str(tmp_path / "cache")})
    bare = Run.create(TrainConfig(**{**vars(cfg), "out": str(tmp_path / "bare_run")}))
    run.sae().save(bare.path / HOOK)
    build_cache(cache_path(cfg, "train"), iter([{HOOK: torch.rand(50, D)}]), {"model": cfg.model})
    with pytest.raises(SaekitError, match="records no token ids"):
        build_atlas(bare, model=FakeModel())


# -- a tiny real run of the offline model ---------------------------------------------------
REAL = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def real(act_cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("atlas_real") / "run"
    args = ["--hookpoints", REAL, "--n_tokens", "6000", "--val_tokens", "600", "--ctx_len", "64", "--epochs", "2",
            "--expansion", "2", "--k", "16", "--batch_size", "500", "--eval_contexts", "2", "--cache_dir",
            str(act_cache_dir), "--dead_tokens", "3000", "--out", str(run)]
    assert cli.main(["train", *args, "--quiet"]) == 0
    assert cli.main(["atlas", "build", str(run), "--quiet"]) == 0
    return Run.open(run), Atlas.open(run / "atlas.sqlite")


def test_real_card_peaks_match_reencoding(real, smollm2):
    import urllib.error
    import urllib.parse
    import urllib.request

    import numpy as np

    from saekit.atlas.html import serve_in_thread
    from saekit.codes import encode_all
    from saekit.pipeline import contexts

    run, atlas = real
    f = atlas.features()
    j = int(f.sort_values("max_act").latent.iloc[-1])
    card = atlas.card(j)
    top = card.top_examples.iloc[0]
    assert top.max_act == pytest.approx(card.max_act, rel=1e-5)
    sae, split = run.sae(REAL), atlas.meta["split"]
    acts = run.cache(split).tensor(REAL)
    with torch.no_grad():
        vals, idx = sae.encode(acts[int(top.row)].unsqueeze(0))
    assert float(vals[idx == j].sum()) == pytest.approx(top.max_act, rel=1e-5)
    # co-occurrence neighbours: the latents of highest Jaccard overlap with j's firing tokens
    fires = encode_all(sae, acts).fires().tocsc().astype(float)
    both = (fires[:, [j]].T @ fires).toarray().ravel()
    count = fires.sum(0).A1
    jac = both / np.maximum(count[j] + count - both, 1)
    jac[j] = -1
    co = card.cooccurrence
    assert len(co) == 10 and co.jaccard.tolist() == pytest.approx(sorted(jac, reverse=True)[:10], rel=1e-5)
    assert jac[co.latent].tolist() == pytest.approx(co.jaccard.tolist(), rel=1e-5)
    # the model on the context up to the peak finds the latent there, at about the recorded activation
    tokens, mask = contexts(run.config, smollm2.tokenizer)[split]
    c, p = (int(x) for x in mask.nonzero()[int(top.row)])
    assert smollm2.tokenizer.decode([int(tokens[c, p])]) == top.tokens[top.peak]
    df = atlas.text(tokens[c, 1 : p + 1].tolist(), model=smollm2)
    at_peak = df[(df.position == p) & (df.latent == j)]
    assert len(at_peak) == 1 and at_peak.act.iloc[0] == pytest.approx(top.max_act, rel=0.05, abs=0.05)
    with pytest.raises(SaekitError, match="the model reads at most"):
        atlas.text([1000] * 9000, model=smollm2)
    # the served text box: the same latents, every string escaped
    server = serve_in_thread(atlas.path, model=smollm2)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        text = smollm2.tokenizer.decode(tokens[c, 1 : p + 1].tolist())
        with urllib.request.urlopen(f"{base}/text.html?{urllib.parse.urlencode({'q': text})}") as r:
            page = r.read().decode()
        assert f"feature/{REAL}/{j}.html" in page
        with urllib.request.urlopen(f"{base}/text.html?q=%3Cscript%3Ealert(1)%3C/script%3E") as r:
            page = r.read().decode()
        assert "&lt;script&gt;" in page and "<script>alert" not in page
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/text.html?q=" + "a%20" * 9000)
        assert e.value.code == 400 and b"the page takes at most 1,000" in e.value.read()
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(SaekitError, match="no tokens"):
        atlas.text("", model=smollm2)
    with pytest.raises(SaekitError, match="bare SAE folder"):
        build_atlas(run.path / REAL)
    with pytest.raises(SaekitError, match="--tokens must be >= 1"):
        build_atlas(run, tokens=0)


def test_served_steer_box_and_attribution(real, smollm2):
    """A card's steer box answers with both continuations and an attribution view with the latents,
    as `saekit.intervene` gives them; prompts are escaped and bounded."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from saekit.atlas.html import MAX_PROMPT, serve_in_thread
    from saekit.intervene import attribute, steer

    run, atlas = real
    prompt = "The <b>king</b> said"
    server = serve_in_thread(atlas.path, model=smollm2)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/feature/{REAL}/3.html?" + urllib.parse.urlencode({"q": prompt,
                                                                                              "v": "+30"})) as r:
            page = r.read().decode()
        res = steer(run, prompt, {3: "+30"}, max_new_tokens=20, model=smollm2)
        assert html.escape(res.steered, quote=True) in page and "<b>king" not in page and "&lt;b&gt;king" in page
        q = urllib.parse.urlencode({"q": prompt, "target": " queen"})
        with urllib.request.urlopen(f"{base}/attribute.html?{q}") as r:
            page = r.read().decode()
        top = attribute(run, prompt, " queen", model=smollm2).table.iloc[0]
        assert f"feature/{REAL}/{int(top.latent)}.html" in page and "<b>king" not in page
        for path, message in ((f"/attribute.html?q={'a' * (MAX_PROMPT + 1)}", b"at most"),
                              ("/attribute.html?q=x&target=%20kingdom%20of", b"give one token"),
                              (f"/feature/{REAL}/3.html?q=x&v=up", b"cannot read the edit")):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + path)
            assert e.value.code == 400 and message in e.value.read()
    finally:
        server.shutdown()
        server.server_close()


def test_atlas_cli(real, tmp_path, capsys):
    run, atlas = real
    path = str(atlas.path)
    capsys.readouterr()
    assert cli.main(["atlas", "query", path, "--feature", "3", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["latent"] == 3 and len(card["top_examples"]) <= 20 and len(card["logits_top"]) == 10
    assert cli.main(["atlas", "query", path, "--top-by", "max_act", "--limit", "5", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5
    assert cli.main(["atlas", "query", path, "--search", ".", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    assert cli.main(["atlas", "query", path, "--dead"]) == 0
    assert cli.main(["atlas", "query", path, "--feature", "100000"]) == 2
    assert "latent 100000 is not in" in capsys.readouterr().err
    assert cli.main(["atlas", "query", str(tmp_path / "none.sqlite"), "--dead"]) == 2
    assert "no atlas at" in capsys.readouterr().err
    assert cli.main(["atlas", "query", path, "--dead", "--dense"]) == 2
    assert cli.main(["atlas", "add", path]) == 0  # a run with no analyses: nothing to add, nothing breaks
    assert "0 matches" in capsys.readouterr().out


FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def answers_or_refuses(query):
    try:
        query()
    except SaekitError:
        pass


@FUZZ
@given(latent=st.integers(-2**40, 2**40), word=st.text(max_size=12), hook=st.none() | st.text(max_size=30),
       column=st.text(max_size=12) | st.sampled_from(["density", "label_score"]))
def test_queries_on_any_input(planted, latent, word, hook, column):
    """Every query answers or raises SaekitError, whatever it is given."""
    atlas, *_ = planted
    for query in (lambda: atlas.card(latent, hook), lambda: atlas.token(word, hook), lambda: atlas.search(word, hook),
                  lambda: atlas.top_by(column, 5, hook), lambda: atlas.features(hook), lambda: atlas.dead(hook)):
        answers_or_refuses(query)


@FUZZ
@given(st.data())
def test_damaged_atlas_file(planted, tmp_path, data):
    """A truncated or bit-flipped atlas opens and answers, or raises SaekitError on open or query."""
    atlas, *_ = planted
    blob = atlas.path.read_bytes()
    n = data.draw(st.integers(0, len(blob)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)), max_size=6))
    b = bytearray(blob[:n] if data.draw(st.booleans()) else blob)
    for i, x in flips:
        if i < len(b):
            b[i] ^= x
    path = tmp_path / "damaged.sqlite"
    path.write_bytes(bytes(b))
    try:
        damaged = Atlas.open(path)
    except SaekitError:
        return
    for query in (lambda: damaged.features(), lambda: damaged.card(2), lambda: damaged.token(" king"),
                  lambda: damaged.search("castle"), lambda: damaged.top_by("density"), lambda: damaged.dead()):
        answers_or_refuses(query)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=40), min_size=10, max_size=10))
def test_server_on_any_path(planted, paths):
    """Any GET path is answered 200, 400 or 404, and nothing from the request comes back unescaped."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from saekit.atlas.html import serve_in_thread

    atlas, *_ = planted
    server = serve_in_thread(atlas.path)
    try:
        for path in paths:
            url = f"http://127.0.0.1:{server.server_address[1]}/" + urllib.parse.quote(path)
            try:
                with urllib.request.urlopen(url) as r:
                    status, body = r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read().decode()
            assert status in (200, 400, 404)
            assert body.count("<script") == body.count("<script>const q=")  # the page's own filter script only
    finally:
        server.shutdown()
        server.server_close()


def test_label_shares_match_reencoding(real):
    """The card's label shares, against the SAE's codes on the atlas's tokens recounted here."""
    from saekit.codes import encode_all

    run, atlas = real
    split = atlas.meta["split"]
    codes = encode_all(run.sae(REAL), run.cache(split).tensor(REAL))
    tok = run.cache(split).rows()["_token"].long()
    f = atlas.features().dropna(subset=["label"])
    checked = 0
    for j in f.sort_values("density").latent.iloc[-40::4]:  # ten labelled latents, dense enough for 5 slices
        card = atlas.card(int(j))
        label_token = atlas.db.execute("SELECT label_token FROM features WHERE latent = ?", (int(j),)).fetchone()[0]
        hit = codes.values * (codes.indices == j)
        rows = hit.sum(1).nonzero().flatten()
        order = hit.sum(1)[rows].argsort(descending=True, stable=True)
        on = (tok[rows[order]] == label_token).double()  # strongest first
        slice_of = torch.arange(len(on)) * 5 // len(on)  # rank r of n is in slice floor(5 r / n)
        want = [float(on[slice_of == s].mean()) for s in range(5)]
        assert card.label_quantile_share == pytest.approx(want, abs=1e-4), j
        peaks = [t[p] == card.label for t, p in zip(card.top_examples.tokens, card.top_examples.peak, strict=True)]
        assert card.label_top_share == pytest.approx(sum(peaks) / len(peaks))
        assert f"of the {len(peaks)} top contexts" in card.label_note()
        checked += 1
    assert checked == 10


def test_cli_tables_say_what_they_leave_out(real, tmp_path, capsys):
    run, atlas = real
    path = str(atlas.path)
    found = len(atlas.search("."))
    capsys.readouterr()
    assert cli.main(["atlas", "query", path, "--search", ".", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 5  # header, 3 rows, the note
    assert all(repr(label) in out for label in atlas.search(".").label[:3])  # quoted: ' king', not king
    assert f"({found - 3:,} more rows not shown; --limit N or --json shows them)" in out
    assert cli.main(["atlas", "query", path, "--search", ".", "--limit", str(found)]) == 0
    assert "more rows" not in capsys.readouterr().out
    assert cli.main(["atlas", "query", path, "--top-by", "max_act", "--limit", "5"]) == 0
    n = len(atlas.features())
    assert f"({n - 5:,} more rows not shown; --limit N shows more)" in capsys.readouterr().out


def test_cli_card_prints_label_shares_and_added_analyses(real, tmp_path, capsys):
    from saekit.atlas import add_analyses

    run, atlas = real
    copy = tmp_path / "atlas.sqlite"
    copy.write_bytes(atlas.path.read_bytes())
    f = atlas.features().dropna(subset=["label"])
    j = int(f.latent.iloc[0])
    capsys.readouterr()
    assert cli.main(["atlas", "query", str(copy), "--feature", str(j)]) == 0
    out = capsys.readouterr().out
    assert f"label: {atlas.card(j).label_note()}" in out and "analyses:" not in out
    (run.path / "analysis").mkdir(exist_ok=True)
    report = run.path / "analysis" / "report.json"
    report.write_text(json.dumps({REAL: {"geometry": {"lobes": {"labels": [2] * len(atlas.features())}},
                                         "absorption": {"absorbing_latents": {"s": [j], "t": [j]}}}}))
    try:
        add_analyses(copy, run)
    finally:
        report.unlink()
    assert cli.main(["atlas", "query", str(copy), "--feature", str(j)]) == 0
    assert "analyses: lobe 2, absorbs letters s,t" in capsys.readouterr().out


def test_crosscoder_card_shows_decoder_norm_per_target(tmp_path):
    """A crosscoder run over two hookpoints: each card carries the latent's decoder norm in each
    target (in target order, equal to `decoder_norms()`), drawn as one bar per target."""
    from saekit.atlas.html import render_card
    from saekit.sae import Crosscoder

    a, b = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    cfg, run, tokens, mask, g = planted_run(tmp_path, sources=[a, b])
    ctx, pos = mask.nonzero(as_tuple=True)
    acts = torch.rand(int(mask.sum()), 2 * D, generator=g)
    cc = Crosscoder(SAEConfig(d_in=2 * D, n_latents=M, k=2, architecture="topk", sources=[a, b], dims={a: D, b: D}))
    with torch.no_grad():
        cc.W_dec[:, D:] *= torch.linspace(0, 2, M).unsqueeze(1)  # latent j's norm in b grows with j
    cc.save(run.path / "crosscoder")
    build_cache(cache_path(cfg, "train"), iter([{a: acts[:, :D], b: acts[:, D:], "_context": ctx, "_position": pos,
                                                  "_token": tokens[mask]}]), {"model": cfg.model})
    atlas = Atlas.open(build_atlas(run, model=FakeModel()))
    norms = cc.decoder_norms()
    for j in (0, M - 1):
        card = atlas.card(j, "crosscoder")
        assert list(card.part_norms.part) == [a, b]
        torch.testing.assert_close(torch.tensor(card.part_norms.norm.to_numpy(), dtype=torch.float32), norms[:, j])
        page = render_card(atlas, j, "crosscoder")
        assert "decoder norm per target" in page and f"{b}: {float(norms[1, j]):.3g}" in page
    assert card.part_norms.norm[1] > card.part_norms.norm[0] and atlas.card(0, "crosscoder").part_norms.norm[1] == 0
