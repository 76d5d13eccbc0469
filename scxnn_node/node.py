"""Wires the node: the SCP, the scheduler and one worker process per configured device."""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from multiprocessing.synchronize import Event as ProcessEvent

from scxnn_node.config import NodeConfig
from scxnn_node.dicom.scp import IngestService, StoreScp
from scxnn_node.dicom.scu import Peer, echo
from scxnn_node.logs import configure_logging
from scxnn_node.model.bundle import read_manifest, verify_bundle
from scxnn_node.scheduler import NodeScheduler
from scxnn_node.store.db import Database
from scxnn_node.store.spool import Spool

log = logging.getLogger(__name__)


def run_worker_process(config_json: str, device: str, stop: ProcessEvent) -> None:
    """Entry point of a worker process (spawned: no state shared with the parent)."""
    from scxnn_node.worker import TriageWorker

    config = NodeConfig.model_validate_json(config_json)
    configure_logging(config.logging.level, config.logging.json_format)
    worker = TriageWorker(config, device)
    thread_stop = threading.Event()
    watcher = threading.Thread(target=lambda: (stop.wait(), thread_stop.set()), daemon=True)
    watcher.start()
    worker.run(thread_stop)


class Node:
    """The running node. start() returns once the SCP listens; stop() shuts everything down."""

    def __init__(self, config: NodeConfig, workers: bool = True) -> None:
        self.config = config
        manifest = verify_bundle(config.model.bundle)  # refuse a bad bundle before listening
        self.bundle_version = manifest.version
        self.db = Database(config.database.url)
        self.db.create_schema()
        self.spool = Spool(config.storage.spool_dir)
        self.scp = StoreScp(config, IngestService(config, self.db, self.spool))
        self.scheduler = NodeScheduler(config, self.db, self.spool, self.bundle_version)
        self.with_workers = workers
        self._stop = mp.get_context("spawn").Event()
        self._processes: list[mp.process.BaseProcess] = []

    def start(self) -> None:
        for destination in self.config.destinations:
            ok, message = echo(Peer.of(destination), self.config.node.ae_title, timeout=5)
            log_fn = log.info if ok else log.warning
            log_fn(
                "C-ECHO %s (%s@%s:%d): %s",
                destination.name,
                destination.ae_title,
                destination.host,
                destination.port,
                message,
            )
        self.scp.start()
        self.scheduler.start()
        if self.with_workers:
            ctx = mp.get_context("spawn")
            for device in self.config.model.devices:
                process = ctx.Process(
                    target=run_worker_process,
                    args=(self.config.model_dump_json(), device, self._stop),
                    name=f"scxnn-worker-{device}",
                )
                process.start()
                self._processes.append(process)
        self.db.record_event(
            "node",
            f"started with bundle {read_manifest(self.config.model.bundle).name} "
            f"{self.bundle_version}",
        )

    def stop(self, timeout: float = 30.0) -> None:
        self.scp.shutdown()
        self.scheduler.shutdown()
        self._stop.set()
        for process in self._processes:
            process.join(timeout)
            if process.is_alive():
                log.warning("worker %s did not stop in %.0f s; terminating", process.name, timeout)
                process.terminate()
                process.join(5)
        self._processes.clear()
        self.db.record_event("node", "stopped")
        self.db.dispose()
