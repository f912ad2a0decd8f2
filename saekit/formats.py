"""SAE folders that other tools write: recognise the format, load it into saekit's SAE, and
export saekit's SAEs in SAELens's layout.

    saekit               cfg.json (n_latents, ...) + sae.safetensors (W_enc [m, d], ...)
    SAELens              cfg.json (architecture, d_sae, ...) + sae_weights.safetensors (W_enc [d, m])
    sparsify             cfg.json (num_latents / expansion_factor, k) + sae.safetensors (encoder.weight [m, d])
    dictionary_learning  config.json ({"trainer": {"dict_class": ...}}) + ae.pt (a state dict)
    Gemma Scope          params.npz (W_enc [d, m], W_dec [m, d], b_enc, b_dec, threshold)

Every loader maps the weights into saekit's notation, `pre = W_enc (x - b_dec) + b_enc` with
W_enc [m, d], folding whatever the source does differently (no b_dec subtraction, a constant
input scale, decoder-norm scoring) into the weights, so that saekit's encode gives the source's
latent activations and its decode the source's reconstructions. Settings that cannot be folded
(per-token normalisation, skip connections, transcoders, ...) are refused with a SaekitError.
Loaders return saekit's config fields and tensors (`Loaded`); `SAE.load` builds the SAE, whose
`cfg.source_format` says what it was loaded from (e.g. "SAELens jumprelu").
"""

import json
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saekit.errors import SaekitError
from saekit.families import FAMILIES
from saekit.io import atomic_write, read_json


class Loaded(NamedTuple):
    """What a loader read: saekit's SAEConfig fields and tensors (saekit's names and layout)."""

    cfg: dict
    tensors: dict[str, torch.Tensor]
    cfg_file: Path  # where the config came from (for messages)
    weights_file: Path


# The SAELens config layout that `export` writes and `load_sae_lens` reads (SAELens 6).
SAE_LENS_LAYOUT_VERSION = "6.0.0"
EXPORT_FORMATS = ("sae-lens",)


# -- helpers ------------------------------------------------------------------------------

def _need(d: dict, key: str, file: Path):
    if key not in d or d[key] is None:
        raise SaekitError(f"{file}: required key {key!r} is missing")
    return d[key]


def _safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError) as e:
        raise SaekitError(f"{file} is corrupt or truncated ({e})") from None


def _take(tensors: dict[str, torch.Tensor], key: str, file: Path) -> torch.Tensor:
    if key not in tensors:
        raise SaekitError(f"{file}: tensor {key!r} is missing")
    return tensors[key].detach().to(torch.float32)


def _extra_keys(tensors: dict, known: set[str], file: Path, what: str) -> None:
    extra = sorted(set(tensors) - known)
    if extra:
        raise SaekitError(f"{file}: tensors {extra} are not part of a plain {what} SAE; saekit cannot load it "
                          "(only the encoder, decoder, biases and thresholds are understood)")


def _fold_input_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """b_enc for saekit's `W_enc (x - b_dec) + b_enc` of an SAE computing `W_enc x + b_enc`."""
    return b_enc + W_enc @ b_dec


def _build(files: tuple[Path, Path], fmt: str, *, W_enc, b_enc, W_dec, b_dec, architecture: str,
           k: int | None = None, threshold=None, hookpoint=None, model=None) -> Loaded:
    """saekit's config and tensors from weights in saekit's layout (W_enc [m, d]); `files` are
    the source's (config, weights) files, named in messages."""
    m, d = W_enc.shape
    cfg = dict(d_in=d, n_latents=m, k=k if k is not None else m, architecture=architecture,
               threshold=threshold if not torch.is_tensor(threshold) else None, hookpoint=hookpoint,
               model=model, source_format=fmt)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    tensors |= {n: threshold for n in FAMILIES[architecture].tensors}  # per-latent thresholds
    tensors = {n: t.to(torch.float32).contiguous() for n, t in tensors.items()}
    return Loaded(cfg, tensors, *files)


# -- saekit -------------------------------------------------------------------------------
def _is_saekit(path: Path) -> bool:
    if not ((path / "cfg.json").is_file() and (path / "sae.safetensors").is_file()):
        return False
    try:  # sparsify writes the same two file names; its cfg.json has its own keys
        cfg = json.loads((path / "cfg.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # saekit's loader reports the broken file
    return not (isinstance(cfg, dict) and "n_latents" not in cfg and {"expansion_factor", "num_latents"} & set(cfg))


def load_saekit(path: Path) -> Loaded:
    """saekit's own folder (written by SAE.save); SAE.load checks the config's keys and values."""
    cfg_file, weights = path / "cfg.json", path / "sae.safetensors"
    raw = read_json(cfg_file, "is not a valid SAE config")
    raw.pop("extra", None)
    try:
        tensors = load_file(weights, device="cpu")
    except (SafetensorError, OSError) as e:
        raise SaekitError(f"{weights} is corrupt or truncated ({e}); retrain or restore it") from None
    return Loaded(raw, tensors, cfg_file, weights)


# -- SAELens ------------------------------------------------------------------------------
SAE_LENS_ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
# per-token normalisations that SAELens applies at run time: no fixed weights can reproduce them
_RUNTIME_NORMS = ("constant_norm_rescale", "layer_norm")


def _is_sae_lens(path: Path) -> bool:
    return (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file()


def _sae_lens_scale(path: Path, cfg_file: Path) -> float:
    """The constant input scale of a checkpoint trained with normalize_activations
    "expected_average_only_in" (SAELens keeps it beside the SAE in activation_scaler.json)."""
    scaler = path / "activation_scaler.json"
    factor = read_json(scaler).get("scaling_factor") if scaler.is_file() else None
    if factor is None:
        raise SaekitError(f"{cfg_file}: normalize_activations is 'expected_average_only_in' but no scaling factor "
                          f"was found ({scaler.name} with 'scaling_factor'); without it the SAE's input scale is "
                          "unknown. Fold the factor in with SAELens (fold_activation_norm_scaling_factor) first")
    return float(factor)


def load_sae_lens(path: Path) -> Loaded:
    cfg_file, weights = path / "cfg.json", path / "sae_weights.safetensors"
    cfg = read_json(cfg_file)
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn", cfg.get("activation_fn_str")) or "relu"  # the latter: SAELens < 6 configs
    if arch == "standard" and act == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k"):
        arch, cfg = "topk", {**cfg, "k": cfg["activation_fn_kwargs"]["k"]}  # as SAELens reads SAELens < 6 TopK
    elif act != "relu":
        raise SaekitError(f"{cfg_file}: activation_fn {act!r} is not supported (relu, or topk with a k)")
    if arch not in SAE_LENS_ARCHITECTURES:
        raise SaekitError(f"{cfg_file}: SAELens architecture {arch!r} is not supported (saekit loads "
                          f"{', '.join(SAE_LENS_ARCHITECTURES)})")
    if cfg.get("hook_head_index", cfg.get("hook_point_head_index")) is not None:
        raise SaekitError(f"{cfg_file}: an SAE on one attention head (hook_head_index) is not supported")
    if cfg.get("reshape_activations", "none") != "none":
        raise SaekitError(f"{cfg_file}: reshape_activations {cfg['reshape_activations']!r} (per-head attention "
                          "SAEs) is not supported")
    norm = cfg.get("normalize_activations", "none")
    if norm in _RUNTIME_NORMS:
        raise SaekitError(f"{cfg_file}: normalize_activations {norm!r} normalises each token at run time, which "
                          "saekit's SAE (a fixed affine encoder) cannot reproduce; refusing to load it")
    if norm == "covariance_whitening":
        raise SaekitError(f"{cfg_file}: normalize_activations 'covariance_whitening' needs the whitening statistics "
                          "folded into the weights; fold them with SAELens (fold_activation_whitening) first")
    if norm not in ("none", "expected_average_only_in"):
        raise SaekitError(f"{cfg_file}: unknown normalize_activations {norm!r}")
    d, m = int(_need(cfg, "d_in", cfg_file)), int(_need(cfg, "d_sae", cfg_file))
    t = _safetensors(weights)
    known = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold", "log_threshold"} if arch == "jumprelu" else set())
    known |= {"topk_threshold"} if arch == "batchtopk" else set()
    _extra_keys(t, known, weights, f"SAELens {arch}")
    W_enc, b_enc = _take(t, "W_enc", weights), _take(t, "b_enc", weights)  # W_enc [d, m]
    W_dec, b_dec = _take(t, "W_dec", weights), _take(t, "b_dec", weights)
    for name, got, want in (("W_enc", W_enc, (d, m)), ("W_dec", W_dec, (m, d))):
        if tuple(got.shape) != want:
            raise SaekitError(f"{weights}: {name} has shape {tuple(got.shape)}, cfg.json says {want}")
    threshold = None
    if arch == "jumprelu":
        threshold = _take(t, "log_threshold", weights).exp() if "log_threshold" in t else _take(t, "threshold", weights)
    elif arch == "batchtopk":
        threshold = float(_take(t, "topk_threshold", weights))
    rescale = arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", False)
    if norm == "expected_average_only_in":  # as SAELens's fold_activation_norm_scaling_factor
        s = _sae_lens_scale(path, cfg_file)
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
        if rescale and threshold is not None:
            threshold = threshold / s
    W_enc = W_enc.T  # saekit's [m, d]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = _fold_input_bias(W_enc, b_enc, b_dec)
    if rescale:  # latents scored (and valued) as pre-activation times decoder row norm
        n = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n[:, None]
    k = int(_need(cfg, "k", cfg_file)) if arch in ("topk", "batchtopk") else None
    saekit_arch = {"standard": "relu"}.get(arch, arch)
    return _build((cfg_file, weights), f"SAELens {arch}", W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                  architecture=saekit_arch, k=k, threshold=threshold,
                  hookpoint=meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point"),
                  model=meta.get("model_name") or cfg.get("model_name"))


def export_sae_lens(cfg: dict, tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """Write an SAE (saekit's SAEConfig fields and tensors) as SAELens writes an inference SAE:
    cfg.json + sae_weights.safetensors, under the family's SAELens architecture (its `saelens` in
    saekit.families, which raises why a family has none)."""
    c = SimpleNamespace(**cfg)
    t = {n: v.to(torch.float32) for n, v in tensors.items()}
    arch, extra, more = FAMILIES[c.architecture].saelens(c, t)
    weights = {"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    weights |= more
    out = {"architecture": arch, "d_in": c.d_in, "d_sae": c.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none", **extra,
           "metadata": {"sae_lens_version": SAE_LENS_LAYOUT_VERSION, "model_name": c.model, "hook_name": c.hookpoint,
                        "exported_by": "saekit"}}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "sae_weights.safetensors", lambda p: save_file(weights, p))
    atomic_write(path / "cfg.json", lambda p: p.write_text(json.dumps(out, indent=2)))
    return path


# -- sparsify -----------------------------------------------------------------------------
def _is_sparsify(path: Path) -> bool:
    return (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file() and not _is_saekit(path)


def sparsify_hookpoint(name: str) -> str:
    """saekit's (TransformerLens) name for a sparsify hookpoint: sparsify hooks module outputs
    and names each SAE folder after the module, e.g. `layers.6` (a decoder layer's output: the
    residual stream after block 6) or `model.layers.6.mlp`. Other names are kept as they are."""
    m = re.fullmatch(r"(?:.*\.)?layers\.(\d+)(?:\.(mlp|self_attn|attn|attention))?", name)
    if not m:
        return name
    sub = {None: "hook_resid_post", "mlp": "hook_mlp_out"}.get(m.group(2), "hook_attn_out")
    return f"blocks.{m.group(1)}.{sub}"


def load_sparsify(path: Path) -> Loaded:
    cfg_file, weights = path / "cfg.json", path / "sae.safetensors"
    cfg = read_json(cfg_file)
    for key, bad in (("transcode", "a transcoder (predicts another module's output)"),
                     ("skip_connection", "has a linear skip connection (W_skip)")):
        if cfg.get(key):
            raise SaekitError(f"{cfg_file}: {key} is set: this sparsify SAE is {bad}, which saekit cannot load")
    if cfg.get("activation", "topk") != "topk":
        raise SaekitError(f"{cfg_file}: activation {cfg['activation']!r} is not supported (topk only)")
    d, k = int(_need(cfg, "d_in", cfg_file)), int(_need(cfg, "k", cfg_file))
    t = _safetensors(weights)
    if "W_skip" in t:
        raise SaekitError(f"{weights}: has a skip connection (W_skip), which saekit cannot load")
    _extra_keys(t, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, weights, "sparsify")
    W_enc = _take(t, "encoder.weight", weights)  # [m, d], as saekit
    m = cfg.get("num_latents") or d * int(_need(cfg, "expansion_factor", cfg_file))
    if tuple(W_enc.shape) != (m, d):
        raise SaekitError(f"{weights}: encoder.weight has shape {tuple(W_enc.shape)}, cfg.json says {(m, d)}")
    # multi_topk and normalize_decoder only change training; the stored decoder is used as it is
    return _build((cfg_file, weights), "sparsify topk", W_enc=W_enc, b_enc=_take(t, "encoder.bias", weights),
                  W_dec=_take(t, "W_dec", weights), b_dec=_take(t, "b_dec", weights), architecture="topk", k=k,
                  hookpoint=sparsify_hookpoint(path.resolve().name))


# -- dictionary_learning ------------------------------------------------------------------------
DICTIONARY_LEARNING_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder")


def _is_dictionary_learning(path: Path) -> bool:
    return (path / "ae.pt").is_file() and (path / "config.json").is_file()


def load_dictionary_learning(path: Path) -> Loaded:
    cfg_file, weights = path / "config.json", path / "ae.pt"
    trainer = _need(read_json(cfg_file), "trainer", cfg_file)
    cls = _need(trainer, "dict_class", cfg_file)
    if cls not in DICTIONARY_LEARNING_CLASSES:
        raise SaekitError(f"{cfg_file}: dictionary_learning class {cls!r} is not supported (saekit loads "
                          f"{', '.join(DICTIONARY_LEARNING_CLASSES)})")
    try:
        t = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise SaekitError(f"{weights} is corrupt or not a state dict ({type(e).__name__}: {e})") from None
    if not isinstance(t, dict):
        raise SaekitError(f"{weights} does not hold a state dict")
    common = dict(model=trainer.get("lm_name"), hookpoint=_dl_hookpoint(trainer))
    fmt = f"dictionary_learning {cls}"
    if cls == "JumpReluAutoEncoder":  # W_enc [d, m]; the input is not centred on b_dec
        _extra_keys(t, {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, weights, cls)
        W_enc, b_dec = _take(t, "W_enc", weights).T, _take(t, "b_dec", weights)
        b_enc = _fold_input_bias(W_enc, _take(t, "b_enc", weights), b_dec)
        return _build((cfg_file, weights), fmt, W_enc=W_enc, b_enc=b_enc, W_dec=_take(t, "W_dec", weights),
                      b_dec=b_dec, architecture="jumprelu", threshold=_take(t, "threshold", weights), **common)
    bias = "bias" if cls == "AutoEncoder" else "b_dec"
    known = {"encoder.weight", "encoder.bias", "decoder.weight", bias}
    _extra_keys(t, known | ({"k", "threshold"} if "TopK" in cls else set()), weights, cls)
    parts = dict(W_enc=_take(t, "encoder.weight", weights), b_enc=_take(t, "encoder.bias", weights),
                 W_dec=_take(t, "decoder.weight", weights).T, b_dec=_take(t, bias, weights))
    if cls == "AutoEncoder":
        return _build((cfg_file, weights), fmt, **parts, architecture="relu", **common)
    k = int(t["k"]) if "k" in t else int(_need(trainer, "k", cfg_file))
    if cls == "AutoEncoderTopK":  # its encode keeps the top k (the threshold is opt-in there)
        return _build((cfg_file, weights), fmt, **parts, architecture="topk", k=k, **common)
    # BatchTopKSAE encodes with its threshold (on ReLU outputs) by default
    return _build((cfg_file, weights), fmt, **parts, architecture="batchtopk", k=k,
                  threshold=float(_take(t, "threshold", weights)), **common)


def _dl_hookpoint(trainer: dict) -> str | None:
    """dictionary_learning records a layer index and a submodule name; a residual-stream
    submodule (or none named) maps to saekit's `blocks.N.hook_resid_post`."""
    layer, sub = trainer.get("layer"), trainer.get("submodule_name")
    if isinstance(layer, int) and (sub is None or "resid" in str(sub)):
        return f"blocks.{layer}.hook_resid_post"
    return None


# -- Gemma Scope params.npz ---------------------------------------------------------------------
def _npz_file(path: Path) -> Path:
    return path if path.suffix == ".npz" else path / "params.npz"


def _is_gemma_scope(path: Path) -> bool:
    return _npz_file(path).is_file()


def load_gemma_scope(path: Path) -> Loaded:
    file = _npz_file(path)
    try:
        with np.load(file) as z:
            t = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    except (OSError, ValueError) as e:
        raise SaekitError(f"{file} is corrupt or not an .npz archive ({e})") from None
    _extra_keys(t, {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, file, "Gemma Scope")
    W_enc, b_dec = _take(t, "W_enc", file).T, _take(t, "b_dec", file)  # stored [d, m]
    # folder names such as gemma-scope-2b-pt-res/layer_20/width_16k/... give the hookpoint
    parts = file.resolve().parts
    layer = next((p.removeprefix("layer_") for p in parts if re.fullmatch(r"layer_\d+", p)), None)
    hook = f"blocks.{layer}.hook_resid_post" if layer and any(p.endswith("-res") for p in parts) else None
    b_enc = _fold_input_bias(W_enc, _take(t, "b_enc", file), b_dec)
    return _build((file, file), "Gemma Scope jumprelu", W_enc=W_enc, b_enc=b_enc, W_dec=_take(t, "W_dec", file),
                  b_dec=b_dec, architecture="jumprelu", threshold=_take(t, "threshold", file), hookpoint=hook)


# -- detection ----------------------------------------------------------------------------
# (name, files that mark it, test, loader), tried in order
FORMATS: tuple[tuple[str, str, Callable[[Path], bool], Callable[[Path], Loaded]], ...] = (
    ("saekit", "cfg.json + sae.safetensors", _is_saekit, load_saekit),
    ("sparsify", "cfg.json (k, num_latents) + sae.safetensors", _is_sparsify, load_sparsify),
    ("SAELens", "cfg.json + sae_weights.safetensors", _is_sae_lens, load_sae_lens),
    ("dictionary_learning", "config.json + ae.pt", _is_dictionary_learning, load_dictionary_learning),
    ("Gemma Scope", "params.npz", _is_gemma_scope, load_gemma_scope),
)


def sae_format(path: Path) -> str | None:
    """The name of the SAE format at `path`, or None if it holds none that saekit knows."""
    path = Path(path)
    return next((name for name, _, test, _ in FORMATS if path.exists() and test(path)), None)


def describe(source_format: str | None) -> str:
    """How the CLI names an SAE's origin, e.g. "a SAELens jumprelu SAE"."""
    return f"a {source_format} SAE" if source_format else "a saekit SAE"


def detect(path: Path) -> tuple[str, Callable[[Path], Loaded]]:
    """(format name, loader) of the SAE at `path`; SaekitError listing the known formats if none fits."""
    path = Path(path)
    if not path.exists():
        raise SaekitError(f"{path} is missing: no such SAE folder")
    for name, _, test, loader in FORMATS:
        if test(path):
            return name, loader
    known = "; ".join(f"{name} ({files})" for name, files, _, _ in FORMATS)
    raise SaekitError(f"{path} is not an SAE folder in any format saekit knows: {known}")


def export(cfg: dict, tensors: dict[str, torch.Tensor], path, format: str) -> Path:
    """Write an SAE (saekit's SAEConfig fields and tensors) to `path` in `format` (EXPORT_FORMATS)."""
    if format != "sae-lens":
        raise SaekitError(f"unknown export format {format!r} (known: saekit, {', '.join(EXPORT_FORMATS)})")
    return export_sae_lens(cfg, tensors, Path(path))
