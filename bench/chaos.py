"""Chaos runs against a real `scxnn-node serve`, audited from outside.

    .venv/bin/python bench/chaos.py --runs 10
    .venv/bin/python bench/chaos.py --runs 5 --senders 6 --studies 20 --faults 15
    .venv/bin/python bench/chaos.py --runs 3 --database postgresql+psycopg://.../db

Each run starts a fresh node (two CPU workers, untrained test bundles) and a loopback PACS
(storescp); senders on several associations send studies, re-send instances and add late ones,
retrying like a PACS, while random faults hit: kill -9 of the serve process (and its group, as
systemd does), kill -9 of a worker, a worker frozen (SIGSTOP) past its lease in the middle of a
study, the PACS down for a few seconds, a graceful restart, a restart with another bundle.
Then the node is healed (PACS up, serve started if dead), left to finish, and audited: every
acknowledged instance present and correctly attributed, every study reported, exactly one SR
per study and instance set with the same UIDs in the database, the outbox and the PACS, and no
result from a stale lease or another bundle. The last line is the total:

    runs 10, lost 0, misattributed 0, duplicated 0, stuck 0, stale 0, wrong bundle 0, ...

With --database, each run gets a database of its own on that PostgreSQL server (created and
dropped; the URL names a database the user may create databases from).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

# `python bench/X.py` puts bench/ first on sys.path, where bench/training.py would shadow the
# training package; the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scxnn_node.model.bundle import write_bundle
from scxnn_node.testing.audit import Audit
from scxnn_node.testing.chaos import FAULTS, ChaosPlan, ChaosRun
from training.untrained import untrained_parts

FINDINGS = ("pneumothorax", "nodule", "cardiomegaly")


def build_bundles(root: Path) -> list[Path]:
    """Two untrained 64 px bundles of different versions (the switch_bundle fault)."""
    bundles = []
    for seed, version in enumerate(("1.0.0", "2.0.0")):
        manifest, states, stage = untrained_parts("densenet_small", 64, FINDINGS, seed=seed)
        out = root / f"bundle-{version}"
        write_bundle(out, replace(manifest, name="chaos", version=version), states, stage)
        bundles.append(out)
    return bundles


class PostgresDatabases:
    """One throwaway database per run on a PostgreSQL server."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.plain = admin_url.replace("postgresql+psycopg://", "postgresql://")

    def create(self) -> str:
        import psycopg

        name = f"scxnn_chaos_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.plain, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"

    def drop(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.plain, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--studies", type=int, default=8, help="studies per sender")
    parser.add_argument("--instances", type=int, default=3, help="at most, per study")
    parser.add_argument("--faults", type=int, default=8, help="faults per run")
    parser.add_argument("--only", action="append", choices=FAULTS, help="these faults only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database", help="PostgreSQL admin URL (default: SQLite per run)")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scxnn-chaos-"))
    databases = PostgresDatabases(args.database) if args.database else None
    total = Audit()
    try:
        bundles = build_bundles(root)
        for run_number in range(args.runs):
            plan = ChaosPlan(
                senders=args.senders,
                studies_per_sender=args.studies,
                instances_per_study=args.instances,
                faults=args.faults,
                seed=args.seed + run_number,
            )
            url = databases.create() if databases else None
            run_root = root / f"run{run_number}"
            started = time.monotonic()
            try:
                run = ChaosRun(run_root, bundles, plan, url, faults=args.only or FAULTS)
                audit = run.run()
            finally:
                if databases and url:
                    databases.drop(url)
            total.merge(audit)
            print(
                f"run {run_number + 1}/{args.runs} ({time.monotonic() - started:.0f} s, "
                f"{audit.acknowledged} acknowledged): {audit.summary(1)}"
            )
            if not audit.ok or audit.notes:
                print(audit.report())
            if not args.keep:
                shutil.rmtree(run_root, ignore_errors=True)
            else:
                print(f"  kept in {run_root}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(total.summary(args.runs))


if __name__ == "__main__":
    main()
