"""A child process ends with its parent: the worker with its node, a decode process with its
worker, even when the parent is killed with -9."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys

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
