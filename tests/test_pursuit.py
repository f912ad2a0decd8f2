"""Matching pursuit (saekit.kernels.pursuit) against the plain unrolled loop, and its invariants;
the `mp` architecture trained, saved, resumed and configured."""

import math

import pytest
import torch
from test_dictionary import fvu, planted, recovery

from saekit.config import TrainConfig, make_config
from saekit.errors import SaekitError
from saekit.evaluate import reconstruction_metrics
from saekit.kernels import sparse_decode
from saekit.kernels.pursuit import distinct, gram, mp_pursue, mp_reference, mp_select, mp_values
from saekit.runtime import torch_threads
from saekit.sae import SAE, SAEConfig
from saekit.trainer import Trainer, fit


def dictionary(m, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, d, generator=g, dtype=dtype)
    return W / W.norm(dim=1, keepdim=True)


def inputs(B, d, seed=1, dtype=torch.float64):
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense(vals, idx, m):
    return torch.zeros(vals.shape[0], m, dtype=vals.dtype).scatter_add(1, idx, vals)


@pytest.mark.parametrize("rows,threads", [(1, 1), (7, 2), (7, 3), (128, 2)])
@pytest.mark.parametrize("m", [40, 150])  # 150: two chunks of the row argmax and a short tail
def test_codes_equal_the_plain_pursuit(rows, threads, m):
    """Same latents and values as the unrolled loop, whatever the block of rows or the threads
    sharing the blocks; each latent once."""
    W, x = dictionary(m, 8), inputs(50, 8)  # m atoms in 8 dims: coherent, so latents repeat
    k = 12
    z, _ = mp_reference(x, W, k)
    with torch_threads(threads):
        vals, idx = distinct(*reversed(mp_pursue(x, W, k, rows=rows)))
    torch.testing.assert_close(dense(vals, idx, m), z, rtol=0, atol=1e-12)
    live = vals != 0
    assert all(len(set(i[v].tolist())) == int(v.sum()) for i, v in zip(idx, live, strict=True))
    assert bool((z != 0).sum(1).lt(k).any()), "the case should include repeated picks"
    assert (vals >= 0).all()


def test_threaded_pursuit_inside_inference_mode():
    """The blocks' worker threads take the caller's inference mode (it is per thread): a model's
    forward under inference mode that splices an MP SAE in (downstream evaluation) must work, and
    give the same codes as outside it."""
    W, x = dictionary(150, 8), inputs(50, 8)
    with torch_threads(2):
        want = mp_pursue(x, W, 12, rows=7)
        with torch.inference_mode():
            got = mp_pursue(x.clone(), W.clone(), 12, rows=7)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_fp32_selection_matches_fp32_reference():
    """The Gram-updated correlations pick the plain loop's latents in fp32 too (no drift over k)."""
    W, x = dictionary(512, 64, dtype=torch.float32), inputs(64, 64, dtype=torch.float32)
    z, _ = mp_reference(x, W, 32)
    vals, idx = mp_select(x, W, 32)
    got = dense(vals, idx, 512)
    assert torch.equal(got != 0, z != 0)
    torch.testing.assert_close(got, z, rtol=1e-4, atol=1e-5)


def test_residual_orthogonal_to_last_row_and_values_are_the_solve():
    W, x = dictionary(30, 6), inputs(20, 6)
    order, coeffs = mp_pursue(x, W, 5)
    assert (order >= 0).all()
    vals, idx = mp_values(x, W, order)
    r = x - sparse_decode(vals, idx, W)
    last = W[order[:, -1]]
    torch.testing.assert_close((r * last).sum(1), torch.zeros(20, dtype=x.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(vals, distinct(coeffs, order)[0], rtol=0, atol=1e-12)


def test_gradients_match_autograd_through_the_plain_loop():
    """mp_values (given the order) has the gradients of the unrolled loop, for x and every row."""
    W0, x0 = dictionary(12, 5), inputs(6, 5)
    k = 4
    order, _ = mp_pursue(x0, W0, k)
    probe = inputs(6, 5, seed=7)

    def loss(z_dense, W):  # a reconstruction-like loss touching every coefficient and row
        return ((z_dense @ W - probe) ** 2).sum() + (z_dense**3).sum()

    x, W = x0.clone().requires_grad_(), W0.clone().requires_grad_()
    z, _ = mp_reference(x, W, k)
    ref = torch.autograd.grad(loss(z, W), (x, W))
    x, W = x0.clone().requires_grad_(), W0.clone().requires_grad_()
    got = torch.autograd.grad(loss(dense(*mp_values(x, W, order), 12), W), (x, W))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert (got[1].abs().sum(1) > 0).sum() >= len(set(order.flatten().tolist()))


def test_gradcheck_mp_values():
    W, x = dictionary(9, 4), inputs(3, 4)
    order, _ = mp_pursue(x, W, 3)
    order[0, 2] = -1  # a row that stopped early: its last step is padding
    f = lambda x, W: mp_values(x, W, order)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), W.requires_grad_()))


def test_more_steps_lower_the_error_monotonically():
    W, x = dictionary(64, 16, dtype=torch.float32), inputs(100, 16, dtype=torch.float32)
    errs = []
    for k in range(1, 25):
        vals, idx = mp_select(x, W, k)
        errs.append((x - sparse_decode(vals, idx, W)).norm(dim=1))
    errs = torch.stack(errs)  # [k, B]
    assert (errs[1:] <= errs[:-1] + 1e-5).all()
    assert (errs[-1] < 0.5 * errs[0]).all()


def test_threshold_stops_a_row_once_its_residual_is_small():
    W, x = dictionary(40, 8), inputs(50, 8)
    thr = 0.8
    order, _ = mp_pursue(x, W, 30, threshold=thr)
    vals, idx = mp_select(x, W, 30, threshold=thr)
    z, r = mp_reference(x, W, 30, threshold=thr)
    torch.testing.assert_close(dense(vals, idx, 40), z, rtol=0, atol=1e-12)
    steps = (order >= 0).sum(1)
    assert (r.norm(dim=1) < thr).all() and (steps < 30).all()
    for b in range(len(x)):  # the row went on while its residual was at or above the threshold
        v, i = mp_select(x[b : b + 1], W, int(steps[b]) - 1)
        assert (x[b] - sparse_decode(v, i, W)[0]).norm() >= thr
    small = x[:3] / x[:3].norm(dim=1, keepdim=True) * 0.5  # below the threshold from the start
    assert (mp_select(small, W, 5, threshold=thr)[0] == 0).all()


def test_rows_without_a_positive_correlation_stop():
    W = torch.eye(3, dtype=torch.float64)
    x = torch.tensor([[-1.0, -2.0, -0.5], [3.0, -1.0, 0.0], [2.0, 1.0, 0.5]], dtype=torch.float64)
    order, coeffs = mp_pursue(x, W, 3)
    assert order.tolist() == [[-1, -1, -1], [0, -1, -1], [0, 1, 2]]
    assert coeffs.tolist() == [[0, 0, 0], [3, 0, 0], [2, 1, 0.5]]
    vals, idx = mp_select(x, W, 3)
    assert dense(vals, idx, 3).tolist() == [[0, 0, 0], [3, 0, 0], [2, 1, 0.5]]
    z, _ = mp_reference(x, W, 3)
    assert torch.equal(dense(vals, idx, 3), z)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pursuit_matches_cpu():
    """One block of rows and the Triton gathers on the GPU: the CPU's latents, values and gradients."""
    W, x = dictionary(2048, 64, dtype=torch.float32), inputs(300, 64, dtype=torch.float32)
    order, _ = mp_pursue(x, W, 16)
    assert torch.equal(mp_pursue(x.cuda(), W.cuda(), 16)[0].cpu(), order)
    grads = []
    for dev in ("cpu", "cuda"):
        xd, Wd = (t.detach().to(dev).clone().requires_grad_() for t in (x, W))  # leaves on each device
        vals, idx = mp_values(xd, Wd, order.to(dev))
        (sparse_decode(vals, idx, Wd) - xd.detach()).pow(2).sum().backward()
        grads.append((vals.detach().cpu(), xd.grad.cpu(), Wd.grad.cpu()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gram_is_reused():
    W, x = dictionary(20, 5), inputs(10, 5)
    G = gram(W)
    assert torch.equal(mp_select(x, W, 4, G=G)[0], mp_select(x, W, 4)[0])
    torch.testing.assert_close(G.diagonal(), torch.ones(20, dtype=W.dtype))
    assert math.isclose(float(G[3, 5]), float(W[3] @ W[5]))


# -- the `mp` architecture: training, files, config -------------------------------------------
def test_mp_fit_recovers_planted_features_and_encodes_by_pursuit(tmp_path):
    x, feats, _ = planted(8000, 24, 48, 3, seed=6)
    sae = fit(x, n_latents=96, k=4, architecture="mp", batch_size=256, epochs=8, dead_tokens=5000, lr=3e-3)
    assert sae.cfg.architecture == "mp" and torch.equal(sae.W_enc, sae.W_dec)  # tied
    assert recovery(feats, sae.W_dec).mean() > 0.9
    vals, idx = sae.encode(x[:3000])
    assert fvu(sae.decode(vals, idx), x[:3000]) < 0.15
    z, _ = mp_reference(x[:500] - sae.b_dec, sae.W_dec, 4)
    torch.testing.assert_close(dense(vals[:500], idx[:500], 96), z, rtol=1e-4, atol=1e-4)
    assert reconstruction_metrics(sae, x[:3000])["l0"] <= 4
    sae.save(tmp_path / "mp")
    back = SAE.load(tmp_path / "mp")
    assert back.cfg == sae.cfg and "mp_threshold" not in (tmp_path / "mp" / "cfg.json").read_text()
    assert all(torch.equal(a, b) for a, b in zip(back.encode(x[:100]), sae.encode(x[:100]), strict=True))
    with pytest.raises(SaekitError, match="no SAELens equivalent"):
        sae.save(tmp_path / "lens", format="sae-lens")


def test_mp_threshold_is_folded_to_input_units_and_stops_tokens_early(tmp_path):
    x, _, _ = planted(4000, 16, 32, 4, seed=3)
    x = 7 * x  # raw units far from the training units (unit RMS)
    kw = dict(n_latents=48, k=8, architecture="mp", batch_size=256, epochs=1, lr=3e-3, seed=1)
    plain = fit(x, **kw)
    stopped = fit(x, mp_threshold=0.5, **kw)
    scale = float(x.pow(2).sum(1).mean().div(16).sqrt())
    assert stopped.cfg.mp_threshold == pytest.approx(0.5 * scale, rel=1e-3)
    thr, xc = stopped.cfg.mp_threshold, x[:1000] - stopped.b_dec
    order, _ = mp_pursue(xc, stopped.W_dec, 8, thr)
    early = (order < 0).any(1)
    r = xc - stopped.decode(*stopped.encode(x[:1000])) + stopped.b_dec
    best = (r @ stopped.W_dec.T).max(1).values
    assert early.sum() > 20 and ((r.norm(dim=1) < thr) | (best <= 0))[early].all()
    vals, _ = stopped.encode(x[:1000])
    assert (vals > 0).sum(1).float().mean() < (plain.encode(x[:1000])[0] > 0).sum(1).float().mean()
    stopped.save(tmp_path / "s")
    assert SAE.load(tmp_path / "s").cfg.mp_threshold == stopped.cfg.mp_threshold


@pytest.mark.parametrize("values,match", [
    ({"architecture": "mp", "k": 0}, "'k'"),
    ({"architecture": "mp", "mp_threshold": -0.1}, "mp_threshold"),
    ({"architecture": "topk", "mp_threshold": 0.1}, "mp_threshold"),
])
def test_mp_config_refusals(values, match):
    with pytest.raises(SaekitError, match=match):
        make_config(TrainConfig, values)


def test_mp_is_one_tied_hookpoint():
    with pytest.raises(SaekitError, match="tied SAE of one hookpoint"):
        SAEConfig(8, 16, 2, "mp", sources=["a"], targets=["b"], dims={"a": 8, "b": 8})
    with pytest.raises(SaekitError, match="mp_threshold"):
        SAEConfig(8, 16, 2, "topk", mp_threshold=1.0)


def test_mp_auxk_reaches_dead_rows_through_the_residual():
    """AuxK of the tied pursuit: dead rows get a gradient from their correlation with the residual."""
    x, _, _ = planted(2000, 12, 24, 3, seed=2)
    cfg = make_config(TrainConfig, {"n_latents": 256, "k": 1, "batch_size": 50, "architecture": "mp",
                                    "hookpoints": ["a"], "dead_tokens": 1, "k_aux": 4})
    tr = Trainer(cfg, {"a": 12}, {"a": x}, 10, torch.device("cpu"))
    sae = tr.saes["a"]
    before = sae.W_dec.detach().clone()
    chosen = set(sae.encode(x[:50] / tr.scales["a"])[1].flatten().tolist())
    m = tr.train_step({"a": x[:50]})["a"]
    assert m["dead_fraction"] > 0.5 and float(m["aux_loss"]) > 0
    moved = set(((sae.W_dec - before).norm(dim=1) > 0).nonzero().flatten().tolist())
    assert len(moved - chosen) >= 4  # dead rows moved: only AuxK reaches them


def test_mp_toy_hierarchy_is_conditionally_orthogonal():
    """The toy of benchmarks/conditional_hierarchy.py as Costa et al. describe it: a child's direction is
    orthogonal to its parent's and to everything outside its family, siblings (and the top level) meet at
    cosine rho; one top-level feature per sample, a parent's child with probability 0.6 (L0 1.36)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from conditional_hierarchy import D, directions, layout, sample

    parents, children, lone = layout()
    g = torch.Generator().manual_seed(0)
    for rho in (0.0, 0.4, 0.8):
        dirs = directions(rho, g)
        cos = dirs @ dirs.T
        torch.testing.assert_close(cos.diagonal(), torch.ones(D))
        fam = children[0]
        assert cos[fam[0], fam[1]] == pytest.approx(rho, abs=0.01) and cos[parents[0], lone[0]] == pytest.approx(
            rho, abs=0.01)
        assert cos[parents[0], fam].abs().max() < 1e-5 and cos[fam][:, children[1]].abs().max() < 1e-5
    x, mags = sample(20_000, dirs, g)
    on = mags != 0
    torch.testing.assert_close(x, mags @ dirs)
    assert on[:, torch.cat([parents, lone])].sum(1).eq(1).all()  # exactly one top-level feature
    assert not on[:, children.flatten()][~on[:, parents].repeat_interleave(3, 1)].any()  # no child without parent
    assert on.sum(1).float().mean() == pytest.approx(1.36, abs=0.02)
