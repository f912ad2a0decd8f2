"""Run configuration: one flat dataclass, loaded from YAML plus `--key value` overrides.

Unknown keys, wrongly typed values, choices outside their `Literal` and values outside their
range raise SaekitError naming the key and what it allows, when the config is built: before
any model is loaded, token harvested or folder written.
"""

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from saekit.errors import SaekitError
from saekit.families import FAMILIES, TRAINABLE, users
from saekit.runtime import DEVICE_PATTERN


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
    data_seed: int = 0  # which contexts, and the train/held-out split (part of the activation cache's key)
    # -- the dictionary ------------------------------------------------------------------
    # a trainable family of saekit.families: topk: k per token | batchtopk: k*B per batch (Bussmann et
    # al. 2024) | matryoshka: BatchTopK codes, nested prefixes each reconstruct (Bussmann et al. 2025) |
    # jumprelu: learned per-latent thresholds with an L0 penalty (Rajamanoharan et al. 2024) | mp: k
    # matching-pursuit steps over a tied dictionary (Costa et al. 2025)
    architecture: str = "topk"
    expansion: int = 16  # n_latents = expansion * d_in (the widest source's) unless n_latents is set
    n_latents: int | None = None
    k: int = 32  # latents per token; jumprelu: the initial L0 only (thresholds start at each latent's k/m quantile)
    # matryoshka prefix ends: fractions of n_latents (all <= 1) or sizes, increasing, ending at the full width
    matryoshka_groups: list[float] = field(default_factory=lambda: [0.0625, 0.125, 0.25, 0.5, 1.0])
    l0_coeff: float = 1e-3  # jumprelu: weight of the L0 (active latents per token) next to the FVU loss
    # jumprelu: steer the L0 to this: the penalty's coefficient becomes l0_coeff * (L0 / target_l0 - 1)
    target_l0: float | None = None
    jumprelu_bandwidth: float = 0.01  # jumprelu: straight-through rectangle width, in unit-RMS input units
    mp_threshold: float | None = None  # mp: stop a token once its residual norm is below this (unit-RMS units)
    # one dictionary over several activations instead of one SAE per hookpoint: the hookpoints it reads
    # (sources) and writes (targets; null = the sources). A crosscoder: several layers as both; a
    # transcoder: sources [mlp input], targets [mlp output]. hookpoints becomes sources + targets.
    sources: list[str] | None = None
    targets: list[str] | None = None
    # random directions | inside the data's principal subspace | normalised centred activation samples
    init: Literal["tied", "subspace", "data"] = "tied"
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
    on_nonfinite: Literal["skip", "stop"] = "stop"  # NaN/Inf in a batch or loss: skip it (no update) | stop
    # -- run -----------------------------------------------------------------------------
    seed: int = 0  # initialisation and batch order (not the data: runs of several seeds share one cache)
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N"
    out: str = "runs/default"
    cache_dir: str | None = None  # activation cache root; None: $SAEKIT_CACHE/activations
    # cache: harvest the training split to disk once, read it every epoch | stream: the model forwards the training
    # contexts as the run goes (memory and disk do not grow with n_tokens; every epoch forwards them again)
    activations: Literal["cache", "stream"] = "cache"
    buffer_tokens: int = 1_048_576  # activation rows shuffled together in memory, all hookpoints together
    harvest_batch: int = 16  # contexts per model forward while harvesting
    checkpoint_every: int = 50  # steps
    log_every: int = 5  # steps
    collapse_every: int = 0  # steps; log the decoder's collapse figures to metrics.jsonl (0 = off)
    eval_contexts: int = 24  # held-out contexts for CE loss / KL in evaluation
    wandb: bool = False  # log to Weights & Biases too (if installed)
    # under torchrun: each process trains only its own hookpoints (round-robin) instead of every
    # process training every hookpoint on its slice of each batch (data parallel)
    shard_hookpoints: bool = False

    @property
    def crosscoder(self) -> bool:
        """One dictionary over named sources (a crosscoder or transcoder), not one SAE per hookpoint."""
        return self.sources is not None

    def __post_init__(self):
        if self.sources:
            self.hookpoints = list(dict.fromkeys(self.sources + (self.targets or [])))
        for key, ok, allowed in _RULES:
            value = getattr(self, key)
            if value is not None and not ok(value, self):
                raise SaekitError(f"config key {key!r} must be {allowed}, got {value!r}")


# (key, check(value, config), what it allows); None values are "use the default" and skip the check.
_RULES: list[tuple[str, typing.Callable, str]] = [
    ("architecture", lambda v, c: v in TRAINABLE, "one of " + ", ".join(map(repr, TRAINABLE))),  # checked first
    ("hookpoints", lambda v, c: len(v) > 0 and len(set(v)) == len(v) and (c.sources or ":" not in "".join(v)),
     "a non-empty list of distinct hookpoints of the config's model (other models' go in sources/targets)"),
    ("ctx_len", lambda v, c: v >= 2, ">= 2"),
    ("n_tokens", lambda v, c: v >= 1, ">= 1"),
    ("epochs", lambda v, c: v >= 1, ">= 1"),
    ("val_tokens", lambda v, c: 1 <= v < c.n_tokens, "in [1, n_tokens) (held-out text smaller than the training text)"),
    ("expansion", lambda v, c: v >= 1, ">= 1 (n_latents = expansion * d_in)"),
    ("n_latents", lambda v, c: v >= 1, ">= 1"),
    ("k", lambda v, c: v >= 1 and (c.n_latents is None or v <= c.n_latents or not FAMILIES[c.architecture].k_bounded),
     "in [1, n_latents]"),
    ("matryoshka_groups", lambda v, c: c.architecture not in users("matryoshka_groups") or _groups_ok(v, c.n_latents),
     "increasing fractions of n_latents (ending at 1.0) or increasing sizes (ending at n_latents)"),
    ("l0_coeff", lambda v, c: v >= 0, ">= 0"),
    ("target_l0", lambda v, c: v > 0 and c.architecture in users("target_l0"),
     f"> 0, with architecture {' or '.join(users('target_l0'))}"),
    ("jumprelu_bandwidth", lambda v, c: v > 0, "> 0"),
    ("mp_threshold", lambda v, c: v >= 0 and c.architecture in users("mp_threshold"),
     f">= 0, with architecture {' or '.join(users('mp_threshold'))}"),
    ("sources", lambda v, c: _names_ok(v), "a non-empty list of distinct names (hookpoint, model:hookpoint or "
     "model@revision:hookpoint)"),
    ("targets", lambda v, c: c.sources is not None and _names_ok(v), "a non-empty list of distinct names, with "
     "sources set"),
    ("subspace_rank", lambda v, c: v >= 1, ">= 1"),
    ("subspace_variance", lambda v, c: 0 < v <= 1, "in (0, 1]"),
    ("ortho_penalty", lambda v, c: v >= 0, ">= 0"),
    ("ortho_every", lambda v, c: v >= 1, ">= 1"),
    ("batch_size", lambda v, c: v >= 1, ">= 1"),
    ("lr", lambda v, c: v > 0, "> 0 (or null for the default)"),
    ("warmup_steps", lambda v, c: v >= 0, ">= 0"),
    ("decay_start", lambda v, c: 0 <= v <= 1, "in [0, 1]"),
    ("k_aux", lambda v, c: v >= 1, ">= 1"),
    ("auxk_alpha", lambda v, c: v >= 0, ">= 0"),
    ("dead_tokens", lambda v, c: v >= 1, ">= 1"),
    ("device", lambda v, c: re.fullmatch(DEVICE_PATTERN, v), "auto, cpu, cuda or cuda:N"),
    ("buffer_tokens", lambda v, c: v >= 1, ">= 1"),
    ("harvest_batch", lambda v, c: v >= 1, ">= 1"),
    ("checkpoint_every", lambda v, c: v >= 1, ">= 1"),
    ("log_every", lambda v, c: v >= 1, ">= 1"),
    ("collapse_every", lambda v, c: v >= 0, ">= 0 (0 = off)"),
    ("eval_contexts", lambda v, c: v >= 1, ">= 1"),
]


def _names_ok(names: list[str]) -> bool:
    try:
        return len(names) > 0 and len(set(names)) == len(names) and all(parse_source(n) for n in names)
    except SaekitError:
        return False


def _groups_ok(groups: list[float], n_latents: int | None) -> bool:
    """Valid prefix ends (for sizes without n_latents: increasing; the end is checked at training)."""
    n = n_latents or (1 << 20 if all(g <= 1 for g in groups) else int(groups[-1]) if groups else 1)
    try:
        matryoshka_ends(groups, n)
    except SaekitError:
        return False
    return True


def matryoshka_ends(groups: list[float], n_latents: int) -> list[int]:
    """The end of each Matryoshka prefix as a latent count: `groups` are fractions of n_latents
    (all <= 1, the last 1.0) or sizes (the last n_latents); strictly increasing either way."""
    fractions = all(g <= 1 for g in groups)
    ends = [round(g * n_latents) if fractions else int(g) for g in groups]
    if not groups or (not fractions and any(g != int(g) for g in groups)) or ends[0] < 1 \
            or any(b <= a for a, b in zip(ends, ends[1:], strict=False)) or ends[-1] != n_latents:
        raise SaekitError(f"matryoshka_groups {groups} must be increasing fractions ending at 1.0 or increasing sizes "
                          f"ending at n_latents ({n_latents}), each prefix at least one latent larger than the last")
    return ends


def parse_source(name: str) -> tuple[str | None, str | None, str]:
    """A source or target name -> (model, revision, hookpoint): `hookpoint` (of the config's model),
    `model:hookpoint` or `model@revision:hookpoint` (another model, a pre-training snapshot)."""
    where, sep, hook = name.rpartition(":")
    if not hook:
        raise SaekitError(f"source {name!r} names no hookpoint")
    if not sep:
        return None, None, hook
    model, at, revision = where.partition("@")
    if not model or (at and not revision):
        raise SaekitError(f"source {name!r} is not hookpoint, model:hookpoint or model@revision:hookpoint")
    return model, revision or None, hook


Wiring = tuple[list[str], list[str]]  # what a dictionary reads and writes: (sources, targets)


def dictionaries(cfg: "TrainConfig") -> dict[str, Wiring]:
    """The dictionaries a config trains, by name, with their wiring. One SAE per hookpoint (named
    after it, wired ([h], [h])), or with `sources` one dictionary, "crosscoder" (targets = sources)
    or "transcoder"."""
    if not cfg.crosscoder:
        return {h: ([h], [h]) for h in cfg.hookpoints}
    targets = cfg.targets or cfg.sources
    return {"crosscoder" if targets == cfg.sources else "transcoder": (list(cfg.sources), list(targets))}


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(tp)
        return isinstance(value, dict) and all(_type_ok(k, key) and _type_ok(v, item) for k, v in value.items())
    if tp is float:  # finite: an inf or NaN setting only fails later, mid-run
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:  # an int beyond float range
            return False
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp) -> str:
    """A type as a user reads it: `one of 'topk', 'batchtopk'`, `int or None`, `list[str]`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp)) if origin is None else str(tp)


def make_config(cls, values: dict):
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if not isinstance(key, str):
            raise SaekitError(f"config keys must be names, got {key!r}")
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
            raise SaekitError(f"config key {key!r} must be {_describe(hints[key])}, got {value!r}")
        if hints[key] is float and isinstance(value, int):
            values[key] = float(value)
    return cls(**values)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) + `--key value` pairs -> TrainConfig (values parsed as YAML)."""
    return make_config(TrainConfig, load_values(path, overrides))


def load_values(path: str | None = None, overrides: list[str] | None = None) -> dict:
    """The raw key/values a YAML file (optional) and `--key value` pairs give, later ones winning."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SaekitError(f"config file {path} not found")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise SaekitError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise SaekitError(f"{path} must hold a mapping of config keys")
    values.update(parse_overrides(overrides or []))
    return values


def config_help() -> str:
    """Every TrainConfig key with its default and comment (the comment lines above it, then the one
    after it), read from the class source (for --help)."""
    lines, above = [], []
    for line in inspect.getsource(TrainConfig).splitlines():
        if m := re.match(r"    # -- (.*?) -+$", line):
            lines.append(f"{m.group(1)}:")
            above = []
        elif m := re.match(r"    # (.*)$", line):
            above.append(m.group(1))
        elif m := re.match(r"    (\w+): ([^=]+?) = (.+?)(?:  # (.*))?$", line):
            name, default = m.group(1), m.group(3)
            note = " ".join(above + ([m.group(4)] if m.group(4) else []))
            default = re.sub(r"field\(default_factory=lambda: (.*)\)", r"\1", default)
            lines.append(f"  --{name} {default}" + (f"   {note}" if note else ""))
            above = []
    return "\n".join(lines)


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
        try:
            out[key.replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise SaekitError(f"--{key} {value!r} is not a valid value: {e}") from None
    return out
