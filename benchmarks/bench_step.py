"""One SAE training step (forward + backward + optimizer), side by side in one process.

Contenders at the same d_in, n_latents, k, batch, fp32 parameters, on random inputs:
  saekit    `Trainer.train_step` (TopK, sparse kernels, decoder-gradient projection, fused Adam;
            on a CPU where bf16 matmuls pay, a bf16 encoder matmul rescored in fp32)
  saekit-fp32  the same with the encoder matmul forced to fp32 (SAEKIT_ENCODER=fp32)
  sparsify  eai-sparsify `SparseCoder` stepped as its `Trainer.fit` does with optimizer="adam"
            (on CUDA: its bf16 autocast forward and Triton decoder)
  sae-lens  `TopKTrainingSAE` stepped by `SAETrainer._train_step` (its own per-step routine)
  dense     a textbook TopK SAE: dense [B, m] latents, dense decode, torch Adam (bf16
            autocast on CUDA)
  matmul    the encoder matmul alone, x [B, d] @ W_enc.T [d, m] (bf16 on CUDA): the bound
  matmul-bf16  the same in bf16 on CPU: the bound of the bf16 encoder

`--fit N` times whole trainings on N batches instead, set-up included: `saekit.fit` (geometric
median, init, input scale, N steps) against sparsify's loop (SparseCoder and Adam built, then N
of the steps above), each against N encoder matmuls.

Timing: every repetition times one step of each contender in turn (interleaved, so load
changes hit all alike), after warm-up; the table gives medians, and means (the average cost
when some steps do more, as with OrtSAE's every-n-th penalty: use reps a multiple of n). On
CUDA each step is timed between synchronisations. Memory, CPU: each contender also runs alone in a fresh subprocess;
"peak MiB" is that process's peak resident set size over building the SAE and a few steps
(VmHWM, reset just before the build via /proc/self/clear_refs) minus its resident size at
that moment: parameters, optimizer state, activations, gradients and what the allocators
keep cached. CUDA: growth of `torch.cuda.max_memory_allocated` over the build and a few steps.

The anchors come from PyPI in `benchmarks/.venv`, which this script creates on first use
(CPU torch pinned first, then eai-sparsify and sae-lens, then saekit itself with --no-deps)
and re-runs itself in; `--no-venv` uses the current interpreter instead (a GPU machine with
the anchors' wheels on PYTHONPATH). An anchor that cannot be imported is skipped with a message.

    python3 benchmarks/bench_step.py                 # d_in 576, m 9216, k 32, batch 4096, CPU
    python3 benchmarks/bench_step.py --m 4608 --reps 5 --only saekit,matmul
    python3 benchmarks/bench_step.py --device cuda --no-venv --d 2304 --m 65536 --batch 16384
    python3 benchmarks/bench_step.py --only saekit --profile     # where saekit's step spends its time
    python3 benchmarks/bench_step.py --fit 12 --only saekit,sparsify,matmul   # 12-step fits, set-up included
    python3 benchmarks/bench_step.py --only saekit --against /tmp/old --no-memory   # against another checkout

`--against DIR` adds the contender `saekit@DIR`: the step of the saekit in checkout DIR (e.g. a
`git worktree` of the commit before a change), imported into this same process beside this
checkout's and timed interleaved with it, so a change's step cost is a ratio from one run.
"""

import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import types
from pathlib import Path

import torch
from sizes import interleaved, size_parser

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "benchmarks" / ".venv"
VENV_PY = VENV / "bin" / "python"
TORCH_PIN = "torch==2.13.0"  # the CPU build; an unpinned torch pulls a multi-GB CUDA build
CONTENDERS = ("saekit", "saekit-fp32", "sparsify", "sae-lens", "dense", "matmul", "matmul-bf16")


def ensure_venv() -> None:
    """Create benchmarks/.venv with the anchors (once) and re-execute this script in it."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not VENV_PY.exists():
        print(f"creating {VENV} (torch, eai-sparsify, sae-lens, saekit) ...", flush=True)
        pip = [str(VENV_PY), "-m", "pip", "install", "-q"]
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(pip + [TORCH_PIN], check=True)
        for pkg in ("eai-sparsify", "sae-lens"):  # each may fail alone; then it is skipped
            if subprocess.run(pip + [pkg, TORCH_PIN]).returncode:
                print(f"could not install {pkg}; it will be skipped", flush=True)
        subprocess.run(pip + ["--no-deps", "-e", str(ROOT)], check=True)
        subprocess.run(pip + ["safetensors", "pyyaml", "tqdm", TORCH_PIN], check=True)
    os.execv(str(VENV_PY), [str(VENV_PY), __file__, *sys.argv[1:]])


def import_sparsify() -> types.ModuleType:
    """eai-sparsify's `sparse_coder` module, without running its package `__init__` (which
    imports its trainer and thereby `datasets`, absent from a bare GPU machine)."""
    if "sparsify" not in sys.modules:
        spec = importlib.util.find_spec("sparsify")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("eai-sparsify is not installed")
        pkg = types.ModuleType("sparsify")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = pkg
    import sparsify.sparse_coder

    return sparsify.sparse_coder


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- contenders: each returns a zero-argument step function --------------------------------
def make_saekit(x, a, fp32=False):
    from saekit.config import TrainConfig, make_config
    from saekit.trainer import Trainer

    cfg = make_config(TrainConfig, {"n_latents": a.m, "k": a.k, "hookpoints": ["x"], "batch_size": a.batch,
                                    "log_every": 10**9, "architecture": a.architecture,
                                    "ortho_penalty": a.ortho_penalty, "ortho_every": a.ortho_every})
    trainer = Trainer(cfg, {"x": a.d}, {"x": x}, 10**6, torch.device(a.device))
    if fp32:
        trainer.saes["x"].matmul_dtype = torch.float32
    return lambda: trainer.train_step({"x": x})


def make_saekit_from(root: str, x, a):
    """`make_saekit` with the saekit of checkout `root`: its modules are imported under their
    usual names, the step keeps them, and this checkout's are put back."""
    mine = {n: m for n, m in sys.modules.items() if n == "saekit" or n.startswith("saekit.")}
    for n in mine:
        del sys.modules[n]
    sys.path.insert(0, str(Path(root).resolve()))
    try:
        step = make_saekit(x, a)
    finally:
        sys.path.pop(0)
        for n in [n for n in sys.modules if n == "saekit" or n.startswith("saekit.")]:
            del sys.modules[n]
        sys.modules.update(mine)
    return step


def make_saekit_fit(x, a):
    import saekit

    xs = x.repeat(a.fit, 1)  # N batches: one epoch of N steps
    return lambda: saekit.fit(xs, a.m, a.k, batch_size=a.batch, epochs=1, device=a.device)


def make_sparsify(x, a):
    if a.device == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its CPU decoder (embedding_bag)
    sc = import_sparsify()
    from sparsify.config import SparseCoderConfig

    sae = sc.SparseCoder(a.d, SparseCoderConfig(num_latents=a.m, k=a.k), device=a.device)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (a.m / 2**14) ** 0.5)  # as its trainer
    total_variance = (x - x.mean(0)).pow(2).sum()

    def step():  # Trainer.fit, optimizer="adam", loss_fn="fvu", auxk_alpha=0 (its defaults)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        (out.fvu + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return step


def make_sparsify_fit(x, a):
    import_sparsify()  # outside the timing, as saekit's import is

    def fit():  # build, then N steps
        step = make_sparsify(x, a)
        for _ in range(a.fit):
            step()

    return fit


def make_sae_lens(x, a):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.d, d_sae=a.m, k=a.k, dtype="float32", device=a.device))
    lr = 2e-4 / (a.m / 2**14) ** 0.5
    cfg = SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=a.batch, lr=lr, lr_end=lr,
                           logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    return lambda: trainer._train_step(sae, x)


def make_dense(x, a):
    g = torch.Generator(device=a.device).manual_seed(0)
    W_dec = torch.randn(a.m, a.d, generator=g, device=a.device)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = [W_dec.clone().requires_grad_(), torch.zeros(a.m, requires_grad=True, device=a.device),
              W_dec.requires_grad_(), torch.zeros(a.d, requires_grad=True, device=a.device)]
    W_enc, b_enc, W_dec, b_dec = params
    opt = torch.optim.Adam(params, lr=2e-4 / (a.m / 2**14) ** 0.5)

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=a.device == "cuda"):
            pre = (x - b_dec) @ W_enc.T + b_enc  # [B, m]
            vals, idx = pre.topk(a.k, dim=1)
            z = torch.zeros_like(pre).scatter(1, idx, vals.relu())  # [B, m] dense latents
            fvu = (z @ W_dec + b_dec - x).float().pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        fvu.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    return step


def make_matmul(x, a, dt=None):
    dt = dt or (torch.bfloat16 if a.device == "cuda" else torch.float32)
    W, xm = torch.randn(a.m, a.d, device=a.device, dtype=dt), x.to(dt)
    n = a.fit or 1
    return lambda: [torch.mm(xm, W.T) for _ in range(n)]


MAKERS = {"saekit": make_saekit, "saekit-fp32": lambda x, a: make_saekit(x, a, fp32=True),
          "sparsify": make_sparsify, "sae-lens": make_sae_lens, "dense": make_dense, "matmul": make_matmul,
          "matmul-bf16": lambda x, a: make_matmul(x, a, torch.bfloat16)}
FIT_MAKERS = {"saekit": make_saekit_fit, "sparsify": make_sparsify_fit, "matmul": make_matmul,
              "matmul-bf16": MAKERS["matmul-bf16"]}


def build(names, x, a):
    steps, makers = {}, FIT_MAKERS if a.fit else MAKERS
    for name in names:
        if name not in makers:
            print(f"skipping {name}: no --fit variant", flush=True)
            continue
        try:
            steps[name] = makers[name](x, a)
        except ImportError as e:
            print(f"skipping {name}: cannot import it ({e})", flush=True)
    return steps


def cuda_peak_mib(name: str, x, a) -> float | None:
    """Growth of the CUDA allocator's peak over building `name` and warm-up + 3 steps."""
    sync("cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step = build([name], x, a).get(name)
    if step is None:
        return None
    for _ in range(a.warmup + 3):
        step()
    sync("cuda")
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del step
    torch.cuda.empty_cache()
    return peak


def profile(step, a) -> None:
    """Print where one contender's step spends its time (torch.profiler, 3 steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
    for _ in range(a.warmup):
        step()
    with prof(activities=acts) as p:
        for _ in range(3):
            step()
        sync(a.device)
    key = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_mib(name: str, a) -> float | None:
    """Peak RSS growth of a fresh process that builds `name` and runs warm-up + 3 steps."""
    argv = [sys.executable, __file__, "--memory-of", name, *(f"--{k}={v}" for k, v in
            (("d", a.d), ("m", a.m), ("k", a.k), ("batch", a.batch), ("threads", a.threads),
             ("architecture", a.architecture), ("ortho-penalty", a.ortho_penalty), ("ortho-every", a.ortho_every)))]
    out = subprocess.run(argv, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    return float(lines[-1]) if out.returncode == 0 and lines else None


def main():
    p = size_parser(__doc__, reps=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--architecture", default="topk", choices=["topk", "batchtopk", "matryoshka", "jumprelu", "mp"],
                   help="saekit's SAE")
    p.add_argument("--ortho-penalty", type=float, default=0.0, help="saekit's OrtSAE weight (0: off)")
    p.add_argument("--ortho-every", type=int, default=1, help="apply the OrtSAE penalty every n-th step")
    p.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    p.add_argument("--no-venv", action="store_true", help="use this interpreter's anchors, not benchmarks/.venv")
    p.add_argument("--profile", action="store_true", help="profile the first contender's step, then stop")
    p.add_argument("--no-memory", action="store_true", help="skip the per-contender memory subprocesses")
    p.add_argument("--fit", type=int, default=0, help="time whole N-batch trainings (set-up included)")
    p.add_argument("--against", metavar="DIR", help="also time the saekit step of the checkout in DIR (no --fit)")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    a = p.parse_args()
    names = [n for n in a.only.split(",") if n]
    if unknown := set(names) - set(CONTENDERS):
        p.error(f"unknown contenders {sorted(unknown)}; choose from {CONTENDERS}")
    if a.against:
        if a.fit or not a.no_memory:
            p.error("--against times steps in this process: give --no-memory, and no --fit")
        MAKERS[f"saekit@{a.against}"] = lambda x, a: make_saekit_from(a.against, x, a)
        names.append(f"saekit@{a.against}")
    if any(n in ("sparsify", "sae-lens") for n in names) and not a.no_venv:
        ensure_venv()

    if a.threads:
        torch.set_num_threads(a.threads)
    x = torch.randn(a.batch, a.d, generator=torch.Generator().manual_seed(0)).to(a.device)
    if a.profile:
        profile(build(names[:1], x, a)[names[0]], a)
        return
    if a.memory_of:  # child: print the peak RSS growth in MiB
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
        base = _status_kib("VmRSS")
        step = build([a.memory_of], x, a)[a.memory_of]
        for _ in range(a.warmup + 3):
            step()
        print((_status_kib("VmHWM") - base) / 1024)
        return

    cuda_mem = {}
    if a.device == "cuda" and not a.no_memory:  # before the timed SAEs exist: one at a time
        cuda_mem = {n: cuda_peak_mib(n, x, a) for n in names}
    steps = build(names, x, a)
    times = interleaved(steps, a.reps, a.warmup, lambda: sync(a.device))
    med = {n: statistics.median(t) for n, t in times.items()}
    mem = cuda_mem if a.device == "cuda" or a.fit else {} if a.no_memory else {n: peak_mib(n, a) for n in steps}

    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"\ntorch {torch.__version__}, {where}; saekit {a.architecture}, ortho {a.ortho_penalty}/{a.ortho_every}; "
          f"d_in {a.d}, m {a.m}, k {a.k}, batch {a.batch}, fp32 parameters; "
          f"median of {a.reps} after {a.warmup} warm-up" + (f"; whole {a.fit}-batch fits, set-up included" if a.fit
                                                            else ""))
    unit = "fit" if a.fit else "step"
    print(f"| {'contender':9} | {unit} ms | mean ms | tokens/s | matmul/{unit} | bf16 matmul/{unit} | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n, t in med.items():  # mean: what a step costs on average (OrtSAE's penalty is every n-th step)
        bound = {b: f"{med[b] / t:.2f}" if b in med else "-" for b in ("matmul", "matmul-bf16")}
        mb = f"{mem[n]:.0f}" if mem.get(n) is not None else "-"
        mean = 1e3 * statistics.mean(times[n])
        print(f"| {n:9} | {1e3 * t:.2f} | {mean:.2f} | {a.batch * (a.fit or 1) / t:,.0f} | {bound['matmul']} | "
              f"{bound['matmul-bf16']} | {mb} |")
    if a.against and "saekit" in med:
        print(f"saekit@{a.against} / saekit step time: {med[f'saekit@{a.against}'] / med['saekit']:.3f}")
    for ours in ("saekit", "saekit-fp32"):
        for n in ("sparsify", "sae-lens", "dense"):
            if ours in med and n in med:
                print(f"{ours} speed-up over {n}: {med[n] / med[ours]:.2f}x")


if __name__ == "__main__":
    main()
