"""Data-parallel helpers over `torch.distributed` (launched by torchrun; gloo on CPU, NCCL on CUDA).

Every helper is a no-op in a single process, so the trainer calls them unconditionally.
A process group is set up by `init_from_env` when torchrun's `WORLD_SIZE`/`RANK` variables are
present, or by the caller (e.g. `torch.multiprocessing.spawn` + `init_process_group`).
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from saekit.errors import SaekitError
from saekit.runtime import resolve_device


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes in the environment (once); True if one is joined.

    The backend is NCCL when the run trains on CUDA, gloo otherwise; each CUDA process uses the
    GPU of its `LOCAL_RANK`."""
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    if not dist.is_available():
        raise SaekitError("WORLD_SIZE/RANK are set but this torch build has no torch.distributed")
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # The others wait while the main process evaluates, and all wait for the slowest harvester:
    # allow that much longer than torch's default before a collective gives up.
    minutes = float(os.environ.get("SAEKIT_DIST_TIMEOUT_MIN", 120))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=minutes))
    return True


def local_device(device: torch.device) -> torch.device:
    """The device of this process: under a process group on CUDA, the current GPU (one per process)."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def shard(x: torch.Tensor) -> torch.Tensor:
    """This process's contiguous slice of a global batch (slices differ in size by at most one row)."""
    return x.tensor_split(world())[rank()] if active() else x


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum", "min" or "max"); returns `t`."""
    if active():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t


def all_reduce_grads(params) -> None:
    """Sum the gradients of `params` over the processes (one flat buffer, one collective)."""
    if not active():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def broadcast_params(module: torch.nn.Module, src: int = 0) -> None:
    """Copy `src`'s parameters and buffers to every process."""
    if not active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def broadcast_object(obj, src: int = 0):
    """`obj` of process `src`, on every process (pickled)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather_objects(obj) -> list | None:
    """Every process's `obj`, in rank order, on the main process (None elsewhere); all must call."""
    if not active():
        return [obj]
    out = [None] * world() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_rows(t: torch.Tensor | None, n: int) -> torch.Tensor:
    """Every process's rows `[n_r, ...]` (None: none) stacked in rank order, `[n, ...]`, on every process."""
    metas = [None] * world()
    dist.all_gather_object(metas, None if t is None else (len(t), tuple(t.shape[1:]), t.dtype))
    most = max(m[0] for m in metas if m is not None)
    _, shape, dtype = next(m for m in metas if m is not None)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    pad = torch.zeros((most, *shape), dtype=dtype, device=device)  # NCCL gathers device tensors only
    if t is not None:
        pad[: len(t)] = t
    got = [torch.empty_like(pad) for _ in metas]
    dist.all_gather(got, pad)
    out = torch.cat([g[: m[0]] for g, m in zip(got, metas, strict=True) if m is not None]).cpu()
    if len(out) != n:
        raise SaekitError(f"the processes forwarded {len(out)} rows of a buffer of {n}")
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def batch_cut(vals: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK's cut over the global batch: the (k * B)-th largest of every process's candidate
    pre-activations `vals [b_r, c]` (B = sum of the b_r); the same 0-dim tensor on every process."""
    n = torch.tensor([vals.shape[0]], device=vals.device)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    rows, cap = max(sizes), vals.shape[1]
    padded = F.pad(vals, (0, 0, 0, rows - vals.shape[0]), value=float("-inf")).reshape(-1)
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    flat = torch.cat(parts)  # padding is -inf: never among the kept values
    n_keep = min(k * sum(sizes), cap * sum(sizes))
    if flat.is_cuda:
        return flat.topk(n_keep, sorted=False).values.min()
    return flat.kthvalue(flat.numel() - n_keep + 1).values


def main_first(fn):
    """`fn()` on the main process while the others wait; returns its result there (None elsewhere).
    A SaekitError it raises is raised on every process, so none is left waiting."""
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except SaekitError as e:
            error = e
    message = broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise SaekitError(f"the main process stopped: {message}")
    return result


def together(fn):
    """`fn()` on every process, returning its result; a SaekitError raised on any process is raised
    on all once every one has finished, so none is left waiting."""
    result, error = None, None
    try:
        result = fn()
    except SaekitError as e:
        if not active():
            raise
        error = e
    if not active():
        return result
    messages = [None] * world()
    dist.all_gather_object(messages, None if error is None else str(error))
    if error is not None:
        raise error
    failed = next(((r, m) for r, m in enumerate(messages) if m is not None), None)
    if failed is not None:
        raise SaekitError(f"process {failed[0]} stopped: {failed[1]}")
    return result


def leave() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
