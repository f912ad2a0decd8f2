"""Analyses of trained SAEs (spec §5, §6): pure functions over (SAE, activations or model),
each returning a small dataclass with `.to_dict()`; `report` runs them all on a run folder."""

from saekit.analyze.absorption import AbsorptionResult, absorption
from saekit.analyze.collapse import CollapseResult, collapse, decoder_collapse
from saekit.analyze.dead import DeadResult, dead, firing_history

__all__ = ["AbsorptionResult", "CollapseResult", "DeadResult", "absorption", "collapse", "dead",
           "decoder_collapse", "firing_history"]
