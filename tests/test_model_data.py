"""Model loading, hookpoints, harvesting, corpora and packing (offline model and corpus)."""

import json

import pytest
import torch

from saekit.data import load_texts, pack_contexts, split_contexts
from saekit.errors import SaekitError
from saekit.model import check_hookpoints, harvest, last_layer, logprobs

HOOK = "blocks.2.hook_resid_post"


def test_offline_model_answers_paris(smollm2):
    toks = smollm2.to_tokens("The capital of France is")
    nxt = logprobs(smollm2, toks)[0, -1].argmax()
    assert smollm2.tokenizer.decode(nxt) == " Paris"


def test_unknown_hookpoint_lists_close_names(smollm2):
    check_hookpoints(smollm2, [HOOK, "blocks.3.hook_attn_out"])
    with pytest.raises(SaekitError, match="blocks.6.hook_resid_post"):
        check_hookpoints(smollm2, ["blocks.6.hook_resid_pots"])


def test_last_layer():
    assert last_layer(["blocks.2.hook_resid_post", "blocks.11.attn.hook_z"]) == 11
    assert last_layer(["hook_embed"]) is None


def test_harvest_matches_full_forward_and_drops_masked_positions(smollm2):
    tokens, mask = pack_contexts(load_texts("pydoc"), smollm2.tokenizer, ctx_len=32, n_tokens=200, seed=0)
    hooks = [HOOK, "blocks.1.attn.hook_z"]
    chunks = list(harvest(smollm2, tokens, mask, hooks, batch_size=3))
    _, full = smollm2.run_with_cache(tokens, names_filter=lambda n: n in hooks)  # no early stop
    got = torch.cat([c[HOOK] for c in chunks])
    assert got.shape == (int(mask.sum()), 576)
    # Batches of 3 and of all contexts sum in different orders (and thread splits): fp32 rounding
    # relative to the activations' scale, accumulated over the layers and the d_model-long sums.
    want = full[HOOK][mask]
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) * eps * 576)
    z = torch.cat([c["blocks.1.attn.hook_z"] for c in chunks])
    assert z.shape == (int(mask.sum()), 576)  # 9 heads x 64, flattened


def test_harvest_reads_module_hookpoints_from_the_plain_model_equal_to_the_bridge(smollm2):
    from saekit.model import _twin_hooks

    tokens, mask = pack_contexts(load_texts("pydoc"), smollm2.tokenizer, ctx_len=32, n_tokens=150, seed=1)
    hooks = ["blocks.2.hook_resid_pre", HOOK, "blocks.3.hook_mlp_out", "blocks.3.hook_attn_out",
             "blocks.4.hook_resid_mid", "blocks.1.attn.hook_z", "blocks.3.mlp.hook_in"]
    assert [w[1:] for w in _twin_hooks(smollm2, hooks)] == [
        ("model.layers.2", "in"), ("model.layers.2", "out"), ("model.layers.3.mlp", "out"),
        ("model.layers.3.self_attn", "out"), ("model.layers.4.post_attention_layernorm", "in"),
        ("model.layers.1.self_attn.o_proj", "in"), ("model.layers.3.mlp", "in")]
    assert _twin_hooks(smollm2, [HOOK, "blocks.1.attn.hook_rot_q"]) is None  # no module's input/output: bridge
    with pytest.raises(SaekitError, match=r"\['blocks.3.hook_mlp_in'\] exist but the forward never reached"):
        next(harvest(smollm2, tokens, mask, [HOOK, "blocks.3.hook_mlp_in"]))  # off by default in TransformerLens
    got = {h: torch.cat([c[h] for c in harvest(smollm2, tokens, mask, hooks, batch_size=4)]) for h in hooks}
    _, full = smollm2.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    eps = torch.finfo(torch.float32).eps
    for h in hooks:  # the twin attends with SDPA, the bridge eagerly: fp32 rounding apart
        want = full[h][mask].flatten(1)
        torch.testing.assert_close(got[h], want, rtol=0, atol=float(want.abs().max()) * eps * 576)


def test_pack_contexts_is_deterministic_and_masks_special_tokens(smollm2):
    tok = smollm2.tokenizer
    a, ma = pack_contexts(load_texts("shakespeare"), tok, ctx_len=64, n_tokens=5000, seed=3)
    b, mb = pack_contexts(load_texts("shakespeare"), tok, ctx_len=64, n_tokens=5000, seed=3)
    c, _ = pack_contexts(load_texts("shakespeare"), tok, ctx_len=64, n_tokens=5000, seed=4)
    assert torch.equal(a, b) and torch.equal(ma, mb) and not torch.equal(a, c)
    assert (a[:, 0] == tok.bos_token_id).all() and not ma[:, 0].any()
    assert not ma[a == tok.eos_token_id].any()
    assert ma.sum() >= 5000 and a.shape[1] == 64
    (tt, _), (vt, _) = split_contexts(a, ma, 5, seed=0)
    assert len(vt) == 5 and len(tt) == len(a) - 5
    assert not any(torch.equal(v, t) for v in vt for t in tt)


def test_local_files_every_format(tmp_path, smollm2):
    import pandas as pd

    (tmp_path / "a.txt").write_text("First document.\nStill the first one.")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"json doc {i}"}) for i in range(3)))
    pd.DataFrame({"body": ["parquet doc"]}).to_parquet(tmp_path / "c.parquet")
    assert list(load_texts(str(tmp_path / "a.txt"))) == ["First document.\nStill the first one."]
    docs = list(load_texts(str(tmp_path / "b.jsonl"), text_field="body"))
    assert docs == ["json doc 0", "json doc 1", "json doc 2"]
    assert list(load_texts(str(tmp_path / "c.parquet"), text_field="body")) == ["parquet doc"]
    (tmp_path / "a.txt").unlink()
    assert sorted(load_texts(str(tmp_path), text_field="body"))[0] == "json doc 0"
    with pytest.raises(SaekitError, match="no column 'text'"):
        list(load_texts(str(tmp_path / "b.jsonl")))


def test_bad_corpora(tmp_path, smollm2):
    with pytest.raises(SaekitError, match="not found"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SaekitError, match="empty"):
        pack_contexts(load_texts(str(tmp_path / "empty.txt")), smollm2.tokenizer, ctx_len=16)
    with pytest.raises(SaekitError, match="offline corpora"):
        load_texts("no-such-user/no-such-dataset")
