"""Load: many concurrent associations into a real `scxnn-node serve`, audited from outside.

    .venv/bin/python bench/load.py                        # 8 associations x 500 instances
    .venv/bin/python bench/load.py --associations 4 --instances 100 --size 512
    .venv/bin/python bench/load.py --database postgresql+psycopg://user@host/db

Each association is its own sender thread, one association each, sending its instances
back to back (generated 12-bit chest DX images of --size px, --per-study per study). Printed:
C-STORE throughput while all senders run (instances/s, MB/s, from the first association to
the last acknowledgement), the time until every study was triaged and its results delivered
to a loopback PACS (storescp), the peak resident memory of the node's process tree (serve
and its workers, sampled every 0.2 s), and the audit: every acknowledged instance present and
correctly attributed, every study reported, nothing lost.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydicom.uid import generate_uid

# `python bench/X.py` puts bench/ first on sys.path, where bench/training.py would shadow the
# training package; the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scxnn_node.testing.audit import Auditor, NodeDatabase, wait_settled
from scxnn_node.testing.datasets import chest_dataset, write_part10
from scxnn_node.testing.dcmtk import Storescp
from scxnn_node.testing.node_process import MemoryPeak, NodeProcess, bundle_version, serve_config
from scxnn_node.testing.peers import Sent, store_files
from training.untrained import untrained_bundle


def make_files(folder: Path, count: int, per_study: int, size: int, seed: int) -> list[Path]:
    files = []
    study = generate_uid()
    for i in range(count):
        if i % per_study == 0:
            study = generate_uid()
        ds = chest_dataset(study_uid=study, size=size, seed=seed * 100_000 + i)
        files.append(write_part10(ds, folder / f"{i:05d}.dcm"))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--associations", type=int, default=8)
    parser.add_argument("--instances", type=int, default=500, help="per association")
    parser.add_argument("--per-study", type=int, default=4, help="instances per study")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--bundle", type=Path, help="default: an untrained 64 px test bundle")
    parser.add_argument("--devices", default="cpu", help="comma-separated worker devices")
    parser.add_argument("--database", help="database URL (default: SQLite in the run directory)")
    parser.add_argument("--settle-seconds", type=float, default=3600)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scxnn-load-"))
    bundle = args.bundle or untrained_bundle(
        "densenet_small", 64, ["pneumothorax", "nodule", "cardiomegaly"], out=root / "bundle"
    ).path
    print(f"writing {args.associations} x {args.instances} files of {args.size} px ...")
    groups = [
        make_files(root / "sent" / f"a{a}", args.instances, args.per_study, args.size, a)
        for a in range(args.associations)
    ]
    megabytes = sum(f.stat().st_size for g in groups for f in g) / 1e6
    pacs = Storescp(root / "pacs").start()
    config = serve_config(
        root / "node",
        bundle,
        database_url=args.database,
        pacs_port=pacs.port,
        node={"max_associations": max(16, args.associations * 2)},
        model={"devices": args.devices.split(",")},
        study={"quiet_seconds": 2.0},
        worker={"lease_seconds": 120, "heartbeat_seconds": 10},
    )
    node = NodeProcess(config, root / "node").start()
    results: list[list[Sent]] = [[] for _ in groups]

    def sender(index: int) -> None:
        results[index] = store_files(node.port, groups[index], timeout=120)

    try:
        with MemoryPeak(node) as memory:
            threads = [threading.Thread(target=sender, args=(i,)) for i in range(len(groups))]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            sending = time.monotonic() - started
            db = NodeDatabase(node.database_url)
            settled = wait_settled(db, args.settle_seconds, polls=5)
            finished = time.monotonic() - started
        sends = [s for batch in results for s in batch]
        auditor = Auditor(db, node.spool_dir, [bundle_version(bundle)], pacs.directory)
        audit = auditor.audit(sends)
        status = node.status()
        db.dispose()
    finally:
        node.stop()
        pacs.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    acknowledged = sum(s.acknowledged for s in sends)
    studies = args.associations * -(-args.instances // args.per_study)
    print(
        f"{args.associations} associations x {args.instances} instances ({megabytes:.0f} MB): "
        f"{acknowledged}/{len(sends)} acknowledged in {sending:.1f} s = "
        f"{acknowledged / sending:.1f} instances/s, {megabytes / sending:.1f} MB/s"
    )
    print(
        f"all {studies} studies triaged and delivered after {finished:.1f} s "
        f"({studies / finished:.2f} studies/s){'' if settled else ' (NOT settled: timed out)'}"
    )
    print(f"peak RSS of the node process tree: {memory.peak / 2**20:.0f} MiB")
    print(f"status: studies {status['studies']}, deliveries {status['deliveries']}")
    print(audit.report())
    print(audit.summary(1))


if __name__ == "__main__":
    main()
