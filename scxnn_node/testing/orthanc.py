"""Orthanc as the PACS on loopback: our own `Orthanc` process (Debian `orthanc`) with its
DICOMweb plugin (`orthanc-dicomweb`), a generated config, its REST API on one free port and DICOM
on another; it can be stopped and started again on the same ports and storage.

Like the rest of the black-box harness it reaches the node only from outside (DICOM C-STORE to
the node, the node's C-STORE or STOW-RS back), and is read through its REST API.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from scxnn_node.testing.peers import free_port, wait_until

ORTHANC_AE = "ORTHANC"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """An Orthanc server of our own. `node_port`, when given, is the node as Orthanc's modality
    `scxnn` (for `POST /modalities/scxnn/store`); `users` (name -> password) turns on HTTP
    basic auth for its REST API and DICOMweb."""

    def __init__(
        self, root: Path, node_port: int | None = None, users: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.users = dict(users or {})
        self.config: dict[str, Any] = {
            "Name": "scxnn-test-pacs",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomModalities": (
                {"scxnn": ["SCXNN", "127.0.0.1", node_port]} if node_port is not None else {}
            ),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        self.process: subprocess.Popen | None = None

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self) -> Orthanc:
        executable = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
        if executable is None:
            raise RuntimeError("Orthanc is not installed: scripts/setup.sh installs Debian orthanc")
        if not DICOMWEB_PLUGIN.is_file():
            raise RuntimeError(f"{DICOMWEB_PLUGIN} is missing: install Debian orthanc-dicomweb")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "orthanc.json"
        config.write_text(json.dumps(self.config))
        with open(self.root / "orthanc.log", "ab") as log:
            self.process = subprocess.Popen(
                [executable, str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._up, 60, 0.2)
        return self

    def _up(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited; see {self.root / 'orthanc.log'}")
        try:
            return self.get("/system")["DicomAet"] == ORTHANC_AE
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        if self.users:
            name, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{name}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=120) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: bytes) -> Any:
        return self.request("POST", path, body)

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The simplified tags of every instance Orthanc holds in the study (none: [])."""
        found = self.post(
            "/tools/lookup", study_instance_uid.encode()
        )  # -> [{"Type": "Study", "ID": ...}] when Orthanc has the study
        studies = [f["ID"] for f in found if f.get("Type") == "Study"]
        if not studies:
            return []
        instances = self.get(f"/studies/{studies[0]}/instances")
        return [self.get(f"/instances/{i['ID']}/simplified-tags") for i in instances]
