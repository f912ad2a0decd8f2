"""Every Python block of README.md runs as pasted after the main job. CI has no runs/default, so
the blocks run on a small run of the same shape made here (SmolLM2's blocks.6.hook_resid_post,
9,216 latents, its atlas built), its folder and config file standing in for `runs/default` and
`configs/default.yaml`; absorption reads 400 words instead of 3,000 (its model passes over the
first-letter prompts are most of the time) and universality draws 10 shuffles instead of 100.
A block that cannot run offline (CUDA, several nodes) may opt out by starting with the line
`# readme: not run here (REASON)`."""

import functools
import re
from pathlib import Path

import pytest

from saekit import analyze, cli
from saekit import model as lm

README = Path(__file__).resolve().parents[1] / "README.md"
OPT_OUT = "# readme: not run here"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


@pytest.fixture(scope="module")
def small_run(act_cache_dir, tmp_path_factory):
    """A run and its config file in place of the main job's: a few steps on 4k tokens."""
    root = tmp_path_factory.mktemp("readme")
    config = root / "small.yaml"
    config.write_text(f"""hookpoints: [blocks.6.hook_resid_post]
n_latents: 9216
k: 32
n_tokens: 4000
val_tokens: 2000
ctx_len: 128
epochs: 1
batch_size: 1000
eval_contexts: 1
cache_dir: {act_cache_dir}
out: {root / "run"}
""")
    assert cli.main(["train", str(config), "--quiet"]) == 0
    assert cli.main(["atlas", "build", str(root / "run"), "--quiet"]) == 0
    return config, root / "run"


def test_readme_python_blocks_run_as_pasted(small_run, smollm2, tmp_path, monkeypatch):
    config, run = small_run
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    monkeypatch.setattr(lm, "load_model", lambda *a, **k: smollm2)  # loaded once for the session
    monkeypatch.setattr(analyze, "absorption", functools.partial(analyze.absorption, n_words=400, min_letters=3))
    monkeypatch.setattr(analyze, "universality", functools.partial(analyze.universality, n_shuffles=10))
    monkeypatch.chdir(tmp_path)  # files a block writes (m.parquet)
    for i, code in enumerate(blocks, 1):
        if code.startswith(OPT_OUT):
            continue
        code = code.replace("runs/default", str(run)).replace("configs/default.yaml", str(config))
        exec(compile(code, f"README.md, Python block {i}", "exec"), {"__name__": f"readme_block_{i}"})
