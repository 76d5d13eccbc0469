"""A node on loopback for tests and benchmarks: its config on a free port with its state under
a temp folder, and polling for what it produces."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from scxnn_node.config import NodeConfig
from scxnn_node.testing.peers import free_port


def node_config(tmp: Path, **sections: Any) -> NodeConfig:
    """A config whose state lives under `tmp`, listening on a free port."""
    raw: dict[str, Any] = {
        # The SCP and the dispatcher in the serve process: tests start many nodes, and both in
        # processes of their own have tests of their own (tests/test_ingest_processes.py,
        # tests/test_dispatch_processes.py).
        "node": {
            "ae_title": "SCXNN",
            "host": "127.0.0.1",
            "port": free_port(),
            "ingest_processes": 1,
            "dispatch_processes": 0,
        },
        "allowed_callers": [{"ae_title": "PACS"}],
        "storage": {"spool_dir": str(tmp / "spool"), "min_free_bytes": 0},
        "database": {"url": f"sqlite:///{tmp / 'node.db'}"},
        "study": {"quiet_seconds": 0.5},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return NodeConfig.model_validate(raw)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll until predicate() is truthy; return its value or raise TimeoutError."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s")
