"""`saekit train` killed with SIGKILL at random moments, resumed each time: the result is the
uninterrupted run's, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from saekit import cli
from saekit import model as lm
from saekit.sae import SAE

HOOK = "blocks.2.hook_resid_post"
ROOT = Path(__file__).resolve().parents[1]


def logged_step(run: Path) -> int:
    """The last step in run/metrics.jsonl (0 if none yet; a half-written line is ignored)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except json.JSONDecodeError:
            continue
    return 0


def meta(run: Path) -> dict:
    with safe_open(run / "state.safetensors", "pt") as f:
        return json.loads(f.metadata()["meta"])


def _env() -> dict:
    """This process's environment with this checkout first on the path, read when called (tests set variables)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def train_then_kill(args: list[str], out: Path, target: int, pause: float) -> bool:
    """Start `saekit train ARGS --out OUT` (with `--resume` once OUT holds a run), wait until it
    logs step `target` (0: no wait) or ends, `pause` seconds more, then SIGKILL it if it still
    runs. True if it was killed. The deadline is long: a loaded machine takes minutes to start a run."""
    cmd = [sys.executable, "-m", "saekit.cli", "train", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd + ["--resume"] * (out / "config.json").exists(), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while target and proc.poll() is None and logged_step(out) < target and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(pause)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert proc.returncode in (0, -signal.SIGKILL), err
    return killed


def resume(args: list[str], out: Path) -> subprocess.CompletedProcess:
    """`saekit train ARGS --out OUT --resume` to its end."""
    return subprocess.run([sys.executable, "-m", "saekit.cli", "train", *args, "--out", str(out), "--resume"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True)


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tiny, smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("SAEKIT_ENCODER", "fp32")  # no per-process timing decision in the encoder
    args = [*tiny, "--checkpoint_every", "1", "--quiet"]
    monkeypatch.setattr(lm, "load_model", lambda *a, **k: smollm2)  # the reference run evaluates in-process
    assert cli.main(["train", *args, "--out", str(tmp_path / "ref")]) == 0
    total = logged_step(tmp_path / "ref")

    out = tmp_path / "cut"
    rng = random.Random(0)
    # kill points: once during start-up (before any checkpoint), then after random steps, the
    # last one after the final step (saving, evaluating)
    targets = [0, *sorted(rng.sample(range(1, total), 8)), total]
    pauses = [rng.uniform(0.5, 2.5) if t in (0, total) else rng.uniform(0, 0.2) for t in targets]
    kills = sum(train_then_kill(args, out, t, p) for t, p in zip(targets, pauses, strict=True))
    done = resume(args, out)
    assert done.returncode == 0, done.stderr
    assert kills >= 10

    a, b = SAE.load(tmp_path / "ref" / HOOK), SAE.load(out / HOOK)
    for n, p in a.named_parameters():
        torch.testing.assert_close(getattr(b, n), p, rtol=0, atol=1e-6, msg=n)
    assert meta(out)["tokens"] == meta(tmp_path / "ref")["tokens"] == total * 500
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total + 1))
    assert (out / "eval.json").is_file()
