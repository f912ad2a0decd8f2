"""Run configuration: one flat dataclass, loaded from YAML plus `--key value` overrides.

Unknown keys and wrongly typed values raise SaekitError naming the key, so a typo never
silently falls back to a default.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from saekit.errors import SaekitError


@dataclass
class TrainConfig:
    # -- data: which model, hookpoints and text ------------------------------------------
    model: str = "smollm2-135m"  # offline default, an HF name, or a local HF folder
    hookpoints: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_post"])
    dataset: str = "shakespeare"  # "shakespeare" | "pydoc" | local file/folder | HF name
    text_field: str = "text"
    ctx_len: int = 256
    n_tokens: int = 350_000  # training tokens harvested once, then reused for every epoch
    epochs: int = 3
    val_tokens: int = 32_768  # held-out tokens for evaluation (never trained on)
    # -- the SAE -------------------------------------------------------------------------
    architecture: str = "topk"  # "topk" | "batchtopk"
    expansion: int = 16  # n_latents = expansion * d_in unless n_latents is set
    n_latents: int | None = None
    k: int = 32
    init: str = "tied"  # "tied" (random directions) | "subspace" (inside the data's principal subspace)
    subspace_rank: int | None = None  # fixed r for subspace init; None: smallest r with subspace_variance
    subspace_variance: float = 0.99
    ortho_penalty: float = 0.0  # OrtSAE weight gamma (0.25 in the paper); 0 = off
    ortho_every: int = 1  # apply the penalty every n-th step with weight n * gamma
    # -- optimisation --------------------------------------------------------------------
    batch_size: int = 4096
    lr: float | None = None  # None: 2e-4 / sqrt(n_latents / 2**14) (Gao et al., long runs); short runs want ~10x
    warmup_steps: int = 20
    decay_start: float = 0.8  # lr decays linearly to 0 over the steps after this fraction
    k_aux: int | None = None  # None: d_in // 2
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 1_000_000  # a latent is dead after this many tokens without firing
    # -- run -----------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N"
    out: str = "runs/default"
    cache_dir: str | None = None  # activation cache root; None: $SAEKIT_CACHE/activations
    buffer_tokens: int = 1_048_576  # tokens shuffled together in memory (per hookpoint)
    harvest_batch: int = 16  # contexts per model forward while harvesting
    checkpoint_every: int = 50  # steps
    log_every: int = 5  # steps
    collapse_every: int = 0  # steps; log the decoder's collapse figures to metrics.jsonl (0 = off)
    eval_contexts: int = 24  # held-out contexts for CE loss / KL in evaluation
    wandb: bool = False  # log to Weights & Biases too (if installed)


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def make_config(cls, values: dict):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SaekitError(f"unknown config key {key!r}{hint}")
        if key == "hookpoints" and isinstance(value, str):
            values[key] = value = [value]
        if isinstance(value, str) and _type_ok(1.0, hints[key]):
            try:  # YAML reads "1e-3" as a string
                values[key] = value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, hints[key]):
            raise SaekitError(f"config key {key!r} must be {hints[key]}, got {value!r}")
        if hints[key] is float and isinstance(value, int):
            values[key] = float(value)
    return cls(**values)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) + `--key value` pairs -> TrainConfig (values parsed as YAML)."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SaekitError(f"config file {path} not found")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SaekitError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise SaekitError(f"{path} must hold a mapping of config keys")
    values.update(parse_overrides(overrides or []))
    return make_config(TrainConfig, values)


def parse_overrides(args: list[str]) -> dict:
    """`["--k", "64", "--hookpoints", "[a, b]"]` -> {"k": 64, "hookpoints": ["a", "b"]}."""
    out = {}
    it = iter(args)
    for arg in it:
        if not arg.startswith("--"):
            raise SaekitError(f"expected --key value, got {arg!r}")
        key, _, value = arg[2:].partition("=")
        if not _:
            value = next(it, None)
            if value is None:
                raise SaekitError(f"--{key} needs a value")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out
