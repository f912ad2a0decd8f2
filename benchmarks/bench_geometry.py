"""Feature-geometry analyses at a realistic size: a 16,384-latent SAE (d_in 576, k 32) with
planted structure, and 500k tokens of synthetic activations made from it, generated batch by
batch (a stream).

Planted: the first 15,944 latents in 3 topic pools (decoder rows near a pool centre; each 256-token
document draws its 8 features per token from one pool, so co-occurrence lobes = geometric lobes);
20 circles of 12 latents in random planes (a third of tokens also sit on one, radius 2, between
two neighbouring latents); 50 parallelograms a - b = c - d in the last 200 rows. The encoder is
tied (W_enc = W_dec), so the codes are the SAE's own, not the planted ones.

Timed separately: the SAE's sparse encoding of the stream (once, shared as codes), then
`geometry`, `lobes`, `multidim_features` (both from the shared codes) and `crystals`.

    python3 benchmarks/bench_geometry.py                   # 16384 x 576, 500k tokens
    python3 benchmarks/bench_geometry.py --tokens 100000    # quicker
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

from saekit import analyze
from saekit.codes import encode_all
from saekit.kernels import sparse_decode
from saekit.sae import SAE, SAEConfig

POOLS, DOC = 3, 256


def planted_sae(m: int, d: int, k: int, n_circles: int, n_par: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pool_end = m - n_circles * 12 - n_par * 4
    pool = torch.arange(pool_end) % POOLS
    centres = F.normalize(torch.randn(POOLS, d, generator=g), dim=1)
    W = F.normalize(torch.randn(m, d, generator=g), dim=1)
    W[:pool_end] = F.normalize(0.3 * centres[pool] + W[:pool_end], dim=1)  # cosine ~0.08 within a pool
    circles = torch.arange(pool_end, pool_end + n_circles * 12).view(n_circles, 12)
    phi = torch.arange(12) * 2 * math.pi / 12
    for c in circles:
        Q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g))
        W[c] = torch.cos(phi)[:, None] * Q[:, 0] + torch.sin(phi)[:, None] * Q[:, 1]
    base = pool_end + n_circles * 12
    for p in range(n_par):
        Q, _ = torch.linalg.qr(torch.randn(d, 3, generator=g))
        x, y, z = Q[:, 0] * math.sqrt(0.8), Q[:, 1] * math.sqrt(0.2), Q[:, 2] * math.sqrt(0.8)
        W[base + 4 * p : base + 4 * p + 4] = torch.stack([x + y, x - y, z + y, z - y])
    sae = SAE(SAEConfig(d_in=d, n_latents=m, k=k)).eval().requires_grad_(False)
    sae.W_dec.copy_(W)
    sae.W_enc.copy_(W)
    sae.b_enc.zero_()
    sae.b_dec.zero_()
    return sae, pool, circles


def stream(sae: SAE, pool: torch.Tensor, circles: torch.Tensor, tokens: int, per_token: int, batch: int,
           seed: int):
    """Batches of `batch` tokens (a multiple of DOC): each document's tokens draw `per_token`
    features from one pool; a third of tokens also sit on a random circle."""
    g = torch.Generator().manual_seed(seed + 1)
    members = [torch.nonzero(pool == p).squeeze(1) for p in range(POOLS)]
    step = 2 * math.pi / 12
    for s in range(0, tokens, batch):
        B = min(batch, tokens - s)
        topic = torch.randint(0, POOLS, (math.ceil(B / DOC),), generator=g).repeat_interleave(DOC)[:B]
        idx = torch.empty(B, per_token + 2, dtype=torch.long)
        for p in range(POOLS):
            rows = topic == p
            idx[rows, :per_token] = members[p][torch.randint(0, len(members[p]), (int(rows.sum()), per_token),
                                                             generator=g)]
        vals = 0.5 + torch.rand(B, per_token + 2, generator=g)
        c = circles[torch.randint(0, len(circles), (B,), generator=g)]
        theta = torch.rand(B, generator=g) * 2 * math.pi
        a = (theta / step).floor().long() % 12
        idx[:, per_token] = c.gather(1, a[:, None])[:, 0]
        idx[:, per_token + 1] = c.gather(1, ((a + 1) % 12)[:, None])[:, 0]
        on = torch.rand(B, generator=g) < 1 / 3
        vals[:, per_token] = 2 * on * torch.sin(a * step + step - theta) / math.sin(step)  # radius 2
        vals[:, per_token + 1] = 2 * on * torch.sin(theta - a * step) / math.sin(step)
        yield sparse_decode(vals, idx, sae.W_dec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latents", type=int, default=16_384)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=500_000)
    ap.add_argument("--per-token", type=int, default=8, help="pool features per token")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    sae, pool, circles = planted_sae(a.latents, a.d, a.k, 20, 50, a.seed)
    rows = []

    def timed(name, fn, show):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        rows.append((name, dt, show(out)))
        print(f"{name}: {dt:.1f} s  {rows[-1][2]}", flush=True)
        return out

    codes = timed(f"encode {a.tokens:,} tokens (once)", lambda: encode_all(
        sae, stream(sae, pool, circles, a.tokens, a.per_token, a.batch, a.seed)), lambda c: f"{c.n_tokens:,} tokens")
    timed("geometry", lambda: analyze.geometry(sae, seed=a.seed),
          lambda g: f"alpha {g.power_law_alpha:.3f} [{g.power_law_ci[0]:.3f}, {g.power_law_ci[1]:.3f}], "
                    f"shrunk {g.power_law_alpha_shrunk:.3f}, clustering {g.clustering:.2f} "
                    f"[{g.clustering_ci[0]:.2f}, {g.clustering_ci[1]:.2f}]")
    timed("lobes (from codes)", lambda: analyze.lobes(sae, codes=codes, seed=a.seed),
          lambda lb: f"AMI {lb.ami:.3f}, z {lb.z_score:.1f}, {lb.n_fired} fired, {lb.n_clustered} clustered, "
                     f"{lb.n_chunks} chunks")
    n_circ = set(tuple(c) for c in circles.tolist())
    base = a.latents - 50 * 4

    def planted(r):  # the four latents of one planted parallelogram
        q = sorted((r.a, r.b, r.c, r.d))
        return q[0] >= base and (q[0] - base) % 4 == 0 and q == list(range(q[0], q[0] + 4))

    timed("multidim_features (from codes)", lambda: analyze.multidim_features(sae, codes=codes, seed=a.seed),
          lambda df: f"{len(df)} clusters; top 20 circles {sum(tuple(x) in n_circ for x in df.latents[:20])}/20, "
                     f"best score {df.score.iloc[0]:.3f}" if len(df) else "none")
    on_circle = torch.zeros(a.latents, dtype=torch.bool)
    on_circle[circles.flatten()] = True

    def found(df):
        top = df.head(100)
        circ = sum(bool(on_circle[[r.a, r.b, r.c, r.d]].all()) for r in top.itertuples())
        return (f"{sum(planted(r) for r in df.itertuples())}/50 planted parallelograms in the best {len(df)}; "
                f"top 100: {sum(planted(r) for r in top.itertuples())} planted, {circ} circle chords (exact too), "
                f"score of #100 {top.score.iloc[-1]:.3f}")

    timed("crystals", lambda: analyze.crystals(sae, n=1000), found)
    total = sum(r[1] for r in rows)
    print("\n| step | seconds | result |\n|---|---|---|")
    for name, dt, show in rows:
        print(f"| {name} | {dt:.1f} | {show} |")
    print(f"| total | {total:.1f} | analyses alone {total - rows[0][1]:.1f} s |")
    print(f"\n{a.latents} latents x d_in {a.d}, k {a.k}, {a.tokens:,} tokens, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
