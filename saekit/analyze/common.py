"""What every analysis shares: result objects with `.to_dict()`, and activations as
`Activations` (a tensor or an iterable of `[batch, d_in]` tensors) read through `batches`
(both defined in `saekit.activations`, beside the cache, and re-exported here)."""

import dataclasses

import torch

from saekit.activations import Activations, batches

__all__ = ["Activations", "Result", "batches"]


def _plain(v):
    """JSON-ready value: tensors to lists, DataFrames to records, containers recursively."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if hasattr(v, "to_dict") and hasattr(v, "columns"):  # pandas DataFrame
        return v.to_dict(orient="records")
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class Result:
    """Mixin for the analyses' dataclasses: every field as plain JSON-ready data."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
