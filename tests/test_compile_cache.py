"""A compiled engine keeps its compiled graph where the node says (beside the spool by
default), and a restarted worker loads it from there instead of compiling again."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from scxnn_node.config import NodeConfig

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
    return json.loads(out.strip().splitlines()[-1])


def _start_worker_engine(bundle_dir: Path, cache_dir: Path) -> dict:
    return _counts(_worker_engine(bundle_dir, cache_dir))


def test_a_restarted_worker_loads_its_compiled_graph_from_the_cache(small_bundle_dir, tmp_path):
    cache = tmp_path / "compile-cache"
    first = _start_worker_engine(small_bundle_dir, cache)
    assert first["misses"] >= 1 and first["hits"] == 0  # compiled, and kept
    assert any(cache.rglob("*")), "nothing written to the compile cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700  # Inductor's pickles: ours alone
    second = _start_worker_engine(small_bundle_dir, cache)
    assert second["hits"] >= 1 and second["misses"] == 0  # loaded, not compiled
    assert second["logits"] == first["logits"]


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


def test_a_worker_killed_while_compiling_does_not_hold_the_others(small_bundle_dir, tmp_path):
    """The lock is the kernel's (flock): it goes with its holder, whatever kills it."""
    cache = tmp_path / "compile-cache"
    cache.mkdir()
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
    assert _counts(waiting)["misses"] >= 1  # then compiles, and starts
