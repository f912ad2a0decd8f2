"""Streaming activations: the model forwards training contexts as the run goes, so neither tokens
nor activations grow in memory or on disk with `n_tokens`.

Contexts come in a fixed order (a pure function of `data_seed`, see `saekit.data.iter_contexts`).
Consecutive contexts are grouped into buffers of at least `buffer_tokens` activation rows, counted
over all hookpoints; a buffer's rows are forwarded, shuffled together by a generator of (seed,
epoch, buffer) and cut into batches, the remainder carried into the next buffer. Batch s of an epoch
is therefore rows [s*B, (s+1)*B) of the epoch's concatenated buffers, as in
`saekit.activations.ShuffledBatches`, and a resumed run re-forwards only the buffer it stopped in
(the text before it is tokenised again, not forwarded). In a process group every process forwards
its own contiguous share of each buffer's contexts and the rows are gathered, so every process
holds the global batches one process would have.
"""

import sys
from collections.abc import Callable, Iterator

import torch

from saekit import distributed as dist
from saekit.errors import SaekitError

Contexts = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]  # a fresh (tokens [ctx], mask [ctx]) iterator
Forward = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]  # (tokens, mask) [n, ctx] -> rows


class StreamedBatches:
    """Fixed-size batches of activations forwarded from `contexts` (the training split, held-out
    contexts already left out) by `forward`, for `n_tokens` rows per epoch; resumable at any step.

    `forward(tokens, mask)` returns `{hookpoint: [n_kept, d]}` for a few contexts; it is called on
    `chunk` contexts at a time. An epoch that the corpus ends before `n_tokens // batch_size` steps
    ends the run there, with a line that says so."""

    def __init__(self, contexts: Contexts, forward: Forward, hookpoints: list[str], n_tokens: int,
                 batch_size: int, seed: int, buffer_tokens: int, chunk: int):
        self.contexts, self.forward, self.hookpoints = contexts, forward, hookpoints
        self.n_tokens, self.B, self.seed, self.chunk = n_tokens, batch_size, seed, chunk
        self.rows_per_buffer = max(1, buffer_tokens // len(hookpoints))
        self.steps_per_epoch = n_tokens // batch_size
        if self.steps_per_epoch == 0:
            raise SaekitError(f"n_tokens {n_tokens} is fewer than one batch of {batch_size}")
        self.ended = False  # the corpus ended before an epoch's n_tokens

    def _buffers(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's buffers of contexts (tokens, mask) `[n, ctx]`, until `n_tokens` kept positions."""
        toks, masks, n_buf, n_all = [], [], 0, 0
        for t, m in self.contexts():
            if n_all >= self.n_tokens:
                break
            toks.append(t)
            masks.append(m)
            kept = int(m.sum())
            n_buf, n_all = n_buf + kept, n_all + kept
            if n_buf >= self.rows_per_buffer:
                yield torch.stack(toks), torch.stack(masks)
                toks, masks, n_buf = [], [], 0
        if toks:
            yield torch.stack(toks), torch.stack(masks)

    def _rows(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The activation rows of a buffer's contexts, in context order; each process forwards its share,
        `chunk` contexts at a time, written into one tensor per hookpoint (a buffer is held once)."""
        lo, hi = len(tokens) * dist.rank() // dist.world(), len(tokens) * (dist.rank() + 1) // dist.world()
        mine: dict[str, torch.Tensor | None] = dict.fromkeys(self.hookpoints)
        at = 0
        for s in range(lo, hi, self.chunk):
            part = self.forward(tokens[s : min(s + self.chunk, hi)], mask[s : min(s + self.chunk, hi)])
            for h in self.hookpoints:
                t = part[h]
                if mine[h] is None:
                    mine[h] = t.new_empty((int(mask[lo:hi].sum()), *t.shape[1:]))
                mine[h][at : at + len(t)] = t
            at += len(part[self.hookpoints[0]])
        if not dist.active():
            return mine
        n = int(mask.sum())
        return {h: dist.all_gather_rows(t, n) for h, t in mine.items()}

    def sample(self, n: int, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The first `n` rows of the stream (what a run initialises from), or with `seed` `n` rows
        that the seed draws from its first `4 n` (so two seeds of `init: data` start on different rows);
        never rows past the epoch's `n_tokens`, which the run does not train on."""
        want = min(n if seed is None else 4 * n, self.n_tokens)
        got, n_got = [], 0
        for t, m in self.contexts():
            if n_got >= want:
                break
            got.append((t, m))
            n_got += int(m.sum())
        rows = self._rows(torch.stack([t for t, _ in got]), torch.stack([m for _, m in got]))
        if seed is None:
            return {h: r[:n] for h, r in rows.items()}
        pick = torch.randperm(n_got, generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return {h: r[pick] for h, r in rows.items()}

    def _epoch(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of one epoch from batch index `start` on."""
        skip = start * self.B  # rows of this epoch already trained on
        offset, emitted = 0, start
        carry: dict[str, torch.Tensor] | None = None  # the previous buffer's rows after its last full batch
        for j, (tokens, mask) in enumerate(self._buffers()):
            if emitted >= self.steps_per_epoch:
                return
            n = int(mask.sum())
            if offset + n <= skip:  # trained on before a resume: tokenised again, not forwarded
                offset += n
                continue
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + j)
            keep = torch.randperm(n, generator=g)[max(0, skip - offset) :]
            rows = self._rows(tokens, mask)
            offset += n
            # batches are rows of carry + rows[keep], gathered one batch at a time (no shuffled copy of the buffer)
            c = len(carry[self.hookpoints[0]]) if carry is not None else 0
            n_full = (c + len(keep)) // self.B
            for b in range(min(n_full, self.steps_per_epoch - emitted)):
                lo, hi = b * self.B - c, (b + 1) * self.B - c  # positions in keep
                if lo < 0:
                    yield {h: torch.cat([carry[h], rows[h][keep[:hi]]]) for h in self.hookpoints}
                else:
                    yield {h: rows[h][keep[lo:hi]] for h in self.hookpoints}
                emitted += 1
            tail = n_full * self.B - c
            carry = {h: rows[h][keep[tail:]] if tail >= 0 else torch.cat([carry[h], rows[h][keep]])
                     for h in self.hookpoints}
            del rows
        if emitted < self.steps_per_epoch:
            self.ended = True
            if dist.is_main():
                print(f"saekit: the corpus ended after {offset:,} training tokens, before n_tokens={self.n_tokens:,}: "
                      f"the run stops at step {epoch * self.steps_per_epoch + emitted} of epoch {epoch + 1} "
                      "(lower n_tokens to train on fewer tokens with the full learning-rate schedule)",
                      file=sys.stderr)

    def batches(self, start_step: int = 0, epochs: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """All batches from global step `start_step` to the end of `epochs` epochs (or of the corpus)."""
        for epoch in range(start_step // self.steps_per_epoch, epochs):
            yield from self._epoch(epoch, max(0, start_step - epoch * self.steps_per_epoch))
            if self.ended:
                return
