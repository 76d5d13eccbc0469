"""C-STORE ingest throughput: the node's SCP against dcmtk storescp, same files, same storescu.

    .venv/bin/python bench/ingest.py                 # 120 x 1 MB files, 1 and 4 senders
    .venv/bin/python bench/ingest.py --files 400

Both receivers write to a temp directory on the same disk. The node acknowledges only after
fsync, rename and the database commit (durable); storescp writes without fsync. Each run sends
the same files with the same storescu options; figures are instances/s and MB/s and the ratio
node / storescp for 1 and 4 concurrent senders (4 storescu processes, a quarter of the files
each).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from scxnn_node.testing.loopback import free_port, node_config
from scxnn_node.testing.samples import sample_copies


def run_node_scp(workdir: str, port: int, ready: mp.Event, stop: mp.Event) -> None:
    from scxnn_node.dicom.scp import IngestService, StoreScp
    from scxnn_node.store.db import Database
    from scxnn_node.store.spool import Spool

    config = node_config(
        Path(workdir), node={"port": port, "max_associations": 64}, allowed_callers=None
    )
    db = Database(config.database.url)
    db.create_schema()
    scp = StoreScp(config, IngestService(config, db, Spool(config.storage.spool_dir)))
    scp.start()
    ready.set()
    stop.wait()
    scp.shutdown()


def send(port: int, files: list[Path], senders: int) -> float:
    """Seconds for `senders` concurrent storescu processes to send all files."""
    groups = [files[i::senders] for i in range(senders)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                "storescu",
                "-xi",
                "-R",
                "-aet",
                "PACS",
                "-aec",
                "SCXNN",
                "127.0.0.1",
                str(port),
                *map(str, group),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for group in groups
    ]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--files", type=int, default=120)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scxnn-ingest-"))
    try:
        files = sample_copies(root / "files", args.files, per_study=8)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(f"{len(files)} files, {megabytes:.0f} MB (real 1024x1024 DX, implicit VR)")
        results: dict[tuple[str, int], float] = {}
        for senders in (1, 4):
            out = root / f"storescp-{senders}"
            out.mkdir()
            port = free_port()
            storescp = subprocess.Popen(
                ["storescp", "-aet", "SCXNN", "+xa", "-od", str(out), str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            try:
                results[("storescp", senders)] = send(port, files, senders)
            finally:
                storescp.terminate()
                storescp.wait()
            ctx = mp.get_context("spawn")
            ready, stop = ctx.Event(), ctx.Event()
            port = free_port()
            node = ctx.Process(
                target=run_node_scp, args=(str(root / f"node-{senders}"), port, ready, stop)
            )
            node.start()
            ready.wait(60)
            try:
                results[("node", senders)] = send(port, files, senders)
            finally:
                stop.set()
                node.join(30)
        for senders in (1, 4):
            base = results[("storescp", senders)]
            ours = results[("node", senders)]
            print(
                f"{senders} sender(s): storescp {len(files) / base:6.1f} inst/s "
                f"{megabytes / base:6.1f} MB/s | node (durable) {len(files) / ours:6.1f} inst/s "
                f"{megabytes / ours:6.1f} MB/s | ratio {base / ours:.2f}x"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
