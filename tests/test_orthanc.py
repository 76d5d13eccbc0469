"""Orthanc as the PACS, end to end: a real PACS forwards a chest study to the node (REST
`POST /modalities/scxnn/store`), the node sends its SR and summary image back, and Orthanc's
REST API and DICOMweb show them in the same study as the image. Orthanc (Debian `orthanc`,
`orthanc-dicomweb`) runs as this test's own process on loopback ports with a generated config.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scxnn_node.store.models import DeliveryState
from scxnn_node.testing.datasets import sample_files
from scxnn_node.testing.node_process import NodeProcess, serve_config
from scxnn_node.testing.peers import free_port, wait_until

ORTHANC_AE = "ORTHANC"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """An Orthanc server of our own: its REST API on one loopback port, DICOM on another."""

    def __init__(self, root: Path, node_port: int) -> None:
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config = {
            "Name": "scxnn-test-pacs",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"scxnn": ["SCXNN", "127.0.0.1", node_port]},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        executable = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
        if executable is None:
            pytest.fail("Orthanc is not installed: scripts/setup.sh installs Debian orthanc")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "orthanc.json"
        config.write_text(json.dumps(self.config))
        with open(self.root / "orthanc.log", "wb") as log:
            self.process = subprocess.Popen(
                [executable, str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._up, 60, 0.2)
        return self

    def _up(self) -> bool:
        try:
            return self.get("/system")["DicomAet"] == ORTHANC_AE
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        with urllib.request.urlopen(req, timeout=120) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: bytes) -> Any:
        return self.request("POST", path, body)


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
