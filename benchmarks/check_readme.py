"""Compare the README's headline table ("What the main job gives") with a run's eval.json.

    saekit train configs/default.yaml && python3 benchmarks/check_readme.py runs/default

The table has a column per CPU encoder path (a run on a CPU with AVX-512 BF16 takes the bf16 path
and learns another dictionary); the run's `encoder_path` picks the column. Each figure there is
read at the precision the README prints it and compared with the run's value rounded the same way;
prints one line per figure and exits 1 if any differs (or the table cannot be read), so a README
left behind by a change of the code is found.
"""

import argparse
import json
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HOOK = "blocks.6.hook_resid_post"


def headline(text: str, encoder_path: str) -> dict[str, str]:
    """{first cell: the cell of `encoder_path`'s column} of the table under "## What the main job
    gives", its header row too; the column is the one whose header names the path (fp32 or bf16)."""
    section = text.split("## What the main job gives", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in section.splitlines() if line.startswith("|")]
    want = "bf16" if encoder_path.startswith("bf16") else "fp32"
    col = next((i for i, c in enumerate(rows[0]) if i and want in c), None) if rows else None
    if col is None:
        raise SystemExit(f"check_readme: the README's headline table has no column for the {want} encoder path")
    return {cells[0]: cells[col] for i, cells in enumerate(rows) if i != 1 and len(cells) > col}


def figures(table: dict[str, str]) -> list[tuple[str, str, float]]:
    """(eval.json key, number as printed, scale from eval.json's units) for each figure the table
    gives (a cell without a number, e.g. "–", gives none)."""
    def numbers(key: str, cell: bool = True) -> list[str]:
        row = next(((k, v) for k, v in table.items() if k.startswith(key)), None)
        if row is None:
            raise SystemExit(f"check_readme: the README's headline table has no row starting {key!r}")
        return re.findall(r"\d[\d,]*\.?\d*", row[1] if cell else row[0])

    rows = [("n_tokens", numbers("held-out metric", cell=False)[:1], 1.0),
            (("fvu", "explained_variance"), numbers("FVU")[:2], 1.0), ("l0", numbers("L0")[:1], 1.0),
            ("dead_fraction", numbers("dead latents")[:1], 100.0), ("cosine", numbers("cosine")[:1], 1.0),
            (("ce_clean", "ce_sae", "ce_zero"), numbers("CE loss")[:3], 1.0),
            (("loss_recovered", "kl_sae"), numbers("loss recovered")[:2], 1.0)]
    return [(k, v, scale) for keys, found, scale in rows
            for k, v in zip((keys,) if isinstance(keys, str) else keys, found, strict=False)]


def same(printed: str, value: float) -> bool:
    """`value` rounded to as many decimals as `printed` has is `printed`."""
    text = printed.replace(",", "")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{value:.{decimals}f}" == text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished run of configs/default.yaml (its eval.json)")
    ap.add_argument("--readme", default=str(README))
    args = ap.parse_args()
    eval_file = Path(args.run) / "eval.json"
    if not eval_file.is_file():
        print(f"check_readme: {eval_file} not found; train the main job first", file=sys.stderr)
        return 2
    result = json.loads(eval_file.read_text())[HOOK]
    path = result.get("encoder_path", "fp32")
    print(f"check_readme: the run took the {path} encoder path; its column of the table:")
    bad = 0
    for key, printed, scale in figures(headline(Path(args.readme).read_text(), path)):
        value = result[key] * scale
        ok = same(printed, value)
        bad += not ok
        print(f"{'ok  ' if ok else 'DIFF'} {key:20s} README {printed:>8s}  run {value:.6g}")
    print(f"check_readme: {'the headline table matches' if not bad else f'{bad} figures differ from'} {eval_file}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
