"""`activations: stream`: batches forwarded from the model as training runs. Every epoch is the
training rows once, shuffled across contexts; a resume continues with exactly the batches it had not
seen, re-forwarding one buffer; memory holds a buffer, whatever n_tokens; the held-out contexts never
enter the stream; a SIGKILLed run resumes to the uninterrupted SAE bit for bit; two processes forward
disjoint contexts and train the SAE one process trains."""

import os
import random
from itertools import islice

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import free_port
from test_kill import HOOK, logged_step, meta, resume, train_then_kill
from torch.utils._python_dispatch import TorchDispatchMode

from saekit import cli, data, pipeline
from saekit import model as lm
from saekit.config import load_config
from saekit.sae import SAE
from saekit.stream import StreamedBatches

CTX, N_CTX, B = 16, 120, 64


def fake_contexts():
    """N_CTX contexts whose token ids name them (context * CTX + position); a few masked positions each."""
    g = torch.Generator().manual_seed(0)
    for c in range(N_CTX):
        mask = torch.rand(CTX, generator=g) > 0.2
        mask[0] = False  # BOS
        yield torch.arange(c * CTX, (c + 1) * CTX), mask


def fake_stream(n_tokens: int, seed: int = 0, buffer_tokens: int = 300, log: list | None = None) -> StreamedBatches:
    """Rows are their token ids: hookpoint "x" the id, "y" twice it (the same row at two hookpoints)."""
    def forward(tokens, mask):
        if log is not None:
            log.extend((tokens[:, 0] // CTX).tolist())
        ids = tokens[mask].float()[:, None]
        return {"x": ids, "y": 2 * ids}

    return StreamedBatches(fake_contexts, forward, ["x", "y"], n_tokens, B, seed, buffer_tokens, chunk=3)


def n_rows() -> int:
    return sum(int(m.sum()) for _, m in fake_contexts())


def ids(batches) -> list[torch.Tensor]:
    return [b["x"][:, 0].long() for b in batches]


def test_an_epoch_is_every_row_once_shuffled_across_buffers_and_a_pure_function_of_the_seed():
    total = n_rows()
    stream = fake_stream(total)
    assert stream.steps_per_epoch == total // B
    batches = list(stream.batches(0, 2))
    assert len(batches) == 2 * stream.steps_per_epoch and not stream.ended
    assert all(torch.equal(b["y"], 2 * b["x"]) for b in batches)  # hookpoints stay row-aligned
    kept = torch.cat([t[m] for t, m in fake_contexts()])
    for epoch in range(2):
        rows = torch.cat(ids(batches[epoch * stream.steps_per_epoch : (epoch + 1) * stream.steps_per_epoch]))
        assert len(rows.unique()) == len(rows) == stream.steps_per_epoch * B  # no row twice
        assert torch.isin(rows, kept).all()  # only kept positions, never a masked one
        assert len(kept) - len(rows) < B  # all but the epoch's remainder
    first = ids(batches)[0]
    assert (first // CTX).unique().numel() > 10  # a batch mixes many contexts
    assert not torch.equal(ids(batches)[0], ids(batches)[stream.steps_per_epoch])  # epochs differ in order
    again = ids(fake_stream(total).batches(0, 2))
    assert all(torch.equal(a, b) for a, b in zip(ids(batches), again, strict=True))
    other = ids(fake_stream(total, seed=1).batches(0, 1))
    assert not torch.equal(other[0], ids(batches)[0])


def test_resume_at_any_step_continues_with_the_unseen_batches_and_reforwards_one_buffer():
    total = n_rows()
    log: list[int] = []
    full, forwarded = [], []  # forwarded[s]: how many contexts were forwarded when batch s was given
    for b in fake_stream(total, log=log).batches(0, 2):
        full.append(b["x"][:, 0].long())
        forwarded.append(len(log))
    per_epoch = len(full) // 2
    buffer_contexts = max(len(c) for c in _buffers(fake_stream(total)))
    for s in range(1, len(full)):
        epoch = s // per_epoch
        rest = ids(fake_stream(total).batches(s, 2))
        assert len(rest) == len(full) - s and all(torch.equal(a, b) for a, b in zip(rest, full[s:], strict=True))
        log2: list[int] = []
        list(fake_stream(total, log=log2).batches(s, epoch + 1))  # the rest of the epoch it was killed in
        seen = log[forwarded[epoch * per_epoch - 1] if epoch else 0 : forwarded[s - 1]]  # that epoch's, before
        again = set(log2) & set(seen)  # forwarded again: contexts of one buffer at most, in one run
        assert len(again) <= buffer_contexts and (not again or max(again) - min(again) < len(again)), (s, again)


def _buffers(stream):
    for tokens, _ in stream._buffers():
        yield (tokens[:, 0] // CTX).tolist()


def test_memory_holds_one_buffer_whatever_n_tokens_and_the_corpus_end_stops_the_run(capsys):
    pulled, sizes = [], []

    def contexts():
        for c in fake_contexts():
            pulled.append(1)
            yield c

    def forward(tokens, mask):
        sizes.append((len(tokens), int(mask.sum())))
        return {"x": tokens[mask].float()[:, None]}

    stream = StreamedBatches(contexts, forward, ["x"], n_rows(), B, 0, 200, chunk=100)
    for _ in stream.batches(0, 1):
        assert len(pulled) - sum(n for n, _ in sizes) <= 1  # contexts are read as a buffer needs them
    assert max(rows for _, rows in sizes) < 200 + CTX  # a buffer is its rows plus at most one context
    long = fake_stream(10 * n_rows())
    got = list(long.batches(0, 3))
    assert long.ended and len(got) == n_rows() // B  # one epoch of what there is, then the run stops
    err = capsys.readouterr().err
    assert "the corpus ended after" in err and f"stops at step {len(got)} of epoch 1" in err


class BigTensors(TorchDispatchMode):
    """Records the op of every activation-row tensor (2-D) of more than `rows` rows made while active."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows, self.ops = rows, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() == 2 and len(out) > self.rows:
            self.ops.append(func.__name__)
        return out


def test_a_buffer_is_held_once_batches_are_gathered_from_it():
    buffers = _buffers(fake_stream(n_rows(), buffer_tokens=1000))
    with BigTensors(2 * B) as big:  # buffers of ~500 rows, batches of 64, chunks of 3 contexts (~40 rows)
        n = len(list(fake_stream(n_rows(), buffer_tokens=1000).batches(0, 1)))
    assert n == n_rows() // B
    assert big.ops == ["new_empty.default"] * 2 * len(list(buffers))  # one tensor per hookpoint and buffer, no copy


def test_the_init_sample_reads_only_contexts_the_run_trains_on():
    n_tokens = 5 * B  # far fewer rows than the sample asks for
    trained: list[int] = []
    list(fake_stream(n_tokens, log=trained).batches(0, 1))
    for seed in (None, 3):
        read: list[int] = []
        sample = fake_stream(n_tokens, log=read).sample(16_384, seed)
        assert read and set(read) <= set(trained), (seed, sorted(set(read) - set(trained)))
        assert len(sample["x"]) <= sum(int(m.sum()) for _, m in islice(fake_contexts(), len(set(trained))))


def test_held_out_contexts_are_the_streams_first_and_never_enter_training(smollm2, tiny):
    cfg = load_config(None, [*tiny, "--activations", "stream"])
    val, _ = pipeline.contexts(cfg, smollm2.tokenizer)["val"]
    stream = pipeline.stream_batches(cfg, smollm2, [HOOK], len(val))
    train = torch.stack([t for t, _ in islice(stream.contexts(), 300)])
    order = torch.stack([t for t, _ in islice(data.iter_contexts(data.load_texts(cfg.dataset), smollm2.tokenizer,
                                                                 cfg.ctx_len, cfg.data_seed), len(val) + 300)])
    assert torch.equal(torch.cat([val, train]), order)  # the held-out first, then the rest, in the seeded order
    assert not (val[:, None] == train[None]).all(-1).any()  # no held-out context is a training one
    other = load_config(None, [*tiny, "--activations", "stream", "--data_seed", "1"])
    assert not torch.equal(pipeline.contexts(other, smollm2.tokenizer)["val"][0][: len(val)], val)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_streaming_run(tiny, smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("SAEKIT_ENCODER", "fp32")  # no per-process timing decision in the encoder
    # four buffers per epoch: kills land inside buffers, after the first, so a resume skips some
    args = [*tiny, "--activations", "stream", "--buffer_tokens", "1500", "--checkpoint_every", "1", "--quiet"]
    monkeypatch.setattr(lm, "load_model", lambda *a, **k: smollm2)  # the reference run evaluates in-process
    assert cli.main(["train", *args, "--out", str(tmp_path / "ref")]) == 0
    total = logged_step(tmp_path / "ref")
    assert total == 2 * (6000 // 500)

    out = tmp_path / "cut"
    rng = random.Random(0)
    kills = 0
    for target in [0, 5, total // 2 + 3]:  # start-up, mid first epoch, mid second epoch
        kills += train_then_kill(args, out, target, rng.uniform(0, 0.2) if target else 3)
    done = resume(args, out)  # the last kill was mid-epoch 2
    assert done.returncode == 0, done.stderr
    assert kills == 3
    assert "saekit: resuming" in done.stderr
    assert "forwards the model over the 6,000 training tokens again" in done.stderr

    a, b = SAE.load(tmp_path / "ref" / HOOK), SAE.load(out / HOOK)
    for n, p in a.named_parameters():
        assert torch.equal(getattr(b, n), p), n
    assert meta(out)["tokens"] == meta(tmp_path / "ref")["tokens"] == total * 500
    assert (out / "eval.json").is_file()


def _stream_worker(rank: int, world: int, args: list[str], ports: list[int], outs: str) -> None:
    """`saekit train` in the environment torchrun gives its processes; saves the contexts this
    process forwarded, per buffer (and the number in the buffer), and the CLI's exit codes."""
    torch.set_num_threads(1)
    os.environ |= {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ports[0])}
    forwarded, real = [], StreamedBatches._rows

    def rows(self, tokens, mask):
        lo, hi = len(tokens) * rank // world, len(tokens) * (rank + 1) // world
        forwarded.append((len(tokens), [tuple(t) for t in tokens[lo:hi].tolist()]))
        return real(self, tokens, mask)

    StreamedBatches._rows = rows
    codes = [cli.main(["train", *args, "--quiet"])]
    os.environ["MASTER_PORT"] = str(ports[1])
    codes.append(cli.main(["train", *args[:-2], "--out", args[-1] + "_sh", "--shard_hookpoints", "true", "--quiet"]))
    torch.save({"forwarded": forwarded, "codes": codes}, f"{outs}.{rank}")


def test_two_processes_stream_disjoint_contexts_and_train_what_one_does(tiny, tmp_path, capsys):
    args = [*tiny, "--activations", "stream", "--epochs", "1", "--buffer_tokens", "2000", "--out", str(tmp_path / "dp")]
    outs = str(tmp_path / "forwarded")
    mp.spawn(_stream_worker, args=(2, args, [free_port(), free_port()], outs), nprocs=2, join=True)
    got = [torch.load(f"{outs}.{r}") for r in range(2)]
    assert [g["codes"] for g in got] == [[0, 2], [0, 2]]  # trained; sharded hookpoints refused
    calls = list(zip(got[0]["forwarded"], got[1]["forwarded"], strict=True))  # the sample, then each buffer
    assert len(calls) > 2
    for (n, a), (_, b) in calls:  # each process forwarded its own share of the contexts, together all of them
        assert a and b and len(a) + len(b) == n and not set(a) & set(b)

    assert cli.main(["train", *args[:-2], "--out", str(tmp_path / "one"), "--quiet"]) == 0
    a, b = SAE.load(tmp_path / "one" / HOOK), SAE.load(tmp_path / "dp" / HOOK)
    for n, p in a.named_parameters():  # the tolerance of the cached torchrun test (tests/test_distributed.py)
        torch.testing.assert_close(p, getattr(b, n), rtol=1e-4, atol=1e-5, msg=n)


def test_a_streamed_run_names_the_split_it_has_when_asked_for_its_training_activations(tmp_path):
    from saekit.config import TrainConfig, make_config
    from saekit.errors import SaekitError
    from saekit.run import Run

    cfg = make_config(TrainConfig, {"activations": "stream", "out": str(tmp_path / "r"), "cache_dir": str(tmp_path)})
    with pytest.raises(SaekitError, match="activations: stream.*--split val"):
        Run.create(cfg).cache("train")
