"""What the commands say while they work and when they stop: a line or a bar for every long
phase (none under --quiet), a finished run that says so instead of training or evaluating again,
and a Ctrl-C that names the last checkpoint and the command that continues it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saekit import cli
from saekit import model as lm

HOOK = "blocks.2.hook_resid_post"  # the hookpoint of the `tiny` run (conftest)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def done_run(act_cache_dir, tmp_path_factory):
    """A finished tiny run (the `tiny` fixture's settings, 22 steps)."""
    run = tmp_path_factory.mktemp("progress") / "run"
    args = ["--hookpoints", HOOK, "--n_tokens", "6000", "--val_tokens", "600", "--ctx_len", "64", "--epochs", "2",
            "--expansion", "2", "--k", "16", "--batch_size", "500", "--checkpoint_every", "4", "--eval_contexts", "2",
            "--cache_dir", str(act_cache_dir), "--dead_tokens", "3000", "--out", str(run)]
    assert cli.main(["train", *args, "--quiet"]) == 0
    return run, args


def test_long_phases_say_what_they_do(done_run, smollm2, tmp_path, monkeypatch, capsys):
    run, _ = done_run
    monkeypatch.setattr(lm, "load_model", lambda *a, **k: smollm2)
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--contexts", "1"]) == 0
    out, err = capsys.readouterr()
    dead = json.loads((run / "eval.json").read_text())[HOOK]["dead_fraction"]  # full precision in the file,
    assert f"| dead_fraction | {100 * dead:.3g} % |" in out, out  # a percentage in the table
    for line in ("eval: loading smollm2-135m ...", f"eval: {HOOK}: reconstruction on the held-out activations: ",
                 f"eval {HOOK}: downstream loss: 100%"):
        assert line in err, err
    assert cli.main(["atlas", "build", str(run)]) == 0
    err = capsys.readouterr().err
    for line in ("atlas: reading the train cache's token positions: ", f"atlas {HOOK}: 100%",  # the encoding bar
                 f"atlas {HOOK}: sorting the codes, top contexts, labels: ", f"atlas {HOOK}: context windows: ",
                 f"atlas {HOOK}: logit effects, decoder and co-occurrence neighbours: ",
                 f"atlas {HOOK}: writing the tables: ", f"atlas: writing {run / 'atlas.sqlite'}: "):
        assert line in err, err
    assert cli.main(["atlas", "export", str(run / "atlas.sqlite"), str(tmp_path / "site")]) == 0
    assert "atlas pages: 100%" in capsys.readouterr().err
    assert cli.main(["analyze", "dead", str(run)]) == 0
    assert f"{HOOK}: dead ..." in capsys.readouterr().err
    assert cli.main(["analyze", "absorption", str(run), "--words", "400", "--min-letters", "3"]) == 0
    err = capsys.readouterr().err
    for line in ("analyze: loading smollm2-135m: ", f"{HOOK}: absorption ...", "first-letter prompts: 100%",
                 "absorption: ground-truth letter probes: ", "absorption: k-sparse probing of the SAE's latents",
                 "absorption: absorption scores: ", f"{HOOK}: absorption: "):
        assert line in err, err
    # --quiet: not one of these lines
    atlas = str(tmp_path / "a.sqlite")
    for args in (["eval", str(run), "--contexts", "1"], ["atlas", "build", str(run), "--out", atlas],
                 ["atlas", "export", atlas, str(tmp_path / "site2")], ["analyze", "dead", str(run)]):
        assert cli.main([*args, "--quiet"]) == 0
        assert capsys.readouterr().err == "", args


def test_a_finished_run_says_so_and_stops(done_run, tmp_path, capsys):
    run, args = done_run
    total = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    evaluated = (run / "eval.json").stat().st_mtime_ns
    capsys.readouterr()
    # --resume, and the command that made the run given again (the README's first command, re-run)
    for again in (["--out", str(run), "--resume"], args):
        assert cli.main(["train", *again, "--quiet"]) == 0
        out, err = capsys.readouterr()
        assert f"{run} is complete (step {total} of {total}); `saekit eval {run}` re-evaluates it" in err
        assert "| fvu |" not in out  # not evaluated again
        assert (run / "eval.json").stat().st_mtime_ns == evaluated
    assert cli.main(["train", *args, "--k", "8", "--quiet"]) == 2  # another config is still refused
    assert "already holds a run of another config (k: 16 -> 8)" in capsys.readouterr().err


def test_a_run_stopped_while_evaluating_is_evaluated(done_run, smollm2, tmp_path, monkeypatch, capsys):
    run, _ = done_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in run.iterdir():
        if f.is_file() and f.name != "eval.json":
            (copy / f.name).write_bytes(f.read_bytes())
    (copy / HOOK).mkdir()
    for f in (run / HOOK).iterdir():
        (copy / HOOK / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(lm, "load_model", lambda *a, **k: smollm2)
    capsys.readouterr()
    assert cli.main(["train", "--out", str(copy), "--resume", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "is complete (step 22 of 22); evaluating it" in err and "| fvu |" in out
    assert (copy / "eval.json").is_file()


def logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(done_run, tmp_path, monkeypatch, capsys):
    _, args = done_run
    out = tmp_path / "cut"
    args = [*args[: args.index("--out")], "--epochs", "40", "--checkpoint_every", "2", "--log_every", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # Ctrl-C as on a terminal's run, even when the suite itself runs with SIGINT ignored (nohup, a
    # background job), which its children would inherit
    proc = subprocess.Popen([sys.executable, "-m", "saekit.cli", "train", *args, "--out", str(out)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600  # start-up alone can take minutes on loaded cores
    while proc.poll() is None and logged_step(out) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    with open(out / "state.safetensors", "rb") as f:  # the checkpoint on disk is the one named
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    step = json.loads(header["__metadata__"]["meta"])["step"]
    assert step >= 4 and step % 2 == 0
    resume = f"saekit train --out {out} --resume"
    assert f"saekit: interrupted; last checkpoint: step {step} of 440 in {out}; continue with `{resume}`" in err, err
    # the command it gives continues from that step (stopped again at once: the message is the point)
    from saekit.trainer import Trainer

    def stop(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", stop)
    assert cli.main(resume.split()[1:] + ["--quiet"]) == 130
    assert f"saekit: resuming {out} from step {step} of 440" in capsys.readouterr().err


def test_ctrl_c_before_any_run_folder_gives_the_same_command(tmp_path, monkeypatch, capsys):
    from saekit import pipeline

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train", stop)
    assert cli.main(["train", "--out", str(tmp_path / "r"), "--k", "8", "--quiet"]) == 130
    assert (f"saekit: interrupted; nothing trained yet; `saekit train --out {tmp_path / 'r'} --k 8 --quiet` "
            "continues the activation harvest where it stopped") in capsys.readouterr().err


def test_bars_are_labelled_and_closed_before_a_stop_is_reported(monkeypatch, capsys):
    """The training bar is labelled and names what its dead share counts; a Ctrl-C or an error
    mid-bar is reported on a line of its own, and no bar is redrawn after the report."""
    import torch
    from tqdm import tqdm

    import saekit
    from saekit import pipeline
    from saekit.errors import SaekitError

    saekit.fit(torch.randn(2000, 8), n_latents=16, k=2, epochs=1, batch_size=500, dead_tokens=1000, quiet=False)
    err = capsys.readouterr().err
    assert "train: 100%" in err and "dead(1.00k tok)=" in err, err

    for stop, code, said in ((KeyboardInterrupt("last checkpoint: step 3"), 130, "saekit: interrupted;"),
                             (SaekitError("the disk is full"), 2, "saekit: error: the disk is full")):
        def halfway(*a, stop=stop, **k):
            bar = tqdm(total=10, desc="harvest train")
            bar.update(4)
            raise stop

        monkeypatch.setattr(pipeline, "train", halfway)
        assert cli.main(["train", "--k", "8", "--quiet"]) == code
        err = capsys.readouterr().err
        assert "harvest train:  40%" in err and f"\n{said}" in err and err.endswith("\n"), repr(err)
        assert "harvest train" not in err.split(said)[1], repr(err)  # not redrawn after the report
