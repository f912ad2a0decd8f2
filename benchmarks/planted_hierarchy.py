"""Planted hierarchy: does each dictionary family keep a parent feature's latent when a child fires?

The toy of Chanin et al. ("A is for Absorption"): random unit directions for `parents`, each with
`children` child features that only ever occur together with their parent (one child at a
time), plus independent features. A family *absorbs* the parent when its parent latent goes
quiet on tokens where a child is present (the child's latent then carries the parent direction
too). Every family is trained on the same data with `saekit.fit`, at a k that binds (below the
planted number of active features on child tokens) and at a loose one, over several seeds.

Per family and k: `parent|child`, how often the latent closest to each parent direction fires on
tokens where one of its children is present; `parent|alone`, the same on tokens with the parent
and no child (should be ~1); `recovery`, the mean and the minimum over every planted direction of
its best cosine with a decoder row; `FVU` on held-out tokens. Codes are each family's inference
codes (BatchTopK and Matryoshka: their learned threshold).

    python3 benchmarks/planted_hierarchy.py                       # writes analysis/results/planted_hierarchy.md
    python3 benchmarks/planted_hierarchy.py --seeds 1 --families topk,mp --ks 2
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saekit import fit  # noqa: E402

FAMILIES = ("topk", "batchtopk", "matryoshka", "jumprelu", "mp")


def planted_hierarchy(n, d, parents, children, independent, seed, p_parent=0.2, p_child=0.6, p_ind=0.08):
    """(activations [n, d], directions [F, d], active [n, F] bool, parent ids, child ids [parents, children]).

    Directions: parents first, then each parent's children, then the independent features.
    A child fires only with its parent (one child, with probability p_child given the parent)."""
    g = torch.Generator().manual_seed(seed)
    F = parents * (1 + children) + independent
    dirs = torch.randn(F, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    active = torch.zeros(n, F, dtype=torch.bool)
    par = torch.rand(n, parents, generator=g) < p_parent
    active[:, :parents] = par
    child_ids = parents + torch.arange(parents * children).view(parents, children)
    has_child = par & (torch.rand(n, parents, generator=g) < p_child)
    which = torch.randint(children, (n, parents), generator=g)
    rows, ps = has_child.nonzero(as_tuple=True)
    active[rows, child_ids[ps, which[rows, ps]]] = True
    active[:, parents * (1 + children):] = torch.rand(n, independent, generator=g) < p_ind
    mags = 0.5 + torch.rand(n, F, generator=g)
    return (active * mags) @ dirs, dirs, active, torch.arange(parents), child_ids


def measure(sae, x, dirs, active, parent_ids, child_ids):
    W = sae.W_dec.detach()
    cos = dirs @ (W / W.norm(dim=1, keepdim=True)).T  # [F, m]
    recovery = cos.max(1).values
    vals, idx = sae.encode(x)
    fires = torch.zeros(len(x), sae.n_latents, dtype=torch.bool).scatter_(1, idx, vals > 0)
    with_child, alone = [], []
    for p in parent_ids.tolist():
        lat = int(cos[p].argmax())
        child_present = active[:, child_ids[p]].any(1)
        with_child.append(fires[child_present, lat].float().mean())
        alone.append(fires[active[:, p] & ~child_present, lat].float().mean())
    x_hat = sae.decode(vals, idx)
    fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return {"parent|child": float(torch.stack(with_child).mean()), "parent|alone": float(torch.stack(alone).mean()),
            "recovery": float(recovery.mean()), "recovery min": float(recovery.min()), "FVU": fvu}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--ks", default="2,6", help="k values: one binding (below ~3.4 active), one loose")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=12_000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "analysis" / "results" / "planted_hierarchy.md"))
    a = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    d, parents, children, independent = 48, 6, 4, 18
    rows = []
    for fam in a.families.split(","):
        for k in [int(v) for v in a.ks.split(",")] if fam != "jumprelu" else [None]:
            per_seed = []
            for seed in range(a.seeds):
                data = planted_hierarchy(a.tokens + 4000, d, parents, children, independent, seed)
                x, dirs, active, pids, cids = data
                kw = dict(n_latents=64, batch_size=256, epochs=a.epochs, lr=3e-3, dead_tokens=4000, seed=seed,
                          architecture=fam)
                if k is not None:
                    kw["k"] = k
                if fam == "matryoshka":
                    kw["matryoshka_groups"] = [8, 64]  # a small first prefix: room for the parents
                t = time.time()
                sae = fit(x[:a.tokens], **kw)
                with torch.no_grad():
                    r = measure(sae, x[a.tokens:], dirs, active[a.tokens:], pids, cids)
                print(f"{fam} k={k} seed={seed}: " + ", ".join(f"{n} {v:.3f}" for n, v in r.items())
                      + f" ({time.time() - t:.0f} s)", flush=True)
                per_seed.append(r)
            rows.append((fam, k, {n: [r[n] for r in per_seed] for n in per_seed[0]}))
            write(rows, a, d, parents, children, independent)  # after every row: a partial table survives


def write(rows, a, d, parents, children, independent):
    n_feat = parents * (1 + children) + independent
    active_child = 2 + independent * 0.08  # parent + child + the independent ones on a child token
    lines = [
        "# Planted hierarchy: absorption per dictionary family",
        "",
        f"`python3 benchmarks/planted_hierarchy.py --seeds {a.seeds} --ks {a.ks} --tokens {a.tokens} "
        f"--epochs {a.epochs}`",
        "",
        f"d {d}; {parents} parents with {children} children each (a child only with its parent, one at a "
        f"time) and {independent} independent features: {n_feat} directions, 64 latents. A token with a "
        f"child holds ~{active_child:.1f} active features, so k=2 binds and k=6 is loose. Mean over "
        f"{a.seeds} seed{'s' * (a.seeds > 1)}, range in brackets. `parent|child`: how often the latent "
        "closest to a parent "
        "fires on its children's tokens (1 = no absorption); `parent|alone`: on the parent's tokens "
        "without a child; `recovery`: best decoder cosine of each planted direction (mean, and the "
        "worst one); JumpReLU has no k (l0_coeff 1e-3).",
        "",
        "| family | k | parent\\|child | parent\\|alone | recovery | recovery min | FVU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fam, k, r in rows:
        cell = lambda v: f"{statistics.mean(v):.2f} [{min(v):.2f}, {max(v):.2f}]"  # noqa: E731
        lines.append(f"| {fam} | {k if k is not None else '-'} | " + " | ".join(cell(r[n]) for n in r) + " |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]), flush=True)


if __name__ == "__main__":
    main()
