"""An SAE's sparse codes on a set of tokens: streamed batch by batch (`encode_batches`) or held
in memory (`encode_all` -> `Codes`, 12 bytes per token and code slot) for the analyses that
read them more than once (matching, geometry). Never a dense [tokens, latents] matrix."""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse as sp
from tqdm.auto import tqdm

from saekit.activations import Activations, batches
from saekit.errors import SaekitError
from saekit.kernels import cat_padded
from saekit.sae import SAE, SparseCode

BATCH = 4096


@torch.no_grad()
def encode_batches(sae: SAE, activations: Activations, max_tokens: int | None = None,
                   batch_size: int = BATCH, progress: str | None = None, total: int | None = None
                   ) -> Iterator[SparseCode]:
    """`sae`'s codes of `activations` (a tensor or a stream of batches), batch by batch, on CPU;
    with `progress`, a progress bar of that name over `total` tokens."""
    with tqdm(total=total, disable=progress is None, desc=progress, unit="tok", unit_scale=True) as bar:
        for x in batches(activations, sae.d_in, batch_size, max_tokens):
            vals, idx = sae.encode(x.to(sae.W_enc.device))
            bar.update(len(x))
            yield SparseCode(vals.float().cpu(), idx.cpu())


@dataclass
class Codes:
    """The sparse codes of one SAE on N tokens: row t holds token t's active latents.
    Iterating gives `(values, indices)` batches in token order."""

    values: torch.Tensor  # [N, k] float32, 0 = padding
    indices: torch.Tensor  # [N, k] int64
    n_latents: int

    @property
    def n_tokens(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[SparseCode]:
        for s in range(0, self.n_tokens, BATCH):
            yield SparseCode(self.values[s : s + BATCH], self.indices[s : s + BATCH])

    def csr(self) -> sp.csr_matrix:
        """The [N, n_latents] scipy sparse matrix of the codes."""
        keep = (self.values > 0).flatten().numpy()
        rows = np.repeat(np.arange(self.n_tokens), self.values.shape[1])[keep]
        cols = self.indices.flatten().numpy()[keep]
        return sp.csr_matrix((self.values.flatten().double().numpy()[keep], (rows, cols)),
                             shape=(self.n_tokens, self.n_latents))

    def fires(self) -> sp.csr_matrix:
        """[N, n_latents] boolean firing pattern."""
        return self.csr() > 0

    def _sum(self, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.n_latents, dtype=torch.float64).index_add_(0, self.indices.flatten(),
                                                                           v.flatten().double())

    def counts(self) -> torch.Tensor:
        """Tokens each latent fires on."""
        return self._sum(self.values > 0)

    def mean_active(self) -> torch.Tensor:
        """Each latent's mean value over the tokens it fires on (0 if it never fires)."""
        return (self._sum(self.values) / self.counts().clamp_min(1)).float()

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-latent mean and standard deviation over all N tokens (zeros included)."""
        mu = self._sum(self.values) / self.n_tokens
        var = self._sum(self.values.double() ** 2) / self.n_tokens - mu**2
        return mu.numpy(), var.clamp_min(0).sqrt().numpy()


def encode_all(sae: SAE, activations: Activations, max_tokens: int | None = None, batch_size: int = BATCH,
               progress: str | None = None, total: int | None = None) -> Codes:
    """`sae`'s codes on every row of `activations`, held as one `Codes` (progress: as `encode_batches`)."""
    blocks = list(encode_batches(sae, activations, max_tokens, batch_size, progress, total))
    if not blocks:
        raise SaekitError("no activations to encode: the activation stream is empty")
    return Codes(*cat_padded(blocks), sae.n_latents)  # BatchTopK rows have different widths
