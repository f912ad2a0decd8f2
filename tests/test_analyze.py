"""Analyses on SAEs with planted ground truth (dead latents, duplicate pairs, a known spectrum,
absorbed tokens), then `saekit analyze` end to end on a tiny run and its bad inputs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from saekit import analyze, cli
from saekit.analyze.absorption import (
    FirstLetterData,
    absorption_from_data,
    absorption_scores,
    saebench_from_data,
    saebench_output,
)
from saekit.analyze.collapse import duplicate_pairs
from saekit.errors import SaekitError
from saekit.run import FiringHistory
from saekit.sae import SAE, SAEConfig


def make_sae(W_dec: torch.Tensor, W_enc: torch.Tensor | None = None, k: int = 1, b_enc=None) -> SAE:
    m, d = W_dec.shape
    sae = SAE(SAEConfig(d_in=d, n_latents=m, k=k)).eval().requires_grad_(False)
    sae.W_dec.copy_(W_dec)
    sae.W_enc.copy_(W_dec if W_enc is None else W_enc)
    sae.b_enc.copy_(torch.zeros(m) if b_enc is None else b_enc)
    sae.b_dec.zero_()
    return sae


def test_planted_dead_latents_and_duplicate_pairs_are_counted_exactly():
    g = torch.Generator().manual_seed(0)
    d, m = 64, 300
    W = F.normalize(torch.randn(m, d, generator=g), dim=1)
    dup = [(3, 150), (40, 41), (7, 299)]
    for i, j in dup:  # near-copies: cosine ~0.995
        W[j] = F.normalize(W[i] + 0.1 * F.normalize(torch.randn(d, generator=g), dim=0), dim=0)
    dead_ids = torch.arange(200, 240)
    b_enc = torch.zeros(m)
    b_enc[dead_ids] = -1e4  # never selectable
    sae = make_sae(W, k=8, b_enc=b_enc)
    x = torch.randn(5000, d, generator=g)
    res = analyze.dead(sae, (t for t in x.split(700)))  # an iterable of batches
    assert res.n_dead == 40 and res.dead_fraction == pytest.approx(40 / m)
    assert (res.density[dead_ids] == 0).all() and (res.density[:200] > 0).all()
    assert res.n_tokens == 5000 and sum(res.hist_counts) == m - 40
    assert res.density.sum() == pytest.approx(8, rel=1e-5)  # k latents per token
    assert res.dense_fraction == pytest.approx(float((res.density > 0.1).double().mean()))
    col = analyze.collapse(sae, tau=0.9)
    assert col.duplicate_pairs == sorted(dup)
    assert col.duplicate_fraction == pytest.approx(6 / m)
    assert duplicate_pairs(W, 0.9, block=7) == sorted(dup)  # block edges do not matter
    json.dumps(res.to_dict()), json.dumps(col.to_dict())


def test_dead_at_init_versus_died_during_training():
    sae = make_sae(torch.eye(4), k=1, b_enc=torch.tensor([0.0, 0.0, -1e4, -1e4]))
    hist = FiringHistory(step=100, first_fired=torch.tensor([0, 3, -1, 5]), last_fired=torch.tensor([99, 99, -1, 40]),
                         tokens_since_fired=torch.tensor([0, 10, 500, 300]), dead_tokens=300)
    res = analyze.dead(sae, torch.randn(200, 4), history=hist)
    assert (res.n_dead, res.dead_at_init, res.died_in_training, res.died_last_fired_median) == (2, 1, 1, 40.0)
    assert res.dead_by_training_rule == 2


def test_effective_rank_and_participation_ratio_of_a_known_spectrum():
    d, m = 16, 64
    sigma = torch.linspace(1, 4, d, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(m, d, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    W = (U * sigma) @ V.T  # singular values exactly sigma
    res = analyze.collapse(make_sae(W.float()))
    p = sigma / sigma.sum()
    lam = sigma**2
    assert res.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum()), rel=1e-4)
    assert res.participation_ratio == pytest.approx(float(lam.sum() ** 2 / lam.pow(2).sum()), rel=1e-4)
    torch.testing.assert_close(res.singular_values.double(), sigma.flip(0), rtol=1e-4, atol=1e-4)
    half = analyze.collapse(make_sae(torch.eye(d)[: d // 2].repeat(4, 1)))  # 8 equal directions
    assert half.effective_rank == pytest.approx(d // 2) and half.participation_ratio == pytest.approx(d // 2)


def test_code_covariance_rank_with_activations():
    d = 8
    sae = make_sae(torch.eye(d), k=1)
    x = torch.zeros(800, d)
    x[torch.arange(800), torch.arange(800) % 4] = 1.0  # 4 latents fire, one at a time, equally often
    res = analyze.collapse(sae, x)
    # cov = I/4 - 1/16 (rank 3, equal eigenvalues 1/4): effective rank 3 over 4 live latents
    assert res.code_latents == 4 and res.code_effective_rank == pytest.approx(3, rel=1e-6)
    assert res.input_dims_99 == 3 and res.n_tokens == 800
    sub = analyze.collapse(sae, x, max_code_latents=2)  # a random 2-latent subset
    assert sub.code_latents <= 2


# -- absorption on a hand-built SAE --------------------------------------------------------
D = 32  # 26 letter directions e_0..e_25, 6 spare directions
ABSORBED = {0: 26, 1: 27, 2: 28}  # letter -> spare direction of its absorbing latent


def letter_sae() -> SAE:
    """Latent c (c < 26) = e_c; latent 26 + i absorbs letter i: decoder (e_i + e_spare)/sqrt 2,
    firing (k = 1 wins) only on tokens that carry the spare direction."""
    eye = torch.eye(D)
    W_dec = torch.cat([eye[:26], F.normalize(torch.stack([eye[c] + eye[s] for c, s in ABSORBED.items()]), dim=1)])
    W_enc = torch.cat([1.2 * eye[:26], torch.stack([eye[c] + 2 * eye[s] for c, s in ABSORBED.items()])])
    b_enc = torch.cat([torch.zeros(26), torch.full((len(ABSORBED),), -0.5)])
    return make_sae(W_dec, W_enc, k=1, b_enc=b_enc)


def letter_data(per_letter: int = 30, planted: int = 3):
    """Tokens x = e_letter + noise; in the held-out split `planted` tokens of each absorbed
    letter also carry the spare direction, so the absorbing latent fires instead of the main one."""
    g = torch.Generator().manual_seed(0)
    letters = torch.arange(26).repeat_interleave(per_letter)
    x = F.one_hot(letters, D).float() + 0.05 * torch.randn(len(letters), D, generator=g)
    train = (torch.arange(len(letters)) % per_letter) < int(0.8 * per_letter)
    plant = torch.zeros(len(letters), dtype=torch.bool)
    for c, s in ABSORBED.items():
        rows = ((letters == c) & ~train).nonzero().squeeze(1)[:planted]
        x[rows, s] += 1.0
        plant[rows] = True
    words = [" " + "abcdefghijklmnopqrstuvwxyz"[c] + "x" for c in letters]
    return FirstLetterData(words, letters, x, train), plant


def test_absorption_core_flags_exactly_the_planted_tokens():
    data, plant = letter_data()
    s = absorption_scores(letter_sae(), data.acts, data.letters, torch.eye(D)[:26], [[c] for c in range(26)])
    assert torch.equal(s.fraction > 0, plant) and torch.equal(s.full, plant)
    assert (s.fraction[plant] == 1).all() and (s.fraction[~plant] == 0).all()
    absorbed_by = s.absorbers[plant, 0]
    assert absorbed_by.tolist() == [26 + c for c in ABSORBED for _ in range(3)]


def test_absorption_end_to_end_with_learned_probes():
    data, plant = letter_data()
    res = absorption_from_data(letter_sae(), data)
    t = res.table.set_index("letter")
    assert res.n_letters == 26 and (t["probe_f1"] == 1).all()
    assert t["main_latents"].tolist() == [[c] for c in range(26)]  # k-sparse probing finds the letter latents
    absorbed = {"abcdefghijklmnopqrstuvwxyz"[c] for c in ABSORBED}
    assert set(t.index[t["n_absorbed"] > 0]) == absorbed
    assert t.loc[sorted(absorbed), "n_absorbed"].tolist() == [3, 3, 3]  # of 6 held-out tokens each
    assert t.loc[sorted(absorbed), "full_absorption"].tolist() == [0.5, 0.5, 0.5]
    assert res.absorbing_latents["a"] == [26] and res.absorbing_latents["d"] == []
    assert res.mean_absorption_fraction == pytest.approx(3 * 0.5 / 26)
    json.dumps(res.to_dict())
    with pytest.raises(SaekitError, match="SAEBench's protocol"):
        saebench_output(res, letter_sae())  # sae-bench's schema holds its own protocol's figures only


def test_saebench_protocol_finds_the_planted_absorber_on_fresh_prompts():
    """SAEBench's probes (random start, minibatches, raw activations) and k-sparse probing on raw
    latent values find each letter's latent and the planted absorbers; the metric reads the fresh
    prompts, not the probe's activations: without the spare direction there, nothing is absorbed.
    The SAE gets 2,000 latents that never fire, so that (as in a real SAE) the probes' random start
    is small beside what they learn; activations (and the absorbers' thresholds) are scaled up 4x."""
    data, plant = letter_data()
    small = letter_sae()
    n_dead = 2000
    dead = F.normalize(torch.randn(n_dead, D, generator=torch.Generator().manual_seed(2)), dim=1)
    sae = make_sae(torch.cat([small.W_dec, dead]), torch.cat([small.W_enc, torch.zeros(n_dead, D)]), k=1,
                   b_enc=torch.cat([4 * small.b_enc, -torch.ones(n_dead)]))
    test = ~data.train
    data.acts *= 4
    data.fresh = data.acts[test] + 0.2 * torch.randn(int(test.sum()), D, generator=torch.Generator().manual_seed(1))
    res = saebench_from_data(sae, data)
    t = res.table.set_index("letter")
    assert res.protocol == "saebench" and res.n_letters == 26 and (t["probe_f1"] > 0.8).all()
    assert t["main_latents"].tolist() == [[c] for c in range(26)]
    absorbed = sorted("abcdefghijklmnopqrstuvwxyz"[c] for c in ABSORBED)
    assert set(t.index[t["n_absorbed"] > 0]) == set(absorbed)
    assert t.loc[absorbed, "n_absorbed"].tolist() == [3, 3, 3]
    assert t.loc[absorbed, "full_absorption"].tolist() == [0.5] * 3
    assert res.absorbing_latents["a"] == [26] and res.mean_absorption_fraction == pytest.approx(3 * 0.5 / 26)
    out = json.loads(json.dumps(saebench_output(res, sae, "smollm2-135m")))  # sae-bench's output schema
    assert out["eval_type_id"] == "absorption_first_letter" and out["eval_config"]["min_GT_probe_f1"] == 0.6
    assert out["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"] == res.mean_absorption_fraction
    assert out["eval_result_metrics"]["mean"]["mean_num_split_features"] == 1
    a = out["eval_result_details"][0]
    assert a == {"first_letter": "a", "mean_absorption_fraction": 0.5, "full_absorption_rate": 0.5,
                 "num_full_absorption": 3, "num_probe_true_positives": 6, "num_split_features": 1}
    for s in ABSORBED.values():
        data.fresh[plant[test], s] = 0.0
    assert saebench_from_data(sae, data).mean_absorption_fraction == 0
    data.fresh = None
    with pytest.raises(SaekitError, match="fresh prompts"):
        saebench_from_data(sae, data)

def test_saebench_explained_variance_is_its_batched_formula_about_zero():
    """explained_variance_saebench equals sae-bench 0.6.0's aggregation written out (per-batch means
    of ||x||^2, of x_i^2 and of the residual); on activations far from zero it reads above 1 - FVU."""
    from saekit.evaluate import reconstruction_metrics

    g = torch.Generator().manual_seed(0)
    x = 3.0 + torch.randn(400, D, generator=g)  # a large shared offset, as in a residual stream
    sae = make_sae(F.normalize(torch.randn(64, D, generator=g), dim=1), k=4)
    m = reconstruction_metrics(sae, x)
    x_hat = sae(x)
    sos, act, res = [], [], []
    for xb, hb in zip(x.split(100), x_hat.split(100), strict=True):
        sos.append(xb.pow(2).sum(-1).mean(0))
        act.append(xb.pow(2).mean(0))
        res.append((xb - hb).pow(2).sum(-1).mean(0))
    theirs = 1 - torch.stack(res).mean(0) / (torch.stack(sos).mean(0) - torch.cat(act).mean(0) ** 2)
    assert m["explained_variance_saebench"] == pytest.approx(float(theirs), rel=1e-5)
    assert m["explained_variance_saebench"] > m["explained_variance"] + 0.1


def test_too_few_letters_pass_the_probe():
    data, _ = letter_data()
    data.acts = torch.randn_like(data.acts)  # nothing to find
    with pytest.raises(SaekitError, match="letters have a probe F1"):
        absorption_from_data(letter_sae(), data)


# -- `saekit analyze` on a tiny run of the offline model -------------------------------------
HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def tiny_run(act_cache_dir, tmp_path_factory):
    """A run trained by the CLI in seconds (as tests/test_pipeline.py's `tiny`)."""
    run = tmp_path_factory.mktemp("analyze") / "run"
    args = ["--hookpoints", HOOK, "--n_tokens", "6000", "--val_tokens", "600", "--ctx_len", "64", "--epochs", "2",
            "--expansion", "2", "--k", "16", "--batch_size", "500", "--log_every", "1", "--collapse_every", "4",
            "--eval_contexts", "2", "--cache_dir", str(act_cache_dir), "--dead_tokens", "3000", "--out", str(run)]
    assert cli.main(["train", *args, "--quiet"]) == 0
    return run


def test_collapse_is_logged_during_training(tiny_run):
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    logged = [m["step"] for m in lines if "collapse" in m[HOOK]]
    assert logged == [s for s in range(4, lines[-1]["step"] + 1, 4)]
    c = lines[logged[0] - 1][HOOK]["collapse"]
    assert 0 < c["effective_rank"] <= 576 and 0 <= c["duplicate_fraction"] <= 1


def test_analyze_all_writes_the_report(tiny_run, capsys):
    assert cli.main(["analyze", "all", str(tiny_run), "--words", "400", "--min-letters", "3", "--quiet"]) == 0
    out = tiny_run / "analysis"
    report = json.loads((out / "report.json").read_text())
    r = report[HOOK]
    assert r["dead"]["n_tokens"] >= 600 and len(r["dead"]["density"]) == 1152
    assert r["dead"]["dead_at_init"] + r["dead"]["died_in_training"] == r["dead"]["n_dead"]
    assert 0 < r["collapse"]["effective_rank"] <= 576 and r["collapse"]["code_latents"] > 0
    assert r["absorption"]["n_letters"] >= 3 and 0 <= r["absorption"]["mean_absorption_fraction"] <= 1
    assert set(report["wall_time_s"][HOOK]) == {"dead", "collapse", "absorption", "geometry"}
    g = r["geometry"]
    assert g["galaxy"]["n_latents"] == 1152 and g["lobes"]["n_chunks"] >= 2 and g["multidim"] is not None
    md = (out / "report.md").read_text()
    assert "Absorption" in md and "Feature geometry" in md and "Wall time" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    try:
        import matplotlib  # noqa: F401
        # spectrum and lobe map always; the multi-dim plot when a cluster was active on enough tokens
        assert len(pngs) == 5 + bool(g["cluster_points"]) and "![density]" in md and "![lobes]" in md
    except ImportError:
        assert not pngs and "matplotlib is not installed" in md


def test_analyze_on_activations_a_user_brings(tiny_run, tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.randn(300, 576)}, tmp_path / "acts.safetensors")
    assert cli.main(["analyze", "dead", str(tiny_run), "--activations", str(tmp_path / "acts.safetensors"),
                     "--quiet"]) == 0
    assert json.loads((tiny_run / "analysis" / "dead.json").read_text())[HOOK]["dead"]["n_tokens"] == 300


@pytest.mark.parametrize("fmt", ["saekit", "sae-lens"])
def test_analyze_and_eval_a_bare_sae_folder(tiny_run, tmp_path, fmt):
    """A bare SAE folder, saekit's own or exported to SAELens's layout (read back as an imported
    SAELens SAE of the offline model's hookpoint), runs every analysis and the evaluation."""
    from safetensors.torch import save_file

    bare = tmp_path / "sae"
    SAE.load(tiny_run / HOOK).save(bare, format=fmt)  # no run around it
    assert SAE.load(bare).cfg.source_format == (None if fmt == "saekit" else "SAELens topk")
    save_file({"x": torch.randn(400, 576) * 3}, tmp_path / "acts.safetensors")
    acts = str(tmp_path / "acts.safetensors")
    assert cli.main(["analyze", "all", str(bare), "--activations", acts, "--words", "400", "--min-letters", "3",
                     "--quiet"]) == 0
    report = json.loads((bare / "analysis" / "report.json").read_text())[HOOK]
    assert report["dead"]["n_tokens"] == 400 and report["dead"]["dead_at_init"] is None  # no training state
    assert report["absorption"]["n_letters"] >= 3  # the model named in the SAE's cfg.json
    assert cli.main(["eval", str(bare), "--activations", acts, "--contexts", "1", "--quiet"]) == 0
    ev = json.loads((bare / "eval.json").read_text())[HOOK]
    assert ev["n_tokens"] == 400 and ev["ce_clean"] < ev["ce_zero"]


def test_analyze_bad_inputs(tiny_run, tmp_path, capsys):
    def fails(*args, match):
        assert cli.main(["analyze", *args, "--quiet"]) == 2
        assert match in capsys.readouterr().err

    fails("dead", str(tmp_path), match="neither a saekit run folder")
    fails("dead", str(tmp_path / "nowhere"), match="nowhere does not exist")
    fails("dead", str(tiny_run), "--hookpoint", "blocks.3.hook_resid_post", match="is not in")
    from safetensors.torch import save_file

    save_file({"x": torch.randn(10, 64)}, tmp_path / "narrow.safetensors")
    fails("collapse", str(tiny_run), "--activations", str(tmp_path / "narrow.safetensors"), match="[batch, 576]")
    fails("dead", str(tiny_run), "--activations", str(tmp_path / "missing"), match="expected an activation cache")
    fails("absorption", str(tiny_run), "--words", "60", match="letters have a probe F1")
    bare = tmp_path / "bare"  # an SAE folder that records no model
    sae = SAE.load(tiny_run / HOOK)
    sae.cfg.model = None
    sae.save(bare)
    fails("absorption", str(bare), match="names no model")
    fails("dead", str(bare), match="bare SAE folder")


def test_report_without_matplotlib_gives_a_note(monkeypatch, tmp_path):
    import sys

    from saekit.analyze.report import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert "matplotlib is not installed" in plots({"run": "r", "wall_time_s": {}}, tmp_path)[0]


def test_a_fit_sae_names_no_model_and_analyze_all_skips_absorption(tmp_path, capsys):
    """`saekit.fit` records the model and hookpoint only when given; `analyze all` on an SAE that
    names no model skips absorption with a note, asked alone it is refused, and a model whose
    hookpoints do not include the SAE's is refused by name (not a KeyError from the model)."""
    from safetensors.torch import save_file

    import saekit

    x = torch.randn(1024, 16, generator=torch.Generator().manual_seed(0))
    sae = saekit.fit(x, n_latents=32, k=4, epochs=1, batch_size=256)
    assert (sae.cfg.model, sae.cfg.hookpoint) == (None, None)
    named = saekit.fit(x, n_latents=32, k=4, epochs=1, batch_size=256, model="m", hookpoint="blocks.0.hook_resid_post")
    assert (named.cfg.model, named.cfg.hookpoint) == ("m", "blocks.0.hook_resid_post")
    folder = tmp_path / "fit"
    sae.save(folder)
    save_file({"x": x}, tmp_path / "acts.safetensors")
    acts = str(tmp_path / "acts.safetensors")
    assert cli.main(["analyze", "all", str(folder), "--activations", acts, "--quiet"]) == 0
    report = json.loads((folder / "analysis" / "report.json").read_text())
    assert "absorption" in report["skipped"] and "absorption" not in report["fit"]
    assert "dead" in report["fit"] and "geometry" in report["fit"]
    assert "Skipped absorption:" in (folder / "analysis" / "report.md").read_text()
    capsys.readouterr()
    assert cli.main(["analyze", "absorption", str(folder), "--quiet"]) == 2
    assert "names no model" in capsys.readouterr().err
    assert cli.main(["analyze", "absorption", str(folder), "--model", "smollm2-135m", "--quiet"]) == 2
    assert "unknown hookpoint 'fit'" in capsys.readouterr().err


@pytest.mark.parametrize("n_clusters", [1, 3])
def test_geometry_plots_fit_their_titles_and_label_their_axes(n_clusters):
    """Every title and axis label of the lobe map and the multi-dimensional panels lies inside its
    figure (a long hookpoint name included); the panels name their PCs and their latents."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from saekit.analyze.report import _geometry_plots

    h = "blocks.16.hook_resid_post"
    r = torch.arange(1.0, 41.0)
    g = {"galaxy": {"eigenvalues": (r ** -1.2).tolist(), "rank_window": [2, 30], "power_law_intercept": 0.0,
                    "power_law_alpha": 1.2},
         "lobes": {"ami": 0.123456},
         "lobe_map": {"x": torch.randn(50).tolist(), "y": torch.randn(50).tolist(), "lobe": [i % 3 for i in range(50)]},
         "multidim": [{"score": 0.5, "pcs": [0, 1]}, {"score": 0.4, "pcs": [1, 2]}, {"score": 0.3, "pcs": [0, 1]}],
         "cluster_points": [{"latents": [9000 + i, 1234, 5678, 42, 7], "x": torch.randn(30).tolist(),
                             "y": torch.randn(30).tolist()} for i in range(n_clusters)]}
    figs = dict(_geometry_plots(plt, h, g))
    for kind, fig in figs.items():
        fig.tight_layout()
        fig.canvas.draw()
        box = fig.bbox
        texts = [fig._suptitle] if fig._suptitle else []
        for ax in fig.axes:
            texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
        for t in texts:
            if t.get_text():
                e = t.get_window_extent()
                assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, (kind, t.get_text())
        plt.close(fig)
    assert "AMI with geometry 0.123" in figs["lobes"].axes[0].get_title()
    panels = figs["multidim"].axes
    assert len(panels) == n_clusters and panels[-1].get_xlabel() == f"PC {g['multidim'][n_clusters - 1]['pcs'][0] + 1}"
    assert all(ax.get_ylabel().startswith("PC ") and "1234" in ax.get_title() for ax in panels)


@pytest.mark.parametrize("architecture", ["mp", "jumprelu", "matryoshka"])
def test_new_families_run_every_downstream_verb(architecture, act_cache_dir, tmp_path, capsys):
    """A run of each newer family, on two layers of the real model, goes through eval, `analyze
    all`, the atlas and `match` like a TopK run."""
    from saekit.atlas import Atlas
    from saekit.matching import Match

    hooks = ["blocks.1.hook_resid_post", HOOK]
    run = tmp_path / "run"
    assert cli.main(["train", "--hookpoints", f"[{', '.join(hooks)}]", "--architecture", architecture,
                     "--n_tokens", "6000", "--val_tokens", "600", "--ctx_len", "64", "--epochs", "2", "--expansion",
                     "2", "--k", "16", "--batch_size", "500", "--eval_contexts", "2", "--cache_dir",
                     str(act_cache_dir), "--dead_tokens", "3000", "--out", str(run), "--quiet"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert all(0 < ev[h]["fvu"] < 1 and ev[h]["l0"] > 0 for h in hooks)
    assert cli.main(["analyze", "all", str(run), "--words", "400", "--min-letters", "3", "--quiet"]) == 0
    report = json.loads((run / "analysis" / "report.json").read_text())
    assert all(len(report[h]["dead"]["density"]) == 1152 and report[h]["absorption"]["n_letters"] >= 3 for h in hooks)
    assert cli.main(["atlas", "build", str(run), "--quiet"]) == 0
    atlas = Atlas.open(run / "atlas.sqlite")
    assert atlas.hookpoints == hooks and len(atlas.features(HOOK)) == 1152
    live = int(atlas.features(HOOK).sort_values("max_act").latent.iloc[-1])
    assert len(atlas.card(live, HOOK).top_examples) > 0
    a, b = (str(run / h) for h in hooks)
    assert cli.main(["match", a, b, "--out", str(tmp_path / "m.parquet")]) == 0
    assert Match.load(tmp_path / "m.parquet").m_a == 1152
