"""A doorbell: one part of the node rings it when it made work for another (jobs queued,
results committed), so that part starts now instead of at its next poll.

The database stays the only place work is found (DESIGN rule: the parts meet through durable
state); a ring only says "look now". A ring that is lost (a process restarted between ring and
wait) costs one poll interval, nothing else, and two nodes on one database still find each
other's work by polling.
"""

from __future__ import annotations

import threading
from multiprocessing.synchronize import Event as ProcessEvent


class Doorbell:
    """Wraps an event that one or several processes share (a multiprocessing Event given to a
    spawned process) or a threading Event within one process."""

    def __init__(self, event: ProcessEvent | threading.Event | None = None) -> None:
        self._event = event if event is not None else threading.Event()

    def ring(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` for a ring; True if it rang. The ring is consumed before the
        caller looks for work, so a ring during that look is kept for the next wait."""
        rung = self._event.wait(timeout)
        self._event.clear()
        return rung
