"""Delivery of results: each pending delivery is sent, retried with backoff, or dead-lettered."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta

from sqlalchemy import select, update

from scxnn_node.config import NodeConfig
from scxnn_node.dicom.scu import Peer, is_success, send_files
from scxnn_node.store.db import Database, utc_now
from scxnn_node.store.models import Delivery
from scxnn_node.store.spool import Spool

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, config: NodeConfig, db: Database, spool: Spool) -> None:
        self.config = config
        self.db = db
        self.spool = spool

    def backoff(self, attempts: int) -> timedelta:
        d = self.config.delivery
        return timedelta(
            seconds=min(d.max_backoff_seconds, d.backoff_seconds * 2 ** (attempts - 1))
        )

    def deliver_due(self, limit: int = 200) -> int:
        """Send every delivery whose time has come; returns how many were sent."""
        now = utc_now()
        with self.db.session() as session:
            due = session.execute(
                select(Delivery.id, Delivery.destination, Delivery.path)
                .where(Delivery.state == "pending", Delivery.next_attempt_at <= now)
                .order_by(Delivery.id)
                .limit(limit)
            ).all()
        by_destination: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for delivery_id, destination, path in due:
            by_destination[destination].append((delivery_id, path))
        sent = 0
        for name, items in by_destination.items():
            try:
                peer = Peer.of(self.config.destination(name))
            except KeyError as exc:
                self._record(items, [None] * len(items), str(exc), dead=True)
                continue
            paths = [self.spool.absolute(path) for _, path in items]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                log.error("outbox file missing: %s", missing[0])
            try:
                statuses = send_files(peer, self.config.node.ae_title, paths)
                error = "association failed" if all(s is None for s in statuses) else None
            except Exception as exc:  # an unreachable peer must not stop the other ones
                statuses, error = [None] * len(items), str(exc)
            sent += self._record(items, statuses, error)
        return sent

    def _record(
        self,
        items: list[tuple[int, str]],
        statuses: list[int | None],
        error: str | None,
        dead: bool = False,
    ) -> int:
        now = utc_now()
        sent = 0
        max_attempts = self.config.delivery.max_attempts
        with self.db.session() as session:
            for (delivery_id, _path), status in zip(items, statuses, strict=True):
                delivery = session.get(Delivery, delivery_id)
                if delivery is None or delivery.state != "pending":
                    continue
                delivery.attempts += 1
                delivery.updated_at = now
                if is_success(status):
                    delivery.state = "sent"
                    delivery.last_error = None
                    sent += 1
                    continue
                if status is not None:
                    delivery.last_error = f"status 0x{status:04X}"
                else:
                    delivery.last_error = error or "not sent"
                if dead or delivery.attempts >= max_attempts:
                    delivery.state = "dead"
                    log.error(
                        "delivery %d to %s dead after %d attempts: %s",
                        delivery.id,
                        delivery.destination,
                        delivery.attempts,
                        delivery.last_error,
                    )
                else:
                    delivery.next_attempt_at = now + self.backoff(delivery.attempts)
        return sent

    def retry(self, delivery_id: int | None = None, all_dead: bool = False) -> int:
        """Dead (or any pending) deliveries back to pending, due now, attempts reset."""
        stmt = update(Delivery)
        if delivery_id is not None:
            stmt = stmt.where(Delivery.id == delivery_id)
        elif all_dead:
            stmt = stmt.where(Delivery.state == "dead")
        else:
            raise ValueError("retry needs a delivery id or all_dead")
        with self.db.session() as session:
            res = session.execute(
                stmt.where(Delivery.state != "sent").values(
                    state="pending", attempts=0, next_attempt_at=utc_now(), updated_at=utc_now()
                )
            )
            return res.rowcount
