"""Every import arrow points down: the node never imports training or the tests (the demo asks
for a bundle rather than training one), and the benchmarks take their shared helpers from the
installed package, not from tests/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_MODULES = {p.stem for p in (ROOT / "tests").glob("*.py")}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in a file, wherever it appears."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _violations(files: list[Path], forbidden: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in files
        for line, module in _imports(path)
        if module.split(".")[0] in forbidden
    ]


def test_the_node_never_imports_training_or_tests():
    files = sorted((ROOT / "scxnn_node").rglob("*.py"))
    assert len(files) > 20
    assert _violations(files, {"training", "tests", *TEST_MODULES}) == []


def test_benchmarks_neither_import_test_modules_nor_put_tests_on_sys_path():
    files = sorted((ROOT / "bench").glob("*.py"))
    assert files
    assert _violations(files, {"tests", *TEST_MODULES}) == []
    path_edits = [
        f"{p.relative_to(ROOT)}: {line.strip()}"
        for p in files
        for line in p.read_text().splitlines()
        if "sys.path" in line and "tests" in line
    ]
    assert path_edits == []


def test_the_shared_test_helpers_are_installed_with_the_node():
    from scxnn_node.testing import dcmtk, loopback, samples

    for module, names in (
        (loopback, ("free_port", "node_config", "wait_for")),
        (dcmtk, ("storescu", "Storescp")),
        (samples, ("sample_copies",)),
    ):
        assert Path(module.__file__).resolve().is_relative_to(ROOT / "scxnn_node" / "testing")
        for name in names:
            assert callable(getattr(module, name)), f"{module.__name__}.{name}"


def test_demo_without_a_bundle_says_how_to_build_one(tmp_path):
    missing = tmp_path / "bundles" / "demo"
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{bundle: {missing}}}\n")
    run = subprocess.run(
        [sys.executable, "-m", "scxnn_node.cli", "demo", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert f"scxnn-train demo-bundle --out {missing}" in run.stderr
    assert not missing.exists()  # nothing was trained on the node's side
