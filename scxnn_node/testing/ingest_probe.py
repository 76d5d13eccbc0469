"""The node's SCP alone in a child process that reports its peak memory, and large instances
to send it: what the ingest memory test and `bench/ingest_memory.py` measure.

    python -m scxnn_node.testing.ingest_probe WORKDIR PORT   # then "peak" or "stop" on stdin
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from scxnn_node.testing.datasets import chest_dataset, write_part10
from scxnn_node.testing.loopback import free_port, node_config
from scxnn_node.testing.peers import Sent, store_files


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: VmHWM (Linux), the high-water mark of
    this program's own memory. getrusage's ru_maxrss would not do: it keeps the parent's peak
    across fork and exec, so a child of a large test process starts high."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def serve(workdir: Path, port: int) -> None:
    """Run the SCP until "stop" arrives on stdin; answer "peak" with peak_rss_bytes()."""
    from scxnn_node.dicom.scp import IngestService, StoreScp
    from scxnn_node.store.db import Database
    from scxnn_node.store.spool import Spool

    config = node_config(
        workdir,
        node={"port": port, "max_associations": 16},
        storage={"max_instance_bytes": 1 << 40},
        allowed_callers=None,
    )
    db = Database(config.database.url)
    db.create_schema()
    scp = StoreScp(config, IngestService(config, db, Spool(config.storage.spool_dir)))
    scp.start()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "peak":
            print(peak_rss_bytes(), flush=True)
        elif line.strip() == "stop":
            break
    scp.shutdown()
    db.dispose()


class IngestProbe:
    """The parent's handle on a serving child: its port, its peak memory, stop."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> IngestProbe:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scxnn_node.testing.ingest_probe", str(self.workdir),
             str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self._read() == "ready"
        return self

    def _read(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def peak(self) -> int:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write("peak\n")
        self.process.stdin.flush()
        return int(self._read())

    def stop(self) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.write("stop\n")
            self.process.stdin.close()
            self.process.wait(60)
            self.process = None


def large_instance(path: Path, pixel_bytes: int, seed: int = 0) -> Path:
    """A chest DX instance whose pixel data is `pixel_bytes` long (content irrelevant: the SCP
    does not decode pixels), written as a Part 10 file."""
    ds = chest_dataset(size=16, seed=seed)
    side = int((pixel_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(side * side * 2)
    return write_part10(ds, path)


def send_concurrently(port: int, files: Sequence[Path]) -> list[Sent]:
    """Each file on its own association, all at once."""
    results: list[Sent] = []
    lock = threading.Lock()

    def send(path: Path) -> None:
        sent = store_files(port, [path], timeout=300)
        with lock:
            results.extend(sent)

    threads = [threading.Thread(target=send, args=(f,)) for f in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
