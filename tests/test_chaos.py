"""A short chaos run, on SQLite and on PostgreSQL: three senders on their own associations while
the serve process is killed (-9) and restarted, a worker is killed, a worker is frozen past its
lease in the middle of a study, the PACS goes down and up, and the node restarts with another
bundle. Then, healed and idle, the node is audited from outside: every acknowledged instance
kept and correctly attributed, every study reported, one current SR per study and instance set
with the same UIDs in the database, the outbox and the PACS, and no result from a stale lease
or another bundle. `bench/chaos.py --runs N` runs longer and random versions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from scxnn_node.config import load_config
from scxnn_node.model.bundle import write_bundle
from scxnn_node.testing.chaos import ChaosPlan, ChaosRun
from training.untrained import untrained_parts

FAULT_ORDER = ("pacs_down", "pause_mid_job", "kill_serve", "kill_helper", "switch_bundle")


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of another version, for the restart that switches bundles."""
    manifest, states, stage = untrained_parts(
        "densenet_small", 64, ("pneumothorax", "nodule", "cardiomegaly"), seed=1
    )
    out = tmp_path_factory.mktemp("bundles") / "second"
    write_bundle(out, replace(manifest, name="test-bundle", version="2.0.0"), states, stage)
    return out


def test_chaos_run_loses_and_confuses_nothing(
    tmp_path: Path,
    small_bundle_dir: Path,
    second_bundle: Path,
    database_url: str,
) -> None:
    plan = ChaosPlan(
        senders=3,
        studies_per_sender=4,
        instances_per_study=2,
        faults=len(FAULT_ORDER),
        seed=3,
        shuffle_faults=False,
    )
    run = ChaosRun(
        tmp_path, [small_bundle_dir, second_bundle], plan, database_url, faults=FAULT_ORDER
    )
    audit = run.run()
    print(audit.summary(1), audit.report(), sep="\n")  # shown with -s or on failure
    assert audit.acknowledged >= plan.senders * plan.studies_per_sender
    assert run.injected == list(FAULT_ORDER), run.injected
    assert audit.ok, audit.summary(1) + "\n" + audit.report()


def test_what_a_fault_leaves_the_node_waiting_on_ends_well_within_the_settle_time(
    tmp_path: Path, small_bundle_dir: Path
) -> None:
    """A kill -9 leaves jobs and deliveries leased to a dead process, retaken only when their
    lease expires, and each fault a job meets doubles its retry backoff. The chaos node's
    config must keep these waits short against the settle time, or the audit finds a healthy
    node stuck: a delivery claimed just before kill_serve stayed leased for the default 600 s,
    past the 300 s settle ("stuck: delivery 7 (sr of result 4) left pending")."""
    plan = ChaosPlan()
    run = ChaosRun(tmp_path, [small_bundle_dir], plan)
    run.node.write_config()
    config = load_config(run.node.config_path, environ={})  # as serve reads it
    # The worst case: every fault of the run gives up the same job, each after its lease.
    job_waits = sum(
        config.worker.lease_seconds + config.worker.retry_backoff_seconds * 2**attempt
        for attempt in range(plan.faults)
    )
    assert config.delivery.lease_seconds * plan.faults < plan.settle_seconds / 4
    assert job_waits < plan.settle_seconds / 4, job_waits


def test_postgresql_dropping_every_connection_loses_and_confuses_nothing(
    tmp_path: Path, small_bundle_dir: Path, postgres_url: str
) -> None:
    """PostgreSQL restarted (or failed over) under the node, again and again, while studies
    arrive: every connection ends, mid-transaction or idle. A C-STORE whose commit is cut off
    is not acknowledged (the sender sends it again), and the node carries on by itself."""
    plan = ChaosPlan(
        senders=3,
        studies_per_sender=4,
        instances_per_study=2,
        faults=4,
        seed=5,
        shuffle_faults=False,
    )
    run = ChaosRun(tmp_path, [small_bundle_dir], plan, postgres_url, faults=("database_drop",))
    audit = run.run()
    print(audit.summary(1), audit.report(), sep="\n")
    assert [f.split(" ")[0] for f in run.injected] == ["database_drop"] * plan.faults
    assert audit.acknowledged >= plan.senders * plan.studies_per_sender
    assert audit.ok, audit.summary(1) + "\n" + audit.report()
