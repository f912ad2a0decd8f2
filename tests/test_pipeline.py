"""`saekit train/eval` end to end on the offline model: outputs, kill-and-resume, bad input."""

import dataclasses
import json
import re

import pytest
import torch

from saekit import cli, pipeline
from saekit.activations import ActivationCache, build_cache, cache_path, merge_parts, resume_point
from saekit.config import TrainConfig, load_config
from saekit.errors import SaekitError
from saekit.init import init_sae
from saekit.run import Run
from saekit.sae import SAE, SAEConfig
from saekit.trainer import Trainer

HOOK = "blocks.2.hook_resid_post"  # the hookpoint of the `tiny` run (conftest)


def run_cli(*args) -> int:
    return cli.main(["train", *args, "--quiet"])


def test_train_writes_a_loadable_evaluated_run(tiny, tmp_path, capsys):
    assert run_cli(*tiny, "--out", str(tmp_path / "run")) == 0
    run = tmp_path / "run"
    sae = SAE.load(run / HOOK)
    assert sae.W_dec.shape == (1152, 576) and sae.cfg.hookpoint == HOOK
    results = json.loads((run / "eval.json").read_text())[HOOK]
    assert 0 < results["fvu"] < 1 and results["l0"] == pytest.approx(16, abs=0.5)
    assert results["ce_clean"] < results["ce_sae"] < results["ce_zero"]
    assert results["explained_variance_saebench"] > results["explained_variance"]  # about zero, not the mean
    assert set(results["conventions"]) == {"fvu", "ce"} and "centred" in results["conventions"]["fvu"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fvus = [m[HOOK]["fvu"] for m in metrics]
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    assert sum(fvus[-3:]) < 0.9 * sum(fvus[:3])  # FVU falls on real activations
    path = sae.cfg.encoder_path  # the run's CPU encoder path, recorded with everything it produced
    assert path in ("fp32", "bf16+fp32-rescore") and results["encoder_path"] == path
    assert {m["encoder_path"] for m in metrics} == {path}
    out = capsys.readouterr().out
    assert "| fvu |" in out and f"the run is in {run}" in out
    assert cli.main(["eval", str(run), "--quiet", "--format", "saebench"]) == 0  # from the folder alone
    check_saebench_core(run, json.loads((run / "eval.json").read_text())[HOOK])


# sae-bench 0.6.0's core output schema (sae_bench/evals/core/eval_output.py): category -> fields
SAEBENCH_CORE = {
    "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
    "model_performance_preservation": {"ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                       "ce_loss_without_sae"},
    "reconstruction_quality": {"explained_variance", "explained_variance_legacy", "mse", "cossim"},
    "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
    "sparsity": {"l0", "l1"},
    "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
    "misc_metrics": {"freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                     "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim",
                     "average_max_decoder_cosine_sim", "frac_alive"},
}


def check_saebench_core(run, ours: dict) -> None:
    """RUN/saebench/core/ holds sae-bench's core schema; figures defined alike equal eval.json's."""
    out = json.loads((run / "saebench" / "core" / f"saekit_{HOOK}_eval_results.json").read_text())
    assert out["eval_type_id"] == "core" and out["sae_lens_id"] == HOOK and out["eval_result_details"] == []
    assert {k: set(v) for k, v in out["eval_result_metrics"].items()} == SAEBENCH_CORE
    m = out["eval_result_metrics"]
    assert m["reconstruction_quality"]["explained_variance"] == ours["explained_variance_saebench"]
    assert m["reconstruction_quality"]["cossim"] == ours["cosine"] and m["sparsity"]["l0"] == ours["l0"]
    assert m["shrinkage"]["l2_ratio"] == ours["l2_ratio"]
    assert m["misc_metrics"]["frac_alive"] == 1 - ours["dead_fraction"]
    assert m["token_stats"]["total_tokens_eval_sparsity_variance"] == ours["n_tokens"]
    ce = m["model_performance_preservation"]  # SAEBench's convention: BOS replaced too, so CE differs
    assert ce["ce_loss_without_sae"] < min(ce["ce_loss_with_sae"], ce["ce_loss_with_ablation"])
    assert ce["ce_loss_score"] == pytest.approx((ce["ce_loss_with_ablation"] - ce["ce_loss_with_sae"])
                                                / (ce["ce_loss_with_ablation"] - ce["ce_loss_without_sae"]))
    assert ce["ce_loss_with_ablation"] != ours["ce_zero"]
    assert out["eval_result_unstructured"]["fvu"] == ours["fvu"]



def test_saebench_ce_convention_is_sae_benchs_definition(smollm2):
    """`downstream_metrics(convention="saebench")` equals sae-bench 0.6.0's core CE and KL written out
    (its get_recons_loss): the SAE or zeros at every position, BOS included; CE over the positions
    whose input is not BOS/EOS/padding, KL over every such position. saekit's own reads otherwise."""
    from saekit.evaluate import downstream_metrics
    from saekit.model import logprobs

    tok = smollm2.tokenizer
    ids = tok("Shall I compare thee to a summer's day? Thou art more lovely", add_special_tokens=False).input_ids
    row = torch.tensor([tok.bos_token_id, *ids[:6], tok.eos_token_id, *ids[6:]])
    tokens = torch.stack([row, torch.cat([row[:1], row[1:].flip(0)])])
    mask = ~torch.isin(tokens, torch.tensor(tok.all_special_ids))
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d_in=576, n_latents=1152, k=32)).eval().requires_grad_(False)
    sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(1152, 576, generator=g), dim=1))
    sae.W_enc.copy_(sae.W_dec)
    every = lambda acts: sae(acts.reshape(-1, 576)).reshape(acts.shape)  # noqa: E731
    lp = {n: logprobs(smollm2, tokens, HOOK, f)
          for n, f in (("clean", None), ("sae", every), ("zero", torch.zeros_like))}
    ce = {n: -(v[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1))[mask[:, :-1]].mean() for n, v in lp.items()}
    kl = {n: (lp["clean"].exp() * (lp["clean"] - lp[n])).sum(-1)[mask].mean() for n in ("sae", "zero")}
    ours = downstream_metrics(smollm2, sae, HOOK, tokens, mask, convention="saebench")
    for n in ("clean", "sae", "zero"):
        assert ours[f"ce_{n}"] == pytest.approx(float(ce[n]), rel=1e-4)
    for n in ("sae", "zero"):
        assert ours[f"kl_{n}"] == pytest.approx(float(kl[n]), rel=1e-4)
    own = downstream_metrics(smollm2, sae, HOOK, tokens, mask)  # BOS keeps its activation
    assert own["ce_clean"] != pytest.approx(ours["ce_clean"], rel=1e-3)  # other positions averaged
    assert own["ce_zero"] != pytest.approx(ours["ce_zero"], rel=1e-3)
    with pytest.raises(SaekitError, match="unknown CE convention"):
        downstream_metrics(smollm2, sae, HOOK, tokens, mask, convention="sae-lens")

def test_killed_run_resumes_where_it_stopped(tiny, tmp_path, monkeypatch):
    assert run_cli(*tiny, "--out", str(tmp_path / "full")) == 0

    real_step = Trainer.train_step

    def dies_at_step_10(self, batch):
        if self.step == 10:
            raise KeyboardInterrupt  # as if killed: nothing after the last checkpoint is saved
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_10)
    assert run_cli(*tiny, "--out", str(tmp_path / "cut")) == 130
    monkeypatch.setattr(Trainer, "train_step", real_step)
    path = SAE.load(tmp_path / "full" / HOOK).cfg.encoder_path
    flipped = path == "fp32"  # the resume runs where this CPU would choose the other path: the run's stays
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flipped)
    cut = ["--out", str(tmp_path / "cut"), "--resume"]
    assert run_cli(*cut, "--k", "8") == 2  # a flag given again must agree with the stored config
    assert run_cli(*cut, "--log_every", "2") == 0  # the stored config; resumes at step 8
    a, b = SAE.load(tmp_path / "full" / HOOK), SAE.load(tmp_path / "cut" / HOOK)
    assert b.cfg.encoder_path == path
    for n, p in a.named_parameters():
        torch.testing.assert_close(p, getattr(b, n), rtol=1e-4, atol=1e-5, msg=n)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step logged twice


def test_a_second_seed_reuses_the_cache(tiny, tmp_path, monkeypatch, capsys):
    assert run_cli(*tiny, "--out", str(tmp_path / "s0")) == 0

    def harvest(*args, **kwargs):
        raise AssertionError("a second seed harvested again")

    monkeypatch.setattr(pipeline.lm, "harvest", harvest)
    assert run_cli(*tiny, "--seed", "1", "--out", str(tmp_path / "s1")) == 0
    a, b = SAE.load(tmp_path / "s0" / HOOK), SAE.load(tmp_path / "s1" / HOOK)
    assert not torch.equal(a.W_dec, b.W_dec)  # the seed still starts the SAE elsewhere
    # the two seeds' stability, as a verb and in `analyze` (the SAEs are young: little is shared)
    s0, s1 = str(tmp_path / "s0"), str(tmp_path / "s1")
    assert cli.main(["stability", s0, s1, "--json"]) == 0
    res = json.loads((tmp_path / "s0" / "analysis" / "stability_s1.json").read_text())
    assert 0 <= res["shared_0.9"] <= res["shared_0.7"] < 0.5 and res["cofiring"]["n_tokens"] > 500
    assert cli.main(["analyze", "dead", s0, "--against", s1, "--quiet"]) == 0
    assert "Seed stability against" in capsys.readouterr().out
    assert cli.main(["stability", s0, s1, "--hookpoint", "blocks.3.hook_resid_post"]) == 2
    with pytest.raises(AssertionError, match="harvested"):  # another data seed is other data
        run_cli(*tiny, "--data_seed", "1", "--out", str(tmp_path / "d1"))

    # the default data seed keeps the key caches had when one seed picked data and init (pinned)
    assert [cache_path(TrainConfig(cache_dir="c"), s).name for s in ("train", "val")] == [
        "598da2f8cee7ef1d", "5e72516521ae41ee"]
    assert cache_path(TrainConfig(cache_dir="c", data_seed=1, seed=1), "train").name == "8e793e9e0ce3c87d"
    # a run saved before data_seed existed drew its data with its seed, and finds that cache
    old = json.loads((tmp_path / "s1" / "config.json").read_text())
    del old["data_seed"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    assert Run.open(tmp_path / "old").config.data_seed == 1


def test_a_cache_of_more_hookpoints_serves_a_subset_of_them(tiny, tmp_path, monkeypatch):
    def given(args, key, value):
        out = list(args)
        if key in out:
            out[out.index(key) + 1] = value
        else:
            out += [key, value]
        return out

    own = given(tiny, "--cache_dir", str(tmp_path / "own"))
    shared = given(tiny, "--cache_dir", str(tmp_path / "shared"))
    both = given(shared, "--hookpoints", json.dumps([HOOK, "blocks.3.hook_resid_post"]))
    assert cli.main(["cache", *both, "--quiet"]) == 0
    assert run_cli(*own, "--out", str(tmp_path / "a")) == 0  # harvests its own cache of one hookpoint

    def harvest(*args, **kwargs):
        raise AssertionError("a subset of a finished cache's hookpoints harvested again")

    monkeypatch.setattr(pipeline.lm, "harvest", harvest)
    assert run_cli(*shared, "--out", str(tmp_path / "b")) == 0
    sub, sup = load_config(None, shared), load_config(None, both)
    assert all(cache_path(sub, s) == cache_path(sup, s) != cache_path(load_config(None, own), s)
               for s in ("train", "val"))
    a, b = SAE.load(tmp_path / "a" / HOOK), SAE.load(tmp_path / "b" / HOOK)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)  # the same rows, the same batches
    with pytest.raises(AssertionError, match="harvested"):  # hookpoints beyond the cache's are not in it
        run_cli(*given(shared, "--hookpoints", json.dumps([HOOK, "blocks.1.hook_resid_post"])),
                "--out", str(tmp_path / "c"))


def test_bad_inputs_exit_cleanly(tiny, tmp_path, capsys):
    out = ["--out", str(tmp_path / "r")]
    assert run_cli(*tiny, *out, "--hookpoints", "blocks.2.hook_resid_psot") == 2
    assert "close matches: blocks.2.hook_resid_post" in capsys.readouterr().err
    assert run_cli(*tiny, *out, "--learning_rate", "1") == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err
    assert run_cli(str(tmp_path / "nope.yaml")) == 2
    assert run_cli(*tiny, *out, "--dataset", str(tmp_path / "missing_dir/")) == 2
    assert "not found" in capsys.readouterr().err
    assert run_cli(*tiny, *out, "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path), "--quiet"]) == 2


def test_bad_values_are_named_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """A flag out of range names the flag under its verb's usage; a layer the model lacks and
    activations of the wrong width are refused before the model's weights load; `k` out of range
    reads the same whether the config or the SAE finds it."""
    from safetensors.torch import save_file

    from saekit import model as lm
    from saekit.config import make_config

    monkeypatch.setattr(lm, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    where = str(tmp_path)
    for argv, usage, said in ((["analyze", "dead", where, "--tokens", "-10"], "analyze", "--tokens: must be >= 1"),
                              (["analyze", "dead", where, "--tokens", "0"], "analyze", "--tokens: must be >= 1"),
                              (["eval", where, "--foo", "3"], "eval", "unrecognized arguments: --foo 3"),
                              (["atlas", "query", where, "--limit", "x"], "atlas", "--limit: must be an integer")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"usage: saekit {usage}") and said in err, err
    assert run_cli("--hookpoints", "blocks.40.hook_resid_post", "--out", str(tmp_path / "r")) == 2
    assert "'blocks.40.hook_resid_post': smollm2-135m has 30 layers, blocks.0 to blocks.29" in capsys.readouterr().err
    sae = SAE(SAEConfig(d_in=576, n_latents=64, k=4, hookpoint="blocks.6.hook_resid_post", model="smollm2-135m"))
    sae.save(tmp_path / "sae")
    save_file({"x": torch.randn(10, 64)}, tmp_path / "acts.safetensors")
    for verb in (["eval"], ["analyze", "all"]):
        assert cli.main([*verb, f"{where}/sae", "--activations", f"{where}/acts.safetensors", "--quiet"]) == 2
        assert "must be [batch, 576] to match the SAE's d_in, got shape (10, 64)" in capsys.readouterr().err
    said = []
    for make in (lambda: make_config(TrainConfig, {"k": -5}), lambda: SAEConfig(d_in=8, n_latents=16, k=100000)):
        with pytest.raises(SaekitError) as e:
            make()
        said.append(str(e.value))
    assert all(re.search(r"\bk'? must be in \[1, n_latents\], got (-5|100000)", m) for m in said), said


def test_resume_with_other_config_and_corrupt_state_are_refused(tiny, tmp_path, capsys):
    run = tmp_path / "r"
    assert run_cli(*tiny, "--out", str(run)) == 0
    before = (run / HOOK / "sae.safetensors").read_bytes()
    assert run_cli(*tiny, "--out", str(run), "--k", "8") == 2  # no silent overwrite
    assert "already holds a run of another config" in capsys.readouterr().err
    assert run_cli(*tiny, "--out", str(run), "--resume", "--k", "8") == 2
    assert "k: 16 -> 8" in capsys.readouterr().err
    state = run / "state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    assert run_cli(*tiny, "--out", str(run), "--resume") == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert (run / HOOK / "sae.safetensors").read_bytes() == before  # nothing saved was lost


def test_sae_with_wrong_width_for_the_hookpoint(tiny, tmp_path, capsys):
    run = tmp_path / "r"
    assert run_cli(*tiny, "--out", str(run)) == 0
    SAE(SAE.load(run / HOOK).cfg.__class__(d_in=64, n_latents=128, k=4)).save(run / HOOK)
    assert cli.main(["eval", str(run), "--quiet"]) == 2
    assert "[batch, 64] to match the SAE's d_in" in capsys.readouterr().err


def test_cache_rows_are_the_split_tokens_in_order(tiny, tmp_path):
    cfg = load_config(None, tiny)
    _, ctx, caches = pipeline.prepare(cfg, quiet=True)
    for split, cache in caches.items():
        tokens, mask = ctx[split]
        rows = {k: v.long() for k, v in cache.rows().items()}
        c, p = rows["_context"], rows["_position"]
        assert torch.equal(rows["_token"], tokens[mask]) and len(c) == cache.n_tokens == int(mask.sum())
        assert mask[c, p].all() and torch.equal(tokens[c, p], rows["_token"])
        assert (torch.diff(c * tokens.shape[1] + p) > 0).all()  # row-major: each kept position once, in order
        assert cache.load_shard(0, [HOOK, "_token"])["_token"].dtype == torch.int32
    bare = build_cache(tmp_path / "c", iter([{"h": torch.ones(4, 2)}]), {})  # activations without row fields
    assert bare.hookpoints == ["h"]
    with pytest.raises(SaekitError, match="records no token ids"):
        bare.rows()


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    cfg = load_config(None, ["--dataset", str(tmp_path / "empty.jsonl"), "--cache_dir", str(tmp_path)])
    with pytest.raises(SaekitError):
        pipeline.prepare(cfg, quiet=True)


def test_interrupted_harvest_continues(tmp_path):
    chunks = [{"h": torch.full((10, 2), float(i))} for i in range(9)]

    def dies_after(n):
        for i, c in enumerate(chunks):
            if i == n:
                raise KeyboardInterrupt
            yield c

    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "c", dies_after(7), {}, shard_tokens=30)
    done = resume_point(tmp_path / "c")
    assert done == 6  # two full shards were written before the kill
    cache = build_cache(tmp_path / "c", iter(chunks[done:]), {}, shard_tokens=30, chunks_done=done)
    assert torch.equal(cache.tensor("h")[:, 0], torch.arange(9).repeat_interleave(10).float())

    # the same chunks split over two processes' parts, the second killed and continued
    build_cache(tmp_path / "p", iter(chunks[:4]), {"contexts": [0, 4]}, shard_tokens=30, part=0)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "p", (c for i, c in enumerate(dies_after(7)) if i >= 4), {"contexts": [4, 9]},
                    shard_tokens=30, part=1)
    assert resume_point(tmp_path / "p", 1, {"contexts": [4, 9]}) == 3
    assert resume_point(tmp_path / "p", 1, {"contexts": [5, 9]}) == 0  # another split of the contexts
    with pytest.raises(SaekitError, match="part_r1.json is incomplete"):
        merge_parts(tmp_path / "p", 2, {})
    build_cache(tmp_path / "p", iter(chunks[7:]), {}, shard_tokens=30, chunks_done=3, part=1)
    merged = merge_parts(tmp_path / "p", 2, {"model": "m"})
    assert [s["file"] for s in merged.manifest["shards"]] == [
        "shard_r0_00000.safetensors", "shard_r0_00001.safetensors", "shard_r1_00000.safetensors",
        "shard_r1_00001.safetensors"]
    assert torch.equal(ActivationCache.open(tmp_path / "p").tensor("h"), cache.tensor("h"))
    with pytest.raises(SaekitError, match="lacks part_r2.json, the part of process 2"):
        merge_parts(tmp_path / "p", 3, {})


def test_cache_list_and_remove(tmp_path, capsys):
    """`saekit cache --list` shows each cache under cache_dir (size, tokens, split, hookpoints,
    model; a partial one as incomplete); `--remove KEY|all` deletes only cache folders."""
    root = tmp_path / "caches"
    rows = {"_context": torch.zeros(50, dtype=torch.int32), "_position": torch.arange(50, dtype=torch.int32),
            "_token": torch.ones(50, dtype=torch.int32)}
    build_cache(root / "0123456789abcdef", iter([{"h": torch.randn(50, 8), **rows}]), {"model": "m", "split": "val"})
    (root / "fedcba9876543210").mkdir()  # a harvest killed before its first shard
    (root / "notes").mkdir()  # not a cache: never listed or removed
    assert cli.main(["cache", "--list", "--cache_dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "| 0123456789abcdef |" in out and "| 50 | val | h | m |" in out and "(incomplete)" in out
    assert "notes" not in out
    assert cli.main(["cache", "--remove", "notes", "--cache_dir", str(root)]) == 2
    assert cli.main(["cache", "--remove", "0123456789abcdef", "--cache_dir", str(root)]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["fedcba9876543210", "notes"]
    assert cli.main(["cache", "--remove", "all", "--cache_dir", str(root)]) == 0
    assert [p.name for p in root.iterdir()] == ["notes"]
    assert cli.main(["cache", "--list", "--cache_dir", str(root)]) == 0
    assert "no activation caches" in capsys.readouterr().out


def test_data_init_seeds_start_on_different_rows(tmp_path):
    x = torch.randn(200_000, 16, generator=torch.Generator().manual_seed(0))
    cache = build_cache(tmp_path / "c", iter([{"h": c} for c in x.split(25_000)]), {}, shard_tokens=50_000)
    n, cfg = pipeline.INIT_SAMPLE, load_config("configs/default.yaml", [])
    assert torch.equal(pipeline.init_sample(cache, ["h"], cfg)["h"], x[:n])  # other inits: the first tokens

    def start(seed: int, sample: torch.Tensor) -> torch.Tensor:
        sae = SAE(SAEConfig(d_in=16, n_latents=8_000, k=4))
        init_sae(sae, sample, "data", torch.Generator().manual_seed(seed))
        return sae.W_dec

    def shared(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a @ b.T).amax(1) > 0.9999).double().mean())

    cfgs = [dataclasses.replace(cfg, init="data", seed=s) for s in (0, 1)]
    samples = [pipeline.init_sample(cache, ["h"], c)["h"] for c in cfgs]
    for s in samples:  # n distinct rows of the cache
        assert s.shape == (n, 16) and len(torch.unique(s, dim=0)) == n
        assert bool((torch.cdist(s[:50], x, compute_mode="donot_use_mm_for_euclid_dist").amin(1) == 0).all())
    assert torch.equal(samples[1], pipeline.init_sample(cache, ["h"], cfgs[1])["h"])  # reproducible
    assert shared(start(0, samples[0]), start(1, samples[1])) < 0.1  # ~8,000 / 200,000 expected
    assert shared(start(0, x[:n]), start(1, x[:n])) > 0.4  # one shared pool of first tokens: ~8,000 / 16,384
