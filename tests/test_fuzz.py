"""Loaders fed random and mutated files: they load, or raise SaekitError; nothing else escapes."""

import json

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from saekit.activations import ActivationCache, build_cache, open_activations
from saekit.config import TrainConfig, load_config, make_config
from saekit.errors import SaekitError
from saekit.run import Run
from saekit.sae import SAE, SAEConfig
from saekit.trainer import Trainer

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
scalars = st.none() | st.booleans() | st.integers(-3, 40) | st.integers() | st.floats() | st.text(max_size=6)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                      max_leaves=6)


def loads_or_refuses(load):
    try:
        return load()
    except SaekitError:
        return None


def mutated(base: dict, keys: list[str]):
    """`base` with some keys dropped, some set to random JSON values, maybe a stray key."""
    return st.builds(lambda drop, put: {**{k: v for k, v in base.items() if k not in drop}, **put},
                     st.sets(st.sampled_from(keys), max_size=2),
                     st.dictionaries(st.sampled_from([*keys, "extra", "colour"]), values, max_size=3))


def flipped(blob: bytes):
    """`blob` truncated, with a few bytes flipped, or replaced by random bytes."""
    flips = st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)), max_size=4)

    def flip(fl):
        b = bytearray(blob)
        for i, x in fl:
            b[i] ^= x
        return bytes(b)

    return st.integers(0, len(blob)).map(lambda n: blob[:n]) | flips.map(flip) | st.binary(max_size=120)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sae")
    SAE(SAEConfig(6, 12, 3, hookpoint="h")).save(path, extra={"step": 1})
    return path


CFG = json.loads(json.dumps(vars(SAEConfig(6, 12, 3, hookpoint="h"))))


@FUZZ
@given(st.one_of(mutated(CFG, list(CFG)).map(json.dumps), values.map(json.dumps), st.text(max_size=30)))
def test_sae_load_on_mutated_cfg(sae_dir, text):
    good = (sae_dir / "cfg.json").read_text()
    try:
        (sae_dir / "cfg.json").write_text(text)
        loads_or_refuses(lambda: SAE.load(sae_dir))
    finally:
        (sae_dir / "cfg.json").write_text(good)


@FUZZ
@given(st.data())
def test_sae_load_on_damaged_weights(sae_dir, data):
    file = sae_dir / "sae.safetensors"
    good = file.read_bytes()
    try:
        file.write_bytes(data.draw(flipped(good)))
        sae = loads_or_refuses(lambda: SAE.load(sae_dir))
        if sae is not None:
            sae(torch.ones(2, 6))
    finally:
        file.write_bytes(good)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    chunks = ({"a": torch.randn(5, 3), "b": torch.randn(5, 2)} for _ in range(3))
    build_cache(path, chunks, {"model": "m"}, shard_tokens=5)
    return path


def _use(cache: ActivationCache):
    for h in cache.hookpoints:
        assert cache.tensor(h).shape == (cache.n_tokens, cache.dim(h))


@FUZZ
@given(st.data())
def test_activation_cache_on_mutated_manifest(cache_dir, data):
    file = cache_dir / "manifest.json"
    good = file.read_text()
    m = json.loads(good)
    shard = data.draw(st.integers(0, 2))
    m["shards"][shard] = data.draw(mutated(m["shards"][shard], ["file", "n_tokens", "sha256"]))
    m["hookpoints"] = data.draw(mutated(m["hookpoints"], ["a", "b"]))
    m = data.draw(mutated(m, ["hookpoints", "shards", "complete", "chunks_done", "dtype"]) | st.just(m) | values)
    try:
        file.write_text(data.draw(st.just(json.dumps(m)) | st.text(max_size=20)))
        cache = loads_or_refuses(lambda: ActivationCache.open(cache_dir, complete=data.draw(st.booleans())))
        if cache is not None:
            loads_or_refuses(lambda: _use(cache))
    finally:
        file.write_text(good)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.bool]
tensors = st.builds(lambda shape, dt: torch.zeros(shape, dtype=dt),
                    st.lists(st.integers(0, 4), max_size=3), st.sampled_from(DTYPES))


@FUZZ
@given(st.dictionaries(st.sampled_from(["x", "h", "y"]), tensors, max_size=3), st.data())
def test_open_activations_on_random_safetensors(tmp_path, content, data):
    file = tmp_path / "acts.safetensors"
    file.unlink(missing_ok=True)
    save_file(content, file)
    if data.draw(st.booleans()):
        file.write_bytes(data.draw(flipped(file.read_bytes())))
    stream = loads_or_refuses(lambda: open_activations(file, "h", batch_size=3))
    if stream is not None:
        loads_or_refuses(lambda: [x.float() for x in stream])


KEYS = ["k", "lr", "hookpoints", "expansion", "n_latents", "architecture", "device", "epochs", "val_tokens",
        "batch_size", "on_nonfinite", "subspace_variance", "wandb"]


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5) | st.integers(), values, max_size=5),
       st.lists(st.tuples(st.sampled_from(KEYS), st.text(max_size=6)), max_size=2), st.text(max_size=30))
def test_load_config_on_random_yaml(tmp_path, content, overrides, text):
    file = tmp_path / "cfg.yaml"
    file.write_text(yaml.safe_dump(content))
    flags = [s for k, v in overrides for s in (f"--{k}", v)]
    cfg = loads_or_refuses(lambda: load_config(str(file), flags))
    assert cfg is None or isinstance(cfg, TrainConfig)
    file.write_text(text)
    loads_or_refuses(lambda: load_config(str(file)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    cfg = make_config(TrainConfig, {"hookpoints": ["h"], "n_latents": 8, "k": 2, "batch_size": 10, "out": str(path)})
    run = Run.create(cfg)
    tr = Trainer(cfg, {"h": 4}, {"h": torch.randn(30, 4)}, 5, torch.device("cpu"))
    tr.train_step({"h": torch.randn(10, 4)})
    tr.save(run)
    return path


@FUZZ
@given(st.data())
def test_run_open_and_resume_on_damaged_files(run_dir, data):
    config, state = run_dir / "config.json", run_dir / "state.safetensors"
    good_config, good_state = config.read_text(), state.read_bytes()
    base = json.loads(good_config)
    try:
        config.write_text(data.draw(mutated(base, list(base)).map(json.dumps) | values.map(json.dumps)))
        loads_or_refuses(lambda: Run.open(run_dir))
        state.write_bytes(data.draw(flipped(good_state)))
        cfg = make_config(TrainConfig, base)
        tr = Trainer(cfg, {"h": 4}, {"h": torch.randn(30, 4)}, 5, torch.device("cpu"))
        if loads_or_refuses(lambda: tr.load(Run(run_dir, cfg, ["h"])) or True):
            loads_or_refuses(lambda: tr.train_step({"h": torch.randn(cfg.batch_size, 4)}))
    finally:
        config.write_text(good_config)
        state.write_bytes(good_state)
