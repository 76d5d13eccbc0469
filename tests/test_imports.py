"""The commands an administrator runs on a busy node, and the torch-free modules, import no torch.

`python -X importtime` lists every module a process imports; torch alone costs seconds of CPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scxnn_node.testing.loopback import free_port, node_config


def _imported_modules(stderr: str) -> set[str]:
    """Module names from `-X importtime` lines: 'import time: self | cumulative | name'."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def _torch_modules(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] == "torch")


def _importtime(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("light")
    closed_port = free_port()  # nothing listens: echo answers quickly that it failed
    pacs = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": closed_port}
    config = node_config(tmp, destinations=[pacs])
    path = tmp / "config.yaml"
    path.write_text(config.model_dump_json())  # JSON is valid YAML
    return path


@pytest.mark.parametrize(
    ("argv", "exit_code", "says"),
    [
        (["--help"], 0, "check-config"),
        (["check-config", "{config}"], 0, "valid"),
        (["status", "--config", "{config}"], 0, "jobs"),
        (["status", "--json", "--config", "{config}"], 0, "{"),
        (["jobs", "list", "--config", "{config}"], 0, ""),
        (["deliveries", "list", "--config", "{config}"], 0, ""),
        (["echo", "pacs", "--config", "{config}"], 1, "C-ECHO pacs"),
        (["audit", "export", "--since", "2000-01-01", "--config", "{config}"], 0, ""),
    ],
    ids=["help", "check-config", "status", "status-json", "jobs", "deliveries", "echo", "audit"],
)
def test_operational_commands_import_no_torch(config_file, argv, exit_code, says):
    args = [a.format(config=config_file) for a in argv]
    run = _importtime("-m", "scxnn_node.cli", *args, cwd=config_file.parent)
    assert run.returncode == exit_code, run.stderr[-2000:]
    assert says in run.stdout
    imported = _imported_modules(run.stderr)
    assert "scxnn_node.cli" in imported or "scxnn_node.config" in imported  # the parse worked
    assert _torch_modules(imported) == []


@pytest.mark.parametrize(
    "module",
    [
        "scxnn_node.config",
        "scxnn_node.cli",
        "scxnn_node.status",
        "scxnn_node.dicom.sr",
        "scxnn_node.dicom.summary",
        "scxnn_node.model.decision",
        "scxnn_node.model.manifest",
        "scxnn_node.model.options",
        "training.metrics",
    ],
)
def test_module_imports_no_torch(module, tmp_path):
    run = _importtime("-c", f"import {module}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    imported = _imported_modules(run.stderr)
    assert module in imported
    assert _torch_modules(imported) == []
