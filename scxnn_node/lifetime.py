"""A child process ends with its parent: the worker with its node, a decode process with its
worker, even when the parent is killed with -9."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: the kernel sends this process SIGTERM when its parent ends (even by kill -9).
    Elsewhere a no-op; the caller's parent-pid watch covers it. The signal follows the parent
    *thread* that started this process, so that thread must live as long as the parent."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        log.warning("prctl unavailable: %s", exc)


def exit_after_parent(parent_pid: int, grace_seconds: float, every: float = 0.5) -> None:
    """A watchdog thread: once the parent `parent_pid` is gone, this process gets
    `grace_seconds` to end by itself (its SIGTERM handling hands work back), then exits
    without running exit handlers. Bounds a child's life after its parent's whatever hangs in
    its own shutdown (a pool join, a thread join at interpreter exit)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every)
        time.sleep(grace_seconds)
        log.error("parent %d gone for %.0f s: exiting", parent_pid, grace_seconds)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watchdog").start()
