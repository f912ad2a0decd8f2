"""Peak RSS and bytes written of one `saekit train` command, read from /proc while it runs (so a run
stopped early still reports what it used until then), with what it left on disk in --out and
--cache_dir. Every line it prints is one sample; the last is the summary.

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
    t0, peak, written, last = time.time(), 0, 0, 0.0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            io = Path(f"/proc/{proc.pid}/io").read_text()
        except OSError:
            break
        peak = max(peak, int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) * 1024)
        written = int(next(x for x in io.splitlines() if x.startswith("write_bytes")).split()[1])
        if time.time() - last > 60:
            last = time.time()
            metrics = Path(opt.get("--out", "runs/default")) / "metrics.jsonl"
            step = json.loads(metrics.read_text().splitlines()[-1])["step"] if metrics.is_file() and \
                metrics.stat().st_size else 0
            print(json.dumps({"s": round(last - t0), "step": step, "peak_rss_MiB": peak >> 20,
                              "written_MiB": written >> 20}), flush=True)
        time.sleep(1)
    proc.wait()
    print(json.dumps({"rc": proc.returncode, "s": round(time.time() - t0), "peak_rss_MiB": peak >> 20,
                      "written_MiB": written >> 20, "out_MiB": du(opt.get("--out")) >> 20,
                      "cache_dir_MiB": du(opt.get("--cache_dir")) >> 20}), flush=True)


if __name__ == "__main__":
    main()
