"""Feature geometry on dictionaries with planted structure: a known covariance power law, Gaussian
versus clumpy clouds, topic lobes, a circular feature, points on a ring in cyclic order, a parallelogram;
bad inputs; the CLI."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_mutual_info_score

from saekit import analyze, cli
from saekit.analyze.geometry import mixture_index, separability_index, shrunk_eigenvalues
from saekit.codes import encode_all
from saekit.errors import SaekitError
from saekit.sae import SAE, SAEConfig


def code_sae(W_dec: torch.Tensor, k: int) -> SAE:
    """An SAE whose encoder reads latent i's value from input coordinate i (W_enc = [I | 0]), so
    activations `[z, 0, ...]` encode to exactly the codes z (k nonzeros per token at most);
    the decoder rows are `W_dec [m, d]`, d >= m."""
    m, d = W_dec.shape
    sae = SAE(SAEConfig(d_in=d, n_latents=m, k=k)).eval().requires_grad_(False)
    sae.W_dec.copy_(W_dec)
    sae.W_enc.copy_(torch.eye(m, d))
    sae.b_enc.zero_()
    sae.b_dec.zero_()
    return sae


def as_acts(Z: torch.Tensor, d: int) -> torch.Tensor:
    return F.pad(Z, (0, d - Z.shape[1]))


def planted_cloud(alpha: float, d: int, m: int, seed: int) -> torch.Tensor:
    """Rows ~ N(0, Q diag(r^-alpha) Q^T), Q a random rotation."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.arange(1, d + 1, dtype=torch.float64) ** -alpha
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return ((torch.randn(m, d, generator=g, dtype=torch.float64) * lam.sqrt()) @ Q.T).float()


# -- galaxy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.3, 0.6])
def test_planted_power_law_is_recovered(alpha):
    d = 256
    g = analyze.geometry(code_sae(planted_cloud(alpha, d, 8192, seed=1), k=1), rank_window=(10, 150), max_rows=1000)
    assert g.power_law_alpha == pytest.approx(alpha, abs=0.03)
    assert g.power_law_alpha_shrunk == pytest.approx(alpha, abs=0.04)
    lo, hi = g.power_law_ci
    assert lo < g.power_law_alpha < hi and hi - lo < 0.05
    assert g.rank_window == (10, 150) and len(g.eigenvalues) == d
    assert (g.eigenvalues[:-1] >= g.eigenvalues[1:]).all()  # descending
    assert g.power_law_r2 > 0.95
    json.dumps(g.to_dict())


def test_power_law_of_chosen_latents_ignores_the_others():
    """The chosen (living) rows carry a planted law; larger isotropic rows beside them hide it."""
    d = 256
    live, dead = planted_cloud(0.6, d, 4096, seed=1), 3 * planted_cloud(0.0, d, 8192, seed=3)
    sae = code_sae(torch.cat([dead[:4096], live, dead[4096:]]), k=1)
    only = analyze.geometry(sae, latents=torch.arange(4096, 8192), max_rows=500, n_boot=0)
    alone = analyze.geometry(code_sae(live, k=1), max_rows=500, n_boot=0)
    assert only.n_latents == 4096 and only.power_law_alpha == alone.power_law_alpha
    assert only.power_law_alpha == pytest.approx(0.6, abs=0.05)
    assert analyze.geometry(sae, max_rows=500, n_boot=0).power_law_alpha < 0.4  # all rows: the law is hidden
    with pytest.raises(SaekitError, match="at least 4"):
        analyze.geometry(sae, latents=torch.arange(3))


def test_isotropic_cloud_has_no_power_law_and_no_clustering():
    g = analyze.geometry(code_sae(planted_cloud(0.0, 64, 4000, seed=2), k=1), n_boot=200)
    assert g.rank_window == (10, 64)  # clipped to the ranks that exist
    # the raw sample spectrum has a Marchenko-Pastur slope; shrinkage removes it
    assert 0 < g.power_law_alpha < 0.35 and abs(g.power_law_alpha_shrunk) < 0.03
    lo, hi = g.clustering_ci
    assert lo <= 0 <= hi or abs(g.clustering) < 0.3
    assert abs(g.clustering) < 1.0 and hi - lo < 2.0
    assert g.clustering_dims == 64 and g.clustering_rows == 4000


def test_shrinkage_leaves_a_well_sampled_spectrum_alone():
    lam = np.linspace(1, 10, 20)
    assert np.allclose(shrunk_eigenvalues(lam, 10**7), lam, rtol=1e-2)


def test_clumpy_cloud_is_clustered():
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(8, 64, generator=gen)
    W = centres[torch.randint(0, 8, (3000,), generator=gen)] + 0.3 * torch.randn(3000, 64, generator=gen)
    g = analyze.geometry(code_sae(W, k=1))
    assert g.clustering > 10 and g.clustering_ci[0] > 5


# -- lobes ----------------------------------------------------------------------------------
TOPICS, PER_TOPIC, SILENT, D, K = 3, 40, 6, 160, 4


def topic_setup(shuffled: bool, n_docs: int = 60, seed: int = 0):
    """Decoder rows clustered by topic (3 x 40 latents, 6 latents that never fire); each 256-token
    document draws K features per token from one topic (or, shuffled, from 40 random latents)."""
    g = torch.Generator().manual_seed(seed)
    m = TOPICS * PER_TOPIC + SILENT
    topic = torch.arange(m) // PER_TOPIC
    centres = F.normalize(torch.randn(TOPICS + 1, D, generator=g), dim=1)
    W = F.normalize(centres[topic] + 0.6 * F.normalize(torch.randn(m, D, generator=g), dim=1), dim=1)
    docs = []
    for _ in range(n_docs):
        t = int(torch.randint(0, TOPICS, (1,), generator=g))
        feats = torch.randperm(TOPICS * PER_TOPIC, generator=g)[:PER_TOPIC] if shuffled \
            else torch.arange(t * PER_TOPIC, (t + 1) * PER_TOPIC)
        pick = feats[torch.stack([torch.randperm(PER_TOPIC, generator=g)[:K] for _ in range(256)])]
        z = torch.zeros(256, m).scatter_(1, pick, 0.5 + torch.rand(256, K, generator=g))
        docs.append(z)
    return code_sae(W, k=K), as_acts(torch.cat(docs), D), topic


def test_lobes_recover_planted_topics():
    sae, x, topic = topic_setup(shuffled=False)
    lb = analyze.lobes(sae, x, n_lobes=3, chunk=256)
    fired = lb.labels >= 0
    assert fired.tolist() == [True] * (TOPICS * PER_TOPIC) + [False] * SILENT  # silent latents: -1
    assert (lb.geometric_labels[~fired] == -1).all()
    assert adjusted_mutual_info_score(lb.labels[fired], topic[fired]) >= 0.8
    assert lb.ami >= 0.8 and lb.z_score > 5 and abs(lb.null_mean) < 0.1
    assert lb.n_chunks == 60 and lb.n_tokens == 60 * 256 and lb.n_fired == 120
    assert sorted(lb.lobe_sizes) == [40, 40, 40]
    # the same from precomputed codes, and with the clustering on a subsample of latents
    codes = encode_all(sae, x)
    assert torch.equal(analyze.lobes(sae, codes=codes, n_lobes=3).labels, lb.labels)
    sub = analyze.lobes(sae, codes=codes, n_lobes=3, max_latents=60)
    assert sub.n_clustered == 60 and sub.ami >= 0.8
    json.dumps(lb.to_dict())


def test_shuffled_topics_give_no_lobe_agreement():
    sae, x, topic = topic_setup(shuffled=True)
    lb = analyze.lobes(sae, x, n_lobes=3, chunk=256)
    assert lb.ami < 0.1
    assert abs(adjusted_mutual_info_score(lb.labels[lb.labels >= 0], topic[lb.labels >= 0])) < 0.1


# -- multi-dimensional features -------------------------------------------------------------
def circle_setup(n: int = 6000, seed: int = 0):
    """12 latents on a circle in one plane (token at angle theta activates the two latents around
    it with the values that put the reconstruction at (cos theta, sin theta)); latents 12, 13
    orthogonal and firing independently; 50 random background latents, 2 on per token."""
    g = torch.Generator().manual_seed(seed)
    d, nb = 128, 50
    m = 14 + nb
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    step = 2 * math.pi / 12
    phi = torch.arange(12) * step
    W = torch.empty(m, d)
    W[:12] = torch.cos(phi)[:, None] * Q[:, 0] + torch.sin(phi)[:, None] * Q[:, 1]
    W[12], W[13] = Q[:, 2], Q[:, 3]
    W[14:] = F.normalize(torch.randn(nb, d, generator=g), dim=1)
    Z = torch.zeros(n, m)
    kind = torch.randint(0, 2, (n,), generator=g)
    rows = torch.arange(n)
    theta = torch.rand(n, generator=g) * 2 * math.pi
    i0 = (theta / step).floor().long() % 12
    circ = rows[kind == 0]
    t, a = theta[circ], i0[kind == 0]
    Z[circ, a] = torch.sin(phi[a] + step - t) / math.sin(step)
    Z[circ, (a + 1) % 12] = torch.sin(t - phi[a]) / math.sin(step)
    pair = rows[kind == 1]
    on = torch.rand(len(pair), 2, generator=g) < 0.5
    on[~on.any(1), 0] = True
    Z[pair, 12:14] = on * (0.5 + torch.rand(len(pair), 2, generator=g))
    bg = 14 + torch.stack([torch.randperm(nb, generator=g)[:2] for _ in range(n)])
    Z.scatter_(1, bg, 0.5 + torch.rand(n, 2, generator=g))
    return code_sae(W, k=4), as_acts(Z, d)


def test_circle_ranks_first_among_multidimensional_features():
    sae, x = circle_setup()
    found = analyze.multidim_features(sae, x)
    assert found.latents[0] == list(range(12))
    given = analyze.multidim_features(sae, x, clusters=[[12, 13], list(range(12)), [20, 21]])
    assert given.latents[0] == list(range(12)) and len(given) == 3
    circle = given.iloc[0]
    pair = given[given.latents.map(tuple) == (12, 13)].iloc[0]
    assert circle.score > 3 * pair.score
    assert circle.mixture_index < 0.3 < pair.mixture_index
    assert circle.separability_index > 0.5 > pair.separability_index
    assert circle.variance_share == pytest.approx(1.0, abs=1e-6) and circle.pcs == [0, 1]


def test_mixture_and_separability_indices_on_known_shapes():
    rng = np.random.default_rng(0)
    th = rng.uniform(0, 2 * np.pi, 4000)
    circle = np.stack([np.cos(th), np.sin(th)], 1)
    axes = np.zeros((4000, 2))  # one of two orthogonal features on at a time
    which = rng.integers(0, 2, 4000)
    axes[np.arange(4000), which] = rng.uniform(0.5, 1.5, 4000)
    rot = np.array([[np.cos(0.5), -np.sin(0.5)], [np.sin(0.5), np.cos(0.5)]])
    square = rng.uniform(-1, 1, (4000, 2)) @ rot.T  # two independent uniform features, rotated
    assert mixture_index(axes) > 0.45 > 0.25 > mixture_index(circle)
    assert separability_index(square) < 0.05 < 0.5 < separability_index(circle)


# -- circles in a cyclic order --------------------------------------------------------------
def planted_ring(n: int, behind: float = 0.0, noise: float = 0.02, d: int = 64, seed: int = 0) -> torch.Tensor:
    """n points evenly on a unit circle in row order (row i at angle 2 pi i / n) in a random plane
    of R^d, plus two orthogonal directions of std `behind` whose values are uncorrelated with the
    circle (so with behind > 1 the circle is PCs 3 and 4), plus isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    th = 2 * math.pi * torch.arange(n) / n
    C = torch.stack([torch.ones(n), torch.cos(th), torch.sin(th)], 1)
    D = torch.randn(n, 2, generator=g)
    D = D - C @ torch.linalg.lstsq(C, D).solution
    D = behind * D / D.std(0)
    return C[:, 1:] @ Q[:, :2].T + D @ Q[:, 2:4].T + noise * torch.randn(n, d, generator=g)


def test_circularity_finds_a_ring_in_order_and_not_a_shuffled_one():
    X = planted_ring(12, behind=2.0)  # months: the ring sits behind two larger directions
    r = analyze.circularity(X, n_pcs=4)
    assert r.pcs == (2, 3) and r.neighbours == 12 and r.p_value < 0.005 and r.radius_cv < 0.1 and r.gap_ratio < 1.3
    assert r.neighbours_top < 6 and r.p_value_top > 0.1  # PCs 1 and 2 hold no ring
    assert sorted(r.order) == list(range(12)) and r.components.shape == (4, 64)
    walk = np.diff(r.order + r.order[:1]) % 12
    assert set(walk.tolist()) in ({1}, {11})  # the angular order is the cyclic order, one way round
    shuffled = analyze.circularity(X[torch.randperm(12, generator=torch.Generator().manual_seed(1))], n_pcs=4)
    assert shuffled.neighbours < 12 and shuffled.p_value > 0.05
    days = analyze.circularity(planted_ring(7, noise=0.05, seed=2), n_pcs=4)
    assert days.pcs == (0, 1) and days.neighbours_top == 7 and days.p_value_top < 0.01 and days.p_value < 0.05


def test_circularity_tells_an_open_arc_from_a_ring():
    """12 points in order on 240 degrees of a circle: every angular neighbour is a cyclic one (the
    ends meet across the centre), but the step from the last to the first is ~5x the others."""
    g = torch.Generator().manual_seed(3)
    th = torch.arange(12) * (2 * math.pi / 3) / 11
    Q, _ = torch.linalg.qr(torch.randn(32, 2, generator=g))
    arc = torch.stack([th.cos(), th.sin()], 1) @ Q.T + 0.01 * torch.randn(12, 32, generator=g)
    r = analyze.circularity(arc)
    assert r.neighbours == 12 and r.p_value < 0.005
    assert r.gap_after == 11 and r.gap_ratio == pytest.approx(math.sin(math.pi / 3) / math.sin(math.pi / 33), rel=0.1)


def test_circularity_null_holds_the_choice_of_plane():
    """Gaussian blobs: the best of six planes is compared with the best of six planes under each
    relabelling, so p < 0.05 stays rare (taken against one plane's null it is ~25 %)."""
    for n in (7, 12):
        ps = np.array([analyze.circularity(torch.randn(n, 64, generator=torch.Generator().manual_seed(s)),
                                           n_pcs=4, n_perm=200, seed=s).p_value for s in range(60)])
        assert (ps < 0.05).mean() <= 0.07


def test_circularity_refuses_bad_points():
    with pytest.raises(SaekitError, match="n >= 5"):
        analyze.circularity(torch.randn(4, 8))
    with pytest.raises(SaekitError, match="non-finite"):
        analyze.circularity(torch.full((7, 8), math.nan))
    with pytest.raises(SaekitError, match=">= 2 dimensions"):
        analyze.circularity(torch.arange(7.0)[:, None] * torch.ones(1, 8))


# -- crystals -------------------------------------------------------------------------------
def test_planted_parallelogram_is_the_top_crystal():
    g = torch.Generator().manual_seed(4)
    W = F.normalize(torch.randn(500, 64, generator=g), dim=1)
    Q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    x, y, z = Q[:, 0] * math.sqrt(0.8), Q[:, 1] * math.sqrt(0.2), Q[:, 2] * math.sqrt(0.8)
    W[10], W[200], W[300], W[450] = x + y, x - y, z + y, z - y  # unit rows, 10 - 200 = 300 - 450
    cr = analyze.crystals(code_sae(W, k=1), n=10)
    top = cr.iloc[0]
    assert {frozenset((top.a, top.b)), frozenset((top.c, top.d))} == {frozenset((10, 200)), frozenset((300, 450))}
    assert (W[top.a] - W[top.b] - W[top.c] + W[top.d]).norm() < 1e-5  # a - b = c - d, signs aligned
    assert top.cos == pytest.approx(1, abs=1e-5) and top.kind == "parallelogram"
    assert top.score > cr.score.iloc[1] + 0.1
    assert {"a", "b", "c", "d", "cos", "length_ratio", "kind", "score"} <= set(cr.columns)


# -- bad inputs and the CLI -----------------------------------------------------------------
def test_bad_inputs_are_refused_with_a_clear_message():
    sae = code_sae(F.normalize(torch.randn(20, 24), dim=1), k=2)
    with pytest.raises(SaekitError, match=r"must be \[batch, 24\]"):
        analyze.lobes(sae, torch.randn(600, 16))
    with pytest.raises(SaekitError, match="no activations"):
        analyze.multidim_features(sae, torch.zeros(0, 24))
    with pytest.raises(SaekitError, match="no activations"):
        analyze.lobes(sae, iter([]))
    with pytest.raises(SaekitError, match="at least 2 chunks of 256 tokens"):
        analyze.lobes(sae, torch.randn(300, 24))
    with pytest.raises(SaekitError, match="either activations or codes"):
        analyze.lobes(sae)
    with pytest.raises(SaekitError, match="disjoint"):
        analyze.multidim_features(sae, torch.randn(300, 24), clusters=[[0, 1], [1, 2]])


def test_cli_geometry_on_a_bare_sae_folder(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder = tmp_path / "sae"
    SAE(SAEConfig(d_in=32, n_latents=256, k=4, hookpoint="blocks.0.hook_resid_post")).save(folder)
    assert cli.main(["analyze", "geometry", str(folder), "--quiet"]) == 0
    res = json.loads((folder / "analysis" / "geometry.json").read_text())["blocks.0.hook_resid_post"]["geometry"]
    assert res["galaxy"]["n_latents"] == 256 and res["lobes"] is None and "no activations" in res["notes"][0]
    assert len(res["crystals"]) > 0
    save_file({"x": torch.randn(1200, 32)}, tmp_path / "acts.safetensors")
    assert cli.main(["analyze", "geometry", str(folder), "--activations", str(tmp_path / "acts.safetensors"),
                     "--quiet"]) == 0
    res = json.loads((folder / "analysis" / "geometry.json").read_text())["blocks.0.hook_resid_post"]["geometry"]
    assert res["lobes"]["n_chunks"] == 4 and len(res["lobes"]["labels"]) == 256
    assert res["multidim"] is not None and len(res["lobe_map"]["x"]) == res["lobes"]["n_fired"]
