"""A node with its HTTP port on loopback after a real flow, for the HTTP tests and the README
screenshot: chest studies sent by storescu, SR and summary delivered to a storescp standing in
for the PACS, and a second destination that is down, so its deliveries are dead; plus
headless chromium to look at the status page."""

from __future__ import annotations

import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from scxnn_node.node import Node
from scxnn_node.store.models import Delivery
from scxnn_node.testing.dcmtk import Storescp, storescu
from scxnn_node.testing.loopback import free_port, node_config, wait_for

FLOW_TIMEOUT_S = 300
CHROMIUM_TIMEOUT_S = 120


@dataclass
class HttpFlow:
    node: Node
    pacs: Storescp
    down: Storescp  # the destination "archive", not listening during the flow
    url: str  # http://127.0.0.1:PORT

    def get(self, path: str) -> tuple[int, str, str]:
        """(status, content type, body) of a GET."""
        return self.request("GET", path)

    def request(
        self,
        method: str,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str, str]:
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as answer:
                return answer.status, answer.headers["Content-Type"], answer.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers["Content-Type"], err.read().decode()

    def deliveries(self) -> dict[tuple[str, str], int]:
        """(destination, state) -> count, read from the database."""
        with self.node.db.session() as session:
            rows = session.execute(
                select(Delivery.destination, Delivery.state, func.count()).group_by(
                    Delivery.destination, Delivery.state
                )
            ).all()
        return {(d, s): n for d, s, n in rows}


@contextmanager
def node_after_flow(
    tmp: Path,
    bundle: Path,
    files: Sequence[Path],
    chest_studies: int,
    retry_token_env: str | None = None,
    **sections: Any,
) -> Iterator[HttpFlow]:
    """A running node (workers included) once every output of `chest_studies` studies among
    `files` is sent to the PACS or dead at the destination that is down."""
    pacs = Storescp(tmp / "pacs").start()
    down = Storescp(tmp / "archive", aet="ARCHIVE")
    destinations = [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
        {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": down.port},
    ]
    config = node_config(
        tmp,
        model={"bundle": str(bundle)},
        destinations=destinations,
        http={
            "enabled": True,
            "host": "127.0.0.1",
            "port": free_port(),
            "retry_token_env": retry_token_env,
        },
        delivery={"max_attempts": 1},  # the archive's deliveries are dead at the first refusal
        scheduler={"readiness_seconds": 0.2, "delivery_seconds": 0.3},
        worker={"poll_seconds": 0.2, "heartbeat_seconds": 1},
        **sections,
    )
    node = Node(config)
    node.start()
    flow = HttpFlow(node, pacs, down, f"http://127.0.0.1:{config.http.port}")
    try:
        sent = storescu(config.node.port, *files)
        assert sent.returncode == 0, sent.stderr
        per_destination = 2 * chest_studies  # an SR and a summary image per study
        expected = {("pacs", "sent"): per_destination, ("archive", "dead"): per_destination}
        wait_for(lambda: flow.deliveries() == expected, FLOW_TIMEOUT_S)
        yield flow
    finally:
        node.stop()
        pacs.stop()
        down.stop()


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    """Headless Debian chromium on `url` (--dump-dom, --screenshot=PATH, ...). --no-sandbox:
    its sandbox cannot start as root, which CI containers are."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:  # no shared profile
        return subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                f"--user-data-dir={profile}",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=CHROMIUM_TIMEOUT_S,
        )
