"""Activation cache and shuffled batches: harvest once, train (and re-train) from disk.

A cache is a folder of safetensors shards (one tensor per hookpoint, `[tokens, d]`, and the
int32 row fields `ROWS`: which context, position and token each row is) and a `manifest.json`
with the model, hookpoints, dims, dtype, token counts and a sha256 per shard. Building is
resumable shard by shard, and may be split over processes: each writes its own part (shards and
progress), then one manifest ties the parts together. Reading verifies checksums. The batch order is
a pure function of (seed, step), so a resumed run sees exactly the batches it had not seen.
"""

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from saekit.errors import SaekitError
from saekit.io import atomic_write, saekit_cache

MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMAT = 2  # in the cache key: caches of older formats (no row fields) are rebuilt, not read
# Per-row int32 fields stored beside the activations: the row's context (an index into the split's
# packed contexts), its position in that context and its token id. Never hookpoint names.
ROWS = ("_context", "_position", "_token")


Activations = torch.Tensor | Iterable[torch.Tensor]  # an [N, d] tensor or a stream of [batch, d] tensors


def cache_key(**fields) -> str:
    """Stable short hash of everything that determines a cache's content."""
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root(cfg) -> Path:
    """Where a TrainConfig's activation caches live: `cache_dir`, or $SAEKIT_CACHE/activations."""
    return Path(cfg.cache_dir) if cfg.cache_dir else saekit_cache() / "activations"


def cache_path(cfg, split: str) -> Path:
    """Folder of the activation cache of one split of a TrainConfig (no model needed to find it):
    `cache_root`, then a hash of what determines the content. The data seed is hashed under the name
    `seed` (what it was called when it also seeded the SAE), so caches built then keep their key; the
    training seed is not in the key. When the config's own cache is not finished, a finished cache of
    the same data whose hookpoints include the config's serves it (the same rows, harvested once)."""
    root = cache_root(cfg)

    stream = {"activations": "stream"} if cfg.activations == "stream" else {}

    def key(hookpoints) -> str:  # a stream's held-out contexts are its first ones, whatever n_tokens
        return cache_key(model=cfg.model, dataset=cfg.dataset, text_field=cfg.text_field, ctx_len=cfg.ctx_len,
                         n_tokens=None if stream else cfg.n_tokens, val_tokens=cfg.val_tokens, seed=cfg.data_seed,
                         hookpoints=sorted(hookpoints), split=split, format=FORMAT, **stream)

    own = root / key(cfg.hookpoints)
    for path in [own, *sorted(p for p in root.iterdir() if _is_cache_key(p) and p != own)] if root.is_dir() else []:
        try:
            hooks = ActivationCache.open(path).hookpoints
        except SaekitError:
            continue
        if path == own or (set(cfg.hookpoints) < set(hooks) and path.name == key(hooks)):
            return path
    return own


def list_caches(root: Path) -> list[dict]:
    """Every activation cache folder under `root` (named by its key): size on disk, tokens, split,
    hookpoints and model; a cache still being built (or whose harvest was killed) shows as incomplete."""
    out = []
    for path in sorted(p for p in root.iterdir() if _is_cache_key(p)) if root.is_dir() else []:
        row = {"key": path.name, "MiB": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20}
        try:
            c = ActivationCache.open(path)
            row |= {"tokens": c.n_tokens, "split": c.manifest.get("split"), "hookpoints": ", ".join(c.hookpoints),
                    "model": c.manifest.get("model")}
        except SaekitError:
            row |= {"tokens": None, "split": None, "hookpoints": "(incomplete)", "model": None}
        out.append(row)
    return out


def remove_caches(root: Path, key: str) -> list[Path]:
    """Delete the cache folder `key` under `root`, or every one with key "all"; returns what went."""
    import shutil

    targets = [p for p in root.iterdir() if _is_cache_key(p)] if key == "all" and root.is_dir() else [root / key]
    if key != "all" and not _is_cache_key(targets[0]):
        raise SaekitError(f"no activation cache {key!r} in {root} (`saekit cache --list` shows the keys)")
    for path in targets:
        shutil.rmtree(path)
    return targets


def _is_cache_key(path: Path) -> bool:
    """A folder named as `cache_key` names caches (16 hex digits): nothing else in a root is touched."""
    return path.is_dir() and len(path.name) == 16 and all(ch in "0123456789abcdef" for ch in path.name)


@dataclass
class ActivationCache:
    """A finished (or partly built) cache folder."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, complete: bool = True) -> "ActivationCache":
        path = Path(path)
        manifest = _read_manifest(path / MANIFEST)
        if complete and not manifest.get("complete"):
            raise SaekitError(f"activation cache {path} is incomplete; rerun `saekit cache` to finish it")
        return cls(path, manifest)

    @property
    def hookpoints(self) -> list[str]:
        return list(self.manifest["hookpoints"])

    @property
    def n_tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.manifest["shards"])

    def dim(self, hookpoint: str) -> int:
        return self.manifest["hookpoints"][hookpoint]["d"]

    def load_shard(self, i: int, hookpoints: list[str] | None = None) -> dict[str, torch.Tensor]:
        """One shard as float32 tensors (row fields named in `hookpoints` as int32), after checking its sha256."""
        info = self.manifest["shards"][i]
        file = self.path / info["file"]
        try:
            blob = file.read_bytes()
        except OSError as e:
            raise SaekitError(f"activation shard {file} cannot be read: {e}") from None
        if hashlib.sha256(blob).hexdigest() != info["sha256"]:
            raise SaekitError(f"activation shard {file} is corrupt (checksum mismatch); delete {self.path} to rebuild")
        try:
            tensors = load_bytes(blob)
        except SafetensorError as e:
            raise SaekitError(f"activation shard {file} is corrupt: {e}") from None
        out = {}
        for h in hookpoints or self.hookpoints:
            t, row = tensors.get(h), h in ROWS and "rows" in self.manifest
            want = (info["n_tokens"],) if row else (info["n_tokens"], self.dim(h)) if h in self.manifest["hookpoints"] \
                else None
            if t is None or want is None or tuple(t.shape) != want or not (t.dtype == torch.int32 if row
                                                                           else t.is_floating_point()):
                got = None if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise SaekitError(f"activation shard {file} does not match {self.path / MANIFEST}: {h!r} is {got}, "
                                  f"expected {'int32' if row else 'floats'} of shape {want}; delete {self.path} "
                                  "to rebuild")
            out[h] = t if row else t.float()
        return out

    def rows(self) -> dict[str, torch.Tensor]:
        """The row fields (`ROWS`) of every row in stored order, int32 `[n_tokens]` each: which
        token of which context each activation is. Reads only these fields, checked by their own sha256."""
        if "rows" not in self.manifest:
            raise SaekitError(f"activation cache {self.path} records no token ids or positions (written by an "
                              f"older saekit or from bare activations); delete it and rerun `saekit cache` to rebuild")
        parts = []
        for info in self.manifest["shards"]:
            file = self.path / info["file"]
            try:
                with safe_open(file, "pt") as f:
                    part = {h: f.get_tensor(h) for h in ROWS}
            except (SafetensorError, OSError) as e:
                raise SaekitError(f"activation shard {file} cannot be read: {e}; delete {self.path} to rebuild") \
                    from None
            if any(t.shape != (info["n_tokens"],) or t.dtype != torch.int32 for t in part.values()) \
                    or _rows_sha256(part) != info["rows_sha256"]:
                raise SaekitError(f"activation shard {file} is corrupt (its row fields do not match "
                                  f"{self.path / MANIFEST}); delete {self.path} to rebuild")
            parts.append(part)
        return {h: torch.cat([p[h] for p in parts]) for h in ROWS}

    def batches(self, hookpoint: str, batch_size: int = 4096) -> Iterator[torch.Tensor]:
        """One hookpoint's activations in stored order, as `[batch_size, d]` float32 pieces."""
        for part in self.batches_of([hookpoint], batch_size):
            yield part[hookpoint]

    def batches_of(self, hookpoints: list[str], batch_size: int = 4096) -> Iterator[dict[str, torch.Tensor]]:
        """Several hookpoints' activations of the same rows in stored order, as `{hookpoint:
        [batch_size, d]}` float32 pieces (what a crosscoder or transcoder reads)."""
        missing = [h for h in hookpoints if h not in self.hookpoints]
        if missing:
            raise SaekitError(f"activation cache {self.path} has no {missing} (it holds {', '.join(self.hookpoints)})")
        for i in range(len(self.manifest["shards"])):
            shard = self.load_shard(i, hookpoints)
            for s in range(0, len(shard[hookpoints[0]]), batch_size):
                yield {h: shard[h][s : s + batch_size] for h in hookpoints}

    def sample(self, hookpoints: list[str], n: int, seed: int) -> dict[str, torch.Tensor]:
        """`n` rows (all if fewer) at positions drawn by `seed` over the whole cache, in stored order:
        `{hookpoint: [n, d]}` float32, the same rows for every hookpoint. Reads every shard once."""
        pick = torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(seed))[:n].sort().values
        out, start = {h: [] for h in hookpoints}, 0
        for part in self.batches_of(hookpoints, 1 << 16):
            size = len(part[hookpoints[0]])
            at = pick[(pick >= start) & (pick < start + size)] - start
            for h in hookpoints:
                out[h].append(part[h][at])
            start += size
        return {h: torch.cat(v) for h, v in out.items()}

    def tensor(self, hookpoint: str, max_tokens: int | None = None) -> torch.Tensor:
        """The first `max_tokens` activations of one hookpoint, `[n, d]` float32."""
        parts, n = [], 0
        for i in range(len(self.manifest["shards"])):
            if max_tokens is not None and n >= max_tokens:
                break
            parts.append(self.load_shard(i, [hookpoint])[hookpoint])
            n += len(parts[-1])
        return torch.cat(parts)[:max_tokens]


def _read_manifest(file: Path) -> dict:
    """A cache's manifest (or a part's), checked to be sound."""
    try:
        manifest = json.loads(file.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise SaekitError(f"{file.parent} is not an activation cache (no {file.name})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaekitError(f"{file} is corrupt: {e}; delete {file.parent} to rebuild") from None
    except OSError as e:
        raise SaekitError(f"{file} cannot be read: {e}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise SaekitError(f"{file} is corrupt: {problem}; delete {file.parent} to rebuild")
    return manifest


def _manifest_file(path: Path, part: int | None) -> Path:
    return path / (MANIFEST if part is None else f"part_r{part}.json")


def _rows_sha256(rows: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(rows[h].numpy().tobytes() for h in ROWS)).hexdigest()


def _manifest_problem(m) -> str | None:
    """What is wrong with a manifest's structure (None: nothing), so readers can trust it."""
    def count(v, least):
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    if not isinstance(m, dict):
        return "not a JSON object"
    hps, shards = m.get("hookpoints"), m.get("shards")
    if not isinstance(hps, dict) or not all(isinstance(v, dict) and count(v.get("d"), 1) for v in hps.values()):
        return "'hookpoints' must map names to {\"d\": width}"
    if not isinstance(shards, list):
        return "'shards' must be a list"
    for s in shards:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("sha256"), str)
                and count(s.get("n_tokens"), 1)):
            return f"bad shard entry {s!r}"
        if "\0" in s["file"] or Path(s["file"]).name != s["file"] or s["file"] in ("", ".", ".."):
            return f"shard file {s['file']!r} is not a file name inside the cache"
    if "rows" in m and (m["rows"] != list(ROWS) or not all(isinstance(s.get("rows_sha256"), str) for s in shards)):
        return f"'rows' must be {list(ROWS)} and every shard must have its 'rows_sha256'"
    if not count(m.get("chunks_done", 0), 0) or not isinstance(m.get("complete", False), bool):
        return "'chunks_done' must be a count and 'complete' true or false"
    if m.get("complete") and not (shards and hps) and "part" not in m:  # a process's part may be empty
        return "a complete cache must list its hookpoints and shards"
    return None


def build_cache(
    path: str | Path,
    chunks: Iterator[dict[str, torch.Tensor]],
    meta: dict,
    shard_tokens: int = 65_536,
    dtype: str = "float32",
    chunks_done: int = 0,
    part: int | None = None,
) -> ActivationCache:
    """Write `chunks` (each `{hookpoint: [n, d]}`, optionally with the row fields `ROWS`, `[n]`
    each) into shards of about `shard_tokens`.

    `meta` (model, dataset, ...) goes into the manifest. A partly built cache is continued:
    the manifest records how many chunks were consumed, and the caller passes an iterator
    that starts at `chunks_done` (see `resume_point`; 0 starts afresh). With `part`, this is
    process `part`'s share of a cache built by several: its own shards (`shard_r{part}_*`) and
    progress (`part_r{part}.json`, the part's manifest; the part may be empty), which
    `merge_parts` ties into the cache's manifest.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    manifest_file = _manifest_file(path, part)
    if chunks_done:
        manifest = _read_manifest(manifest_file)
    else:
        manifest = {**meta, "dtype": dtype, "hookpoints": {}, "shards": [], "chunks_done": 0, "complete": False}
        if part is not None:
            manifest["part"] = part
    buf: dict[str, list[torch.Tensor]] = {}
    n_buf, n_chunks = 0, chunks_done

    def flush():
        nonlocal buf, n_buf
        if n_buf == 0:
            return
        tensors = {h: torch.cat(v).to(DTYPES[dtype]).contiguous() for h, v in buf.items() if h not in ROWS}
        rows = {h: torch.cat(buf[h]).to(torch.int32).contiguous() for h in ROWS if h in buf}
        for h, t in tensors.items():
            manifest["hookpoints"].setdefault(h, {"d": t.shape[1]})
        blob = save_bytes(tensors | rows)
        name = f"shard{'' if part is None else f'_r{part}'}_{len(manifest['shards']):05d}.safetensors"
        atomic_write(path / name, lambda p: p.write_bytes(blob))
        shard = {"file": name, "n_tokens": n_buf, "sha256": hashlib.sha256(blob).hexdigest()}
        if rows:
            manifest["rows"], shard["rows_sha256"] = list(ROWS), _rows_sha256(rows)
        manifest["shards"].append(shard)
        manifest["chunks_done"] = n_chunks
        atomic_write(manifest_file, lambda p: p.write_text(json.dumps(manifest, indent=1)))
        buf, n_buf = {}, 0

    for chunk in chunks:
        for h, t in chunk.items():
            buf.setdefault(h, []).append(t.detach().cpu())
        n_buf += len(next(iter(chunk.values())))
        n_chunks += 1
        if n_buf >= shard_tokens:
            flush()
    flush()
    if not manifest["shards"] and part is None:
        raise SaekitError(_EMPTY)
    manifest["complete"] = True
    atomic_write(manifest_file, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return ActivationCache(path, manifest)


_EMPTY = "no activations were produced: the dataset yielded no usable tokens"


def resume_point(path: str | Path, part: int | None = None, meta: dict | None = None) -> int:
    """How many input chunks a partly built cache at `path` (or its part `part`) already holds:
    0 if none, or if its manifest disagrees with any key of `meta` (then the caller starts afresh)."""
    try:
        manifest = _read_manifest(_manifest_file(Path(path), part))
    except SaekitError:
        return 0
    return manifest.get("chunks_done", 0) if all(manifest.get(k) == v for k, v in (meta or {}).items()) else 0


def merge_parts(path: str | Path, parts: int, meta: dict) -> ActivationCache:
    """The cache whose rows are those of the finished parts `0 .. parts-1` (`build_cache(part=...)`)
    in part order: its manifest lists their shards, with `meta` (model, dataset, ...)."""
    path, manifests = Path(path), []
    for r in range(parts):
        file = _manifest_file(path, r)
        if not file.exists():
            raise SaekitError(f"activation cache {path} lacks {file.name}, the part of process {r}; with several "
                              "nodes, cache_dir must be on a file system every node shares")
        manifests.append(_read_manifest(file))
        if not manifests[-1]["complete"]:
            raise SaekitError(f"{file} is incomplete: process {r} has not finished its part of the harvest")
    built = [m for m in manifests if m["shards"]]
    if not built:
        raise SaekitError(_EMPTY)
    manifest = {**meta, "dtype": built[0]["dtype"], "hookpoints": built[0]["hookpoints"],
                "shards": [s for m in built for s in m["shards"]], "complete": True}
    if all("rows" in m for m in built):
        manifest["rows"] = list(ROWS)
    atomic_write(path / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return ActivationCache(path, manifest)


class ShuffledBatches:
    """Fixed-size batches over a cache, shuffled across contexts, resumable at any step.

    Each epoch permutes the shards, groups them into buffers, and permutes the tokens inside
    each buffer (one buffer = a full shuffle). A buffer holds about `buffer_tokens` activation
    rows counted over all `hookpoints` (buffer_tokens / len(hookpoints) tokens of each, at least
    one shard), so its memory does not grow with the number of hookpoints. The epoch's token
    order is the concatenation of the buffers; batch s takes positions [s*B, (s+1)*B). The
    remainder of an epoch (< B tokens) is dropped.
    """

    def __init__(self, cache: ActivationCache, hookpoints: list[str], batch_size: int, seed: int, buffer_tokens: int):
        self.cache, self.hookpoints, self.B, self.seed = cache, hookpoints, batch_size, seed
        sizes = [s["n_tokens"] for s in cache.manifest["shards"]]
        self.sizes = sizes
        self.per_buffer = max(1, math.ceil(buffer_tokens / (len(hookpoints) * max(sizes))))  # shards per buffer
        self.steps_per_epoch = sum(sizes) // batch_size
        if self.steps_per_epoch == 0:
            raise SaekitError(f"the cache holds {sum(sizes)} tokens, fewer than one batch of {batch_size}")

    def _epoch(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of one epoch from batch index `start` on."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.sizes), generator=g).tolist()
        groups = [order[i : i + self.per_buffer] for i in range(0, len(order), self.per_buffer)]
        skip = start * self.B  # tokens of this epoch already consumed
        offset, emitted = 0, start
        carry: dict[str, torch.Tensor] | None = None
        for group in groups:
            n = sum(self.sizes[i] for i in group)
            perm = torch.randperm(n, generator=g)  # drawn for every group: keeps the rng in step
            if offset + n <= skip:
                offset += n
                continue
            shards = [self.cache.load_shard(i, self.hookpoints) for i in group]
            keep = perm[max(0, skip - offset) :]
            # one hookpoint at a time, its shard tensors dropped as it is permuted: a buffer and one copy at most
            data = {h: torch.cat([s.pop(h) for s in shards])[keep] for h in self.hookpoints}
            offset += n
            if carry is not None:
                data = {h: torch.cat([carry[h], data[h]]) for h in data}
            n_have = len(data[self.hookpoints[0]])
            n_full = n_have // self.B
            for b in range(n_full):
                if emitted >= self.steps_per_epoch:
                    return
                yield {h: t[b * self.B : (b + 1) * self.B] for h, t in data.items()}
                emitted += 1
            carry = {h: t[n_full * self.B :] for h, t in data.items()}

    def batches(self, start_step: int = 0, epochs: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """All batches from global step `start_step` to the end of `epochs` epochs."""
        for epoch in range(start_step // self.steps_per_epoch, epochs):
            yield from self._epoch(epoch, max(0, start_step - epoch * self.steps_per_epoch))


def open_activations(path: str | Path, hookpoint: str, batch_size: int = 4096) -> Iterable[torch.Tensor]:
    """Re-iterable `[batch, d]` stream from a saekit activation cache folder (the hookpoint's
    tensor) or a .safetensors file holding one `[N, d]` tensor (read slice by slice)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        cache = ActivationCache.open(path)
        if hookpoint not in cache.hookpoints:
            raise SaekitError(f"activation cache {path} has no {hookpoint!r} (it holds {', '.join(cache.hookpoints)})")
        return Stream(lambda: cache.batches(hookpoint, batch_size))
    if path.suffix != ".safetensors" or not path.is_file():
        raise SaekitError(f"--activations {path}: expected an activation cache folder (with {MANIFEST}) "
                          "or a .safetensors file holding one [N, d_in] tensor")
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            sl = f.get_slice(keys[0]) if len(keys) == 1 else None
            shape, dtype = (sl.get_shape(), sl.get_dtype()) if sl is not None else (None, None)
    except (SafetensorError, OSError) as e:
        raise SaekitError(f"{path} is not a readable safetensors file: {e}") from None
    if shape is None or len(shape) != 2:
        raise SaekitError(f"{path} must hold exactly one [N, d_in] tensor (found {len(keys)} tensors"
                          f"{'' if shape is None else f' of shape {shape}'})")
    if dtype not in ("F64", "F32", "F16", "BF16"):
        raise SaekitError(f"{path} holds {dtype} values; activations must be floating point")

    def read():
        with safe_open(path, "pt") as f:
            sl = f.get_slice(keys[0])
            for s in range(0, shape[0], batch_size):
                yield sl[s : s + batch_size]

    return Stream(read)


class Stream:
    """An iterable that restarts its generator on every `iter()` (so it can be read twice)."""

    def __init__(self, make: Callable[[], Iterator[torch.Tensor]]):
        self.make = make

    def __iter__(self):
        return iter(self.make())


def check_width(activations: Activations, d_in: int) -> None:
    """Read the first batch of `activations` and raise as `batches` does when it is not
    [batch, d_in]: a wrong file is named before any slow work (loading a model) starts."""
    next(batches(activations, d_in), None)


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
