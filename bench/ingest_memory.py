"""Memory of the SCP while it receives large instances concurrently.

    .venv/bin/python bench/ingest_memory.py                    # 4 x 128 MiB at once
    .venv/bin/python bench/ingest_memory.py --senders 8 --mib 64

The SCP runs alone in a child process (scxnn_node.testing.ingest_probe). After one small
instance has warmed it up, its peak resident memory is read; then `--senders` associations
each send one instance of `--mib` MiB at the same time, and the peak is read again. The growth
is what receiving cost in memory: a receiver holding each instance in memory grows by at least
senders x size; one that streams to disk stays near its warm-up peak.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from scxnn_node.testing.ingest_probe import IngestProbe, large_instance, send_concurrently

MIB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--mib", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scxnn-ingest-memory-") as folder:
        root = Path(folder)
        files = [
            large_instance(root / "sent" / f"{i}.dcm", args.mib * MIB, seed=i)
            for i in range(args.senders)
        ]
        probe = IngestProbe(root / "node").start()
        try:
            warm_up = large_instance(root / "sent" / "small.dcm", MIB)
            assert send_concurrently(probe.port, [warm_up])[0].status == 0
            before = probe.peak()
            statuses = [s.status for s in send_concurrently(probe.port, files)]
            after = probe.peak()
        finally:
            probe.stop()
    stored = sum(1 for s in statuses if s == 0)
    print(
        f"{args.senders} concurrent instances of {args.mib} MiB ({stored} stored): "
        f"peak RSS {before / MIB:.0f} MiB before, {after / MIB:.0f} MiB after, "
        f"growth {(after - before) / MIB:.0f} MiB"
    )


if __name__ == "__main__":
    main()
