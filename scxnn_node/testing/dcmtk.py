"""dcmtk's storescu and storescp standing in for a PACS: the sender and the receiver the node
meets in tests and benchmarks (real processes on loopback sockets, no mocks)."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import time
from functools import cache
from pathlib import Path

from scxnn_node.testing.peers import PACS_AE, free_port


@cache
def dcmtk_tool(name: str) -> str:
    """The path of dcmtk's `name` (storescp, storescu, echoscu) on PATH, passing over Python
    scripts of that name: pynetdicom installs its own storescp and storescu, with other options,
    into the virtual environment, and an activated venv puts them first."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            with open(candidate, "rb") as fh:
                if b"python" not in fh.readline():
                    return str(candidate)
    raise FileNotFoundError(f"dcmtk's {name} is not on PATH (Debian package dcmtk)")


# storescu proposes what it is told; a PACS proposes each file's own transfer syntax.
_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu(
    port: int, *files: Path, aet: str = "PACS", aec: str = "SCXNN"
) -> subprocess.CompletedProcess:
    """dcmtk storescu, one association per transfer syntax among the files; the last result
    (or the first failure) is returned."""
    import pydicom

    groups: dict[str, list[Path]] = {}
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_PROPOSE.get(ts, "-xe"), []).append(f)
    run = None
    for option, group in groups.items():
        run = subprocess.run(
            [
                dcmtk_tool("storescu"),
                option,
                "-R",
                "-aet",
                aet,
                "-aec",
                aec,
                "127.0.0.1",
                str(port),
                *map(str, group),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if run.returncode != 0:
            return run
    assert run is not None
    return run


class Storescp:
    """dcmtk storescp standing in for the PACS: receives into `directory` and keeps it all;
    stopped with SIGKILL, as a PACS that goes away mid-association would be."""

    def __init__(self, directory: Path, port: int | None = None, aet: str = PACS_AE) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.aet = aet
        self.process: subprocess.Popen | None = None
        atexit.register(self.stop)  # an interrupted run leaves no peer behind

    def command(self) -> list[str]:
        return [
            dcmtk_tool("storescp"),
            *("-aet", self.aet, "+xa", "-od", str(self.directory), str(self.port)),
        ]

    def start(self) -> Storescp:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30  # a Python stand-in takes seconds to import on a busy CPU
        while self.process.poll() is None and time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{' '.join(self.command())} did not start")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def received(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.is_file())
