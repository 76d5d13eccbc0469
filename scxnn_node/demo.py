"""`scxnn-node demo`: the whole flow on one machine, with a loopback receiver as the PACS.

Runs the bundle of config's model.bundle (`scxnn-train demo-bundle` builds the demo bundle;
`make demo` does so when it is missing), starts the node (SCP, scheduler, a worker), starts a
receiver standing in for the PACS, sends the bundled sample studies, waits for their SR and
summary image, prints each study's verdict and where its outputs landed, and shuts down.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import select

from scxnn_node.config import NodeConfig
from scxnn_node.dicom.scu import Peer, is_success, send_files
from scxnn_node.model.manifest import MANIFEST_FILE, NOT_FOR_CLINICAL_USE
from scxnn_node.node import Node
from scxnn_node.store.models import Delivery, DeliveryState, OutputKind, Result
from scxnn_node.testing.loopback import free_port

log = logging.getLogger(__name__)
SAMPLES = Path(__file__).parent / "samples"


class LoopbackReceiver:
    """A C-STORE SCP that writes what it receives to a folder: the demo's PACS."""

    def __init__(self, directory: Path, port: int, ae_title: str = "DEMOPACS") -> None:
        self.directory = directory
        self.port = port
        self.ae = AE(ae_title=ae_title)
        for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context("1.2.840.10008.1.1")
        self.server = None

    def _on_store(self, event: evt.Event) -> int:
        ds: Dataset = event.dataset
        ds.file_meta = event.file_meta
        path = self.directory / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return 0x0000

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def demo_config(base: NodeConfig, workdir: Path, receiver_port: int) -> NodeConfig:
    raw = base.model_dump(mode="json")
    raw["node"] = {**raw["node"], "host": "127.0.0.1", "port": free_port()}
    raw["allowed_callers"] = [{"ae_title": "DEMOSCU"}]
    raw["storage"] = {**raw["storage"], "spool_dir": str(workdir / "spool"), "min_free_bytes": 0}
    raw["database"] = {"url": f"sqlite:///{workdir / 'node.db'}"}
    raw["study"] = {"quiet_seconds": 1.0}
    raw["destinations"] = [
        {
            "name": "demo-pacs",
            "ae_title": "DEMOPACS",
            "host": "127.0.0.1",
            "port": receiver_port,
            "outputs": ["sr", "summary"],
        }
    ]
    raw["scheduler"] = {**raw["scheduler"], "readiness_seconds": 0.5, "delivery_seconds": 0.5}
    raw["worker"] = {**raw["worker"], "poll_seconds": 0.2}
    return NodeConfig.model_validate(raw)


def run_demo(base: NodeConfig, workdir: Path = Path("var/demo"), timeout: float = 600) -> int:
    bundle = Path(base.model.bundle)
    if not (bundle / MANIFEST_FILE).is_file():
        print(
            f"scxnn-node: no bundle at {bundle} (config model.bundle). Build the demo bundle "
            f"with `scxnn-train demo-bundle --out {bundle}` (a few minutes on a CPU), or run "
            "`make demo`, which builds it when it is missing.",
            file=sys.stderr,
        )
        return 2
    shutil.rmtree(workdir, ignore_errors=True)
    receiver_port = free_port()
    config = demo_config(base, workdir, receiver_port)
    receiver = LoopbackReceiver(workdir / "pacs", receiver_port)
    receiver.start()
    node = Node(config)
    node.start()
    try:
        samples = sorted(SAMPLES.glob("*.dcm"))
        studies = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in samples}
        statuses = send_files(
            Peer(config.node.ae_title, "127.0.0.1", config.node.port), "DEMOSCU", samples
        )
        print(
            f"sent {sum(is_success(s) for s in statuses)}/{len(samples)} sample files "
            f"to {config.node.ae_title}@127.0.0.1:{config.node.port}",
            flush=True,
        )
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with node.db.session() as session:
                results = session.execute(select(Result)).scalars().all()
                deliveries = session.execute(select(Delivery)).scalars().all()
            if (
                len(results) >= len(studies)
                and deliveries
                and all(d.state in (DeliveryState.SENT, DeliveryState.DEAD) for d in deliveries)
            ):
                break
            time.sleep(0.5)
        else:
            print("timed out waiting for results", flush=True)
            return 1
        for result in results:
            data = json.loads(result.result_json)
            tier = f" {data['risk_tier']}" if data["risk_tier"] else ""
            print(f"study {result.study_instance_uid}: {data['verdict']}{tier}")
            for d in deliveries:
                if d.result_id == result.id:
                    uid = (
                        result.sr_sop_instance_uid
                        if d.kind == OutputKind.SR
                        else result.summary_sop_instance_uid
                    )
                    landed = next(receiver.directory.glob(f"*_{uid}.dcm"), None)
                    print(f"  {d.kind:<8} {d.state} -> {landed}")
        demo = any(json.loads(r.result_json)["bundle"]["demo"] for r in results)
        if demo:
            print(NOT_FOR_CLINICAL_USE + ": results of the demo bundle (synthetic training data)")
        return 0 if all(d.state == DeliveryState.SENT for d in deliveries) else 1
    finally:
        node.stop()
        receiver.stop()
