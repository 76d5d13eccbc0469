"""End to end on loopback: storescu -> node -> worker -> SR + summary -> storescp (the PACS)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import DATA
from dicom_factory import chest_pixels, make_dataset, write
from sqlalchemy import select

from scxnn_node.node import Node
from scxnn_node.store.models import Delivery, Job, Result
from scxnn_node.testing.dcmtk import Storescp, storescu
from scxnn_node.testing.loopback import node_config, wait_for


def _config(tmp_path: Path, bundle: Path, pacs_port: int, url: str | None = None, **extra):
    return node_config(
        tmp_path,
        database={"url": url or f"sqlite:///{tmp_path / 'node.db'}"},
        model={"bundle": str(bundle)},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs_port,
                "outputs": ["sr", "summary"],
            }
        ],
        delivery={"backoff_seconds": 0.5, "max_backoff_seconds": 1.0, "max_attempts": 50},
        scheduler={
            "readiness_seconds": 0.2,
            "delivery_seconds": 0.3,
            "lease_recovery_seconds": 0.5,
        },
        worker={"poll_seconds": 0.2, "lease_seconds": 3, "heartbeat_seconds": 1},
        **extra,
    )


def _by_class(files: list[Path]) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for f in files:
        ds = pydicom.dcmread(f)
        out.setdefault(ds.SOPClassUID.name, []).append(ds)
    return out


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture
def pacs(tmp_path):
    receiver = Storescp(tmp_path / "pacs").start()
    yield receiver
    receiver.stop()


def test_pacs_gets_sr_and_summary_for_every_chest_study(
    tmp_path, demo_bundle_dir, pacs, database_url
):
    config = _config(tmp_path, demo_bundle_dir, pacs.port, database_url)
    node = Node(config)
    node.start()
    try:
        files = [DATA / "nih_dx_no_finding.dcm", DATA / "siim_cr_negative.dcm"]
        knee = write(
            make_dataset(chest_pixels(128, bits=12), body_part="KNEE"), tmp_path / "knee.dcm"
        )
        assert storescu(config.node.port, *files, knee).returncode == 0
        received = wait_for(lambda: len(pacs.received()) >= 4 and pacs.received(), 180)
        time.sleep(1.5)  # nothing more may arrive (the knee study gets no output)
        kinds = _by_class(pacs.received())
        srs, scs = kinds["Comprehensive 3D SR Storage"], kinds["Secondary Capture Image Storage"]
        assert len(srs) == 2 and len(scs) == 2 and len(received) == 4
        sources = {pydicom.dcmread(f).StudyInstanceUID for f in files}
        assert {sr.StudyInstanceUID for sr in srs} == sources  # back into the same studies
        for sr in srs:
            assert sr.SeriesDescription.startswith("AI TRIAGE: ")
            assert sr.SeriesDescription.endswith("[DEMO]")
            assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
            assert sr.CurrentRequestedProcedureEvidenceSequence
        for path in pacs.received():
            assert _dciodvfy_errors(path) == [], path
        for sc in scs:
            assert sc.SeriesDescription.startswith("AI TRIAGE: ")
    finally:
        node.stop()


def test_same_instance_twice_gives_one_sr_and_new_instance_amends(tmp_path, demo_bundle_dir, pacs):
    config = _config(tmp_path, demo_bundle_dir, pacs.port)
    node = Node(config)
    node.start()
    try:
        study = pydicom.uid.generate_uid()
        first = write(
            make_dataset(chest_pixels(128, seed=1, bits=12), study_uid=study), tmp_path / "a.dcm"
        )
        assert storescu(config.node.port, first).returncode == 0
        wait_for(lambda: len(pacs.received()) >= 2, 120)
        assert storescu(config.node.port, first).returncode == 0  # re-sent
        time.sleep(3)
        assert len(pacs.received()) == 2  # no second SR for the same input
        second = write(
            make_dataset(chest_pixels(128, seed=2, bits=12), study_uid=study), tmp_path / "b.dcm"
        )
        assert storescu(config.node.port, second).returncode == 0
        wait_for(lambda: len(pacs.received()) >= 4, 120)
        srs = _by_class(pacs.received())["Comprehensive 3D SR Storage"]
        assert len(srs) == 2
        older, newer = sorted(srs, key=lambda ds: len(ds.get("PredecessorDocumentsSequence", [])))
        predecessor = newer.PredecessorDocumentsSequence[0]
        referenced = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == older.SOPInstanceUID
        assert len(newer.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence) == 2
    finally:
        node.stop()


def test_destination_down_gets_its_sr_when_back(tmp_path, demo_bundle_dir):
    pacs = Storescp(tmp_path / "late-pacs")  # not started yet
    config = _config(tmp_path, demo_bundle_dir, pacs.port)
    node = Node(config)
    node.start()
    try:
        assert storescu(config.node.port, DATA / "siim_cr_negative.dcm").returncode == 0

        def failed_attempts():
            with node.db.session() as s:
                rows = s.execute(select(Delivery)).scalars().all()
                return rows and all(r.attempts >= 2 and r.state == "pending" for r in rows)

        wait_for(failed_attempts, 120)
        pacs.start()
        wait_for(lambda: len(pacs.received()) >= 2, 60)

        def delivery_states():
            with node.db.session() as s:
                return {r.state for r in s.execute(select(Delivery)).scalars()}

        # The files land at the PACS just before the dispatcher commits their state.
        wait_for(lambda: delivery_states() == {"sent"}, 10)
        assert delivery_states() == {"sent"}
    finally:
        node.stop()
        pacs.stop()


def test_worker_killed_mid_study_still_gives_exactly_one_sr(tmp_path, demo_bundle_dir, pacs):
    config = _config(tmp_path, demo_bundle_dir, pacs.port)
    node = Node(config, workers=False)  # workers started by hand below
    node.start()
    config_file = tmp_path / "c.yaml"
    worker_cmd = [sys.executable, "-m", "scxnn_node.cli", "worker", "--config", str(config_file)]
    (tmp_path / "c.yaml").write_text(config.model_dump_json())  # JSON is YAML
    env = {**os.environ}
    try:
        assert storescu(config.node.port, DATA / "nih_dx_no_finding.dcm").returncode == 0
        victim = subprocess.Popen(
            worker_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def claimed():
            with node.db.session() as s:
                return s.execute(select(Job).where(Job.state == "claimed")).first()

        wait_for(claimed, 120, interval=0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        rescuer = subprocess.Popen(
            worker_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for(lambda: len(pacs.received()) >= 2, 180)
            time.sleep(3)
            kinds = _by_class(pacs.received())
            assert len(kinds["Comprehensive 3D SR Storage"]) == 1
            with node.db.session() as s:
                assert len(s.execute(select(Result)).scalars().all()) == 1
        finally:
            rescuer.send_signal(signal.SIGTERM)
            rescuer.wait(30)
    finally:
        node.stop()


def _children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.append(int(stat.parent.name))
    return children


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_worker_killed_holding_several_studies_still_gives_exactly_one_sr_each(
    tmp_path, demo_bundle_dir, pacs
):
    config = _config(tmp_path, demo_bundle_dir, pacs.port)
    pipelined = config.worker.model_copy(update={"studies_in_flight": 3, "decode_processes": 1})
    config = config.model_copy(update={"worker": pipelined})
    node = Node(config, workers=False)  # workers started by hand below
    node.start()
    config_file = tmp_path / "c.yaml"
    worker_cmd = [sys.executable, "-m", "scxnn_node.cli", "worker", "--config", str(config_file)]
    config_file.write_text(config.model_dump_json())  # JSON is YAML
    studies = [pydicom.uid.generate_uid() for _ in range(3)]
    files = [
        write(
            make_dataset(chest_pixels(128, seed=seed, bits=12), study_uid=study),
            tmp_path / f"{seed}.dcm",
        )
        for seed, study in enumerate(studies)
    ]
    try:
        assert storescu(config.node.port, *files).returncode == 0

        def queued() -> bool:
            with node.db.session() as s:
                return len(s.execute(select(Job)).all()) == 3

        wait_for(queued, 60, interval=0.05)
        victim_log = (tmp_path / "victim.log").open("wb")
        victim = subprocess.Popen(worker_cmd, stdout=victim_log, stderr=subprocess.STDOUT)

        def several_claimed() -> int:
            with node.db.session() as s:
                claimed = s.execute(select(Job).where(Job.state == "claimed")).scalars().all()
            return len(claimed) >= 2 and bool(_children_of(victim.pid)) and len(claimed)

        try:
            held = wait_for(several_claimed, 300, interval=0.02)  # a loaded machine: slow start
        except TimeoutError:
            victim.kill()
            raise AssertionError((tmp_path / "victim.log").read_text()[-3000:]) from None
        decoders = _children_of(victim.pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        assert held >= 2  # the victim held several studies when it died
        wait_for(lambda: not any(_running(pid) for pid in decoders), 30, interval=0.1)
        rescuer = subprocess.Popen(
            worker_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for(lambda: len(pacs.received()) >= 2 * len(studies), 240)
            time.sleep(3)
            srs = _by_class(pacs.received())["Comprehensive 3D SR Storage"]
            assert sorted(sr.StudyInstanceUID for sr in srs) == sorted(studies)  # one each
            with node.db.session() as s:
                results = s.execute(select(Result)).scalars().all()
            assert sorted(r.study_instance_uid for r in results) == sorted(studies)
        finally:
            rescuer.send_signal(signal.SIGTERM)
            rescuer.wait(30)
    finally:
        node.stop()
