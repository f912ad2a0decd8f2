"""Evolution analysis on planted decoder-norm trajectories and planted codes; the pre-training
script's snapshots loading through saekit's model loader."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import saekit.analyze
from saekit.analyze.evolution import emergence_points, evolution, plot_emergence, plot_trajectories, summary
from saekit.codes import Codes
from saekit.errors import SaekitError

ROOT = Path(__file__).resolve().parents[1]


def planted(n_src=16, per=25, noise=0.03, seed=0):
    """Norm trajectories [n_src, latents]: latents switched on at known snapshots (a sigmoid ramp
    centred between two snapshots, to a random final norm), fading initialisation latents, and
    latents that never grow. Returns (norms, true emergence, true fading)."""
    g = np.random.default_rng(seed)
    s = np.arange(n_src)[:, None]
    on = np.repeat(np.arange(1, n_src), per)  # every snapshot after the first, `per` latents each
    top = g.uniform(0.5, 2.0, len(on))
    rise = top / (1 + np.exp(-4 * (s - on + 0.5)))  # half the maximum between on - 1 and on
    fade = g.uniform(0.5, 2.0, per) * np.exp(-0.5 * s)  # initialisation latents decaying
    flat = np.zeros((n_src, per))  # never more than the noise floor
    norms = np.concatenate([rise, fade, flat], 1)
    norms = np.abs(norms + noise * g.standard_normal(norms.shape))
    norms[:, -per:] = 0.0  # exactly zero: no maximum to pass half of
    truth = np.concatenate([on, np.full(per, -1), np.full(per, -1)])
    fading = np.concatenate([np.zeros(len(on), bool), np.ones(per, bool), np.zeros(per, bool)])
    return norms, truth, fading


def test_planted_emergence_schedule_is_read_back_exactly():
    norms, truth, fading = planted()
    df = evolution(torch.tensor(norms), names=[f"step{2**i}" for i in range(16)])
    assert (df["emergence"].to_numpy() == truth).all()
    assert (df["fading"].to_numpy() == fading).all()
    assert (df["initial"].to_numpy()[fading]).all() and not df["initial"].to_numpy()[truth > 1].any()
    assert list(df.columns[-16:]) == [f"norm:step{2**i}" for i in range(16)]
    np.testing.assert_allclose(df["norm:step8"], norms[3])
    s = summary(df)
    assert s["per_source"] == [0] + [25] * 15 and s["never"] == 50 and s["fading"] == 25


def test_a_transient_crossing_does_not_count_and_a_latent_that_falls_back_never_emerges():
    # latent 0: a spike at 1 above half its maximum, then on from 4; latent 1: up at 2, gone by 5
    norms = np.array([[0.0, 0.0], [0.6, 0.1], [0.1, 1.0], [0.1, 1.0], [0.9, 0.8], [1.0, 0.1]])
    assert emergence_points(norms).tolist() == [4, -1]
    assert emergence_points(norms, threshold=0.05).tolist() == [1, 1]


def snapshot_acts(S, d, F, n, seed):
    """Activations of S snapshots on the same n tokens: every token holds exactly 3 of F features
    (log-normal magnitudes); feature f is in every snapshot from its onset on, on a direction drawn
    per snapshot. Later onsets enlarge the later snapshots' RMS. Returns (acts, onset, stacked rows)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(S, F, d, generator=g)
    dirs /= dirs.norm(dim=2, keepdim=True)
    onset = torch.randint(0, S, (F,), generator=g)
    onset[:S] = torch.arange(S)  # every snapshot has onsets
    idx = torch.rand(n, F, generator=g).topk(3, dim=1).indices
    codes = torch.zeros(n, F).scatter_(1, idx, (0.4 * torch.randn(n, 3, generator=g)).exp())
    acts = {f"s{s}": (codes * (onset <= s)) @ dirs[s] for s in range(S)}
    stacked = torch.cat([dirs[s] * (onset <= s)[:, None] for s in range(S)], 1)
    return acts, onset.numpy(), stacked / stacked.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("S,d,F,seed", [(6, 24, 48, 0), (5, 16, 32, 1)])
def test_a_trained_crosscoder_reads_back_planted_onsets(S, d, F, seed):
    """Through saekit.fit: features switched on at a known snapshot and kept on. In the
    activations' units the emergence of every recovered feature's latent is its onset; in the
    normalised (training) units the first snapshot's features, diluted below half their first norm
    as later ones raise the RMS, read as never emerging."""
    acts, onset, stacked = snapshot_acts(S, d, F, 20_000, seed)
    cc = saekit.fit(acts, n_latents=2 * F, k=3, batch_size=256, epochs=3, dead_tokens=5000, lr=3e-3, seed=seed)
    W = torch.cat([cc.W_dec[t] for t in cc.targets], 1)
    cos = stacked @ (W / W.norm(dim=1, keepdim=True)).T
    found = (cos.max(1).values > 0.9).numpy()
    best = cos.argmax(1).numpy()
    assert found.mean() > 0.7
    read = evolution(cc)["emergence"].to_numpy()[best]
    assert (read == onset)[found].mean() >= 0.95, (read[found], onset[found])
    diluted = evolution(cc, units="normalised")["emergence"].to_numpy()[best]
    scales = cc.cfg.part_scales
    if scales["s0"] < 0.4 * scales[f"s{S - 1}"]:  # the first case: the RMS grows 3x
        assert (diluted[found & (onset == 0)] == -1).all()


def test_crosscoder_duck_type_and_bad_input():
    class CC:
        targets = ["a@step0:h", "a@step9:h"]

        def decoder_norms(self):
            return torch.tensor([[1.0, 0.0, 0.2], [1.0, 2.0, 0.0]])

    df = saekit.analyze.evolution(CC())
    assert df["emergence"].tolist() == [0, 1, -1] and df["n_present"].tolist() == [2, 1, 1]
    assert df["fading"].tolist() == [False, False, True]
    assert "norm:a@step9:h" in df.columns
    with pytest.raises(SaekitError, match="names"):
        evolution(np.ones((3, 4)), names=["a", "b"])
    with pytest.raises(SaekitError, match="non-negative"):
        evolution(-np.ones((3, 4)))
    with pytest.raises(SaekitError, match="both"):
        evolution(np.ones((3, 4)), codes=torch.zeros(5, 4))
    with pytest.raises(SaekitError, match="units"):
        evolution(CC(), units="raw")


def test_unigram_proxy_separates_a_token_latent_from_a_context_latent():
    g = torch.Generator().manual_seed(0)
    n, vocab = 20000, 50
    tokens = torch.randint(0, vocab, (n,), generator=g)
    prev = torch.cat([torch.tensor([0]), tokens[:-1]])
    dense = torch.zeros(n, 3)
    dense[:, 0] = (tokens == 7) * (1 + 0.1 * torch.rand(n, generator=g))  # fires on one token
    dense[:, 1] = (prev == 3) * (1 + 0.1 * torch.rand(n, generator=g))  # fires after one token: context
    dense[:, 2] = ((tokens < 10) & (prev < 25)) * 1.0  # half token, half context
    values, indices = dense.topk(3, dim=1)  # every latent: k = n_latents
    for codes in (dense, (values, indices), Codes(values, indices, 3)):  # every form agrees
        df = evolution(np.ones((2, 3)), codes=codes, tokens=tokens)
        r2 = df["unigram"].to_numpy()
        assert r2[0] > 0.9 and abs(r2[1]) < 0.02 and 0.3 < r2[2] < 0.7
        np.testing.assert_allclose(df["frequency"], (dense > 0).double().mean(0).numpy())
    rare = dense.clone()
    rare[500:, 0] = 0  # latent 0 now fires a few times only: no R^2 from so few rows
    assert 0 < int((rare[:, 0] > 0).sum()) < 20
    assert np.isnan(evolution(np.ones((2, 3)), codes=rare, tokens=tokens)["unigram"][0])


def test_unigram_r2_equals_a_dense_reference():
    g = torch.Generator().manual_seed(1)
    n, vocab, m = 3000, 40, 5
    tokens = torch.randint(0, vocab, (n,), generator=g)
    tokens[1] = vocab  # a token only in the odd half: predicted by the even half's mean
    dense = torch.rand(n, m, generator=g) * (torch.rand(n, m, generator=g) < 0.2)
    got = evolution(np.ones((1, m)), codes=dense, tokens=tokens)["unigram"].to_numpy()
    want = []
    for fit in (0, 1):
        f, s = torch.arange(n) % 2 == fit, torch.arange(n) % 2 != fit
        pred = torch.zeros(s.sum(), m, dtype=torch.float64)
        for i, t in enumerate(tokens[s].tolist()):
            seen = f & (tokens == t)
            pred[i] = dense[seen].double().mean(0) if seen.any() else dense[f].double().mean(0)
        a = dense[s].double()
        want.append(1 - ((a - pred) ** 2).sum(0) / ((a - a.mean(0)) ** 2).sum(0))
    np.testing.assert_allclose(got, torch.stack(want).mean(0).numpy(), rtol=1e-9, atol=1e-12)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    norms, _, _ = planted(n_src=6, per=4)
    df = evolution(norms)
    assert plot_emergence(df, tmp_path / "h.png").stat().st_size > 1000
    assert plot_trajectories(df, tmp_path / "t.png", x=[0, 1, 2, 4, 8, 16]).stat().st_size > 1000


PRETRAIN = ["--steps", "6", "--snapshots", "4", "--d-model", "32", "--layers", "2", "--heads", "2", "--vocab", "300",
            "--docs", "30", "--batch", "4", "--ctx-len", "32", "--val-contexts", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A few steps of training/pretrain.py: a tiny model, 30 scenes, snapshots at steps 0, 1, 2, 6."""
    out = tmp_path_factory.mktemp("pretrain") / "series"
    subprocess.run([sys.executable, str(ROOT / "training/pretrain.py"), "--out", str(out), *PRETRAIN], check=True,
                   capture_output=True)
    return out


def test_pretrain_snapshots_load_as_models_and_harvest(series):
    """`series@stepN` through saekit's loader: the harvested activations are those of the saved
    weights, a rerun trains nothing, and a snapshot that does not exist is refused with the list of
    those that do."""
    from saekit import data
    from saekit import model as lm

    out = series
    info = json.loads((out / "pretrain.json").read_text())
    assert info["schedule"] == [0, 1, 2, 6] and lm.snapshots(out) == ["step0", "step1", "step2", "step6"]
    log = json.loads((out / "loss.json").read_text())
    assert len(log["train"]) == 6 and set(log["val"]) == {"0", "1", "2", "6"} and (out / "loss.png").exists()
    cmd = [sys.executable, str(ROOT / "training/pretrain.py"), "--out", str(out), *PRETRAIN]
    assert "done" in subprocess.run(cmd, check=True, capture_output=True, text=True).stdout  # nothing retrained

    m0, m6 = lm.load_model(f"{out}@step0"), lm.load_model(str(out), revision="step6")
    assert m0.cfg.n_layers == 2 and m0.cfg.d_model == 32
    toks, mask = data.pack_contexts(data.load_texts("shakespeare"), m0.tokenizer, 16, n_tokens=60)
    a0 = torch.cat([b["blocks.1.hook_resid_post"] for b in lm.harvest(m0, toks, mask, ["blocks.1.hook_resid_post"])])
    a6 = torch.cat([b["blocks.1.hook_resid_post"] for b in lm.harvest(m6, toks, mask, ["blocks.1.hook_resid_post"])])
    assert a0.shape == a6.shape == (int(mask.sum()), 32) and not torch.allclose(a0, a6)
    _, cache = m6.run_with_cache(toks, names_filter=lambda n: n == "blocks.1.hook_resid_post")
    torch.testing.assert_close(a6, cache["blocks.1.hook_resid_post"][mask], rtol=1e-4, atol=1e-5)
    with pytest.raises(SaekitError, match="no snapshot 'step3'.*step0, step1, step2, step6"):
        lm.load_model(f"{out}@step3")


def test_pretrain_without_matplotlib_says_so_first_and_finishes(tmp_path):
    """Without the plots extra the series still trains to the end: a note before the first step
    says loss.png will be missing, and loss.json holds the curves."""
    out = tmp_path / "series"
    blocked = ("import runpy, sys; sys.modules['matplotlib'] = None; "  # an import of it raises ImportError
               f"sys.argv = ['pretrain.py', '--out', {str(out)!r}, *{PRETRAIN!r}]; "
               f"runpy.run_path({str(ROOT / 'training/pretrain.py')!r}, run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("matplotlib is missing (pip install 'saekit[plots]')")
    assert (out / "loss.json").exists() and not (out / "loss.png").exists()
    assert json.loads((out / "pretrain.json").read_text())["wall_s"] is not None


def test_train_harvests_snapshot_sources_on_the_same_tokens(series, tmp_path):
    """`saekit train` with sources `SERIES@stepN:hookpoint`: one cache holds every snapshot's rows
    for the same tokens (equal to harvesting each snapshot alone), a crosscoder trains on it and
    `evolution` reads its decoder norms per snapshot; a source model with another tokenizer, an
    unknown hookpoint of a snapshot, and another model's hookpoint outside sources are refused."""
    from saekit import Run, pipeline
    from saekit import model as lm
    from saekit.config import load_config

    h = "blocks.1.hook_resid_post"
    srcs = [f"{series}@step{s}:{h}" for s in (0, 2, 6)]
    args = ["--model", f"{series}@step6", "--sources", json.dumps(srcs), "--hookpoints", "[unused]", "--n_tokens",
            "3000", "--val_tokens", "400", "--ctx_len", "32", "--expansion", "2", "--k", "4", "--batch_size", "256",
            "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "cc"), "--eval_contexts", "2"]
    cfg = load_config(None, args)
    path = pipeline.train(cfg, quiet=True)
    val = pipeline.finished_caches(cfg)["val"]
    assert set(val.hookpoints) == set(srcs)
    toks, mask = pipeline.contexts(cfg, lm.load_model(f"{series}@step6").tokenizer)["val"]
    for s, name in zip((0, 2, 6), srcs, strict=True):
        alone = torch.cat([b[h] for b in lm.harvest(lm.load_model(f"{series}@step{s}"), toks, mask, [h])])
        torch.testing.assert_close(val.tensor(name), alone, rtol=1e-3, atol=1e-3)
    cc = Run.open(path).sae("crosscoder")
    df = saekit.analyze.evolution(cc)
    assert cc.decoder_norms().shape == (3, 64) and len(df) == 64 and {f"norm:{n}" for n in srcs} <= set(df.columns)

    with pytest.raises(SaekitError, match="another tokenizer"):
        pipeline.prepare(load_config(None, [*args[2:], "--model", "smollm2-135m", "--out", str(tmp_path / "x")]))
    bad = json.dumps([f"{series}@step0:blocks.9.hook_resid_post"])
    with pytest.raises(SaekitError, match="unknown hookpoint 'blocks.9.hook_resid_post'"):
        pipeline.prepare(load_config(None, [*args, "--sources", bad, "--out", str(tmp_path / "y")]))
    with pytest.raises(SaekitError, match="other models' go in sources"):
        load_config(None, ["--hookpoints", json.dumps(srcs[:1])])
