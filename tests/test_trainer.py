"""Training on synthetic data with known ground truth, AuxK, config errors, resume."""

import pytest
import torch

from saekit.activations import ActivationCache, ShuffledBatches, build_cache
from saekit.config import TrainConfig, load_config, make_config
from saekit.errors import SaekitError
from saekit.families import StepState, loss_auxk
from saekit.run import Run
from saekit.trainer import Trainer, fit, lr_factor


def planted(n=60_000, d=48, n_feat=192, active=4, seed=0):
    """Sparse combinations of `n_feat` random unit directions (the ground truth)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_feat, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    on = torch.rand(n, n_feat, generator=g) < active / n_feat
    mags = torch.rand(n, n_feat, generator=g) * 2 + 0.5
    x = (on * mags) @ feats + 3.0  # an offset for b_dec to find
    return x, feats


def test_fit_recovers_planted_features():
    x, feats = planted()
    sae = fit(x, n_latents=384, k=6, batch_size=512, epochs=4, dead_tokens=20_000)
    max_cos = (feats @ sae.W_dec.T).max(dim=1).values
    assert max_cos.mean() >= 0.9, max_cos.mean()
    fvu = (sae(x[:5000]) - x[:5000]).pow(2).sum() / (x[:5000] - x[:5000].mean(0)).pow(2).sum()
    assert fvu < 0.2


def test_fit_accepts_an_iterable_of_batches():
    x, feats = planted(n=20_000)
    sae = fit((x[i : i + 700] for i in range(0, len(x), 700)), n_latents=192, k=4, batch_size=1000)
    assert sae.W_dec.shape == (192, x.shape[1])
    with pytest.raises(SaekitError, match="empty"):
        fit(iter([]), n_latents=8, k=2)
    with pytest.raises(SaekitError, match=r"\[N, d_in\]"):
        fit(torch.randn(10), n_latents=8, k=2)


def test_auxk_revives_dead_latents():
    """Latents with tiny encoder rows never reach the top k; only AuxK gives them a gradient."""
    x, _ = planted(n=30_000, d=32, n_feat=64)
    dead = {}
    for alpha in (0.0, 1 / 32):
        cfg = make_config(TrainConfig, {"n_latents": 128, "k": 4, "hookpoints": ["x"], "dead_tokens": 2_000,
                                        "batch_size": 500, "auxk_alpha": alpha})
        tr = Trainer(cfg, {"x": 32}, {"x": x[:4096]}, None, torch.device("cpu"))
        with torch.no_grad():
            tr.saes["x"].W_enc[64:] *= 0.01
        for _ in range(3):
            for i in range(0, 30_000, 500):
                m = tr.train_step({"x": x[i : i + 500]})["x"]
        dead[alpha] = m["dead_fraction"]
    assert dead[0.0] >= 0.45
    assert dead[1 / 32] <= dead[0.0] - 0.05


def test_auxk_loss_matches_dense_reference():
    torch.manual_seed(0)
    cfg = make_config(TrainConfig, {"n_latents": 40, "k": 3, "k_aux": 5, "hookpoints": ["x"]})
    x = torch.randn(64, 8, dtype=torch.float64)
    tr = Trainer(cfg, {"x": 8}, {"x": x.float()}, None, torch.device("cpu"))
    sae = tr.saes["x"].double()
    err = torch.randn(64, 8, dtype=torch.float64)
    dead = torch.tensor([1, 4, 5, 9, 17, 23, 30, 39])
    st = StepState(sae, cfg, x, x, None, None, {}, [], len(x), dead, 0, False, x_hat=x - err)  # y - x_hat = err
    loss_auxk(st)
    loss = st.extra["aux_loss"]
    grads = torch.autograd.grad(loss, [sae.W_enc, sae.b_enc, sae.W_dec])
    pre = (x - sae.b_dec.detach()) @ sae.W_enc.T + sae.b_enc
    pre_dead = torch.full_like(pre, -torch.inf)
    pre_dead[:, dead] = pre[:, dead]
    vals, idx = pre_dead.topk(5, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    ref = (z @ sae.W_dec - err).pow(2).sum() / (err - err.mean(0)).pow(2).sum()
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, [sae.W_enc, sae.b_enc, sae.W_dec]), strict=False):
        torch.testing.assert_close(g, r)
    live = torch.ones(40, dtype=torch.bool)
    live[dead] = False
    assert grads[0][live].abs().max() == 0  # only dead latents learn from AuxK


def test_lr_schedule():
    assert lr_factor(0, 100, 10, 0.8) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, 0.8) == 1.0
    assert lr_factor(90, 100, 10, 0.8) == pytest.approx(0.5)
    assert lr_factor(130, 100, 10, 0.8) == 0.0  # past the end: stays at 0, never negative
    assert lr_factor(10**6, None, 10, 0.8) == 1.0


def test_config_errors(tmp_path):
    with pytest.raises(SaekitError, match="did you mean k"):
        load_config(None, ["--kk", "3"])
    with pytest.raises(SaekitError, match="'k' must be"):
        load_config(None, ["--k", "many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("k: [1, 2\n")
    with pytest.raises(SaekitError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(SaekitError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    ok = tmp_path / "ok.yaml"
    ok.write_text("k: 8\nlr: 1e-3\nhookpoints: blocks.1.hook_resid_post\n")
    cfg = load_config(str(ok), ["--expansion", "4"])
    assert (cfg.k, cfg.lr, cfg.hookpoints, cfg.expansion) == (8, 1e-3, ["blocks.1.hook_resid_post"], 4)


def _synthetic_cache(path, n=12_000, d=16):
    x, _ = planted(n=n, d=d, n_feat=64)
    chunks = ({"h": x[i : i + 1000]} for i in range(0, n, 1000))
    return build_cache(path, chunks, {"model": "synthetic"}, shard_tokens=3000)


def _run(cache, cfg, steps, run_dir=None, resume_from=None):
    batches = ShuffledBatches(cache, ["h"], cfg.batch_size, cfg.seed, cfg.buffer_tokens)
    total = cfg.epochs * batches.steps_per_epoch
    tr = Trainer(cfg, {"h": 16}, {"h": cache.tensor("h", 4096)}, total, torch.device("cpu"))
    if resume_from:
        tr.load(Run(resume_from, cfg, ["h"]))
    seen = []
    for batch in batches.batches(tr.step, cfg.epochs):
        if tr.step >= steps:
            break
        seen.append(batch["h"].sum().item())
        tr.train_step(batch)
    if run_dir:
        tr.save(Run(run_dir, cfg, ["h"]))
    return tr, seen


def test_resume_continues_exactly(tmp_path):
    cache = _synthetic_cache(tmp_path / "cache")
    cfg = make_config(TrainConfig, {"n_latents": 64, "k": 4, "hookpoints": ["h"], "batch_size": 700,
                                    "epochs": 2, "buffer_tokens": 6000, "dead_tokens": 1500})
    full, seen_full = _run(cache, cfg, 10**9)
    _, seen_a = _run(cache, cfg, 13, run_dir=tmp_path / "run")
    resumed, seen_b = _run(cache, cfg, 10**9, resume_from=tmp_path / "run")
    assert seen_a + seen_b == seen_full  # no batch lost or repeated
    for (n, p), q in zip(full.saes["h"].named_parameters(), resumed.saes["h"].parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    for n, t in full.stats["h"].items():
        assert torch.equal(t, resumed.stats["h"][n]), n


def test_cache_detects_corruption_and_resumes_build(tmp_path):
    cache = _synthetic_cache(tmp_path / "c")
    assert cache.n_tokens == 12_000 and len(cache.manifest["shards"]) == 4
    shard = tmp_path / "c" / cache.manifest["shards"][1]["file"]
    blob = bytearray(shard.read_bytes())
    blob[-5] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(SaekitError, match="checksum"):
        ActivationCache.open(tmp_path / "c").load_shard(1)
    with pytest.raises(SaekitError, match="no activations"):
        build_cache(tmp_path / "empty", iter([]), {})


def test_shuffle_buffer_is_bounded_over_all_hookpoints(tmp_path):
    """A buffer holds about `buffer_tokens` rows over all hookpoints (not per hookpoint), the
    hookpoints' rows stay aligned, and a resume from any step sees exactly the remaining batches."""
    x, _ = planted(n=12_000, d=16, n_feat=64)
    hooks = ["a", "b", "c"]
    cache = build_cache(tmp_path / "c", ({h: x[i : i + 1000] for h in hooks} for i in range(0, 12_000, 1000)),
                        {"model": "synthetic"}, shard_tokens=1000)
    loaded, real = [], cache.load_shard
    cache.load_shard = lambda i, hps=None: loaded.append(i) or real(i, hps)
    batches = ShuffledBatches(cache, hooks, 500, 0, buffer_tokens=6000)
    next(batches.batches())
    assert len(loaded) * 1000 * len(hooks) <= 6000  # 2 shards of 3 hookpoints, not 6
    assert ShuffledBatches(cache, ["a"], 500, 0, buffer_tokens=6000).per_buffer == 6
    full = list(batches.batches(0, 2))
    assert all(torch.equal(b["a"], b["b"]) and torch.equal(b["a"], b["c"]) for b in full)
    assert len(full) == 48 and all(torch.equal(u["a"], v["a"]) for u, v in zip(full[29:], batches.batches(29, 2),
                                                                                 strict=True))
