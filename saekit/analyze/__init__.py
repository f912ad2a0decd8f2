"""Analyses of trained SAEs: pure functions over (SAE, activations or model),
each returning a small dataclass with `.to_dict()`; `report` runs them all on a run folder."""

from saekit.analyze.absorption import AbsorptionResult, absorption
from saekit.analyze.collapse import CollapseResult, collapse, decoder_collapse
from saekit.analyze.dead import DeadResult, dead
from saekit.analyze.evolution import evolution
from saekit.analyze.geometry import (
    CircleResult,
    GeometryResult,
    LobesResult,
    circularity,
    crystals,
    geometry,
    geometry_bundle,
    lobes,
    multidim_features,
)
from saekit.analyze.stability import StabilityResult, stability
from saekit.analyze.supervised import SupervisedDictionary, supervised_dictionary
from saekit.analyze.task import TaskEvalResult, task_eval
from saekit.analyze.universality import UniversalityResult, universality

__all__ = ["AbsorptionResult", "CircleResult", "CollapseResult", "DeadResult", "GeometryResult", "LobesResult",
           "StabilityResult", "SupervisedDictionary", "TaskEvalResult", "UniversalityResult", "absorption",
           "circularity", "collapse", "crystals", "dead", "decoder_collapse", "evolution", "geometry",
           "geometry_bundle", "lobes", "multidim_features", "stability", "supervised_dictionary", "task_eval",
           "universality"]
