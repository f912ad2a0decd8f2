"""Faults a long run meets: NaN/Inf batches, a full disk, out of memory, corrupt files."""

import errno
import json
import os
import re
import time

import pytest
import torch
from safetensors.torch import save_file

from saekit import io
from saekit.activations import ActivationCache, build_cache
from saekit.config import TrainConfig, make_config
from saekit.errors import SaekitError
from saekit.run import Run
from saekit.sae import SAE, SAEConfig
from saekit.trainer import Trainer, fit, run_steps

D, B = 12, 100


def _data(n=600, nan_rows=None, value=float("nan")):
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(0)) + 1.0
    if nan_rows is not None:
        x[nan_rows, 3] = value
    return x


def _trainer(on_nonfinite="stop", **kw):
    cfg = make_config(TrainConfig, {"n_latents": 32, "k": 4, "hookpoints": ["h"], "batch_size": B, "epochs": 1,
                                    "log_every": 1, "on_nonfinite": on_nonfinite, "dead_tokens": 300, **kw})
    return Trainer(cfg, {"h": D}, {"h": _data()}, 6, torch.device("cpu"))


def _batches(x):
    return [{"h": t} for t in x.split(B)]


def test_nonfinite_batch_is_skipped_without_an_update(capsys):
    tr, logged = _trainer("skip"), []
    run_steps(tr, _batches(_data(nan_rows=slice(250, 260))), quiet=True, on_log=lambda s, m: logged.append(m))
    assert (tr.step, tr.skipped, tr.tokens) == (6, 1, 5 * B)
    assert all(p.isfinite().all() for p in tr.saes["h"].parameters())
    assert all(t.isfinite().all() for t in tr.stats["h"].values())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'h'" in err[0] and "step 2" in err[0] and "skipped" in err[0]
    assert [m["skipped_batches"] for m in logged] == [0, 0, 1, 1, 1, 1] and "h" not in logged[2]
    assert logged[-1]["tokens"] == 5 * B

    # a skipped batch leaves parameters and optimizer exactly as they were
    tr = _trainer("skip")
    tr.train_step({"h": _data()[:B]})
    before = {n: p.clone() for n, p in tr.saes["h"].named_parameters()}
    adam = {k: t.clone() for k, t in tr.opts["h"].state[tr.saes["h"].W_enc].items()}
    assert tr.train_step({"h": _data(B, nan_rows=[7], value=float("inf"))}) == {}
    assert all(torch.equal(p, before[n]) for n, p in tr.saes["h"].named_parameters())
    assert all(torch.equal(t, adam[k]) for k, t in tr.opts["h"].state[tr.saes["h"].W_enc].items())


def test_nonfinite_batch_stops_by_default():
    tr = _trainer()
    with pytest.raises(SaekitError, match=r"activations of hookpoint 'h' at step 1"):
        run_steps(tr, _batches(_data(nan_rows=[150])), quiet=True)
    with pytest.raises(SaekitError, match="NaN or Inf in the activations of hookpoint 'x' at step"):
        fit(_data(nan_rows=[300]), n_latents=32, k=4, batch_size=B, epochs=1, seed=0)
    sae = fit(_data(nan_rows=[300]), n_latents=32, k=4, batch_size=B, epochs=1, on_nonfinite="skip")
    assert all(p.isfinite().all() for p in sae.parameters())


def test_nan_loss_is_caught_and_no_nan_checkpoint_is_written(tmp_path):
    tr = _trainer()
    run = Run(tmp_path, tr.cfg, ["h"])
    tr.train_step({"h": _data()[:B]})
    tr.save(run)
    good = (tmp_path / "state.safetensors").read_bytes()
    with torch.no_grad():
        tr.saes["h"].W_dec[3] = float("nan")  # diverged parameters: finite input, NaN loss
    with pytest.raises(SaekitError, match="loss of hookpoint 'h' at step 1"):
        tr.train_step({"h": _data()[B : 2 * B]})
    with pytest.raises(SaekitError, match=r"not writing a checkpoint at step 1: hookpoint 'h'.*W_dec"):
        tr.save(run)
    assert (tmp_path / "state.safetensors").read_bytes() == good
    assert SAE.load(tmp_path / "h").W_dec.isfinite().all()


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    tr = _trainer()
    run = Run(tmp_path, tr.cfg, ["h"])
    tr.train_step({"h": _data()[:B]})
    tr.save(run)
    good = (tmp_path / "state.safetensors").read_bytes()
    tr.train_step({"h": _data()[B : 2 * B]})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)  # the data is written, its flush fails
    with pytest.raises(SaekitError, match=r"no space left on device while writing .*sae\.safetensors"):
        tr.save(run)
    with pytest.raises(SaekitError, match=r"no space left on device while writing .*state\.safetensors"):
        run.save_state({"x": torch.ones(3)}, {"step": 9})
    monkeypatch.undo()
    assert (tmp_path / "state.safetensors").read_bytes() == good
    assert run.load_state()[1]["step"] == 1 and SAE.load(tmp_path / "h").W_dec.isfinite().all()
    assert not list(tmp_path.rglob("*.tmp"))

    def partial(p):  # a write that fails halfway
        p.write_bytes(b"half")
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(SaekitError, match=r"cannot write .*eval\.json: Permission denied"):
        io.atomic_write(tmp_path / "eval.json", partial)
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path, umask):
    """Weights, checkpoints, exports and model folders get the mode a plain `open` gives (0666 less
    the umask; safetensors alone writes 0600), so a cache or run on a shared disk serves other users."""
    sae = SAE(SAEConfig(d_in=D, n_latents=32, k=4))
    old = os.umask(umask)
    try:
        sae.save(tmp_path / "sae")
        sae.save(tmp_path / "lens", format="sae-lens")
        (tmp_path / "run").mkdir()
        Run(tmp_path / "run", _trainer().cfg, ["h"]).save_state({"x": torch.ones(3)}, {"step": 1})
        model = tmp_path / "model"
        (model / "sub").mkdir(parents=True)
        save_file({"w": torch.ones(2)}, model / "sub" / "model.safetensors")  # as save_pretrained writes
        io.honour_umask(model)
    finally:
        os.umask(old)
    files = [tmp_path / "sae/sae.safetensors", tmp_path / "sae/cfg.json", tmp_path / "lens/sae_weights.safetensors",
             tmp_path / "run/state.safetensors", model / "sub/model.safetensors"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}
    assert oct((model / "sub").stat().st_mode & 0o777) == oct(0o777 & ~umask)


def test_out_of_memory_says_lower_batch_size(monkeypatch):
    tr = _trainer()

    def oom(self, batch):
        raise MemoryError

    monkeypatch.setattr(Trainer, "train_step", oom)
    with pytest.raises(SaekitError, match="out of memory at training step 0.*lower --batch_size"):
        run_steps(tr, _batches(_data()), quiet=True)
    monkeypatch.setattr(Trainer, "train_step", lambda self, b: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):  # other errors pass through unchanged
        run_steps(tr, _batches(_data()), quiet=True)


def test_corrupt_files_are_named(tmp_path):
    cache = build_cache(tmp_path / "c", ({"h": t} for t in _data().split(200)), {}, shard_tokens=200)
    shard = tmp_path / "c" / cache.manifest["shards"][1]["file"]
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(SaekitError, match=re.escape(f"activation shard {shard} is corrupt")):
        ActivationCache.open(tmp_path / "c").tensor("h")
    rows = {"_context": torch.zeros(200), "_position": torch.arange(200), "_token": torch.ones(200)}
    cache = build_cache(tmp_path / "r", ({"h": t, **rows} for t in _data().split(200)), {}, shard_tokens=200)
    assert cache.hookpoints == ["h"] and torch.equal(cache.rows()["_position"][200:400], torch.arange(200).int())
    shard = tmp_path / "r" / cache.manifest["shards"][2]["file"]
    shard.write_bytes(shard.read_bytes().replace(torch.arange(200).int().numpy().tobytes()[-8:], bytes(8)))
    with pytest.raises(SaekitError, match=re.escape(f"activation shard {shard} is corrupt (its row fields")):
        cache.rows()
    manifest = tmp_path / "c" / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(SaekitError, match=re.escape(f"{manifest} is corrupt")):
        ActivationCache.open(tmp_path / "c")

    tr = _trainer()
    run = Run(tmp_path / "run", tr.cfg, ["h"])
    tr.save(run)
    for f in (run.path / "state.safetensors", run.path / "h" / "sae.safetensors"):
        f.write_bytes(f.read_bytes()[:-50])
    with pytest.raises(SaekitError, match=re.escape(f"{run.path / 'state.safetensors'} is corrupt or truncated")):
        tr.load(run)
    with pytest.raises(SaekitError, match=re.escape(f"{run.path / 'h' / 'sae.safetensors'} is corrupt or truncated")):
        SAE.load(run.path / "h")
    save_file({n: torch.zeros(s, dtype=torch.int32) for n, s in
               [("W_enc", (32, D)), ("b_enc", (32,)), ("W_dec", (32, D)), ("b_dec", (D,))]},
              run.path / "h" / "sae.safetensors")
    (run.path / "h" / "cfg.json").write_text(json.dumps(vars(SAEConfig(D, 32, 4))))
    with pytest.raises(SaekitError, match="sae.safetensors: W_enc is int32"):
        SAE.load(run.path / "h")


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tmp_path):
    cfg = make_config(TrainConfig, {"hookpoints": ["h"], "out": str(tmp_path / "r")})
    Run.create(cfg)  # the config is written, then the process dies before any state
    run = Run.for_resume(tmp_path / "r", {"hookpoints": ["h"]})
    assert run.config == cfg and not run.has_state
    with pytest.raises(SaekitError, match="nothing to resume"):
        Run.for_resume(tmp_path / "other", {})
    (run.path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"st')  # a line cut by the kill
    run.truncate_metrics(1)
    assert (run.path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_ctrl_c_while_the_model_loads_is_not_lost():
    """The loading code of transformers and the bridge can swallow a KeyboardInterrupt (a run then
    went on after Ctrl-C): one that comes while the model loads is raised once the load returns."""
    import signal

    from saekit.model import _ctrl_c_after

    def load_that_swallows_ctrl_c():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        return "model"

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts from a terminal
    try:
        with pytest.raises(KeyboardInterrupt):
            _ctrl_c_after(load_that_swallows_ctrl_c)
        assert _ctrl_c_after(lambda: "model") == "model"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # started under nohup: Ctrl-C stays ignored
        assert _ctrl_c_after(load_that_swallows_ctrl_c) == "model"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_batches_that_end_before_the_last_step_still_log_the_step_they_reached():
    """A stream whose corpus ends early stops the run there: its last step is logged, every
    log_every steps otherwise (a run of 6 steps, logging every 4, fed 5 batches)."""
    tr, logged = _trainer(log_every=4), []
    run_steps(tr, _batches(_data(500)), quiet=True, on_log=lambda s, m: logged.append(s))
    assert logged == [4, 5]
    tr, logged = _trainer(log_every=4), []
    run_steps(tr, _batches(_data(600)), quiet=True, on_log=lambda s, m: logged.append(s))
    assert logged == [4, 6]
