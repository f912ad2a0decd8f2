"""Analyses of trained SAEs: pure functions over (SAE, activations or model),
each returning a small dataclass with `.to_dict()`; `report` runs them all on a run folder."""

from saekit.analyze.absorption import AbsorptionResult, absorption
from saekit.analyze.collapse import CollapseResult, collapse, decoder_collapse
from saekit.analyze.dead import DeadResult, dead

__all__ = ["AbsorptionResult", "CollapseResult", "DeadResult", "absorption", "collapse", "dead",
           "decoder_collapse"]
