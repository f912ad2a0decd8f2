"""A run folder and everything in it, owned in one place.

    RUN/config.json          the TrainConfig (a resume takes it; flags given again must agree)
    RUN/metrics.jsonl        one line per logged step
    RUN/<hookpoint>/         one SAE folder each: cfg.json + sae.safetensors (acts on raw activations);
                             a config with sources: one folder, RUN/crosscoder/ or RUN/transcoder/
    RUN/state.safetensors    everything --resume needs (params, Adam, firing statistics, step)
    RUN/eval.json            evaluation results
    RUN/analysis/            what `saekit analyze` (and later analyses) write
    RUN/atlas.sqlite         the feature atlas (`saekit atlas build`, saekit.atlas)

A bare SAE folder (`cfg.json` + `sae.safetensors`, no config.json; or an SAE folder in another
tool's format, see saekit.formats) opens as a run of one hookpoint with no config, no state and
no activation cache: analyses then take activations and a model from the caller. Nothing else
in saekit reads config.json or state.safetensors.
"""

import json
import math
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from saekit.activations import ActivationCache, Stream, cache_path, open_activations
from saekit.config import TrainConfig, Wiring, dictionaries, make_config
from saekit.errors import SaekitError
from saekit.io import atomic_write, read_json
from saekit.lock import FileLock
from saekit.sae import SAE

ATLAS_FILE = "atlas.sqlite"  # the feature atlas in a run folder (saekit.atlas)

CONFIG, METRICS, STATE, EVAL, ANALYSIS = "config.json", "metrics.jsonl", "state.safetensors", "eval.json", "analysis"
_BROKEN = (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError)  # what a bad state file raises
SAE_FILES = ("cfg.json", "sae.safetensors")
# Keys that may change between a run and its resume without changing what is trained.
RESUMABLE_CHANGES = {"out", "device", "log_every", "checkpoint_every", "wandb", "harvest_batch", "eval_contexts",
                     "cache_dir", "collapse_every", "shard_hookpoints"}


@dataclass
class FiringHistory:
    """Per-latent training statistics of one hookpoint, from the run's training state."""

    step: int  # steps trained when the state was saved
    first_fired: torch.Tensor  # [m] step of the first firing, -1 = never
    last_fired: torch.Tensor  # [m] step of the last firing, -1 = never
    tokens_since_fired: torch.Tensor | None = None  # [m]
    dead_tokens: int | None = None  # the run's training-time dead rule (Gao et al. 2024)


def _logged_step(line: str) -> float:
    """The step of a metrics line; inf for a line a kill cut short (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def choose_hookpoint(where: Path, hookpoints: list[str], hookpoint: str | None) -> str:
    """`hookpoint` checked against `hookpoints` (of a run or an atlas at `where`), or the only one when None."""
    if hookpoint is None:
        if len(hookpoints) > 1:
            raise SaekitError(f"{where} has several hookpoints ({', '.join(hookpoints)}); name one")
        return hookpoints[0]
    if hookpoint not in hookpoints:
        raise SaekitError(f"hookpoint {hookpoint!r} is not in {where} (it has {', '.join(hookpoints)})")
    return hookpoint


def is_sae_folder(path: Path) -> bool:
    return all((path / f).is_file() for f in SAE_FILES)


@dataclass
class Run:
    path: Path
    config: TrainConfig | None  # None: a bare SAE folder
    hookpoints: list[str]

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """A run folder (config.json) or a bare SAE folder (cfg.json + sae.safetensors, or another
        tool's SAE folder that saekit.formats recognises)."""
        from saekit.formats import sae_format

        path = Path(path)
        if not path.exists():
            raise SaekitError(f"{path} does not exist")
        fmt = sae_format(path)
        if (path / CONFIG).is_file() and fmt != "dictionary_learning":  # its SAE folders hold a config.json
            values = read_json(path / CONFIG, "is corrupt")
            # runs saved before data_seed existed drew their data with their one seed
            values.setdefault("data_seed", values.get("seed", 0))
            try:
                cfg = make_config(TrainConfig, values)
            except SaekitError as e:
                raise SaekitError(f"{path / CONFIG}: {e}") from None
            return cls(path, cfg, list(dictionaries(cfg)))
        if fmt is not None:
            return cls(path, None, [SAE.load(path).cfg.hookpoint or path.name])
        raise SaekitError(f"{path} is neither a saekit run folder (config.json) nor an SAE folder "
                          f"({' + '.join(SAE_FILES)}, or another tool's: SAELens, sparsify, dictionary_learning, "
                          "Gemma Scope)")

    @classmethod
    def create(cls, cfg: TrainConfig) -> "Run":
        """A new run folder for `cfg` at `cfg.out`. A folder with a config but no training state
        (a run that died before its first checkpoint) holds nothing to keep and is reused."""
        path = Path(cfg.out)
        if cls.holds_run(path):
            raise SaekitError(f"{path} already holds a run; pass --resume to continue it or choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / CONFIG, lambda p: p.write_text(json.dumps(asdict(cfg), indent=2)))
        atomic_write(path / METRICS, lambda p: p.write_text(""))
        return cls(path, cfg, list(dictionaries(cfg)))

    @staticmethod
    def holds_run(path: str | Path) -> bool:
        """Whether `path` holds a run that trained (a config and a checkpoint)."""
        return (Path(path) / CONFIG).exists() and (Path(path) / STATE).exists()

    @classmethod
    def for_resume(cls, out: str | Path, given: dict, again: bool = False) -> "Run":
        """The run at `out`, with its stored config; `given` keys (from a YAML file or flags)
        must agree with it, except the ones that do not change what is trained. A run killed
        before its first checkpoint (a config, no state) resumes from step 0. `again`: the
        command that made the run, given again without --resume (its own message on a mismatch)."""
        path = Path(out)
        if not (path / CONFIG).is_file():
            raise SaekitError(f"nothing to resume in {path} (no {CONFIG})")
        run = cls.open(path)
        stored = asdict(run.config)
        given = asdict(make_config(TrainConfig, {**stored, **given}))  # types and ranges checked as usual
        diff = sorted(k for k in given if given[k] != stored[k] and k not in RESUMABLE_CHANGES)
        if diff:
            changes = ", ".join(f"{k}: {stored[k]!r} -> {given[k]!r}" for k in diff)
            if again:
                raise SaekitError(f"{path} already holds a run of another config ({changes}); choose another --out, "
                                  "or pass --resume to continue it with its stored config")
            raise SaekitError(f"cannot resume {path} with a different config ({changes}); leave these out "
                              "(the run's stored config is used) or choose a new --out")
        run.config = make_config(TrainConfig, {**stored, **{k: given[k] for k in RESUMABLE_CHANGES}})
        return run

    def labels(self, hookpoint: str) -> dict[int, str]:
        """latent -> its label in the run's feature atlas (`saekit atlas build`); empty without one."""
        path = self.path / ATLAS_FILE
        if self.bare or not path.is_file():
            return {}
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return dict(db.execute("SELECT latent, label FROM features WHERE hookpoint = ?", (hookpoint,)))

    @property
    def has_state(self) -> bool:
        return (self.path / STATE).is_file()

    @property
    def bare(self) -> bool:
        return self.config is None

    def hookpoint(self, hookpoint: str | None = None) -> str:
        """`hookpoint` checked against the run's, or its only one when None."""
        return choose_hookpoint(self.path, self.hookpoints, hookpoint)

    def sae_dir(self, hookpoint: str | None = None) -> Path:
        return self.path if self.bare else self.path / self.hookpoint(hookpoint)

    def sae(self, hookpoint: str | None = None, device=None) -> SAE:
        return SAE.load(self.sae_dir(hookpoint), device=device)

    @property
    def model_name(self) -> str | None:
        """The model the SAEs were trained on (the config's, or the SAE's own record)."""
        return self.config.model if self.config else self.sae().cfg.model

    @property
    def analysis_dir(self) -> Path:
        out = self.path / ANALYSIS
        out.mkdir(exist_ok=True)
        return out

    def writing_analysis(self) -> FileLock:
        """The lock an analysis holds while it writes its files to RUN/analysis/: two commands
        writing there at once leave one's set of files or the other's, never a mix."""
        return FileLock(self.path / f"{ANALYSIS}.lock", f"{self.path / ANALYSIS} is being written")

    # -- activations ----------------------------------------------------------------------
    def cache(self, split: str = "val") -> ActivationCache:
        """The run's activation cache of `split` ("train" or "val")."""
        if self.bare:
            raise SaekitError(f"{self.path} is a bare SAE folder with no activation cache; pass --activations PATH")
        if split == "train" and self.config.activations == "stream":
            raise SaekitError(f"{self.path} was trained with activations: stream, which keeps no training "
                              "activations on disk; use its held-out split (--split val) or pass --activations PATH")
        path = cache_path(self.config, split)
        try:
            return ActivationCache.open(path)
        except SaekitError as e:
            raise SaekitError(f"the run's {split} activation cache cannot be used ({e}); rebuild it with "
                              f"`saekit cache {self.path / CONFIG}` or pass --activations PATH") from None

    def activations(self, hookpoint: str | None = None, split: str = "val",
                    path: str | Path | None = None) -> Iterable[torch.Tensor]:
        """A re-iterable stream of `[batch, d_in]` activations of `hookpoint`: from `path` (a cache
        folder or a .safetensors file) if given, else the run's own cache of `split`. For a
        crosscoder or transcoder, its sources side by side (what its `encode` reads)."""
        hookpoint = self.hookpoint(hookpoint)
        if not self.crosscoder:
            return open_activations(path if path is not None else self.cache(split).path, hookpoint)
        cache = ActivationCache.open(path) if path is not None else self.cache(split)
        sources, _ = self.wiring(hookpoint)
        return Stream(lambda: (torch.cat([b[s] for s in sources], 1) for b in cache.batches_of(sources)))

    @property
    def crosscoder(self) -> bool:
        """Whether the run trained one crosscoder or transcoder (over named sources), not SAEs."""
        return not self.bare and self.config.crosscoder

    def wiring(self, name: str) -> Wiring:
        """What dictionary `name` reads and writes: (sources, targets); an SAE's are its hookpoint."""
        return ([name], [name]) if self.bare else dictionaries(self.config).get(name, ([name], [name]))

    def dictionary_batches(self, name: str, split: str = "val", path: str | Path | None = None):
        """A re-iterable stream of `{hookpoint: [batch, d]}` of every source and target of
        dictionary `name` (aligned rows), from `path` (a cache folder) or the run's cache of `split`."""
        sources, targets = self.wiring(self.hookpoint(name))
        cache = ActivationCache.open(path) if path is not None else self.cache(split)
        return Stream(lambda: cache.batches_of(list(dict.fromkeys(sources + targets))))

    # -- training state -------------------------------------------------------------------
    def save_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_write(self.path / STATE, lambda p: save_file(tensors, p, metadata={"meta": json.dumps(meta)}))

    def _read_state(self, names: list[str] | None = None, device=None) -> tuple[dict, dict[str, torch.Tensor]]:
        """The training state's metadata and its tensors `names` (every one when None); a broken
        file raises one of `_BROKEN` (FileNotFoundError when there is none)."""
        with safe_open(self.path / STATE, "pt", device=str(device or "cpu")) as f:
            meta = json.loads(f.metadata()["meta"])
            return meta, {k: f.get_tensor(k) for k in (f.keys() if names is None else names)}

    def load_state(self, device=None) -> tuple[dict[str, torch.Tensor], dict]:
        file = self.path / STATE
        try:
            meta, tensors = self._read_state(device=device)
        except FileNotFoundError:
            raise SaekitError(f"nothing to resume: {file} does not exist") from None
        except _BROKEN as e:
            raise SaekitError(f"{file} is corrupt or truncated ({e}); start a new run") from None
        if not isinstance(meta, dict):
            raise SaekitError(f"{file} is corrupt (its metadata is not a JSON object); start a new run")
        return tensors, meta

    def checkpoint(self) -> dict | None:
        """The last checkpoint's metadata (`step`, `total_steps` of the run, ...) without reading its
        tensors; None without one."""
        file = self.path / STATE
        if self.bare or not file.is_file():
            return None
        try:
            meta, _ = self._read_state([])
        except _BROKEN as e:
            raise SaekitError(f"{file} is corrupt or truncated ({e}); start a new run") from None
        return meta if isinstance(meta, dict) else None

    def firing_history(self, hookpoint: str | None = None) -> FiringHistory | None:
        """Per-latent firing statistics from the training state (None where there is none)."""
        file = self.path / STATE
        if self.bare or not file.is_file():
            return None
        hookpoint = self.hookpoint(hookpoint)
        try:
            meta, t = self._read_state([f"{hookpoint}/stats/{n}" for n in ("first_fired", "last_fired",
                                                                             "tokens_since_fired")])
            step, (first, last, since) = meta["step"], t.values()
        except _BROKEN as e:
            raise SaekitError(f"{file} is corrupt or has no stats for {hookpoint!r} ({e})") from None
        return FiringHistory(step, first, last, since, self.config.dead_tokens)

    # -- logs and results -----------------------------------------------------------------
    def log_metrics(self, step: int, metrics: dict) -> None:
        with (self.path / METRICS).open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines past `step` (written after the checkpoint a resume starts from)."""
        file = self.path / METRICS
        lines = file.read_text().splitlines() if file.exists() else []
        kept = "".join(ln + "\n" for ln in lines if _logged_step(ln) <= step)
        atomic_write(file, lambda p: p.write_text(kept))

    def write_json(self, name: str, data: dict) -> Path:
        """`data` as RUN/<name> (e.g. "eval.json", "analysis/report.json"), atomically."""
        file = self.path / name
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, lambda p: p.write_text(json.dumps(data, indent=1)))
        return file
