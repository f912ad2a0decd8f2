"""Evidence that BatchTopK, OrtSAE and subspace init do what they claim (synthetic truth)."""

import pytest
import torch

from saekit.errors import SaekitError
from saekit.init import init_sae, subspace_basis
from saekit.linalg import effective_dimension
from saekit.ortho import max_cosine, ortho_loss
from saekit.sae import SAE, SAEConfig
from saekit.trainer import fit


def sparse_data(n, d, feats, active=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, len(feats), generator=g) < active / len(feats)
    return (on * (torch.rand(n, len(feats), generator=g) + 0.5)) @ feats


def unit(t):
    return t / t.norm(dim=1, keepdim=True)


def dead_share(sae, x):
    vals, idx = sae.encode(x)
    return float((torch.bincount(idx[vals > 0], minlength=sae.n_latents) == 0).double().mean())


def test_subspace_init_prevents_dead_latents_on_low_rank_data():
    g = torch.Generator().manual_seed(0)
    d, r = 64, 19  # data confined to a random 19-dim subspace (~0.3 d)
    P = torch.linalg.qr(torch.randn(d, r, generator=g))[0]
    feats = unit(torch.randn(256, r, generator=g) @ P.T)
    x = sparse_data(40_000, d, feats)
    dead = {}
    for init in ("tied", "subspace"):
        sae = fit(x, n_latents=512, k=4, batch_size=500, epochs=2, init=init, dead_tokens=5_000)
        dead[init] = dead_share(sae, x[:20_000])
    assert dead["subspace"] <= 0.01
    assert dead["tied"] >= dead["subspace"] + 0.05


def test_subspace_rank_and_effective_dimension():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(32, 6, generator=g))[0]
    sample = torch.randn(5000, 6, generator=g) @ basis.T + 1e-4 * torch.randn(5000, 32, generator=g)
    P = subspace_basis(sample, variance=0.99)
    assert P.shape == (32, 6)
    torch.testing.assert_close(P @ P.T @ basis, basis, atol=1e-3, rtol=0)  # spans the true subspace
    assert subspace_basis(sample, rank=3).shape == (32, 3)
    dims = effective_dimension(sample)
    assert dims["dims_99"] == 6 and dims["share_99"] == 6 / 32
    sae = SAE(SAEConfig(d_in=32, n_latents=64, k=4))
    report = init_sae(sae, sample, "subspace", subspace_variance=0.99)
    assert report["subspace_rank"] == 6
    resid = sae.W_dec - sae.W_dec @ P @ P.T  # every decoder row inside the subspace
    assert resid.abs().max() < 1e-5
    torch.testing.assert_close(sae.W_enc, sae.W_dec)
    with pytest.raises(SaekitError, match="init must be"):
        init_sae(sae, sample, "orthogonal")
    with pytest.raises(SaekitError, match="subspace_rank"):
        subspace_basis(sample, rank=40)


def test_effective_rank_closed_form():
    # singular values 4, 2, 1, 1 -> p = (.5, .25, .125, .125), H = 1.75 ln 2
    u = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    sample = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)) @ u
    sample = torch.cat([sample, -sample]) / 2**0.5  # zero mean, same singular values
    assert effective_dimension(sample)["effective_rank"] == pytest.approx(2 ** 1.75)


def test_ortho_loss_matches_dense_definition():
    W = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    loss = ortho_loss(W, torch.Generator().manual_seed(0), chunk_size=100)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    ref = 0
    for chunk in perm.tensor_split(3):
        C = unit(W[chunk]) @ unit(W[chunk]).T - 10 * torch.eye(len(chunk), dtype=W.dtype)
        ref = ref + C.max(1).values.pow(2).mean() / 3
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, W), torch.autograd.grad(ref, W), strict=False):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("block", [64, 70, 1000])
def test_max_cosine_matches_dense_search(block):
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(300, 12, generator=g, dtype=torch.float64), torch.randn(40, 12, generator=g, dtype=torch.float64)
    S = unit(A) @ unit(A).T
    S.fill_diagonal_(-torch.inf)
    for got, want in ((max_cosine(A, block=block), S.max(1)),
                      (max_cosine(A, B, block=block), (unit(A) @ unit(B).T).max(1))):
        torch.testing.assert_close(got[0], want.values)
        assert torch.equal(got[1], want.indices)


def test_ortho_penalty_lowers_decoder_similarity():
    g = torch.Generator().manual_seed(2)
    base = unit(torch.randn(96, 48, generator=g))
    twins = unit(base[:32] + 0.35 * unit(torch.randn(32, 48, generator=g)))  # near-parallel pairs
    x = sparse_data(40_000, 48, torch.cat([base, twins]), seed=3)
    out = {}
    for gamma in (0.0, 0.25):
        sae = fit(x, n_latents=256, k=4, batch_size=500, epochs=2, ortho_penalty=gamma, architecture="batchtopk")
        fvu = float((sae(x[:10_000]) - x[:10_000]).pow(2).sum() / (x[:10_000] - x[:10_000].mean(0)).pow(2).sum())
        out[gamma] = (float(max_cosine(sae.W_dec)[0].mean()), fvu)
    assert out[0.25][0] <= out[0.0][0] - 0.05, out
    assert out[0.25][1] <= out[0.0][1] + 0.05, out  # reconstruction within 0.05 FVU


def test_batchtopk_l0_and_threshold_inference():
    g = torch.Generator().manual_seed(4)
    x = sparse_data(30_000, 32, unit(torch.randn(128, 32, generator=g)), seed=5)
    sae = fit(x[:24_000], n_latents=256, k=6, batch_size=400, epochs=3, architecture="batchtopk")
    assert sae.cfg.threshold is not None and sae.cfg.threshold > 0
    sae.train()  # batch selection: exactly k per token on average
    vals, _ = sae.encode(x[24_000:24_400])
    assert int((vals > 0).sum()) == 6 * 400
    sae.eval()  # threshold inference on held-out tokens
    vals, _ = sae.encode(x[24_000:])
    l0 = float((vals > 0).sum(1).double().mean())
    assert abs(l0 - 6) / 6 <= 0.10, l0


def test_data_init_starts_each_row_on_a_distinct_centred_sample():
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(300, 16, generator=g) + 5
    sae = SAE(SAEConfig(d_in=16, n_latents=400, k=4))
    report = init_sae(sae, sample, "data", g)
    assert report["data_rows"] == 300
    cos = sae.W_dec[:300] @ unit(sample - sae.b_dec).T
    best = cos.max(1)
    assert (best.values > 1 - 1e-5).all() and len(best.indices.unique()) == 300
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(400))  # the rest: random unit rows
    torch.testing.assert_close(sae.W_enc, report["encoder_scale"] * sae.W_dec)
    with torch.no_grad():  # the scaled codes reconstruct the sample better than its median alone
        err = (sae(sample) - sample).pow(2).sum() / (sample - sae.b_dec).pow(2).sum()
    assert 0 < report["encoder_scale"] < 1 and err < 1
