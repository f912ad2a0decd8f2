"""Supervised dictionaries and the three-axis task evaluation on planted data (known attribute
vectors plus noise, a "model" that reads one attribute linearly), bad inputs, and IOI on the
offline model (a handful of prompts)."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from saekit import cli
from saekit.analyze.supervised import compare, interpretability, supervised_dictionary
from saekit.errors import SaekitError
from saekit.sae import SAE, SAEConfig

# The toy: d = 16. io (4 values) in coordinates 0-3, s (4 values) in 4-7, order (2 values) in
# 8-9; each value's vector is its one-hot minus the block's average (so the vectors are centred,
# as supervised_dictionary estimates them); 10-12 hold a nuisance sub-group; 13 a constant offset.
D, SCALE = 16, 5.0
BLOCKS = {"io": (0, 4), "s": (4, 4), "order": (8, 2)}
OFFSET = torch.zeros(D)
OFFSET[13] = 3.0


def planted(a: str, v: int) -> torch.Tensor:
    start, n = BLOCKS[a]
    u = torch.zeros(D)
    u[start : start + n] = -1 / n
    u[start + v] += 1
    return u


def toy_data(n: int, seed: int = 0, noise: float = 0.05):
    """acts [n, D], labels (independent attributes, so the centred conditional means are the
    planted vectors; the toy's answer is io, its distractor io + 2 mod 4)."""
    g = torch.Generator().manual_seed(seed)
    io = torch.randint(0, 4, (n,), generator=g)
    s = torch.randint(0, 4, (n,), generator=g)
    order = torch.randint(0, 2, (n,), generator=g)
    sub = torch.randint(0, 3, (n,), generator=g)
    x = OFFSET + noise * torch.randn(n, D, generator=g)
    for a, col in (("io", io), ("s", s), ("order", order)):
        x += torch.stack([planted(a, int(v)) for v in col])
    x[torch.arange(n), 10 + sub] += 1
    return x, pd.DataFrame({"io": io.tolist(), "s": s.tolist(), "order": order.tolist()})


def readout(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The toy model: logits over the 4 io classes read linearly from the io block."""
    return SCALE * x[:, :4]


def planted_sae(split_io0: bool = False, drop: tuple[str, ...] = ()) -> SAE:
    """A ReLU SAE whose latents are the planted vectors (one per value; each fires exactly on
    its value with activation 1). `split_io0`: io = 0 spread over three latents, one per
    nuisance sub-group (each fires on a third of its examples)."""
    enc, dec, bias = [], [], []
    for a, (start, n) in BLOCKS.items():
        if a in drop:
            continue
        for v in range(n):
            u = planted(a, v)
            w = torch.zeros(D)
            w[start + v] = 1 / (1 - 1 / n)  # <w, u_v> = 1, <w, u_w> < 0
            if a == "io" and v == 0 and split_io0:
                for p in range(3):
                    wp = w.clone()
                    wp[10 + p] = 2.0
                    enc.append(wp), dec.append(u / 0.5), bias.append(-2.5)
                continue
            enc.append(w), dec.append(u / 0.5), bias.append(-0.5)
    m = len(enc)
    sae = SAE(SAEConfig(d_in=D, n_latents=m, k=m, architecture="relu")).eval().requires_grad_(False)
    sae.W_enc.copy_(torch.stack(enc))
    sae.W_dec.copy_(torch.stack(dec))
    sae.b_enc.copy_(torch.tensor(bias))
    sae.b_dec.copy_(OFFSET)
    return sae


def test_supervised_dictionary_recovers_planted_vectors():
    x, labels = toy_data(2000)
    sup = supervised_dictionary(x, labels)
    assert set(sup.vectors) == {(a, v) for a, (_, n) in BLOCKS.items() for v in range(n)}
    for (a, v), u in sup.vectors.items():
        assert F.cosine_similarity(u, planted(a, v), dim=0) >= 0.95, (a, v)
    rec = sup.reconstruct(labels)
    assert (x - rec).pow(2).sum() < 0.5 * (x - sup.mean).pow(2).sum()
    assert torch.allclose(sup.mean, x.mean(0), atol=1e-6)
    d = sup.to_dict()
    assert len(d["vectors"]) == 10 and sum(r["count"] for r in d["vectors"] if r["attribute"] == "io") == 2000


def test_task_eval_core_on_a_planted_toy():
    x, labels = toy_data(600)
    held, hl = toy_data(200, seed=1)
    # counterfactuals of the first 40 held-out rows: io moved to io + 1
    i = torch.arange(40)
    new_io = [(hl.io[r] + 1) % 4 for r in range(40)]
    cf = held[i] - torch.stack([planted("io", hl.io[r]) for r in range(40)]) \
        + torch.stack([planted("io", v) for v in new_io])
    acts = torch.cat([held, cf])
    lab = pd.concat([hl, hl.iloc[:40].assign(io=new_io)], ignore_index=True)
    answer = torch.tensor(lab.io.to_numpy())
    distractor = (answer + 2) % 4
    pairs = {"io": torch.stack([i, 200 + i], 1)}
    sup = supervised_dictionary(x, labels)
    res = compare(readout, acts, lab, answer, distractor, sup, planted_sae(), pairs)
    ap = res.approximation.set_index("dictionary")
    assert ap.loc["clean", "accuracy"] == 1 and ap.loc["mean ablation", "recovered"] == 0
    for name in ("sae", "supervised"):
        assert ap.loc[name, "recovered"] >= 0.95 and ap.loc[name, "accuracy"] == 1
        assert abs(ap.loc[name, "necessity_recovered"]) < 0.1  # the reconstruction carries the answer
    c = res.control["io"]
    assert c["valid_pairs"] == 40 and c["supervised_success"] == 1 and c["sae_success"] == 1
    # one latent per value: the io latent out and the new one in, nothing else
    assert max(c["sae_edits"]) <= 2 and c["sae_latents_differing"] == 2 and c["sae_full_swap_success"] == 1
    assert res.values.tracked.all() and not res.values.over_split.any() and not res.attributes.occluded.any()
    assert (res.values.precision == 1).all() and (res.values.recall == 1).all()
    assert set(res.to_dict()) == {"approximation", "control", "values", "attributes", "thresholds"}


def test_over_split_and_occluded_values_are_flagged():
    acts, labels = toy_data(600)
    values, per = interpretability(planted_sae(split_io0=True, drop=("order",)), acts, labels)
    v = values.set_index(["attribute", "value"])
    assert v.loc[("io", 0), "over_split"] and not v.loc[("io", 0), "tracked"] and v.loc[("io", 0), "pieces"] == 3
    assert 0.2 < v.loc[("io", 0), "recall"] < 0.5 and v.loc[("io", 0), "precision"] == 1
    assert v.over_split.sum() == 1 and v.loc["io"].tracked.sum() == 3
    assert per.set_index("attribute").occluded.to_dict() == {"io": False, "s": False, "order": True}


def test_bad_inputs_are_refused(tmp_path, capsys):
    x, labels = toy_data(50)
    with pytest.raises(SaekitError, match="50 rows but there are 49"):
        supervised_dictionary(x[:49], labels)
    with pytest.raises(SaekitError, match="single value"):
        supervised_dictionary(x, labels.assign(order=1))
    with pytest.raises(SaekitError, match="DataFrame"):
        supervised_dictionary(x, labels.to_numpy())
    sup = supervised_dictionary(x, labels)
    with pytest.raises(SaekitError, match="no vector for io = 7"):
        sup.reconstruct(labels.assign(io=7))
    planted_sae().save(tmp_path / "sae")
    assert cli.main(["analyze", "task", str(tmp_path / "sae"), "--task", "nope", "--quiet"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


HOOK = "blocks.2.hook_resid_post"


def test_ioi_prompts_on_the_offline_tokenizer(smollm2):
    from saekit.analyze import ioi

    tok = smollm2.tokenizer
    train, test = ioi.names(tok, "train"), ioi.names(tok, "test")
    assert not set(train) & set(test) and len(test) >= 4
    assert all(len(tok.encode(" " + n, add_special_tokens=False)) == 1 for n in train + test)
    p = ioi.ioi_prompts(tok, 12, seed=3, split="test")
    assert set(p.labels.io) <= set(test) and (p.labels.io != p.labels.s).all()
    assert set(ioi.ioi_prompts(tok, len(train), seed=5).labels.s) == set(train)  # balanced: every name as S
    r = torch.arange(12)
    assert (p.tokens[r, p.where["io"]] == p.answer).all() and (p.tokens[r, p.where["s2"]] == p.distractor).all()
    assert (p.tokens[r, p.where["s1"]] == p.distractor).all() and (p.where["s1"] < p.where["s2"]).all()
    abb = torch.tensor((p.labels.order == "ABB").to_numpy())
    assert ((p.where["io"] < p.where["s1"]) == abb).all()
    sw = ioi.counterfactuals(tok, p, "swap")
    assert (sw.answer == p.distractor).all() and (sw.labels.template == p.labels.template).all()
    with pytest.raises(SaekitError, match="unknown IOI edit"):
        ioi.counterfactuals(tok, p, "nope")


def test_logits_at_matches_logprobs_with_a_replacement(smollm2):
    from saekit.analyze import ioi
    from saekit.model import logits_at, logprobs

    p = ioi.ioi_prompts(smollm2.tokenizer, 2, seed=4)

    def halve(act):
        return act * 0.5

    r = torch.arange(2)
    ref = logprobs(smollm2, p.tokens, HOOK, halve)[r, p.where["end"]]
    got = logits_at(smollm2, p.tokens, p.where["end"], HOOK, halve).log_softmax(-1)
    assert torch.allclose(got, ref, atol=1e-3)
    assert not torch.allclose(logits_at(smollm2, p.tokens, p.where["end"]).log_softmax(-1), ref, atol=1e-2)


def test_task_eval_on_the_offline_model(smollm2, tmp_path):
    from saekit.analyze import task_eval

    sae = SAE(SAEConfig(d_in=576, n_latents=256, k=8, hookpoint=HOOK, model="smollm2-135m")).eval()
    res = task_eval(sae, model=smollm2, n_fit=48, n_eval=4, n_pairs=2, max_edits=1).to_dict()
    r = res["hookpoints"][HOOK]
    ap = {row["dictionary"]: row for row in r["approximation"]}
    assert ap["clean"]["recovered"] == 1 and ap["mean ablation"]["recovered"] == 0 and ap["clean"]["kl"] < 1e-4
    assert {"sae", "supervised"} <= set(ap) and set(r["control"]) == {"io", "swap"}
    assert {row["attribute"] for row in r["attributes"]} == {"io", "s", "order"}
