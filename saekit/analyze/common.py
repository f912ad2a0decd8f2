"""What every analysis shares: result objects with `.to_dict()`, and activations streamed
as `[batch, d_in]` tensors whatever their source (a tensor, an iterable, a cache, a file)."""

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from saekit.activations import MANIFEST, ActivationCache
from saekit.errors import SaekitError

Activations = torch.Tensor | Iterable[torch.Tensor]


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


def batches(activations: Activations, d_in: int, batch_size: int = 4096,
            max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """`[batch, d_in]` float32 tensors from a tensor or an iterable of tensors, checking d_in,
    stopping after `max_tokens` rows."""
    parts = activations.split(batch_size) if isinstance(activations, torch.Tensor) else activations
    n = 0
    for x in parts:
        if max_tokens is not None and n >= max_tokens:
            return
        if x.ndim != 2 or x.shape[1] != d_in:
            raise SaekitError(f"activations must be [batch, {d_in}] to match the SAE's d_in, got shape "
                              f"{tuple(x.shape)}; pass activations of the SAE's hookpoint")
        if max_tokens is not None:
            x = x[: max_tokens - n]
        n += len(x)
        yield x.float()


def open_activations(path: str | Path, hookpoint: str, batch_size: int = 4096) -> Iterable[torch.Tensor]:
    """Re-iterable `[batch, d]` stream from a saekit activation cache folder (the hookpoint's
    tensor) or a .safetensors file holding one `[N, d]` tensor (read slice by slice)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        cache = ActivationCache.open(path)
        if hookpoint not in cache.hookpoints:
            raise SaekitError(f"activation cache {path} has no {hookpoint!r} (it holds {', '.join(cache.hookpoints)})")
        return _Stream(lambda: cache.batches(hookpoint, batch_size))
    if path.suffix != ".safetensors" or not path.is_file():
        raise SaekitError(f"--activations {path}: expected an activation cache folder (with {MANIFEST}) "
                          "or a .safetensors file holding one [N, d_in] tensor")
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            shape = f.get_slice(keys[0]).get_shape() if len(keys) == 1 else None
    except (SafetensorError, OSError) as e:
        raise SaekitError(f"{path} is not a readable safetensors file: {e}") from None
    if shape is None or len(shape) != 2:
        raise SaekitError(f"{path} must hold exactly one [N, d_in] tensor (found {len(keys)} tensors"
                          f"{'' if shape is None else f' of shape {shape}'})")

    def read():
        with safe_open(path, "pt") as f:
            sl = f.get_slice(keys[0])
            for s in range(0, shape[0], batch_size):
                yield sl[s : s + batch_size]

    return _Stream(read)


class _Stream:
    """An iterable that restarts its generator on every `iter()` (so it can be read twice)."""

    def __init__(self, make: Callable[[], Iterator[torch.Tensor]]):
        self.make = make

    def __iter__(self):
        return iter(self.make())
