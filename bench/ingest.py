"""C-STORE ingest throughput: the node against dcmtk storescp --fork (what sites run) and plain
storescp (one association at a time), same files, same storescu.

    .venv/bin/python bench/ingest.py                        # 120 x 1 MB files, 1 and 4 senders
    .venv/bin/python bench/ingest.py --repeat 3 --ingest-processes 1,2
    .venv/bin/python bench/ingest.py --phases               # where the node's time goes

The node runs as `serve` wires it (Node, no workers), with node.ingest_processes set to each
value given; it acknowledges only after fsync, rename and the database commit (durable);
storescp writes without fsync. Each round sends the same files to every receiver in turn
(4 senders: 4 storescu processes, a quarter of the files each); figures are instances/s, the
median over the rounds, and the ratio node / storescp --fork. The machine's load average is
printed: on a shared machine compare within one run.

--phases runs the SCP alone in this process and times the durable steps of each C-STORE
(wall and CPU of the handler, the spool write with its fsyncs, the database commit); what the
handler does not account for is pynetdicom receiving the data.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# `python bench/X.py` puts bench/ first on sys.path, where bench/training.py would shadow the
# training package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scxnn_node.testing.dcmtk import dcmtk_tool
from scxnn_node.testing.loopback import free_port, node_config
from scxnn_node.testing.samples import sample_copies

SENDERS = (1, 4)


def run_node(workdir: str, bundle: str, port: int, processes: int, ready, stop) -> None:
    from scxnn_node.node import Node

    config = node_config(
        Path(workdir),
        node={"port": port, "max_associations": 64, "ingest_processes": processes},
        allowed_callers=None,
        model={"bundle": bundle},
        study={"quiet_seconds": 3600},  # no job made while the bench runs
        logging={"level": "WARNING"},
    )
    node = Node(config, workers=False)
    node.start()
    ready.set()
    stop.wait()
    node.stop(timeout=10)


def send(port: int, files: list[Path], senders: int) -> float:
    """Seconds for `senders` concurrent storescu processes to send all files."""
    groups = [files[i::senders] for i in range(senders)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                dcmtk_tool("storescu"),
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


def time_storescp(root: Path, files: list[Path], senders: int, fork: bool) -> float:
    out = Path(tempfile.mkdtemp(dir=root, prefix="storescp-"))
    port = free_port()
    options = ["--fork"] if fork else []
    storescp = subprocess.Popen(
        [dcmtk_tool("storescp"), *options, "-aet", "SCXNN", "+xa", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        return send(port, files, senders)
    finally:
        storescp.terminate()
        storescp.wait()
        shutil.rmtree(out, ignore_errors=True)


def time_node(root: Path, bundle: Path, files: list[Path], senders: int, processes: int) -> float:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    port = free_port()
    workdir = Path(tempfile.mkdtemp(dir=root, prefix="node-"))
    node = ctx.Process(
        target=run_node, args=(str(workdir), str(bundle), port, processes, ready, stop)
    )
    node.start()
    if not ready.wait(300):
        node.kill()
        raise RuntimeError("the node did not start")
    try:
        return send(port, files, senders)
    finally:
        stop.set()
        node.join(60)
        shutil.rmtree(workdir, ignore_errors=True)


def compare(root: Path, files: list[Path], repeat: int, process_counts: list[int]) -> None:
    from training.untrained import untrained_bundle

    bundle = untrained_bundle("densenet_small", 32, ["pneumothorax"], out=root / "bundle").path
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    print(f"{len(files)} files, {megabytes:.0f} MB (real 1024x1024 DX, implicit VR)")
    columns = [f"node x{n}" for n in process_counts] + ["storescp --fork", "storescp"]
    seconds: dict[tuple[str, int], list[float]] = {}
    for round_ in range(repeat):
        print(f"round {round_ + 1}/{repeat}, load average {os.getloadavg()[0]:.1f}", flush=True)
        for senders in SENDERS:
            for column in columns:
                if column.startswith("node"):
                    n = int(column.split("x")[1])
                    took = time_node(root, bundle, files, senders, n)
                else:
                    took = time_storescp(root, files, senders, fork="--fork" in column)
                seconds.setdefault((column, senders), []).append(took)
    print(f"instances/s, median of {repeat} (load average now {os.getloadavg()[0]:.1f})")
    print(f"{'senders':>8} | " + " | ".join(f"{c:>15}" for c in columns) + " | node / --fork")
    for senders in SENDERS:
        rates = {c: len(files) / statistics.median(seconds[(c, senders)]) for c in columns}
        fork = rates["storescp --fork"]
        ratios = ", ".join(f"x{n} {rates[f'node x{n}'] / fork:.2f}" for n in process_counts)
        figures = " | ".join(f"{rates[c]:15.1f}" for c in columns)
        print(f"{senders:>8} | {figures} | {ratios}")


def phases(root: Path, files: list[Path]) -> None:
    """The SCP in this process, its durable steps timed (wall and this thread's CPU)."""
    import scxnn_node.dicom.scp as scp_module
    from scxnn_node.store.db import Database
    from scxnn_node.store.spool import Spool

    totals: Counter[str] = Counter()
    lock = threading.Lock()

    def timed(name: str, func: Callable) -> Callable:
        def run(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return func(*args, **kwargs)
            finally:
                with lock:
                    totals[f"{name} wall"] += time.perf_counter() - wall
                    totals[f"{name} cpu"] += time.thread_time() - cpu

        return run

    scp_module.IngestService.store = timed("handler", scp_module.IngestService.store)
    scp_module.record_instance = timed("database commit", scp_module.record_instance)
    Spool.store_file = timed("spool link+fsync+rename", Spool.store_file)
    for senders in SENDERS:
        totals.clear()
        config = node_config(
            root / f"phases-{senders}", node={"max_associations": 64}, allowed_callers=None
        )
        db = Database(config.database.url)
        db.create_schema()
        scp = scp_module.StoreScp(
            config, scp_module.IngestService(config, db, Spool(config.storage.spool_dir))
        )
        scp.start()
        before = os.times()
        took = send(config.node.port, files, senders)
        after = os.times()
        scp.shutdown()
        db.dispose()
        cpu = after.user - before.user + after.system - before.system
        print(
            f"{senders} sender(s): {len(files) / took:.1f} inst/s, per instance "
            f"{1000 * took / len(files):.1f} ms wall, node process CPU "
            f"{1000 * cpu / len(files):.1f} ms (load average {os.getloadavg()[0]:.1f})"
        )
        for name, total in sorted(totals.items()):
            print(f"    {name:32} {1000 * total / len(files):6.1f} ms per instance")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--files", type=int, default=120)
    parser.add_argument("--repeat", type=int, default=1, help="rounds; figures are medians")
    parser.add_argument(
        "--ingest-processes", default="1,2", help="node.ingest_processes values, comma-separated"
    )
    parser.add_argument("--phases", action="store_true", help="time the node's steps instead")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scxnn-ingest-"))
    try:
        files = sample_copies(root / "files", args.files, per_study=8)
        if args.phases:
            phases(root, files)
        else:
            counts = [int(n) for n in args.ingest_processes.split(",")]
            compare(root, files, args.repeat, counts)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
