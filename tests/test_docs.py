"""What the README says about setting up and testing holds (the setup script's installs, the quick
and the full test command), and the committed result plots stay legible."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _setup(tmp_path: Path, **env) -> tuple[str, str]:
    """Run .ci/setup with python3 and apt-get replaced by stubs that log their arguments (and no
    chromedriver on PATH): (what python3 was asked, what apt-get was asked)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name in ("python3", "apt-get"):
        (bin_ / name).write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / name}.log\n')
        (bin_ / name).chmod(0o755)
    (bin_ / "dirname").symlink_to("/usr/bin/dirname") if not (bin_ / "dirname").exists() else None
    for log in tmp_path.glob("*.log"):
        log.unlink()
    subprocess.run(["/bin/bash", str(ROOT / ".ci/setup")], check=True, env={"PATH": str(bin_), **env})
    read = lambda name: (tmp_path / f"{name}.log").read_text() if (tmp_path / f"{name}.log").exists() else ""  # noqa: E731
    return read("python3"), read("apt-get")


def test_setup_installs_what_the_readme_says(tmp_path):
    """Python packages through pip (saekit editable in compat mode, so `import saekit` finds the
    package from the clone's parent folder too), Debian's chromium through apt-get unless
    SAEKIT_NO_BROWSER=1; the README says all of it."""
    pip, apt = _setup(tmp_path)
    assert "torch==2.13.0" in pip and "-e .[dev,plots] --config-settings editable_mode=compat" in pip
    assert "install -y -qq chromium chromium-driver" in apt
    pip, apt = _setup(tmp_path, SAEKIT_NO_BROWSER="1")
    assert "editable_mode=compat" in pip and apt == ""
    for said in ("SAEKIT_NO_BROWSER=1 bash .ci/setup", "apt-get install chromium chromium-driver", "python3 -m venv"):
        assert said in README, said


def test_readme_gives_a_quick_and_the_full_test_command():
    """`-m "not slow"` leaves out the tests that run the model; CI runs them all."""
    assert 'python3 -m pytest -q -m "not slow"' in README and "python3 -m pytest -q\n" in README
    assert (ROOT / ".ci/run").read_text().rstrip().endswith("python3 -m pytest -q")
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow",
                          "tests/test_pipeline.py"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert "test_empty_dataset" in out  # no model
    assert "test_train_writes_a_loadable_evaluated_run" not in out  # trains through the model


def test_budget_plot_has_readable_ticks_one_legend_and_the_seeds_spread(monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    monkeypatch.syspath_prepend(str(ROOT / "analysis"))
    import budget_study

    rows = json.loads((ROOT / "analysis/results/budget.json").read_text())["rows"]
    fig = budget_study.figure(rows)
    try:
        fig.canvas.draw()
        colours = {}
        for ax in fig.axes:
            labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
            assert labels == [f"{s:,}" for s in sorted({r["steps"] for r in rows})], labels  # the budgets, no others
            assert not [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
            boxes = [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()]
            assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:], strict=False))  # no label runs into the next
            for line in ax.get_lines():
                if line.get_label().startswith("_child") or line.get_label() == "_nolegend_":
                    continue  # an error bar's caps
                name = line.get_label().lstrip("_").removesuffix(" 0.9")
                assert colours.setdefault(name, line.get_color()) == line.get_color(), name  # one colour per kind
        legend = fig.legends[0]
        assert [t.get_text() for t in legend.get_texts()] == ["epochs", "data init", "lr 6e-3"]
        absorption = next(ax for ax in fig.axes if "absorption" in ax.get_title())
        assert len(absorption.containers) == 3  # min-max bars for every kind of point
    finally:
        plt.close(fig)


def test_check_readme_reads_every_headline_figure_and_finds_a_changed_one(tmp_path):
    """benchmarks/check_readme.py compares the README's headline table with a run's eval.json, in
    the column of the run's encoder path: a run with that column's own figures passes, one with
    another dead share fails naming it; a table without the run's column is refused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import check_readme
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def check(values: dict, readme: Path | None = None) -> subprocess.CompletedProcess:
        (tmp_path / "eval.json").write_text(json.dumps({check_readme.HOOK: values}))
        more = ["--readme", str(readme)] if readme else []
        return subprocess.run([sys.executable, str(ROOT / "benchmarks/check_readme.py"), str(tmp_path), *more],
                              capture_output=True, text=True)

    columns = {}
    for path in ("fp32", "bf16+fp32-rescore"):  # the README fills both columns
        printed = check_readme.figures(check_readme.headline(README, path))
        assert {k for k, _, _ in printed} >= {"n_tokens", "fvu", "l0", "dead_fraction"}
        columns[path] = values = {k: float(v.replace(",", "")) / scale for k, v, scale in printed}
        for change, code in (({}, 0), ({"dead_fraction": values["dead_fraction"] + 0.002}, 1)):
            res = check({**values, **change, "encoder_path": path})
            assert res.returncode == code, res.stdout + res.stderr
            assert ("DIFF dead_fraction" in res.stdout) == bool(change)
    assert {"cosine", "ce_sae", "loss_recovered", "kl_sae"} <= set(columns["fp32"])  # the downstream rows
    assert columns["fp32"] != columns["bf16+fp32-rescore"]  # each path reads its own column
    one_column = tmp_path / "README.md"
    one_column.write_text("## What the main job gives\n\n| held-out metric (10 tokens) | bf16 encoder path |\n"
                          "|---|---|\n| FVU (explained variance) | 0.1 (0.9) |\n")
    res = check({**columns["fp32"], "encoder_path": "fp32"}, one_column)
    assert res.returncode != 0 and "no column for the fp32 encoder path" in res.stdout + res.stderr
