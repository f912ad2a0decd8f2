"""Compare the README's headline table ("What the main job gives") with a run's eval.json.

    saekit train configs/default.yaml && python3 benchmarks/check_readme.py runs/default

Each figure of the table is read back at the precision the README prints it and compared with the
run's value rounded the same way; prints one line per figure and exits 1 if any differs (or the
table cannot be read), so a README left behind by a change of the code is found.
"""

import argparse
import json
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HOOK = "blocks.6.hook_resid_post"


def headline(text: str) -> dict[str, str]:
    """{first cell: second cell} of the table under "## What the main job gives", its header too."""
    section = text.split("## What the main job gives", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("|")]
    return {cells[0].strip(): cells[1].strip() for i, cells in enumerate(rows) if i != 1 and len(cells) >= 2}


def figures(table: dict[str, str]) -> list[tuple[str, str, float]]:
    """(eval.json key, number as printed, scale from eval.json's units) for each figure of the table."""
    def numbers(key: str, cell: bool = True) -> list[str]:
        row = next(((k, v) for k, v in table.items() if k.startswith(key)), None)
        if row is None:
            raise SystemExit(f"check_readme: the README's headline table has no row starting {key!r}")
        return re.findall(r"\d[\d,]*\.?\d*", row[1] if cell else row[0])

    fvu, explained = numbers("FVU")[:2]
    clean, spliced, zero = numbers("CE loss")[:3]
    recovered, kl = numbers("loss recovered")[:2]
    return [("n_tokens", numbers("held-out metric", cell=False)[0], 1.0), ("fvu", fvu, 1.0),
            ("explained_variance", explained, 1.0), ("l0", numbers("L0")[0], 1.0),
            ("dead_fraction", numbers("dead latents")[0], 100.0), ("cosine", numbers("cosine")[0], 1.0),
            ("ce_clean", clean, 1.0), ("ce_sae", spliced, 1.0), ("ce_zero", zero, 1.0),
            ("loss_recovered", recovered, 1.0), ("kl_sae", kl, 1.0)]


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
    bad = 0
    for key, printed, scale in figures(headline(Path(args.readme).read_text())):
        value = result[key] * scale
        ok = same(printed, value)
        bad += not ok
        print(f"{'ok  ' if ok else 'DIFF'} {key:20s} README {printed:>8s}  run {value:.6g}")
    print(f"check_readme: {'the headline table matches' if not bad else f'{bad} figures differ from'} {eval_file}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
