"""Orthanc as the PACS, end to end: a real PACS forwards a chest study to the node (REST
`POST /modalities/scxnn/store`), the node sends its SR and summary image back, and Orthanc's
REST API and DICOMweb show them in the same study as the image. Orthanc (Debian `orthanc`,
`orthanc-dicomweb`) runs as this test's own process on loopback ports with a generated config.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scxnn_node.store.models import DeliveryState
from scxnn_node.testing.datasets import sample_files
from scxnn_node.testing.node_process import NodeProcess, serve_config
from scxnn_node.testing.orthanc import ORTHANC_AE, Orthanc
from scxnn_node.testing.peers import wait_until


@pytest.fixture
def orthanc_and_node(
    tmp_path: Path, small_bundle_dir: Path
) -> Iterator[tuple[Orthanc, NodeProcess]]:
    config = serve_config(
        tmp_path / "node", small_bundle_dir, allowed_callers=[{"ae_title": ORTHANC_AE}]
    )
    orthanc = Orthanc(tmp_path / "orthanc", int(config["node"]["port"])).start()
    config["destinations"] = [
        {
            "name": "orthanc",
            "ae_title": ORTHANC_AE,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
            "outputs": ["sr", "summary"],
        }
    ]
    node = NodeProcess(config, tmp_path / "node")
    try:
        node.start()
        yield orthanc, node
    finally:
        node.stop()
        orthanc.stop()


def test_orthanc_forwards_a_study_and_gets_sr_and_summary_into_it(orthanc_and_node) -> None:
    orthanc, node = orthanc_and_node
    image = next(p for p in sample_files() if p.name == "nih_dx_no_finding.dcm")
    uploaded = orthanc.post("/instances", image.read_bytes())
    study_id = uploaded["ParentStudy"]
    study_uid = orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]

    forwarded = orthanc.post("/modalities/scxnn/store", study_id.encode())
    assert forwarded["FailedInstancesCount"] == 0 and forwarded["InstancesCount"] == 1

    def instances() -> list[dict[str, Any]]:
        found = orthanc.get(f"/studies/{study_id}/instances")
        return found if len(found) >= 3 else []

    arrived = wait_until(instances, 240, 0.5)
    time.sleep(2)  # nothing more may arrive: one SR and one summary for one image
    arrived = orthanc.get(f"/studies/{study_id}/instances")
    tags = [orthanc.get(f"/instances/{i['ID']}/simplified-tags") for i in arrived]
    by_modality = {t["Modality"]: t for t in tags}
    assert len(tags) == 3 and set(by_modality) == {"DX", "SR", "OT"}, [
        (t["Modality"], t["SOPClassUID"]) for t in tags
    ]
    sr, summary = by_modality["SR"], by_modality["OT"]
    assert {sr["StudyInstanceUID"], summary["StudyInstanceUID"]} == {study_uid}
    assert sr["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert summary["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    assert sr["SeriesDescription"].startswith("AI TRIAGE: ")
    assert summary["SeriesDescription"] == sr["SeriesDescription"]
    assert len({t["SeriesInstanceUID"] for t in tags}) == 3  # results in series of their own

    series = orthanc.get(f"/dicom-web/studies/{study_uid}/series")
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    assert modalities == ["DX", "OT", "SR"]
    assert node.status()["deliveries"] == {DeliveryState.SENT: 2}  # the node knows it sent both
