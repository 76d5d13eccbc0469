"""A doorbell: one part of the node rings it when it made work for another (instance stored,
jobs queued, results committed), so that part starts now instead of at its next poll.

The database stays the only place work is found (the parts meet through durable state); a ring
only says "look now". A ring that is lost (a process restarted between ring and wait) costs one
poll interval, nothing else, and two nodes on one database still find each other's work by
polling.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import select
import threading
from typing import Protocol


class _Event(Protocol):
    def set(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...
    def clear(self) -> None: ...


class PipeEvent:
    """An event that processes share over a pipe, given to a spawned process as one of its
    arguments. Not a multiprocessing Event: its set() waits for every sleeper to wake, so one
    process killed while waiting wedges the next ring for ever; here set() never blocks (a full
    pipe already holds a ring) and no process's death can wedge the others."""

    def __init__(self) -> None:
        self._read, self._write = mp.Pipe(duplex=False)

    def set(self) -> None:
        fd = self._write.fileno()
        os.set_blocking(fd, False)  # per call: the flag may not have crossed into this process
        with contextlib.suppress(BlockingIOError):  # full: rings are waiting to be read
            os.write(fd, b"\0")

    def wait(self, timeout: float | None = None) -> bool:
        poller = select.poll()  # not select(): a serving node's descriptors may pass 1024
        poller.register(self._read.fileno(), select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))))

    def clear(self) -> None:
        fd = self._read.fileno()
        os.set_blocking(fd, False)
        with contextlib.suppress(BlockingIOError):  # drained
            while os.read(fd, 4096):
                pass

    def is_set(self) -> bool:
        return self.wait(0)


class Doorbell:
    """Rung by one part, waited on by another: over a PipeEvent between processes, over a
    threading Event within one (the default)."""

    def __init__(self, event: _Event | None = None) -> None:
        self._event: _Event = event if event is not None else threading.Event()

    def ring(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` for a ring; True if it rang. The ring is consumed before the
        caller looks for work, so a ring during that look is kept for the next wait."""
        rung = self._event.wait(timeout)
        self._event.clear()
        return rung
