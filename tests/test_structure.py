"""The package's shape: no import cycles, configs refused before any work, no process-wide side
effects from library calls, the public conveniences a new user reaches for first."""

import ast
import ctypes
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest
import torch

import saekit
from saekit import cli
from saekit.config import load_config
from saekit.errors import SaekitError
from saekit.kernels import torch_ops
from saekit.sae import SAE, SAEConfig

PKG = Path(saekit.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """saekit module -> the saekit modules it imports anywhere in its body (lazy imports too)."""
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saekit"):
                deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
                deps.add(node.module)
        graph[name] = {d for d in deps if d != name and d in modules and d != "saekit"}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert {"saekit.run", "saekit.pipeline", "saekit.evaluate"} <= set(graph)
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        pytest.fail(f"import cycle inside saekit: {' -> '.join(e.args[1])}")


def test_cycle_detector_detects_a_cycle():
    graph = import_graph()
    graph["saekit.evaluate"].add("saekit.pipeline")  # the cycle the run folder's owner removed
    with pytest.raises(CycleError):
        list(TopologicalSorter(graph).static_order())


BAD = [
    (["--architecture", "foo"], "'architecture' must be one of 'topk', 'batchtopk'"),
    (["--init", "subspce"], "'init' must be one of 'tied', 'subspace'"),
    (["--k", "0"], "'k' must be in [1, n_latents]"),
    (["--n_latents", "64", "--k", "65"], "'k' must be in [1, n_latents]"),
    (["--batch_size", "-5"], "'batch_size' must be >= 1"),
    (["--epochs", "0"], "'epochs' must be >= 1"),
    (["--ortho_every", "0"], "'ortho_every' must be >= 1"),
    (["--lr", "-1"], "'lr' must be > 0"),
    (["--expansion", "0"], "'expansion' must be >= 1"),
    (["--subspace_variance", "1.5"], "'subspace_variance' must be in (0, 1]"),
    (["--decay_start", "-0.1"], "'decay_start' must be in [0, 1]"),
    (["--val_tokens", "400000"], "'val_tokens' must be in [1, n_tokens)"),
    (["--device", "gpu"], "'device' must be auto, cpu, cuda or cuda:N"),
    (["--hookpoints", "[]"], "'hookpoints' must be a non-empty list"),
    (["--k", "three"], "'k' must be int"),
]


@pytest.mark.parametrize(("flags", "message"), BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_values_are_refused_before_any_work(flags, message, tmp_path, monkeypatch, capsys):
    import saekit.model

    def no_model(*a, **k):
        raise AssertionError("a model was loaded for a config that should have been refused")

    monkeypatch.setattr(saekit.model, "load_model", no_model)
    with pytest.raises(SaekitError) as e:
        load_config(None, list(flags))
    assert message in str(e.value)
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert cli.main(["train", *flags, "--out", str(out), "--cache_dir", str(cache), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not cache.exists()  # no run folder, no cache entry


def test_fit_leaves_threads_and_allocator_alone(monkeypatch):
    calls = []

    class Recorder:
        def __init__(self, *a, **k):
            calls.append(a)

        def __getattr__(self, name):
            return lambda *a: calls.append((name, *a))

    monkeypatch.setattr(ctypes, "CDLL", Recorder)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        saekit.fit(torch.randn(600, 8), n_latents=32, k=4, epochs=1, batch_size=200, device="cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert calls == []  # no mallopt (or any libc call)


def test_private_aten_op_has_a_public_fallback(monkeypatch):
    g = torch.Generator().manual_seed(0)
    W, G = torch.randn(50, 12, generator=g), torch.randn(30, 12, generator=g)
    idx = torch.randint(0, 50, (30, 4), generator=g)
    fused = torch_ops.gather_dot(idx, W, G)
    monkeypatch.setattr(torch_ops, "_PSW_BACKWARD", None)
    plain = torch_ops.gather_dot(idx, W, G)
    torch.testing.assert_close(plain, fused)
    torch.testing.assert_close(plain, (G[:, None, :] * W[idx]).sum(-1))


def test_lazy_analyze_submodule_and_version():
    code = "import saekit; print(saekit.analyze.dead.__name__, saekit.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "dead"
    with pytest.raises(AttributeError):
        saekit.nonexistent  # noqa: B018


def test_cli_version_and_help_list_the_config_keys(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"saekit {saekit.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--ortho_every 1" in out and "--architecture" in out and "k*B per batch" in out


def test_help_names_every_verb_cache_keys_and_each_analysis(capsys):
    parser = cli.build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert all(v in parser.description for v in verbs)  # the one-line summary names every verb
    with pytest.raises(SystemExit):
        cli.main(["cache", "--help"])
    out = capsys.readouterr().out
    assert "--cache_dir None" in out and "--hookpoints" in out and "--list" in out and "--remove" in out
    with pytest.raises(SystemExit):
        cli.main(["analyze", "--help"])
    out = capsys.readouterr().out
    for name, says in (("dead", "never fire"), ("collapse", "effective rank"), ("absorption", "first-letter"),
                       ("geometry", "power law"), ("all", "report.md")):
        assert f"\n  {name} " in out and says in out, name


def test_sae_repr_names_its_shape():
    sae = SAE(SAEConfig(d_in=8, n_latents=32, k=4, hookpoint="blocks.1.hook_resid_post"))
    assert "d_in=8, n_latents=32, k=4, architecture='topk', hookpoint='blocks.1.hook_resid_post'" in repr(sae)


def test_triton_is_an_extra_the_cpu_path_never_imports(monkeypatch):
    """triton (about 1 GB) comes with `saekit[gpu]` (and `[dev]`, for the interpreter tests), not
    the base install: CPU training runs without it, and CUDA without it says what to install."""
    from types import SimpleNamespace

    from saekit import kernels

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((PKG.parent / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    assert all(any(d.startswith("triton") for d in project["optional-dependencies"][x]) for x in ("gpu", "dev"))
    monkeypatch.setitem(sys.modules, "triton", None)  # as if not installed: importing it raises
    monkeypatch.delitem(sys.modules, "saekit.kernels.triton_ops", raising=False)
    monkeypatch.delattr(kernels, "triton_ops", raising=False)  # an earlier import leaves it on the package
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    assert saekit.fit(x, n_latents=16, k=2, epochs=1, batch_size=128).n_latents == 16
    with pytest.raises(SaekitError, match=r"saekit\[gpu\]"):
        kernels.backend(SimpleNamespace(is_cuda=True))


def _family_tests(tree: ast.AST) -> list[int]:
    """Lines comparing an architecture with a family name: `cfg.architecture == "mp"`,
    `architecture in ("batchtopk", ...)` (other tools' names, e.g. SAELens's, are not ours)."""
    from saekit.families import FAMILIES

    def names(node) -> set:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return set().union(*(names(e) for e in node.elts))
        return set()

    def architecture(node) -> bool:
        return any(isinstance(n, ast.Attribute) and n.attr == "architecture"
                   or isinstance(n, ast.Name) and n.id == "architecture" for n in ast.walk(node))

    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
            and any(names(s) & set(FAMILIES) for s in [node.left, *node.comparators])
            and any(architecture(s) for s in [node.left, *node.comparators])]


def test_family_names_are_tested_only_in_the_family_table():
    """A family's behaviour lives in its saekit.families entry: no other module branches on its name."""
    found = {str(p.relative_to(PKG)): lines for p in PKG.rglob("*.py") if p.name != "families.py"
             if (lines := _family_tests(ast.parse(p.read_text())))}
    assert not found, f"family names compared outside saekit/families.py: {found}"
    assert _family_tests(ast.parse('if sae.cfg.architecture in ("batchtopk", "x"): pass'))  # the check sees them
    assert _family_tests(ast.parse('k = 1 if "mp" == architecture else 2'))


def test_readme_shows_the_jumprelu_entry_as_it_is():
    readme = (PKG.parent / "README.md").read_text()
    block = readme.split("JumpReLU's entry, for instance:\n```\n", 1)[1].split("```", 1)[0]
    words = " ".join(block.split())  # as in the source, up to indentation
    assert words and words in " ".join((PKG / "families.py").read_text().split())


def test_no_function_over_80_lines():
    """Long functions are cut at their seams (phases, one helper each), so each reads on one screen."""
    long = [f"{p.relative_to(PKG)}:{n.name} ({n.end_lineno - n.lineno + 1})" for p in PKG.rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"functions over 80 lines: {long}"
