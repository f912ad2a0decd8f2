"""SAE folders written by other tools (tests/fixtures, made by make_fixtures.sh with the tools' own
classes): saekit reproduces their encode and decode; bad folders are refused by name; saekit's
SAELens export loads in SAELens (roundtrip.json) and back in saekit."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saekit import cli
from saekit.errors import SaekitError
from saekit.formats import FORMATS, sparsify_hookpoint
from saekit.run import Run
from saekit.sae import SAE, SAEConfig

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_saekit_export import dense_outputs, saekit_saes  # noqa: E402

# fixture folder -> (source_format, saekit architecture)
CASES = {
    "saelens_standard": ("SAELens standard", "relu"),
    "saelens_topk": ("SAELens topk", "topk"),
    "saelens_batchtopk": ("SAELens batchtopk", "batchtopk"),
    "saelens_jumprelu": ("SAELens jumprelu", "jumprelu"),
    "sparsify/layers.3": ("sparsify topk", "topk"),
    "dictionary_learning/AutoEncoder": ("dictionary_learning AutoEncoder", "relu"),
    "dictionary_learning/AutoEncoderTopK": ("dictionary_learning AutoEncoderTopK", "topk"),
    "dictionary_learning/BatchTopKSAE": ("dictionary_learning BatchTopKSAE", "batchtopk"),
    "dictionary_learning/JumpReluAutoEncoder": ("dictionary_learning JumpReluAutoEncoder", "jumprelu"),
    "gemma_scope": ("Gemma Scope jumprelu", "jumprelu"),
}
TOL = dict(rtol=1e-5, atol=1e-5)


def dense_encode(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        vals, idx = sae.encode(x)
        acts = torch.zeros(x.shape[0], sae.n_latents).scatter_add(1, idx, vals)
        return acts, sae.decode(vals, idx)


def test_every_fixture_is_covered():
    found = {str(p.parent.relative_to(FIXTURES)) for p in FIXTURES.rglob("expected.safetensors")}
    assert found == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_loaded_sae_matches_the_tools_own_outputs(name):
    want = load_file(FIXTURES / name / "expected.safetensors")
    sae = SAE.load(FIXTURES / name).eval()
    fmt, arch = CASES[name]
    assert (sae.cfg.source_format, sae.cfg.architecture) == (fmt, arch)
    assert (sae.d_in, sae.n_latents) == (16, 64)
    acts, recon = dense_encode(sae, want["x"])
    assert (want["acts"] != 0).sum() >= 8  # the fixture exercises the selection
    torch.testing.assert_close(acts, want["acts"], **TOL)
    torch.testing.assert_close(recon, want["recon"], **TOL)
    # decoding the tool's own activations gives the tool's reconstruction too
    idx = torch.arange(64).expand(want["x"].shape[0], 64)
    torch.testing.assert_close(sae.decode(want["acts"], idx), want["recon"], **TOL)


def test_hookpoints_and_models_come_from_the_source():
    for name in CASES:
        cfg = SAE.load(FIXTURES / name).cfg
        want_hook = None if name == "gemma_scope" else "blocks.3.hook_resid_post"
        assert cfg.hookpoint == want_hook, name
        if name.startswith(("saelens", "dictionary")):
            assert cfg.model == "tiny-stories-1M", name
    assert SAE.load(FIXTURES / "saelens_topk").k == 5
    assert SAE.load(FIXTURES / "sparsify/layers.3").k == 6


def test_sparsify_hookpoint_names():
    assert sparsify_hookpoint("layers.6") == "blocks.6.hook_resid_post"
    assert sparsify_hookpoint("model.layers.11") == "blocks.11.hook_resid_post"
    assert sparsify_hookpoint("gpt_neox.layers.2.mlp") == "blocks.2.hook_mlp_out"
    assert sparsify_hookpoint("embed_tokens") == "embed_tokens"


def test_gemma_scope_hookpoint_from_the_release_folders(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_20" / "width_16k" / "average_l0_71"
    shutil.copytree(FIXTURES / "gemma_scope", folder)
    assert SAE.load(folder).cfg.hookpoint == "blocks.20.hook_resid_post"
    assert SAE.load(folder / "params.npz").cfg.source_format == "Gemma Scope jumprelu"


def test_foreign_folder_opens_as_a_bare_run():
    run = Run.open(FIXTURES / "dictionary_learning" / "JumpReluAutoEncoder")  # has a config.json of its own
    assert run.bare and run.hookpoints == ["blocks.3.hook_resid_post"]
    assert run.sae().cfg.source_format == "dictionary_learning JumpReluAutoEncoder"


# -- refusals ----------------------------------------------------------------------------------
def copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / Path(name).name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    file.write_text(json.dumps(data))


def test_unknown_folder_lists_the_known_formats(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(SaekitError, match="any format saekit knows") as e:
        SAE.load(tmp_path)
    for name, files, _, _ in FORMATS:
        assert name in str(e.value) and files in str(e.value)


@pytest.mark.parametrize(("name", "file", "key"), [
    ("saelens_jumprelu", "cfg.json", "d_sae"),
    ("sparsify/layers.3", "cfg.json", "k"),
])
def test_missing_config_key_is_named(tmp_path, name, file, key):
    path = copy(name, tmp_path)
    edit_json(path / file, **{key: None})
    with pytest.raises(SaekitError, match=f"{file}: required key '{key}' is missing"):
        SAE.load(path)


@pytest.mark.parametrize(("name", "file", "key"), [
    ("saelens_jumprelu", "sae_weights.safetensors", "threshold"),
    ("saelens_topk", "sae_weights.safetensors", "b_enc"),
    ("sparsify/layers.3", "sae.safetensors", "encoder.weight"),
])
def test_missing_tensor_is_named(tmp_path, name, file, key):
    path = copy(name, tmp_path)
    t = load_file(path / file)
    del t[key]
    save_file(t, path / file)
    with pytest.raises(SaekitError, match=f"{file}: tensor '{key}' is missing"):
        SAE.load(path)


def test_missing_npz_and_state_dict_entries_are_named(tmp_path):
    path = copy("gemma_scope", tmp_path)
    with np.load(path / "params.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "threshold"}
    np.savez(path / "params.npz", **arrays)
    with pytest.raises(SaekitError, match="params.npz: tensor 'threshold' is missing"):
        SAE.load(path)
    path = copy("dictionary_learning/AutoEncoder", tmp_path)
    sd = torch.load(path / "ae.pt", weights_only=True)
    del sd["bias"]
    torch.save(sd, path / "ae.pt")
    with pytest.raises(SaekitError, match="ae.pt: tensor 'bias' is missing"):
        SAE.load(path)
    edit_json(path / "config.json", trainer=None)
    with pytest.raises(SaekitError, match="config.json: required key 'trainer'"):
        SAE.load(path)


@pytest.mark.parametrize(("name", "file", "changes", "match"), [
    ("saelens_jumprelu", "cfg.json", {"normalize_activations": "layer_norm"}, "normalises each token at run time"),
    ("saelens_jumprelu", "cfg.json", {"normalize_activations": "constant_norm_rescale"}, "at run time"),
    ("saelens_jumprelu", "cfg.json", {"normalize_activations": "covariance_whitening"}, "fold_activation_whitening"),
    ("saelens_jumprelu", "cfg.json", {"normalize_activations": "expected_average_only_in"}, "no scaling factor"),
    ("saelens_jumprelu", "cfg.json", {"reshape_activations": "hook_z"}, "reshape_activations"),
    ("saelens_jumprelu", "cfg.json", {"architecture": "gated"}, "architecture 'gated' is not supported"),
    ("saelens_standard", "cfg.json", {"activation_fn": "tanh-relu"}, "activation_fn 'tanh-relu'"),
    ("saelens_standard", "cfg.json", {"hook_head_index": 2}, "one attention head"),
    ("sparsify/layers.3", "cfg.json", {"skip_connection": True}, "skip connection"),
    ("sparsify/layers.3", "cfg.json", {"transcode": True}, "transcoder"),
    ("sparsify/layers.3", "cfg.json", {"activation": "groupmax"}, "groupmax"),
])
def test_settings_saekit_cannot_reproduce_are_refused(tmp_path, name, file, changes, match):
    path = copy(name, tmp_path)
    edit_json(path / file, **changes)
    with pytest.raises(SaekitError, match=match):
        SAE.load(path)


def test_wrong_shapes_name_the_weights_file(tmp_path):
    path = copy("saelens_jumprelu", tmp_path)
    edit_json(path / "cfg.json", d_sae=32)
    with pytest.raises(SaekitError, match="sae_weights.safetensors: W_enc has shape"):
        SAE.load(path)
    path = copy("dictionary_learning/JumpReluAutoEncoder", tmp_path)
    sd = torch.load(path / "ae.pt", weights_only=True)
    sd["threshold"] = sd["threshold"][:10]
    torch.save(sd, path / "ae.pt")
    with pytest.raises(SaekitError, match="ae.pt: threshold has shape"):
        SAE.load(path)


def test_unknown_tensors_and_classes_are_refused(tmp_path):
    path = copy("sparsify/layers.3", tmp_path)
    t = load_file(path / "sae.safetensors")
    save_file({**t, "W_skip": torch.zeros(16, 16)}, path / "sae.safetensors")
    with pytest.raises(SaekitError, match="W_skip"):
        SAE.load(path)
    path = copy("saelens_topk", tmp_path)
    t = load_file(path / "sae_weights.safetensors")
    save_file({**t, "finetuning_scaling_factor": torch.ones(64)}, path / "sae_weights.safetensors")
    with pytest.raises(SaekitError, match="finetuning_scaling_factor"):
        SAE.load(path)
    path = copy("dictionary_learning/AutoEncoder", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "GatedAutoEncoder"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SaekitError, match="'GatedAutoEncoder' is not supported"):
        SAE.load(path)


def test_saelens_pre_6_topk_config(tmp_path):
    """SAELens < 6 wrote TopK SAEs as architecture "standard" with activation_fn topk and its k."""
    path = copy("saelens_topk", tmp_path)
    edit_json(path / "cfg.json", architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": 5},
              k=None, metadata=None, hook_point="blocks.2.hook_resid_pre", rescale_acts_by_decoder_norm=None)
    sae = SAE.load(path)
    assert (sae.cfg.architecture, sae.k, sae.cfg.hookpoint) == ("topk", 5, "blocks.2.hook_resid_pre")


def test_saelens_constant_input_scale_is_folded(tmp_path):
    """A checkpoint trained on `s * x` (expected_average_only_in + activation_scaler.json) acts on raw x."""
    s = 2.5
    path = copy("saelens_standard", tmp_path)
    edit_json(path / "cfg.json", normalize_activations="expected_average_only_in")
    (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s, "has_whitening": False}))
    folded, plain = SAE.load(path), SAE.load(FIXTURES / "saelens_standard")
    x = torch.randn(20, 16)
    acts, recon = dense_encode(folded, x)
    want_acts, want_recon = dense_encode(plain, s * x)
    torch.testing.assert_close(acts, want_acts, **TOL)
    torch.testing.assert_close(recon, want_recon / s, **TOL)


# -- saekit's own jumprelu / relu, and the SAELens export -----------------------------------------
def test_relu_and_jumprelu_save_and_load_in_saekit_format(tmp_path):
    for arch, sae in saekit_saes().items():
        sae.save(tmp_path / arch)
        back = SAE.load(tmp_path / arch).eval()
        assert back.cfg == sae.cfg and back.cfg.source_format is None
        x = torch.randn(10, 16)
        for a, b in zip(dense_encode(back, x), dense_encode(sae, x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sae_lens_export_is_what_sae_lens_loaded(tmp_path):
    """The committed export is what saekit writes now, and SAELens's loader agreed with it."""
    done = json.loads((FIXTURES / "saekit_export" / "roundtrip.json").read_text())
    classes = {"topk": "TopKSAE", "batchtopk": "JumpReLUSAE", "relu": "StandardSAE", "jumprelu": "JumpReLUSAE",
               "topk_unit": "TopKSAE"}
    assert {k: v["sae_lens_class"] for k, v in done.items()} == classes
    for arch, r in done.items():
        assert r["acts_max_abs_diff"] < 1e-5 and r["recon_max_abs_diff"] < 1e-5, arch
        assert r["fold_W_dec_norm"] == "ran" or arch == "topk", arch
    # SAEDashboard's first step: a TopK SAE with unit-norm decoder rows (as saekit trains them) folds
    # in SAELens with the same outputs; other row norms cannot be rescaled exactly, so SAELens refuses
    unit = done["topk_unit"]
    assert unit["folded_acts_max_abs_diff"] < 1e-5 and unit["folded_recon_max_abs_diff"] < 1e-5
    assert done["topk"]["fold_W_dec_norm"].startswith("refused")
    for arch, sae in saekit_saes().items():
        out = sae.save(tmp_path / arch, format="sae-lens")
        committed = FIXTURES / "saekit_export" / arch
        assert json.loads((out / "cfg.json").read_text()) == json.loads((committed / "cfg.json").read_text())
        new, old = load_file(out / "sae_weights.safetensors"), load_file(committed / "sae_weights.safetensors")
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
        # and saekit reads its export back as SAELens with the same outputs
        back = SAE.load(out).eval()
        assert back.cfg.source_format.startswith("SAELens")
        want = load_file(committed / "saekit_outputs.safetensors")
        got = dense_encode(back, want["x"])
        torch.testing.assert_close(got[0], want["acts"], **TOL)
        torch.testing.assert_close(got[1], want["recon"], **TOL)
        torch.testing.assert_close(dense_outputs(sae, want["x"])[0], want["acts"], **TOL)


def test_batchtopk_without_threshold_does_not_export(tmp_path):
    sae = SAE(SAEConfig(d_in=4, n_latents=8, k=2, architecture="batchtopk"))
    with pytest.raises(SaekitError, match="no SAELens equivalent"):
        sae.save(tmp_path / "x", format="sae-lens")
    with pytest.raises(SaekitError, match="unknown export format"):
        sae.save(tmp_path / "x", format="npz")


def test_cli_export(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", str(FIXTURES / "saelens_jumprelu"), "--format", "sae-lens", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "loaded a SAELens jumprelu SAE from" in said and str(out) in said
    assert (out / "cfg.json").is_file() and (out / "sae_weights.safetensors").is_file()
    x = torch.randn(6, 16)
    a, b = SAE.load(out), SAE.load(FIXTURES / "saelens_jumprelu")
    torch.testing.assert_close(dense_encode(a, x), dense_encode(b, x), **TOL)
    assert cli.main(["export", str(tmp_path / "nothing"), "--format", "sae-lens"]) == 2
