"""SAE forward/backward against a dense reference, save/load, and bad checkpoints."""

import json

import pytest
import torch

from saekit.config import TrainConfig, make_config
from saekit.errors import SaekitError
from saekit.kernels import row_topk
from saekit.sae import SAE, SAEConfig


def dense_reference(sae: SAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """The textbook TopK SAE: dense pre-activations, dense latent matrix, dense decode."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    return z @ sae.W_dec + sae.b_dec


def random_sae(d=24, m=96, k=5, arch="topk", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, n_latents=m, k=k, architecture=arch)).to(dtype)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.3)
        sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
    return sae


def test_forward_and_gradients_match_dense_reference():
    sae = random_sae()
    x = torch.randn(300, sae.d_in, dtype=torch.float64)
    out = sae(x)
    out.pow(2).sum().backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)
    ref = dense_reference(sae, x, sae.k)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[n], p.grad, msg=f"gradient of {n}")


def test_encode_returns_k_sparse_nonnegative_code():
    sae = random_sae()
    vals, idx = sae.encode(torch.randn(50, sae.d_in, dtype=torch.float64))
    assert vals.shape == idx.shape == (50, sae.k)
    assert (vals >= 0).all()
    assert all(len(set(row.tolist())) == sae.k for row in idx)


def test_batchtopk_keeps_k_times_batch_and_threshold_inference():
    sae = random_sae(arch="batchtopk")
    x = torch.randn(200, sae.d_in, dtype=torch.float64)
    vals, idx, cut = sae.select_batch_topk(x - sae.b_dec)
    assert int((vals > 0).sum()) == sae.k * len(x)
    # the same selection through a threshold just below the cut
    sae.eval()
    sae.cfg.threshold = cut - 1e-9
    tv, _ = sae.encode(x)
    assert int((tv > 0).sum()) == sae.k * len(x)


def test_fold_input_scale_keeps_reconstructions():
    sae = random_sae()
    x = torch.randn(64, sae.d_in, dtype=torch.float64) * 7.0
    scaled = sae(x / 7.0) * 7.0
    sae.fold_input_scale(7.0)
    torch.testing.assert_close(sae(x), scaled)


def test_save_load_roundtrip_is_identical(tmp_path):
    sae = random_sae(dtype=torch.float32)
    x = torch.randn(40, sae.d_in)
    sae.save(tmp_path / "s")
    loaded = SAE.load(tmp_path / "s")
    assert loaded.cfg == sae.cfg
    assert torch.equal(loaded(x), sae(x))


def test_load_rejects_truncated_weights(tmp_path):
    random_sae(dtype=torch.float32).save(tmp_path / "s")
    f = tmp_path / "s" / "sae.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(SaekitError, match="corrupt or truncated"):
        SAE.load(tmp_path / "s")


def test_load_rejects_shape_mismatch_and_bad_cfg(tmp_path):
    random_sae(dtype=torch.float32).save(tmp_path / "s")
    cfg_file = tmp_path / "s" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "d_in": cfg["d_in"] + 1}))
    with pytest.raises(SaekitError, match="shape"):
        SAE.load(tmp_path / "s")
    cfg_file.write_text(json.dumps({**cfg, "colour": "blue"}))
    with pytest.raises(SaekitError, match="unknown keys"):
        SAE.load(tmp_path / "s")
    cfg_file.write_text("{not json")
    with pytest.raises(SaekitError, match="not a valid SAE config"):
        SAE.load(tmp_path / "s")
    with pytest.raises(SaekitError, match="missing"):
        SAE.load(tmp_path / "nowhere")


def test_bad_sae_config():
    with pytest.raises(SaekitError, match="architecture"):
        SAEConfig(d_in=4, n_latents=8, k=2, architecture="gated")
    # relu SAEs load (saekit.formats) but are never trained
    with pytest.raises(SaekitError, match="architecture"):
        make_config(TrainConfig, {"architecture": "relu"})
    with pytest.raises(SaekitError, match="k must be"):
        SAEConfig(d_in=4, n_latents=8, k=9)


@pytest.mark.parametrize("m,k", [(9216, 32), (9216, 128), (4096, 8), (1000, 5), (96, 5)])  # 128: only the fine level
def test_row_topk_is_exact(m, k):
    torch.manual_seed(m)
    pre = torch.randn(70, m) + torch.randn(m)  # per-latent offsets, as trained biases give
    pre[0, :] = 1.0  # all ties
    vals, idx = row_topk(pre, k)
    want = pre.topk(k, dim=1).values
    torch.testing.assert_close(vals.sort(1, descending=True).values, want, rtol=0, atol=0)
    assert torch.equal(pre.gather(1, idx), vals)
    assert all(len(set(row.tolist())) == k for row in idx)


def test_encoder_dtype_dispatch(monkeypatch):
    sae = random_sae(dtype=torch.float32)
    for choice, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        monkeypatch.setenv("SAEKIT_ENCODER", choice)
        assert sae._matmul_dtype() == want
    assert random_sae(dtype=torch.float64)._matmul_dtype() == torch.float64  # bf16 only replaces fp32
    sae.matmul_dtype = torch.float32  # an explicit choice wins
    assert sae._matmul_dtype() == torch.float32
    monkeypatch.setenv("SAEKIT_ENCODER", "fp16")
    with pytest.raises(SaekitError, match="SAEKIT_ENCODER"):
        random_sae(dtype=torch.float32)._matmul_dtype()


def test_bf16_encoder_rescores_to_fp32_choices_except_near_ties(monkeypatch):
    sae = random_sae(d=64, m=1024, k=8, dtype=torch.float32)
    x = torch.randn(3000, 64)
    xc = x - sae.b_dec.detach()
    pre = torch.addmm(sae.b_enc, xc, sae.W_enc.T).detach()  # fp32 reference [B, m]
    monkeypatch.setenv("SAEKIT_ENCODER", "bf16")
    vals, idx = sae.select_topk(xc, sae.k)
    # values are fp32 pre-activations of the chosen latents, not bf16 roundings
    torch.testing.assert_close(vals, pre.gather(1, idx), rtol=1e-5, atol=1e-5)
    ref = pre.topk(sae.k, dim=1).values
    same = (idx.sort(1).values == pre.topk(sae.k, dim=1).indices.sort(1).values).all(1)
    assert same.float().mean() > 0.999
    # where the choice differs, only near-ties can: bf16 products err by <= |x||w| 2^-8
    bound = 2 * xc.norm(dim=1) * sae.W_enc.norm(dim=1).max() * 2**-8
    gap = ref[:, -1] - vals.min(1).values
    assert (gap[~same] <= bound[~same]).all()
    # and without the fp32 rescoring (margin 0, bf16 values) the values would be off
    b16 = torch.addmm(sae.b_enc.bfloat16(), xc.bfloat16(), sae.W_enc.bfloat16().T).detach()
    assert (b16.gather(1, idx).float() - vals).abs().max() > 1e-4
