"""saekit: sparse autoencoders on transformer activations — train, evaluate, analyse."""

import importlib

from saekit.config import TrainConfig, load_config
from saekit.errors import SaekitError
from saekit.run import Run
from saekit.runtime import VERSION as __version__
from saekit.sae import SAE, Crosscoder, SAEConfig, SparseCode
from saekit.trainer import fit

_SUBMODULES = ("analyze", "matching")  # imported on first use: `saekit.analyze.dead(...)` after `import saekit`


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"saekit.{name}")
    if name == "match":  # scipy and pandas load only when matching is used
        from saekit.matching import match

        return match
    if name in ("steer", "attribute"):  # the model loads only when one is called
        return getattr(importlib.import_module("saekit.intervene"), name)
    if name == "Atlas":  # sqlite and pandas load only when the atlas is used
        from saekit.atlas import Atlas

        return Atlas
    raise AttributeError(f"module 'saekit' has no attribute {name!r}")


def train(config: TrainConfig, resume: bool = False, quiet: bool = False):
    """Run `saekit train` for `config` (a TrainConfig, e.g. from `load_config`); returns the run folder."""
    from saekit.pipeline import train as _train

    return _train(config, resume=resume, quiet=quiet)


__all__ = ["SAE", "Atlas", "Crosscoder", "Run", "SAEConfig", "SaekitError", "SparseCode", "TrainConfig", "__version__",
           "analyze", "attribute", "fit", "load_config", "match", "matching", "steer", "train"]
