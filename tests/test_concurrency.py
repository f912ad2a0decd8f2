"""Independent commands on shared files: three processes on one empty activation cache harvest it
once and all finish; the harvester killed with SIGKILL is taken over by a waiting process, which
continues its partial harvest; an atlas rebuilt under readers shows them the old atlas or the new
one; the model cache is written once; the lock itself (waiting line, timeout, release)."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from saekit import lock as locks
from saekit import model as lm
from saekit import pipeline
from saekit.activations import ActivationCache, build_cache, cache_path
from saekit.atlas import Atlas, build_atlas
from saekit.config import TrainConfig, load_config
from saekit.lock import FileLock
from saekit.run import Run
from saekit.sae import SAE, SAEConfig

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.2.hook_resid_post"
BATCH = 16  # TrainConfig.harvest_batch: contexts per harvested chunk
STALL = 3  # chunks the harvester of the kill test harvests (and writes) before it stalls

# `saekit cache ARGS` in a process that starts when the file argv[1] exists (so several start at
# once), prints `HARVEST <split> <contexts>` for every harvest it runs, writes a shard per chunk
# (so a killed harvest leaves progress), and, when argv[2] >= 0, stalls after that many chunks.
WORKER = """
import functools, os, sys, time
from saekit import cli, pipeline, model as lm
go, stall, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real = lm.harvest
def harvest(model, tokens, *a, desc="", **k):
    print("HARVEST", desc.split()[-1], len(tokens), flush=True)
    for i, chunk in enumerate(real(model, tokens, *a, desc=desc, **k)):
        if i == stall:
            print("STALLED", flush=True)
            time.sleep(600)
        time.sleep(0.3)  # a harvest long enough for the others to arrive while it runs
        yield chunk
lm.harvest = harvest
pipeline.build_cache = functools.partial(pipeline.build_cache, shard_tokens=1)
while not os.path.exists(go):
    time.sleep(0.01)
sys.exit(cli.main(["cache", *args, "--quiet"]))
"""


def start(args: list[str], go: Path, out: Path, stall: int = -1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(go), str(stall), *args], env=env, cwd=ROOT,
                            stdout=open(out.with_suffix(".out"), "w"), stderr=open(out.with_suffix(".err"), "w"))


def harvests(out: Path) -> list[tuple[str, int]]:
    return [(s, int(n)) for s, n in re.findall(r"^HARVEST (\w+) (\d+)$", out.with_suffix(".out").read_text(), re.M)]


def waited_for(out: Path) -> set[int]:
    """The pids a process printed it was waiting for."""
    return {int(p) for p in re.findall(r"being harvested by (\d+)@", out.with_suffix(".err").read_text())}


def wait_until(cond, what: str, procs=(), timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, f"{what}: timed out or a process ended early"
        time.sleep(0.05)


def assert_same_cache(cfg_a: TrainConfig, cfg_b: TrainConfig) -> None:
    for split in ("train", "val"):
        a, b = ActivationCache.open(cache_path(cfg_a, split)), ActivationCache.open(cache_path(cfg_b, split))
        rows_a, rows_b = a.rows(), b.rows()
        assert all(torch.equal(rows_a[k], rows_b[k]) for k in rows_a)  # the same tokens, row for row
        torch.testing.assert_close(a.tensor(HOOK), b.tensor(HOOK), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """CLI args of a small cache, and its caches harvested by one process (no other around)."""
    args = ["--hookpoints", HOOK, "--n_tokens", "4000", "--val_tokens", "600", "--ctx_len", "64"]
    cfg = load_config(None, [*args, "--cache_dir", str(tmp_path_factory.mktemp("one"))])
    pipeline.prepare(cfg, quiet=True)
    return args, cfg


@pytest.mark.slow
def test_three_processes_on_one_empty_cache_harvest_it_once(reference, tmp_path):
    args, one = reference
    args = [*args, "--cache_dir", str(tmp_path / "cache")]
    go = tmp_path / "go"
    procs = [start(args, go, tmp_path / f"p{i}") for i in range(3)]
    go.touch()  # all three start now
    for p in procs:
        assert p.wait(timeout=300) == 0, (tmp_path / f"p{procs.index(p)}.err").read_text()
    done = {p.pid: harvests(tmp_path / f"p{i}") for i, p in enumerate(procs)}
    n_contexts = {s: ActivationCache.open(cache_path(one, s)).manifest["n_contexts"] for s in ("train", "val")}
    for split in ("train", "val"):  # one cache key each: harvested once, in full
        assert [h for hs in done.values() for h in hs if h[0] == split] == [(split, n_contexts[split])]
    harvesters = {pid for pid, hs in done.items() if hs}
    waits = [waited_for(tmp_path / f"p{i}") for i in range(3)]
    assert any(waits) and all(w <= harvesters for w in waits)  # who waited named a harvester
    assert_same_cache(one, load_config(None, args))


@pytest.mark.slow
def test_harvester_killed_a_waiting_process_continues_its_harvest(reference, tmp_path):
    args, one = reference
    args = [*args, "--cache_dir", str(tmp_path / "cache")]
    go = tmp_path / "go"
    go.touch()
    first = start(args, go, tmp_path / "first", stall=STALL)
    wait_until(lambda: "STALLED" in (tmp_path / "first.out").read_text(), "the first harvest", [first])
    others = [start(args, go, tmp_path / f"p{i}") for i in range(2)]
    wait_until(lambda: all(first.pid in waited_for(tmp_path / f"p{i}") for i in range(2)), "waiting", others)
    first.send_signal(signal.SIGKILL)
    first.wait()
    for i, p in enumerate(others):
        assert p.wait(timeout=300) == 0, (tmp_path / f"p{i}.err").read_text()
    n_train = ActivationCache.open(cache_path(one, "train")).manifest["n_contexts"]
    done = [harvests(tmp_path / f"p{i}") for i in range(2)]
    # the train harvest is taken over once, from the chunk the killed one had reached
    assert [h for hs in done for h in hs if h[0] == "train"] == [("train", n_train - STALL * BATCH)]
    assert len([h for hs in done for h in hs if h[0] == "val"]) == 1
    assert_same_cache(one, load_config(None, args))


class _Tokenizer:
    bos_token_id, all_special_ids = 0, [0]

    def __len__(self):
        return 50

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


class _Model:
    tokenizer = _Tokenizer()
    W_U = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))


def test_atlas_rebuilt_while_readers_query_it(tmp_path):
    cfg = TrainConfig(hookpoints=[HOOK], out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), ctx_len=32)
    run = Run.create(cfg)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (40, 32), generator=g)
    ctx, pos = torch.ones_like(tokens, dtype=torch.bool).nonzero(as_tuple=True)
    chunk = {HOOK: torch.rand(len(ctx), 8, generator=g), "_context": ctx, "_position": pos, "_token": tokens.flatten()}
    build_cache(cache_path(cfg, "train"), iter([chunk]), {"model": cfg.model})
    SAE(SAEConfig(d_in=8, n_latents=16, k=4, hookpoint=HOOK)).save(run.path / HOOK)
    path = build_atlas(run, tokens=600, model=_Model())
    stop, errors, seen = threading.Event(), [], []

    def read():  # what `saekit atlas query` and the server do: open, query, close
        while not stop.is_set():
            try:
                atlas = Atlas.open(path)
                assert len(atlas.features()) == 16 and atlas.card(3).latent == 3
                seen.append(atlas.meta["tokens"])
                atlas.db.close()
            except Exception as e:  # noqa: BLE001  (any failure of a reader is the test's finding)
                errors.append(e)

    held = Atlas.open(path)  # a reader that keeps its connection over every rebuild
    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    for i in range(4):  # rebuilt on other token counts: readers see the old atlas or the new one
        build_atlas(run, tokens=600 + 100 * (i % 2 + 1), model=_Model())
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    assert {600, 700, 800} <= set(seen)
    assert held.meta["tokens"] == 600 and len(held.features()) == 16 and held.card(5).latent == 5


def test_model_cache_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEKIT_CACHE", str(tmp_path))
    writes = []

    def dequantise(out):  # slow enough that every caller arrives while it runs
        writes.append(out)
        time.sleep(0.5)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(lm, "_dequantise", dequantise)
    got = []
    threads = [threading.Thread(target=lambda: got.append(lm._offline_default())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writes) == 1 and got == [tmp_path / "models" / lm.DEFAULT_MODEL] * 3


def test_lock_names_its_holder_and_passes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(locks, "POLL_S", 0.05)
    a, b = FileLock(tmp_path / "x.lock", "x is being written"), FileLock(tmp_path / "x.lock", "x is being written")
    assert a.acquire(timeout=0)
    t0 = time.monotonic()
    assert not b.acquire(timeout=0.3) and time.monotonic() - t0 >= 0.3
    line = capsys.readouterr().err
    assert re.fullmatch(rf"saekit: x is being written by {os.getpid()}@{re.escape(socket.gethostname())} since "
                        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC; waiting for it\n", line)
    b.release()  # one not taken leaves the holder's line alone
    assert str(os.getpid()) in (tmp_path / "x.lock").read_text()
    a.release()
    assert (tmp_path / "x.lock").read_text() == ""
    c = FileLock(tmp_path / "x.lock", "x")
    with b:
        assert not c.acquire(timeout=0)
    assert c.acquire(timeout=0)
    c.release()


def test_lock_refused_by_the_file_system_warns_and_goes_on(tmp_path, capsys, monkeypatch):
    import errno

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", refuse)
    assert FileLock(tmp_path / "x.lock", "x").acquire()
    assert "not kept apart" in capsys.readouterr().err
