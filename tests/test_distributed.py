"""Several processes over gloo on the CPU: data-parallel training equals one process on the same
global batches; an activation cache harvested by two equals one process's and is read by any number."""

import contextlib
import os
import socket
import threading
import time

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from saekit import distributed as dist
from saekit import model as lm
from saekit import pipeline
from saekit.activations import ActivationCache, ShuffledBatches, build_cache, cache_path
from saekit.config import TrainConfig, load_config, make_config
from saekit.lock import FileLock
from saekit.run import Run
from saekit.trainer import Trainer, fit

D, N_TOKENS, BATCH = 16, 3000, 240


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(48, D, generator=g)
    on = torch.rand(N_TOKENS, 48, generator=g) < 3 / 48
    return (on * (torch.rand(N_TOKENS, 48, generator=g) + 0.5)) @ feats + 1.0


def config(arch: str, out: str = "unused") -> TrainConfig:
    # dead_tokens small enough for AuxK to run; the OrtSAE penalty on: every loss term is covered
    return make_config(TrainConfig, {"n_latents": 64, "k": 4, "hookpoints": ["x"], "architecture": arch,
                                     "batch_size": BATCH, "dead_tokens": 480, "ortho_penalty": 0.1, "lr": 3e-3,
                                     "warmup_steps": 2, "out": out, "seed": 3})


def batch(x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """The global batch of `step`: a pure function of the step."""
    g = torch.Generator().manual_seed(step)
    return {"x": x[torch.randperm(len(x), generator=g)[:BATCH]]}


def train(arch: str, steps: range, total: int, out: str, resume: bool) -> dict[str, torch.Tensor]:
    """Train `steps` of a run of `total` steps (from the state at `out` if `resume`); save it there."""
    x = data()
    cfg = config(arch, out)
    tr = Trainer(cfg, {"x": D}, {"x": x[:1000]}, total, torch.device("cpu"))
    if resume:
        tr.load(Run.open(out))
    assert tr.step == steps.start
    for s in steps:
        tr.train_step(batch(x, s))
    if dist.is_main():
        tr.save(Run.open(out) if resume else Run.create(cfg))
    dist.barrier()
    return {"tokens": torch.tensor(tr.tokens), "threshold": torch.tensor(tr.saes["x"].cfg.threshold or 0.0),
            **{n: p.detach().clone() for n, p in tr.saes["x"].named_parameters()},
            **{f"stats/{n}": t.clone() for n, t in tr.stats["x"].items()}}


def _worker(rank: int, world: int, port: int, job, args, outs: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(job(*args), f"{outs}.{rank}")
    finally:
        tdist.destroy_process_group()


def spawn(job, args, tmp_path, world: int = 2) -> list:
    """`job(*args)` in `world` processes joined in a gloo group; every process's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = str(tmp_path / "result")
    mp.spawn(_worker, args=(world, port, job, args, outs), nprocs=world, join=True)
    return [torch.load(f"{outs}.{r}") for r in range(world)]


def assert_same(a: dict, b: dict) -> None:
    for key in a:
        if isinstance(a[key], dict):
            assert_same(a[key], b[key])
            continue
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def train_with_nan() -> dict[str, torch.Tensor]:
    """4 steps, the second batch holding a NaN in its first row only (the first process's slice)."""
    x = data()
    cfg = make_config(TrainConfig, {**vars(config("topk")), "on_nonfinite": "skip"})
    tr = Trainer(cfg, {"x": D}, {"x": x[:1000]}, 4, torch.device("cpu"))
    for s in range(4):
        b = batch(x, s)
        if s == 1:
            b["x"][0, 0] = float("nan")
        tr.train_step(b)
    params = {n: p.detach().clone() for n, p in tr.saes["x"].named_parameters()}
    return {"skipped": torch.tensor(tr.skipped), "tokens": torch.tensor(tr.tokens), **params}


def _fit_job():
    sae = fit(data(), n_latents=64, k=4, batch_size=BATCH, epochs=1, lr=3e-3, seed=2)
    return dict(sae.named_parameters())


def _two_process_jobs(root: str, total: int) -> dict:
    """Everything the test runs in two processes, in one spawn (each spawn costs seconds)."""
    out = {"fit": _fit_job(), "nan": train_with_nan()}
    for arch in ARCHS:
        out[arch] = train(arch, range(total), total, f"{root}/two-{arch}", False)
        train(arch, range(3), total, f"{root}/a-{arch}", False)  # stopped after 3 steps
        out[f"{arch}-resumed"] = train(arch, range(5, total), total, f"{root}/b-{arch}", True)
    return out


ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu", "mp")


def test_two_processes_equal_one_and_resume_across_world_sizes(tmp_path):
    total = 8
    one = {arch: train(arch, range(total), total, str(tmp_path / f"one-{arch}"), False) for arch in ARCHS}
    assert one["batchtopk"]["stats/threshold_ema"][1] > 0  # the threshold's EMA ran
    for arch in ARCHS:  # one process stops after 5 steps; two resume it
        train(arch, range(5), total, str(tmp_path / f"b-{arch}"), False)
    two = spawn(_two_process_jobs, (str(tmp_path), total), tmp_path)
    assert_same(two[0], two[1])  # the processes agree on everything
    assert_same(_fit_job(), two[0]["fit"])  # fit() in a process group is data parallel
    nan = train_with_nan()  # a NaN in one process's slice skips the step in every process
    assert int(nan["skipped"]) == int(two[1]["nan"]["skipped"]) == 1 and int(nan["tokens"]) == 3 * BATCH
    assert_same(nan, two[0]["nan"])
    for arch in ARCHS:
        assert_same(one[arch], two[0][arch])  # two processes equal one on the same global batches
        assert int(two[0][arch]["tokens"]) == total * BATCH
        assert_same(one[arch], two[0][f"{arch}-resumed"])  # 1 -> 2 processes
        assert int(two[0][f"{arch}-resumed"]["tokens"]) == total * BATCH
        # 2 -> 1 process
        assert_same(one[arch], train(arch, range(3, total), total, str(tmp_path / f"a-{arch}"), True))



HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_worker(rank: int, world: int, runs: list[list[str]], outs: str) -> None:
    """`saekit train` once per argument list, in the environment torchrun gives its processes;
    saves the hookpoints this process trained, per run."""
    import os

    from saekit import cli

    torch.set_num_threads(1)
    trained = []
    real_init = Trainer.__init__

    def init(self, cfg, dims, *args, **kw):
        trained[-1] += list(dims)
        real_init(self, cfg, dims, *args, **kw)

    Trainer.__init__ = init
    for args, port in runs:
        os.environ |= {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        trained.append([])
        assert cli.main(["train", *args, "--quiet"]) == 0
    torch.save(trained, f"{outs}.{rank}")


def test_saekit_train_under_torchrun_data_parallel_and_sharded_hookpoints(tiny, tmp_path):
    from saekit import cli
    from saekit.sae import SAE

    short = [*tiny, "--epochs", "1"]
    sharded = [*short, "--n_tokens", "3000", "--hookpoints", f"[{', '.join(HOOKS)}]", "--shard_hookpoints", "true"]
    runs = [([*short, "--out", str(tmp_path / "dp")], free_port()),
            ([*sharded, "--out", str(tmp_path / "sh")], free_port())]
    outs = str(tmp_path / "trained")
    mp.spawn(_torchrun_worker, args=(2, runs, outs), nprocs=2, join=True)
    trained = [torch.load(f"{outs}.{r}") for r in range(2)]
    assert trained[0][0] == trained[1][0] == [HOOKS[1]]  # data parallel: both train the one SAE
    assert sorted(trained[0][1] + trained[1][1]) == HOOKS  # sharded: each hookpoint exactly once

    assert cli.main(["train", *short, "--out", str(tmp_path / "one"), "--quiet"]) == 0
    a, b = SAE.load(tmp_path / "one" / HOOKS[1]), SAE.load(tmp_path / "dp" / HOOKS[1])
    for n, p in a.named_parameters():
        torch.testing.assert_close(p, getattr(b, n), rtol=1e-4, atol=1e-5, msg=n)
    for run in ("dp", "sh"):
        assert (tmp_path / run / "eval.json").is_file()
    state = Run.open(tmp_path / "sh")
    tensors, meta = state.load_state()
    assert all(f"{h}/param/W_dec" in tensors for h in HOOKS) and set(meta["scales"]) == set(HOOKS)
    assert all((tmp_path / "sh" / h).is_dir() for h in HOOKS)
    metrics = (tmp_path / "sh" / "metrics.jsonl").read_text().splitlines()
    assert all(h in line for h in HOOKS for line in metrics)


def _harvest_job(args: list[str]) -> dict:
    """Both caches harvested by the process group; then the train cache's manifest and the second
    process's part are lost (killed before its first shard) and the harvest rerun: what each harvests."""
    cfg = load_config(None, args)
    model, ctx, caches = pipeline.prepare(cfg, quiet=True)
    dist.barrier()
    if dist.is_main():
        for name in ("manifest.json", "part_r1.json"):
            (caches["train"].path / name).unlink()
    dist.barrier()
    harvested, real = [], lm.harvest
    lm.harvest = lambda model, tokens, *a, **k: harvested.append(len(tokens)) or real(model, tokens, *a, **k)
    pipeline.activation_cache(cfg, model, "train", *ctx["train"], quiet=True)
    return {"harvested": harvested}


def _read_job(path: str, batch_size: int) -> dict:
    """The rows this process trains on over an epoch (its slice of every global batch), and the
    per-row sums of their activations."""
    cache = ActivationCache.open(path)
    batches = ShuffledBatches(cache, [HOOKS[1], "_context", "_position"], batch_size, 0, 2000)
    parts = [{k: dist.shard(t) for k, t in b.items()} for b in batches.batches()]
    return {"rows": torch.cat([torch.stack([p["_context"], p["_position"]], 1) for p in parts]),
            "sums": torch.cat([p[HOOKS[1]].sum(1) for p in parts])}


def test_cache_harvested_by_two_processes_equals_one_and_is_read_by_any_number(tiny, tmp_path):
    args = [*tiny, "--n_tokens", "2000", "--val_tokens", "300"]
    one = pipeline.prepare(load_config(None, [*args, "--cache_dir", str(tmp_path / "one")]), quiet=True)[2]
    two_args = [*args, "--cache_dir", str(tmp_path / "two")]
    harvested = [r["harvested"] for r in spawn(_harvest_job, (two_args,), tmp_path)]
    n_contexts = one["train"].manifest["n_contexts"]
    assert harvested == [[0], [n_contexts - n_contexts // 2]]  # only the lost part is harvested again
    two = pipeline.finished_caches(load_config(None, two_args))
    for split in ("train", "val"):
        a, b = one[split], two[split]
        assert {s["file"].split("_")[1] for s in b.manifest["shards"]} == {"r0", "r1"}
        rows_a, rows_b = a.rows(), b.rows()
        assert all(torch.equal(rows_a[k], rows_b[k]) for k in rows_a)
        torch.testing.assert_close(a.tensor(HOOKS[1]), b.tensor(HOOKS[1]), rtol=1e-4, atol=1e-4)

    cache, n = two["train"], two["train"].n_tokens
    batch_size = next(size for size in range(n // 8, n + 1) if n % size == 0)  # an epoch drops no rows
    rows = cache.rows()
    index = {(int(c), int(p)): i for i, (c, p) in enumerate(zip(rows["_context"], rows["_position"], strict=True))}
    sums = cache.tensor(HOOKS[1]).sum(1)
    for world in (1, 3):
        parts = [_read_job(str(cache.path), batch_size)] if world == 1 else \
            spawn(_read_job, (str(cache.path), batch_size), tmp_path, world)
        got = torch.cat([p["rows"] for p in parts])
        ids = torch.tensor([index[(int(c), int(p))] for c, p in got])
        assert sorted(ids.tolist()) == list(range(n))  # every row of the cache once
        torch.testing.assert_close(torch.cat([p["sums"] for p in parts]), sums[ids])


def _waiting_job(args: list[str], log: str) -> dict:
    """Both caches of `args` prepared by the process group, rank 0's stderr in `log`: what each harvests."""
    harvested, real = [], lm.harvest
    lm.harvest = lambda model, tokens, *a, **k: harvested.append(len(tokens)) or real(model, tokens, *a, **k)
    with open(log, "w") as f, contextlib.redirect_stderr(f) if dist.is_main() else contextlib.nullcontext():
        pipeline.prepare(load_config(None, args), quiet=True)
    return {"harvested": harvested}


def test_process_group_waits_for_another_command_harvesting_its_cache(tiny, tmp_path):
    args = [*tiny, "--n_tokens", "2000", "--val_tokens", "300", "--cache_dir", str(tmp_path / "cache")]
    train = cache_path(load_config(None, args), "train")
    held = FileLock(train.with_name(train.name + ".lock"), "the test holds it")
    assert held.acquire(timeout=0)
    log, group_done = tmp_path / "rank0.err", threading.Event()

    def other_command():  # finishes the train cache once the group waits for it (in rounds of collectives)
        while "waiting for it" not in (log.read_text() if log.exists() else "") and not group_done.is_set():
            time.sleep(0.05)
        time.sleep(2 * pipeline.POLL_S)  # a few rounds
        build_cache(train, iter([{HOOKS[1]: torch.ones(5, 576)}]), {})
        held.release()

    thread = threading.Thread(target=other_command)
    thread.start()
    try:
        harvested = [r["harvested"] for r in spawn(_waiting_job, (args, str(log)), tmp_path)]
    finally:
        group_done.set()
        thread.join()
    assert f"being harvested by {os.getpid()}@" in log.read_text()
    n_val = ActivationCache.open(cache_path(load_config(None, args), "val")).manifest["n_contexts"]
    assert harvested == [[n_val // 2], [n_val - n_val // 2]]  # the val cache only: train was finished meanwhile
