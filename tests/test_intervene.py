"""Splicing, steering and attribution (saekit.splice, saekit.intervene) on a tiny run of the offline
model: an unedited splice with its error term is the clean model; the attributions complete the
gradient of the logit difference; steering a latent towards a token raises that token; a
transcoder splice matches an independent computation; edits do what they say; bad input ends in
one message."""

import json
import re

import pytest
import torch

from saekit import cli
from saekit.errors import SaekitError
from saekit.intervene import _Setup, attribute, steer
from saekit.model import logprobs
from saekit.sae import SAE, Crosscoder, SAEConfig
from saekit.splice import Edit, _edited, forward

HOOK = "blocks.2.hook_resid_post"
PROMPT = "The king of France said to the queen that the"


@pytest.fixture(scope="module")
def run(act_cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("intervene") / "run"
    args = ["--hookpoints", HOOK, "--n_tokens", "6000", "--val_tokens", "600", "--ctx_len", "64", "--epochs", "2",
            "--expansion", "2", "--k", "16", "--batch_size", "500", "--eval_contexts", "2", "--cache_dir",
            str(act_cache_dir), "--dead_tokens", "3000", "--out", str(out)]
    assert cli.main(["train", *args, "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def transcoder(tmp_path_factory):
    """An untrained transcoder of block 2's MLP (random weights: the splice's invariants hold for any)."""
    src, tgt = "blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out"
    torch.manual_seed(0)
    tc = Crosscoder(SAEConfig(576, 1152, 16, sources=[src], targets=[tgt], dims={src: 576, tgt: 576},
                              model="smollm2-135m"))
    with torch.no_grad():
        tc.W_enc.mul_(0.05)
        tc.b_in.copy_(torch.randn(576) * 0.1)
    return tc.save(tmp_path_factory.mktemp("tc") / "transcoder")


def _clean(lm, ids):
    return logprobs(lm, ids)


def test_unedited_splice_with_error_is_the_clean_model(run, smollm2):
    s = _Setup(run, smollm2)
    ids, mask = s.tokens(PROMPT)
    clean = _clean(smollm2, ids)
    with torch.no_grad():
        kept = forward(smollm2, ids, s.splice([], None, mask, error=True))[0].log_softmax(-1)
        alone = forward(smollm2, ids, s.splice([], None, mask, error=False))[0].log_softmax(-1)
    assert (kept - clean).abs().max() < 1e-3
    assert (alone - clean).abs().max() > 0.1  # the splice did replace the activation
    # and the reconstruction alone is the CE evaluation's spliced model
    from saekit.splice import reconstruct

    ref = logprobs(smollm2, ids, HOOK, reconstruct(s.sae(None)[1], mask))
    assert (alone - ref).abs().max() < 1e-3


def test_generation_with_an_unedited_splice_is_the_clean_continuation(run, smollm2):
    res = steer(run, PROMPT, [], max_new_tokens=6, model=smollm2)
    assert res.steered == res.clean and len(res.clean) > 0
    assert torch.allclose(res.p_clean, res.p_steered, atol=1e-4)


def test_attributions_complete_the_gradient(run, smollm2):
    """sum_i z_i dm/dz_i at each position = <dm/dx, x_hat - b_dec>, with dm/dx from an independent
    autograd pass of the clean model through the bridge's hook; the error term's and the bias's
    attributions complete <dm/dx, x>."""
    res = attribute(run, PROMPT, " king", " queen", model=smollm2)
    s = _Setup(run, smollm2)
    _, sae = s.sae(None)
    ids, mask = s.tokens(PROMPT)
    t, a = s.token_id(" king"), s.token_id(" queen")
    got = {}

    def grab(act, hook):
        got["x"] = act.detach().requires_grad_()
        return got["x"]

    logits = smollm2.run_with_hooks(ids, fwd_hooks=[(HOOK, grab)])
    m = logits[0, -1, t] - logits[0, -1, a]
    (g,) = torch.autograd.grad(m, got["x"])
    x, g = got["x"].detach()[0], g[0]
    assert abs(res.metric - float(m.detach())) < 1e-3
    pos = mask[0].nonzero().flatten()
    with torch.no_grad():
        x_hat = sae(x[pos])
    per_pos = res.table.groupby("position").attribution.sum()
    expect = ((x_hat - sae.b_dec) * g[pos]).sum(1)
    for p, e in zip(pos.tolist(), expect.tolist(), strict=True):
        assert per_pos.get(p, 0.0) == pytest.approx(e, rel=2e-3, abs=2e-4)
    assert res.error == pytest.approx(float(((x[pos] - x_hat) * g[pos]).sum()), rel=2e-3, abs=2e-4)
    total = res.table.attribution.sum() + res.error + res.bias
    assert total == pytest.approx(float((x[pos] * g[pos]).sum()), rel=2e-3, abs=2e-4)
    assert 0 < res.error_share < 1
    assert res.table.attribution.abs().is_monotonic_decreasing
    assert set(res.table.columns) == {"position", "token", "latent", "activation", "attribution", "label"}


def test_attribution_of_a_batch_is_each_prompts_own(run, smollm2):
    """Prompts of different lengths attributed as one right-padded batch (one target each) give
    each prompt's one-prompt attribution: same metric, rows, error and bias, and nothing at the
    padding."""
    prompts = [PROMPT, "When Mary and John went to the store, John gave a drink to", "Long live the"]
    targets = [" king", " Mary", " king"]
    batch = attribute(run, prompts, targets, [" queen", " John", None], model=smollm2)
    assert len(batch) == 3
    for p, t, a, got in zip(prompts, targets, [" queen", " John", None], batch, strict=True):
        one = attribute(run, p, t, a, model=smollm2)
        assert got.metric == pytest.approx(one.metric, rel=1e-3, abs=1e-4)
        assert got.error == pytest.approx(one.error, rel=2e-3, abs=2e-4)
        assert got.bias == pytest.approx(one.bias, rel=2e-3, abs=2e-4)
        key = ["position", "latent"]
        merged = one.table.merge(got.table, on=key, suffixes=("", "_b"))
        assert len(merged) == len(one.table) == len(got.table)  # the same active latents, no padding rows
        assert (merged.token == merged.token_b).all()
        assert merged.activation.values == pytest.approx(merged.activation_b.values, rel=1e-3, abs=1e-4)
        assert merged.attribution.values == pytest.approx(merged.attribution_b.values, rel=2e-3, abs=2e-4)
    with pytest.raises(SaekitError, match="2 values of target for 3 prompts"):
        attribute(run, prompts, [" king", " Mary"], model=smollm2)


def test_steering_a_latent_towards_a_token_raises_it(smollm2, tmp_path):
    """A latent whose decoder row is token T's direction through the final norm and the
    unembedding (planted in an SAE of the last block), added at every position, raises P(T) at the
    next position; subtracted, it lowers it."""
    from saekit.model import _TWINS

    twin = _TWINS[smollm2]
    t = smollm2.tokenizer(" dog", add_special_tokens=False).input_ids[0]
    sae = SAE(SAEConfig(576, 64, 4, hookpoint="blocks.29.hook_resid_post", model="smollm2-135m"))
    with torch.no_grad():
        row = twin.lm_head.weight[t] * twin.model.norm.weight
        sae.W_dec[5] = row / row.norm()
    sae.save(tmp_path / "sae")
    up = steer(tmp_path / "sae", PROMPT, {5: "+100"}, max_new_tokens=1, model=smollm2)
    down = steer(tmp_path / "sae", PROMPT, {5: "-100"}, max_new_tokens=1, model=smollm2)
    other = steer(tmp_path / "sae", PROMPT, {6: "+100"}, max_new_tokens=1, model=smollm2)
    assert up.p_steered[t] > 10 * up.p_clean[t] and down.p_steered[t] < up.p_clean[t] / 10
    assert abs(float(other.p_steered[t].log() - other.p_clean[t].log())) < abs(float(up.p_steered[t].log() -
                                                                                 up.p_clean[t].log())) / 4


def test_transcoder_splice(transcoder, smollm2):
    """With its error term the transcoder's splice is the clean model; without, the MLP's output is
    the transcoder's reading of the MLP's input, as computed here by hand."""
    s = _Setup(transcoder, smollm2)
    ids, mask = s.tokens(PROMPT)
    clean = _clean(smollm2, ids)
    with torch.no_grad():
        kept = forward(smollm2, ids, s.splice([], None, mask, error=True))[0].log_softmax(-1)
        alone = forward(smollm2, ids, s.splice([], None, mask, error=False))[0].log_softmax(-1)
    tc = SAE.load(transcoder)
    src, tgt = tc.cfg.sources[0], tc.cfg.targets[0]
    got = {}

    def read(act):
        got["x"] = act
        return act

    def write(act):
        out = act.clone()
        out[mask] = tc.decode_concat(*tc.encode(got["x"][mask])).to(act.dtype)
        return out

    by_hand = logprobs(smollm2, ids, hooks=((src, read), (tgt, write)))
    assert (kept - clean).abs().max() < 1e-3
    assert (alone - clean).abs().max() > 0.1
    assert (alone - by_hand).abs().max() < 1e-3


def test_edits():
    """set / add / scale / zero / mean at chosen positions, on a code with the latent present or not."""
    vals = torch.tensor([[3.0, 1.0], [2.0, 0.5], [4.0, 0.0]])
    idx = torch.tensor([[7, 2], [5, 7], [1, 0]])
    pos = torch.tensor([0, 1, 2])

    def dense(v, i):
        return torch.zeros(3, 9).scatter_add_(1, i, v)

    before = dense(vals, idx)
    for edit, col in [(Edit(7, "set", 9.0), [9.0, 9.0, 9.0]), (Edit(7, "add", 2.0), [5.0, 2.5, 2.0]),
                      (Edit(7, "scale", 3.0), [9.0, 1.5, 0.0]), (Edit(7, "zero"), [0.0, 0.0, 0.0]),
                      (Edit(7, "mean"), [0.25, 0.25, 0.25]), (Edit(7, "add", 2.0, (1,)), [3.0, 2.5, 0.0])]:
        after = dense(*_edited(vals, idx, pos, [edit], {7: 0.25}))
        assert after[:, 7].tolist() == col, edit
        others = [c for c in range(9) if c != 7]
        assert torch.equal(after[:, others], before[:, others])
    assert Edit.parse("6=+8") == Edit(6, "add", 8.0) and Edit.parse("6=-8") == Edit(6, "add", -8.0)
    assert Edit.parse("6=8") == Edit(6, "set", 8.0) and Edit.parse("6=x2") == Edit(6, "scale", 2.0)
    assert Edit.parse("6=mean") == Edit(6, "mean") and Edit.parse("6=zero") == Edit(6, "zero")


def test_cli_json(run, capsys):
    assert cli.main(["steer", str(run), "--prompt", PROMPT, "--feature", "3=+10", "--max-new-tokens", "3",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"clean", "steered", "next_token"} and isinstance(out["clean"], str)
    moves = [abs(r["p_steered"] - r["p_clean"]) for r in out["next_token"]]
    assert set(out["next_token"][0]) == {"token", "p_clean", "p_steered"} and moves == sorted(moves, reverse=True)
    assert cli.main(["attribute", str(run), "--prompt", PROMPT, "--target", " king", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and set(rows[0]) == {"position", "token", "latent", "activation", "attribution", "label"}
    assert cli.main(["attribute", str(run), "--prompt", PROMPT, "--target", " king", "--limit", "1000"]) == 0
    text = capsys.readouterr().out
    assert "' king'" in text  # tokens quoted: the leading space shows
    digits = [len(re.sub(r"^[0.]+", "", x.lstrip("-")).replace(".", "")) for x in re.findall(r"-?\d+\.\d+", text)]
    assert digits and max(digits) <= 4  # figures to 4 significant digits


@pytest.mark.parametrize("argv, message", [
    (["steer", "{run}", "--prompt", PROMPT, "--feature", "100000=+8"], "latent 100000 is out of range"),
    (["steer", "{run}", "--prompt", PROMPT, "--feature", "3=+8", "--hookpoint", "blocks.9.x"], "blocks.9.x"),
    (["steer", "{run}", "--prompt", PROMPT, "--feature", "three"], "cannot read the edit"),
    (["steer", "{run}", "--prompt", "  ", "--feature", "3=+8"], "the prompt is empty"),
    (["steer", "{run}", "--prompt", "word " * 9000, "--feature", "3=+8"], "the model reads at most"),
    (["attribute", "{run}", "--prompt", PROMPT, "--target", " kingdom of"], "give one token"),
    (["attribute", "{bare}", "--prompt", PROMPT, "--target", " king"], "names no model"),
])
def test_bad_input_ends_in_one_message(run, smollm2, tmp_path, capsys, monkeypatch, argv, message):
    from saekit import model as lm

    monkeypatch.setattr(lm, "load_model", lambda *a, **k: smollm2)  # loaded once for the session
    bare = tmp_path / "bare"
    SAE(SAEConfig(576, 64, 4, hookpoint=HOOK)).save(bare)
    code = cli.main([a.format(run=run, bare=bare) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
