"""saekit: sparse autoencoders on transformer activations — train, evaluate, analyse."""

from saekit.config import TrainConfig, load_config
from saekit.errors import SaekitError
from saekit.sae import SAE, SAEConfig, SparseCode
from saekit.trainer import fit


def train(config: TrainConfig, resume: bool = False, quiet: bool = False):
    """Run `saekit train` for `config` (a TrainConfig, e.g. from `load_config`); returns the run folder."""
    from saekit.pipeline import train as _train

    return _train(config, resume=resume, quiet=quiet)


__all__ = ["SAE", "SAEConfig", "SaekitError", "SparseCode", "TrainConfig", "fit", "load_config", "train"]
