"""`scxnn-node serve` as a black box: its config, the process group it runs in (started, killed,
restarted like systemd would), the processes it started, their memory, and `status --json`.

The harness (this module, peers, datasets, audit, chaos) reaches the node only the way an
auditor would: the command line, DICOM on loopback sockets, the database read with plain SQL,
the spool files and what the receiving PACS got. Of the node's code it imports only the state
names (store/models.py, SQLAlchemy only), so it keeps working while the node's internals change.
The fuzz, chaos and load runs (bench/) and their short versions (tests/) share it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from scxnn_node.store.models import OutputKind
from scxnn_node.testing.peers import NODE_AE, PACS_AE, echo, free_port, wait_until

SERVE = (sys.executable, "-m", "scxnn_node.cli", "serve")


# --- processes, seen through /proc --------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state, ppid, pgrp, ..."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def process_group(pgid: int) -> list[int]:
    """Live processes of a process group (the node and every process it started)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return sorted(members)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, all its threads (0 once it is gone)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs, as /proc shows them now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident memory of these processes together (VmRSS)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def send_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# --- the node ----------------------------------------------------------------------------


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def serve_config(
    root: Path,
    bundle: Path,
    *,
    database_url: str | None = None,
    pacs_port: int | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A config.yaml (as a dict) for a node whose state lives under `root`, on a free port,
    with short timings so that a study goes through in about a second; `sections` override."""
    raw: dict[str, Any] = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": free_port()},
        "allowed_callers": [{"ae_title": PACS_AE}],
        "storage": {"spool_dir": str(root / "spool"), "min_free_bytes": 0},
        "database": {"url": database_url or f"sqlite:///{root / 'node.db'}"},
        "model": {"bundle": str(bundle)},
        "study": {"quiet_seconds": 0.5},
        "destinations": []
        if pacs_port is None
        else [
            {
                "name": "pacs",
                "ae_title": PACS_AE,
                "host": "127.0.0.1",
                "port": pacs_port,
                "outputs": [OutputKind.SR, OutputKind.SUMMARY],
            }
        ],
        "delivery": {"backoff_seconds": 0.5, "max_backoff_seconds": 2.0, "max_attempts": 1000},
        "scheduler": {
            "readiness_seconds": 0.2,
            "delivery_seconds": 0.3,
            "lease_recovery_seconds": 0.5,
        },
        "worker": {"poll_seconds": 0.2, "lease_seconds": 4, "heartbeat_seconds": 1},
        "logging": {"level": "WARNING"},
    }
    return _merge(raw, sections)


class NodeProcess:
    """`scxnn-node serve --config FILE` in a process group of its own; its output goes to
    serve.log under `root`. Every process the node starts (workers) shares the group."""

    def __init__(
        self,
        config: dict[str, Any],
        root: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.root = root
        # Variables added to the environment of the node and of its commands (cli).
        self.env = {**os.environ, **(env or {})}
        self.config_path = root / "config.json"  # JSON is YAML
        self.process: subprocess.Popen | None = None
        self.starts = 0
        atexit.register(self.kill)  # an interrupted run leaves no node behind

    @property
    def port(self) -> int:
        return int(self.config["node"]["port"])

    @property
    def caller_ae(self) -> str:
        """An AE title the node lets in (the first of allowed_callers)."""
        callers = self.config.get("allowed_callers")
        return str(callers[0]["ae_title"]) if callers else PACS_AE

    @property
    def database_url(self) -> str:
        return str(self.config["database"]["url"])

    @property
    def spool_dir(self) -> Path:
        return Path(self.config["storage"]["spool_dir"])

    @property
    def log_path(self) -> Path:
        return self.root / "serve.log"

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def start(self, timeout: float = 180.0) -> NodeProcess:
        """Start serve and return once it answers C-ECHO."""
        self.write_config()
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1} at {time.ctime()}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [*SERVE, "--config", str(self.config_path)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not echo(self.port, aet=self.caller_ae, timeout=2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"scxnn-node serve did not start:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self) -> list[int]:
        """The serve process and every live process it started."""
        return process_group(self.process.pid) if self.process is not None else []

    def helpers(self) -> dict[int, str]:
        """Processes the node started (workers, and any other service it runs apart), by pid;
        multiprocessing's resource tracker is left out."""
        if self.process is None:
            return {}
        found = {pid: command_line(pid) for pid in self.pids() if pid != self.process.pid}
        return {pid: cmd for pid, cmd in found.items() if "resource_tracker" not in cmd}

    def kill(self) -> None:
        """kill -9 the serve process, then what is left of its group, as systemd does when a
        service's main process dies."""
        if self.process is None:
            return
        pgid = self.process.pid
        send_signal(pgid, signal.SIGKILL)
        self.process.wait(30)
        for pid in process_group(pgid):
            send_signal(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not process_group(pgid), 10, 0.05)
        self.process = None

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM and wait; kill -9 if it does not stop in time."""
        if self.process is None:
            return
        send_signal(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.kill()

    def memory(self) -> int:
        return rss_bytes(self.pids())

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Another scxnn-node command on this node's config (e.g. "status", "--json")."""
        self.write_config()
        return subprocess.run(
            [sys.executable, "-m", "scxnn_node.cli", *args, "--config", str(self.config_path)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        run = self.cli("status", "--json")
        if run.returncode != 0:
            raise RuntimeError(f"scxnn-node status failed: {run.stderr[-2000:]}")
        return json.loads(run.stdout)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def bundle_version(bundle: Path) -> str:
    """The version a bundle's manifest declares (what the node's jobs and SRs carry)."""
    return str(json.loads((bundle / "manifest.json").read_text())["version"])


class MemoryPeak:
    """Samples the resident memory of a node's process tree in the background; `peak` holds
    the highest total seen."""

    def __init__(self, node: NodeProcess, interval: float = 0.2) -> None:
        self.node = node
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.node.memory())

    def __enter__(self) -> MemoryPeak:
        self.peak = self.node.memory()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
