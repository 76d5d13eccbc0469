"""A compiled engine keeps its compiled graph where the node says (beside the spool by
default), a restarted worker loads it from there instead of compiling again, and neither a torn
entry nor a warm-up cut short (kill -9, power cut) stops a later start."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scxnn_node.config import NodeConfig
from scxnn_node.model.compile_cache import LOCK_NAME, WARMING_NAME

_START_ENGINE = """
import json, sys
from pathlib import Path
import numpy as np
from torch._dynamo.utils import counters
from scxnn_node.model.bundle import load_bundle
from scxnn_node.model.engine import InferenceEngine
from scxnn_node.model.options import EngineOptions

bundle = load_bundle(Path(sys.argv[1]))
engine = InferenceEngine(bundle, EngineOptions(
    batch_size=2, backend="compile", compile_cache_dir=Path(sys.argv[2])))
images = np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8)
logits = engine.member_logits(images)
print(json.dumps({"hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"],
                  "logits": logits.ravel().tolist()}))
"""


def _worker_engine(bundle_dir: Path, cache_dir: Path) -> subprocess.Popen:
    """A fresh process, as a worker is: nothing compiled in memory."""
    return subprocess.Popen(
        [sys.executable, "-c", _START_ENGINE, str(bundle_dir), str(cache_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")},
    )


def _counts(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    counts = json.loads(out.strip().splitlines()[-1])
    counts["log"] = err
    return counts


def _start_worker_engine(bundle_dir: Path, cache_dir: Path) -> dict:
    return _counts(_worker_engine(bundle_dir, cache_dir))


@pytest.fixture(scope="module")
def compiled(small_bundle_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A cache one worker filled, and what that worker computed: each test works on a copy."""
    cache = tmp_path_factory.mktemp("compiled") / "compile-cache"
    return cache, _start_worker_engine(small_bundle_dir, cache)


def _copy(cache: Path, to: Path) -> Path:
    shutil.copytree(cache, to, symlinks=True)
    return to


def _entry_files(cache: Path) -> list[Path]:
    return sorted(
        p for p in cache.rglob("*") if p.is_file() and p.name not in (LOCK_NAME, WARMING_NAME)
    )


def _tear(files: list[Path], rng: random.Random) -> None:
    """What a power cut leaves of files written without fsync: cut short, emptied, or blocks
    of other data."""
    for path in files:
        data = path.read_bytes()
        kind = rng.choice(("cut", "empty", "garbage"))
        if kind == "cut":
            path.write_bytes(data[: rng.randrange(len(data) + 1)])
        elif kind == "empty":
            path.write_bytes(b"")
        else:
            path.write_bytes(rng.randbytes(len(data)))


def test_a_restarted_worker_loads_its_compiled_graph_from_the_cache(
    small_bundle_dir, compiled, tmp_path
):
    cache, first = compiled
    assert first["misses"] >= 1 and first["hits"] == 0  # compiled, and kept
    assert _entry_files(cache), "nothing written to the compile cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700  # Inductor's pickles: ours alone
    assert not (cache / WARMING_NAME).exists()  # a warm-up that finished says so
    second = _start_worker_engine(small_bundle_dir, _copy(cache, tmp_path / "cc"))
    assert second["hits"] >= 1 and second["misses"] == 0  # loaded, not compiled
    assert second["logits"] == first["logits"]


def test_torn_cache_entries_are_cleared_and_compiled_again(small_bundle_dir, compiled, tmp_path):
    """Entries cut, emptied or overwritten (a disk's or an operator's doing, after the warm-up
    that wrote them had finished): the start does not fail, it compiles again."""
    cache, first = compiled
    torn = _copy(cache, tmp_path / "cc")
    seed = random.randrange(2**32)
    _tear(_entry_files(torn), random.Random(seed))
    again = _start_worker_engine(small_bundle_dir, torn)
    assert "unusable" in again["log"] and "cleared, compiling again" in again["log"], seed
    assert again["misses"] >= 1, seed
    assert again["logits"] == first["logits"], seed
    assert _start_worker_engine(small_bundle_dir, torn)["misses"] == 0  # and kept again


def test_a_warm_up_cut_short_leaves_the_cache_untrusted(small_bundle_dir, compiled, tmp_path):
    """A worker killed -9 at a random moment of its compile, then a power cut tears what it had
    written: the next start clears the cache before it reads any of it."""
    _, first = compiled
    cache = tmp_path / "cc"
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    worker = _worker_engine(small_bundle_dir, cache)
    deadline = time.monotonic() + 120
    while not _entry_files(cache) and time.monotonic() < deadline:
        time.sleep(0.05)  # compiling has begun: Inductor wrote its first entry
    time.sleep(rng.uniform(0, 5))
    worker.kill()
    worker.communicate(timeout=30)
    if worker.returncode == 0:
        pytest.fail(f"the warm-up ended before the kill (seed {seed}): kill sooner")
    assert (cache / WARMING_NAME).exists()
    _tear(_entry_files(cache), rng)
    again = _start_worker_engine(small_bundle_dir, cache)
    assert "a warm-up did not finish" in again["log"], seed
    assert "unusable" not in again["log"], seed  # cleared before anything was read
    assert again["hits"] == 0 and again["misses"] >= 1, seed
    assert again["logits"] == first["logits"], seed
    assert not (cache / WARMING_NAME).exists()


def test_workers_starting_together_compile_once(small_bundle_dir, tmp_path):
    """Three workers of one node start at once: one compiles, the others wait and load."""
    cache = tmp_path / "compile-cache"
    workers = [_worker_engine(small_bundle_dir, cache) for _ in range(3)]
    counts = [_counts(worker) for worker in workers]
    compiled = [c for c in counts if c["misses"]]
    assert len(compiled) == 1, counts
    assert all(c["hits"] >= 1 for c in counts if c is not compiled[0]), counts
    assert all(c["logits"] == compiled[0]["logits"] for c in counts)


def test_the_compile_cache_lives_beside_the_spool_unless_configured(tmp_path):
    spool = tmp_path / "var" / "spool"
    config = NodeConfig.model_validate({"storage": {"spool_dir": str(spool)}})
    assert config.engine_options("cpu").compile_cache_dir == tmp_path / "var" / "compile-cache"
    chosen = NodeConfig.model_validate(
        {"storage": {"spool_dir": str(spool)}, "model": {"compile_cache_dir": "/srv/cc"}}
    )
    assert chosen.engine_options("cpu").compile_cache_dir == Path("/srv/cc")


def test_a_worker_killed_while_compiling_does_not_hold_the_others(
    small_bundle_dir, compiled, tmp_path
):
    """The lock is the kernel's (flock): it goes with its holder, whatever kills it."""
    cache = _copy(compiled[0], tmp_path / "cc")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
            str(cache / ".compile.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    waiting = _worker_engine(small_bundle_dir, cache)
    time.sleep(3)
    assert waiting.poll() is None  # it waits for the holder
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(10)
    started = _counts(waiting)  # then starts
    assert started["logits"] == compiled[1]["logits"]


def test_a_compile_cache_on_a_full_disk_fails_the_start_then_compiles_when_there_is_room(
    small_bundle_dir, compiled, small_filesystem
):
    """Inductor's entries do not fit: the start fails naming the disk (the supervisor starts
    the worker again; studies wait in the queue), and nothing it half-wrote is trusted."""
    fs = small_filesystem.mount(1 << 20)
    cache = fs / "compile-cache"
    full = _worker_engine(small_bundle_dir, cache)
    _out, err = full.communicate(timeout=600)
    assert full.returncode != 0
    assert "No space left on device" in err, err[-3000:]
    assert (cache / WARMING_NAME).exists()
    small_filesystem.resize(fs, 64 << 20)
    again = _counts(_worker_engine(small_bundle_dir, cache))
    assert "a warm-up did not finish" in again["log"]
    assert again["logits"] == compiled[1]["logits"]
    assert _entry_files(cache) and not (cache / WARMING_NAME).exists()
