"""Cross-layer matching: folding, planted permutations, solver agreement, widths, universality,
layer skip, and `saekit match` on a real two-layer run."""

import json

import pytest
import torch

import saekit
from saekit import cli
from saekit.analyze import stability, universality
from saekit.analyze.crosslayer import cofiring, layer_skip, layer_skip_loss, residual_skip, similarity_decay
from saekit.codes import encode_all
from saekit.errors import SaekitError
from saekit.matching import FoldedSAE, Match, fold_scale, match
from saekit.sae import SAE, SAEConfig


def sae_pair(m: int = 512, d: int = 64, noise: float = 0.05, seed: int = 0, m_b: int | None = None):
    """SAE A with random unit rows, and B = a permuted (subset of) A with noise on the decoder.
    Returns A, B and the planted answer want[a] = the B latent holding A's latent a (or -1)."""
    g = torch.Generator().manual_seed(seed)
    a = SAE(SAEConfig(d, m, 8))
    with torch.no_grad():
        a.W_dec.copy_(torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1))
        a.W_enc.copy_(a.W_dec)
        a.b_enc.copy_(0.1 * torch.randn(m, generator=g))
    m_b = m_b or m
    src = torch.randperm(m, generator=g)[:m_b]  # B's latent j is A's latent src[j]
    b = SAE(SAEConfig(d, m_b, 8))
    with torch.no_grad():
        b.W_dec.copy_(torch.nn.functional.normalize(a.W_dec[src] + noise * torch.randn(m_b, d, generator=g), dim=1))
        b.W_enc.copy_(a.W_enc[src])
        b.b_enc.copy_(a.b_enc[src])
    want = torch.full((m,), -1, dtype=torch.long)
    want[src] = torch.arange(m_b)
    return a, b, want


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_folding_leaves_the_output_unchanged(architecture):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(32, 256, 8, architecture=architecture, threshold=0.3 if architecture == "batchtopk" else None))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_()
    sae.eval()
    x = torch.randn(300, 32) + sae.b_dec.detach()
    for scale in (torch.rand(256) * 5 + 0.1, fold_scale(sae, encode_all(sae, x), "mean"), fold_scale(sae)):
        f = FoldedSAE(sae, scale)
        torch.testing.assert_close(f(x), sae(x).detach(), atol=1e-5, rtol=1e-5)
        vals, idx = f.encode(x)
        # the folded parameters are the folded SAE: codes come from W_enc' and b_enc'
        pre = (x - f.b_dec) @ f.W_enc.T + f.b_enc
        nz = vals > 0
        torch.testing.assert_close(vals[nz], pre.gather(1, idx)[nz], atol=1e-4, rtol=1e-4)
    mean = fold_scale(sae, encode_all(sae, x), "mean")
    jump = SAE(SAEConfig(32, 256, 8, architecture="jumprelu"))
    with torch.no_grad():
        jump.threshold.uniform_(0.05, 0.5)
        jump.b_enc.normal_(0, 0.2)
    torch.testing.assert_close(fold_scale(jump), jump.threshold)  # SAE Match folds the threshold
    f = FoldedSAE(jump, fold_scale(jump))
    torch.testing.assert_close(f(x), jump(x).detach(), atol=1e-5, rtol=1e-5)
    vals, idx = f.encode(x)
    assert (vals[vals > 0] >= 1 - 1e-5).all()  # folded: every active latent is at least 1
    assert not torch.allclose(mean, torch.ones(256))  # the data-derived scale is not a no-op


@pytest.mark.parametrize("solver", ["exact", "sparse"])
def test_planted_permutation_is_recovered(solver):
    a, b, want = sae_pair(m=1024, noise=0.05)
    m = match(a, b, solver=solver)
    assert m.solver == solver
    assert (m.b_for_a == want).float().mean() >= 0.99
    assert m.score.min() > 0.8 and len(set(m.b_for_a.tolist())) == 1024  # one-to-one
    assert list(m.table.columns) == ["latent_a", "latent_b", "score"] and len(m.table) == 1024
    torch.testing.assert_close(m.a_for_b[m.b_for_a], torch.arange(1024))


def _with_enc(sae: SAE, rows: torch.Tensor) -> SAE:
    """A copy of `sae` with encoder rows `rows`."""
    out = SAE(sae.cfg)
    out.load_state_dict(sae.state_dict())
    with torch.no_grad():
        out.W_enc.copy_(rows)
    return out


def _planted(a: SAE, b: SAE) -> torch.Tensor:
    """For each B latent, the A latent it was copied from (the decoder rows' nearest)."""
    return (torch.nn.functional.normalize(b.W_dec, dim=1) @ a.W_dec.T).argmax(1)


def test_stability_of_a_permuted_noised_copy_and_of_independent_dictionaries():
    a, b, _ = sae_pair(m=1024, d=64, noise=0.02)  # B: a permuted copy of A, decoder rows noised
    with torch.no_grad():
        b.W_enc.add_(0.02 * torch.randn(b.W_enc.shape, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(4000, 64, generator=torch.Generator().manual_seed(6))
    same = stability(a, b, activations=x).to_dict()
    assert same["shared_0.7"] >= 0.99 and same["shared_0.9"] >= 0.99
    assert same["encoder"]["shared_0.9"] >= 0.99 and min(same["shared_both_0.7"], same["shared_both_0.9"]) >= 0.99
    assert same["decoder"]["p10"] > 0.95 and same["null"]["mean"] < 0.45  # a random dictionary matches far worse
    null = [same["null"][f"{p}_{t}"] for p in ("shared", "encoder_shared", "shared_both") for t in (0.7, 0.9)]
    assert max(null) <= 0.002  # a random dictionary shares nothing
    assert same["cofiring"]["n_tokens"] == 4000 and same["cofiring"]["mean_jaccard"] > 0.5

    other, _, _ = sae_pair(m=1024, d=64, seed=9)  # an independent random dictionary
    indep = stability(a, other, activations=x).to_dict()
    assert max(indep["shared_0.7"], indep["encoder"]["shared_0.7"], indep["shared_both_0.7"]) <= 0.002
    assert abs(indep["decoder"]["mean"] - indep["null"]["mean"]) < 0.02  # no better than chance
    assert indep["cofiring"]["mean_jaccard"] < 0.1

    # a whole latent needs both rows: B's encoder rows rotated away leave its decoder rows shared, no latent whole
    turned = stability(a, _with_enc(b, torch.randn(b.W_enc.shape, generator=torch.Generator().manual_seed(7))))
    assert turned.to_dict()["shared_0.7"] >= 0.99 and turned.to_dict()["shared_both_0.7"] <= 0.002

    # a quarter of the latents dead in both (never in the top k) and B's dead rows elsewhere: the decoder share
    # of all latents drops to ~3/4, the whole-latent share of the living ones stays whole
    dead_a = torch.arange(1024) < 256
    dead_b = dead_a[_planted(a, b)]  # B's latent j is dead where its A original is
    with torch.no_grad():
        a.b_enc[dead_a] = -100.0
        b.b_enc[dead_b] = -100.0
        b.W_dec[dead_b] = torch.nn.functional.normalize(torch.randn(int(dead_b.sum()), 64), dim=1)
    living = stability(a, b, activations=x).to_dict()
    assert living["both"]["n_alive_a"] == living["both"]["n_alive_b"] == 768
    assert 0.7 <= living["shared_0.7"] <= 0.76 and living["shared_both_0.7"] >= 0.99

    _, sub, _ = sae_pair(m=1024, d=64, noise=0.02, m_b=512)  # half of A: fractions are of the smaller SAE
    half = stability(a, sub, solver="sparse").to_dict()
    assert half["solver"] == "sparse" and half["n_latents_b"] == 512 and half["shared_0.9"] >= 0.99
    with pytest.raises(SaekitError, match="d_in differs"):
        stability(a, SAE(SAEConfig(32, 64, 4)))


def test_sparse_agrees_with_exact_where_matches_are_not_obvious():
    # noise comparable to the signal: many rows' nearest neighbour is not their planted pair
    a, b, want = sae_pair(m=2048, d=48, noise=0.6, seed=1)
    exact, sparse = match(a, b, solver="exact"), match(a, b, solver="sparse", candidates=16)
    assert (exact.b_for_a == want).float().mean() < 0.99  # the instance is not trivial
    assert (sparse.b_for_a == exact.b_for_a).float().mean() >= 0.99
    assert sparse.info["edges"] < 2 * 16 * 2048 and sparse.info["n_fallback"] == 0


def test_sparse_falls_back_when_candidates_have_no_full_matching():
    a, b, want = sae_pair(m=256, noise=0.05)
    with torch.no_grad():  # 40 A rows share one nearest B latent: one candidate each cannot match them all
        a.W_dec[:40] = b.W_dec[0] + 0.01 * torch.randn(40, 64)
    fb = match(a, b, solver="sparse", candidates=1)
    assert fb.info["n_fallback"] > 0 and (fb.b_for_a >= 0).all() and len(set(fb.b_for_a.tolist())) == 256
    none = match(a, b, solver="sparse", candidates=1, fallback="none")
    assert (none.b_for_a == -1).sum() == fb.info["n_fallback"] and none.score[none.b_for_a < 0].isnan().all()
    assert (fb.b_for_a[40:] == want[40:]).float().mean() > 0.95  # the rest still finds its planted pair


@pytest.mark.parametrize("narrower", ["b", "a"])
def test_different_widths(narrower):
    a, b, want = sae_pair(m=512, noise=0.05, m_b=384)  # B holds 384 of A's 512 latents
    if narrower == "a":
        kept = torch.nonzero(want >= 0).flatten()
        a, b, want = b, a, torch.empty(384, dtype=torch.long).index_put_((want[kept],), kept)
    for solver in ("exact", "sparse"):
        m = match(a, b, solver=solver)
        assert m.m_a == a.n_latents and m.m_b == b.n_latents
        assert int((m.b_for_a >= 0).sum()) == 384 and len(set(m.b_for_a[m.b_for_a >= 0].tolist())) == 384
        planted = want >= 0
        assert (m.b_for_a[planted] == want[planted]).float().mean() >= 0.99
        # shared: a fraction of the narrower side's latents (all 384 matched well, none identical)
        assert m.summary()["shared_0.7"] >= 0.99 and m.shared(0.999) < 0.01


def test_activation_matching_across_models_of_different_width():
    """B reads a rotated, wider input space: decoder rows cannot be compared, codes can."""
    torch.manual_seed(0)
    a, _, _ = sae_pair(m=256, d=32, noise=0)
    perm, q = torch.randperm(256), torch.linalg.qr(torch.randn(48, 48)).Q[:, :32]  # x_b = q x_a
    b = SAE(SAEConfig(48, 256, 8))
    with torch.no_grad():
        b.W_dec.copy_(a.W_dec[perm] @ q.T)
        b.W_enc.copy_(a.W_enc[perm] @ q.T)
        b.b_enc.copy_(a.b_enc[perm])
    xa = torch.randn(20000, 32)
    with pytest.raises(SaekitError, match="d_in differs"):
        match(a, b)
    for solver in ("exact", "sparse"):
        m = match(a, b, "activations", solver, activations=(xa, xa @ q.T))
        live = encode_all(a, xa).counts() > 0
        want = torch.empty(256, dtype=torch.long)
        want[perm] = torch.arange(256)
        assert live.float().mean() > 0.9
        assert (m.b_for_a[live] == want[live]).float().mean() >= 0.99 and m.score[live].min() > 0.99
    lan = match(a, b, "activations", "argmax", activations=(xa, xa @ q.T), min_score=0.1)
    assert (lan.b_for_a[live] == want[live]).float().mean() >= 0.99
    with pytest.raises(SaekitError, match="same tokens"):
        match(a, b, "activations", activations=(xa, xa[:100] @ q.T))


def test_chains_compose_and_save_and_load(tmp_path):
    a, b, want_ab = sae_pair(m=256, noise=0.02, seed=0)
    _, c, want_bc = sae_pair(m=256, noise=0.02, seed=3)
    with torch.no_grad():  # C is a permuted copy of B (sae_pair built it from its own A; rebuild from B)
        g = torch.Generator().manual_seed(5)
        perm = torch.randperm(256, generator=g)
        c.W_dec.copy_(b.W_dec[perm])
        c.W_enc.copy_(b.W_enc[perm])
    ab, bc = match(a, b), match(b, c)
    ac = ab.then(bc)
    want = torch.empty(256, dtype=torch.long)
    want[perm] = torch.arange(256)
    assert (ac.b_for_a == want[want_ab]).float().mean() >= 0.99
    for suffix in (".json", ".parquet"):
        ab.save(tmp_path / f"m{suffix}")
        back = Match.load(tmp_path / f"m{suffix}")
        assert torch.equal(back.b_for_a, ab.b_for_a) and torch.allclose(back.score, ab.score)
        assert back.method == "decoder" and back.m_b == 256
    with pytest.raises(SaekitError, match=".json or .parquet"):
        ab.save(tmp_path / "m.csv")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SaekitError, match="not a readable"):
        Match.load(tmp_path / "bad.json")
    with pytest.raises(SaekitError, match="cannot chain"):
        ab.then(match(*sae_pair(m=128)[:2]))
    rows = similarity_decay([a, b, c], {(0, 1): ab, (1, 2): bc, (0, 2): match(a, c)})
    assert [r["distance"] for r in rows] == [1, 2] and rows[1]["chained"] > 0.95 and rows[1]["direct"] > 0.95


def test_universality_true_pairs_significant_shuffled_not():
    a, b, want = sae_pair(m=512, d=64, noise=0.15, seed=2)
    true = universality(a, b, want, n_shuffles=30)
    assert true.svcca_p == true.rsa_p == 1 / 31  # above every shuffle
    assert true.svcca > true.svcca_null + 0.2 and true.rsa > 0.3
    # a shuffled pairing is a draw from the null: its p-value is uniform, so check many
    g = torch.Generator().manual_seed(0)
    nulls = [universality(a, b, want[torch.randperm(512, generator=g)], n_shuffles=30, seed=i) for i in range(10)]
    for stat in ("svcca_p", "rsa_p"):
        ps = sorted(getattr(u, stat) for u in nulls)
        assert sum(p < 0.05 for p in ps) <= 2 and ps[5] > 0.2
    with pytest.raises(SaekitError, match="entries"):
        universality(a, b, want[:10])


def test_layer_skip_and_cofiring_on_a_permuted_copy():
    """B = A permuted, on the same activations: the matched skip reproduces A's reconstruction,
    identity does not, and matched pairs fire on the same tokens."""
    a, b, want = sae_pair(m=256, d=32, noise=0)
    with torch.no_grad():
        src = want.argsort()
        b.W_dec.copy_(a.W_dec[src])
    x = torch.randn(4000, 32)
    own = layer_skip(a, a, torch.arange(256), x, x)
    assert layer_skip(a, b, want, x, x) == pytest.approx(own, abs=1e-5)
    assert layer_skip(a, b, want, encode_all(a, x), x) == pytest.approx(own, abs=1e-5)  # from codes, no encode
    assert layer_skip(a, b, torch.arange(256), x, x) < own - 0.3
    co = cofiring(encode_all(a, x), encode_all(b, x), want)
    assert co["mean_jaccard"] == pytest.approx(1.0) and co["share_jaccard_ge_0.5"] == 1.0
    assert cofiring(encode_all(a, x), encode_all(b, x), torch.arange(256))["mean_jaccard"] < 0.2


def test_residual_baseline_on_planted_layers():
    """Layer t+1 a rotation of layer t, B's dictionary the same rotation of A's: the SAE skip keeps A's own
    explained variance, the residual baseline (layer t as the prediction) explains nothing; layer t+1 a
    slightly noised copy of layer t: the residual explains all but the noise."""
    g = torch.Generator().manual_seed(3)
    a, _, _ = sae_pair(m=256, d=32, noise=0)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    b = SAE(a.cfg)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.W_dec.copy_(a.W_dec @ q)
        b.b_dec.copy_(a.b_dec @ q)
    x = torch.randn(4000, 32, generator=g)
    own = layer_skip(a, a, torch.arange(256), x, x)
    assert layer_skip(a, b, torch.arange(256), x, x @ q) == pytest.approx(own, abs=1e-4)
    assert residual_skip(x, x @ q, 32) < -0.5 < own
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    want = 1 - float(((noisy - x) ** 2).sum()) / float(((noisy - noisy.mean(0)) ** 2).sum())
    assert residual_skip(x, noisy, 32) == pytest.approx(want, abs=1e-4) and want > 0.98
    assert residual_skip(x, noisy, 32, max_tokens=100) != pytest.approx(want, abs=1e-6)  # max_tokens is honoured
    with pytest.raises(SaekitError, match="32"):
        residual_skip(x, torch.randn(4000, 16), 32)


def test_residual_loss_replaces_layer_b_by_layer_a(smollm2):
    """dloss_residual equals a two-pass reference: layer 1 read in a clean run, then written over layer 2."""
    h1, h2 = "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"
    toks = torch.randint(200, 5000, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 24, dtype=torch.bool)
    mask[:, 0] = False
    sae = SAE(SAEConfig(576, 64, 4))
    got = layer_skip_loss(smollm2, sae, sae, {}, h1, h2, toks, mask, residual=True)
    from saekit.model import logprobs

    store = {}
    clean = logprobs(smollm2, toks, hooks=((h1, lambda act: store.setdefault("x", act.clone())),))
    swap = logprobs(smollm2, toks, h2, lambda act: torch.where(mask.unsqueeze(-1).to(act.device), store["x"], act))
    ce = lambda lp: float(-lp[:, :-1].gather(-1, toks[:, 1:].unsqueeze(-1)).squeeze(-1)[mask[:, 1:]].mean())  # noqa: E731
    assert got["ce_clean"] == pytest.approx(ce(clean), rel=1e-4)
    assert got["dloss_residual"] == pytest.approx(ce(swap) - ce(clean), rel=1e-3, abs=1e-4)
    assert got["dloss_residual"] > 0.01  # skipping a block costs loss


def test_bad_arguments():
    a, b, _ = sae_pair(m=64)
    with pytest.raises(SaekitError, match="solver"):
        match(a, b, solver="hungarian")
    with pytest.raises(SaekitError, match="method"):
        match(a, b, method="weights")
    with pytest.raises(SaekitError, match="needs activations"):
        match(a, b, method="activations")
    with pytest.raises(SaekitError, match="fold"):
        match(a, b, fold="max")
    assert saekit.match is match


def test_cli_matches_two_layers_of_a_real_run(act_cache_dir, tmp_path, capsys):
    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    run = tmp_path / "run"
    assert cli.main(["train", "--hookpoints", f"[{', '.join(hooks)}]", "--n_tokens", "6000", "--val_tokens", "600",
                     "--ctx_len", "64", "--epochs", "2", "--expansion", "2", "--k", "16", "--batch_size", "500",
                     "--eval_contexts", "2", "--cache_dir", str(act_cache_dir), "--out", str(run), "--quiet"]) == 0
    a, b = (str(run / h) for h in hooks)
    assert cli.main(["match", a, b, "--solver", "sparse", "--out", str(tmp_path / "m.parquet")]) == 0
    m = Match.load(tmp_path / "m.parquet")
    assert m.m_a == 1152 and (m.b_for_a >= 0).all() and m.solver == "sparse"
    assert "latent_a" in capsys.readouterr().out
    assert cli.main(["match", a, b, "--method", "activations", "--min-score", "0.1"]) == 0
    assert (run / "analysis" / "matches" / f"{hooks[0]}__{hooks[1]}.json").is_file()
    assert cli.main(["match", str(run), "--chain", "--contexts", "1", "--quiet"]) == 0
    out = json.loads((run / "analysis" / "matching.json").read_text())
    row = out["layers"][0]
    for k in ("ev_match", "ev_identity", "ev_top1", "ev_residual", "dloss_match", "dloss_identity", "dloss_top1",
              "dloss_residual", "svcca_p"):
        assert k in row
    assert row["ev_sae_b"] > row["ev_identity"] and row["dloss_sae_b"] < row["dloss_identity"]
    assert (run / "analysis" / "matching.md").is_file()
    assert cli.main(["match", a]) == 2
    assert cli.main(["match", a, str(tmp_path / "nowhere")]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_match_names_outputs_by_b_and_never_overwrites_silently(tmp_path, capsys):
    """A matched against the same hookpoint of two other runs writes two files in A's run's
    analysis folder (none in the SAE folder); a second time is refused unless --force."""
    from saekit.config import TrainConfig
    from saekit.run import Run

    hook = "blocks.6.hook_resid_post"
    a, b, _ = sae_pair(m=64, d=16)
    for name, sae in (("a", a), ("b1", b), ("b2", a)):
        Run.create(TrainConfig(hookpoints=[hook], out=str(tmp_path / name)))
        sae.save(tmp_path / name / hook)
    sides = [str(tmp_path / n / hook) for n in ("a", "b1", "b2")]
    outs = [tmp_path / "a" / "analysis" / "matches" / f"{hook}__{n}@{hook}.json" for n in ("b1", "b2")]
    for b_side, out in zip(sides[1:], outs, strict=True):
        assert cli.main(["match", sides[0], b_side, "--quiet"]) == 0
        assert f"match written to {out}" in capsys.readouterr().out
    assert Match.load(outs[0]).b_for_a.tolist() != Match.load(outs[1]).b_for_a.tolist()
    assert sorted(p.name for p in (tmp_path / "a" / hook).iterdir()) == ["cfg.json", "sae.safetensors"]
    before = outs[0].read_text()
    assert cli.main(["match", sides[0], sides[1], "--solver", "argmax", "--quiet"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and outs[0].read_text() == before
    assert cli.main(["match", sides[0], sides[1], "--solver", "argmax", "--force", "--quiet"]) == 0
    assert Match.load(outs[0]).solver == "argmax"
