"""Peak RSS and bytes written of one `saekit train` command, read from /proc each second while it
runs (so a run stopped early still reports what it used until then), with what it left on disk in
--out and --cache_dir. `train_peak_rss_MiB` is the highest RSS sampled before the run's last logged
training step (training alone: the evaluation after it loads more); `peak_rss_MiB` is the whole
command's (VmHWM). Every line it prints is a sample (one a minute); the last is the summary.

    python3 benchmarks/bench_stream_footprint.py configs/default.yaml --activations stream \\
        --n_tokens 200000 --epochs 1 --buffer_tokens 131072 --cache_dir /tmp/fp/c200k --out /tmp/fp/r200k
"""

import json
import subprocess
import sys
import time
from pathlib import Path


def du(path: str | None) -> int:
    p = Path(path) if path else None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p and p.exists() else 0


def main():
    args = sys.argv[1:]
    opt = {k: v for k, v in zip(args, args[1:], strict=False) if k.startswith("--")}
    proc = subprocess.Popen([sys.executable, "-m", "saekit.cli", "train", *args, "--quiet"])
    metrics = Path(opt.get("--out", "runs/default")) / "metrics.jsonl"
    t0, peak, written, last = time.time(), 0, 0, 0.0
    rss = []  # (step, RSS) each second
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            io = Path(f"/proc/{proc.pid}/io").read_text()
        except OSError:
            break
        peak = max(peak, kib(status, "VmHWM"))
        written = int(next(x for x in io.splitlines() if x.startswith("write_bytes")).split()[1])
        rss.append((step(metrics), kib(status, "VmRSS")))
        if time.time() - last > 60:
            last = time.time()
            print(json.dumps({"s": round(last - t0), "step": rss[-1][0], "rss_MiB": rss[-1][1] >> 20,
                              "peak_rss_MiB": peak >> 20, "written_MiB": written >> 20}), flush=True)
        time.sleep(1)
    proc.wait()
    final = step(metrics)
    print(json.dumps({"rc": proc.returncode, "s": round(time.time() - t0), "steps": final,
                      "train_peak_rss_MiB": max((r for s, r in rss if s < final), default=0) >> 20,
                      "peak_rss_MiB": peak >> 20, "written_MiB": written >> 20, "out_MiB": du(opt.get("--out")) >> 20,
                      "cache_dir_MiB": du(opt.get("--cache_dir")) >> 20}), flush=True)


def kib(status: list[str], key: str) -> int:
    """A /proc/PID/status figure in bytes."""
    return int(next(x for x in status if x.startswith(key)).split()[1]) * 1024


def step(metrics: Path) -> int:
    """The last logged training step of a run (0 before the first)."""
    for line in reversed(metrics.read_text().splitlines() if metrics.is_file() else []):
        try:
            return json.loads(line)["step"]
        except ValueError:  # a line being written
            continue
    return 0

if __name__ == "__main__":
    main()
