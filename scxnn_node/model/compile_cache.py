"""Inductor's compile cache for one node: its own directory, one warm-up at a time, and never
trusted after a warm-up that did not finish or an entry that fails to load.

Inductor writes its entries (generated Python, shared objects, pickles) without fsync. A power
cut or a kill -9 in the middle of a compile can leave an entry torn, and a torn entry fails
every later start that loads it (measured: a truncated, emptied or overwritten entry stopped
the engine with SyntaxError, AttributeError or UnicodeDecodeError), or worse, a shared object
that crashes the loader. So a warm-up leaves a durable marker while it runs and removes it only
after the cache is on disk; a start that finds the marker clears the cache before reading it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch._dynamo
from torch._inductor.utils import clear_inductor_caches

from scxnn_node.atomic_file import fsync_path

log = logging.getLogger(__name__)

LOCK_NAME = ".compile.lock"
WARMING_NAME = ".warming"
# Inductor's own lock files: a worker recompiling outside our lock may hold one; never entries.
INDUCTOR_LOCKS = "locks"


class CompileCache:
    """The directory Inductor keeps a node's compiled graphs and kernels in."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def use(self) -> None:
        """Make the directory (mode 0700: Inductor's entries are pickles, ours alone, not the
        shared /tmp default) and point this process's Inductor at it. Inductor reads the
        variable at each lookup; process-wide, and a worker process holds one engine."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.directory)

    def entries(self) -> list[Path]:
        """What Inductor has written here (the locks, ours and its own, and the marker aside)."""
        kept = (LOCK_NAME, WARMING_NAME, INDUCTOR_LOCKS)
        return [p for p in self.directory.iterdir() if p.name not in kept]

    @contextlib.contextmanager
    def warming(self) -> Iterator[None]:
        """Held while an engine compiles and makes its first passes.

        Workers of a node take turns (a kernel file lock, released with its holder however it
        dies): the first compiles, the others then load its graphs instead of all compiling at
        once on the same cores. The marker is only removed after a warm-up that ended well and
        whose entries were flushed to disk."""
        marker = self.directory / WARMING_NAME
        with open(self.directory / LOCK_NAME, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if marker.exists():
                log.warning(
                    "compile cache %s: a warm-up did not finish (stopped or power cut); "
                    "cleared, compiling again",
                    self.directory,
                )
                self.clear()
            marker.touch()
            fsync_path(self.directory)
            yield
            os.sync()  # Inductor's entries, then the marker's removal
            marker.unlink()
            fsync_path(self.directory)

    def clear(self) -> None:
        """Remove every entry, and forget what this process loaded from them."""
        for entry in self.entries():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        fsync_path(self.directory)
        torch._dynamo.reset()
        clear_inductor_caches()
