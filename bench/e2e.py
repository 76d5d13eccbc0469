"""End-to-end latency and throughput: C-STORE in, SR received by a PACS stand-in (storescp).

    .venv/bin/python bench/e2e.py --bundle var/bundles/demo --studies 40
    .venv/bin/python bench/e2e.py --untrained densenet121 --size 1024 --studies 6 \
        --latency-studies 2

Part 1, latency: studies sent one at a time, each waited for; p50/p95 of C-STORE sent -> SR
received (quiet_seconds = 0, so the figure is the node's own delay plus inference).
Part 2, saturated queue: all studies sent at once; end-to-end studies/s against the bare
engine's studies/s on the same images in the same run (decode + preprocess + ensemble, no
network, no database). Overhead = 1 - e2e / engine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

# `python bench/X.py` puts bench/ first on sys.path, where bench/training.py would shadow the
# training package; the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scxnn_node.logs import configure_logging
from scxnn_node.model.bundle import load_bundle
from scxnn_node.model.engine import InferenceEngine
from scxnn_node.node import Node
from scxnn_node.testing.dcmtk import Storescp, storescu
from scxnn_node.testing.loopback import node_config
from scxnn_node.testing.samples import sample_copies
from scxnn_node.triage import prepare_instance
from training.untrained import untrained_bundle

_seen: dict[Path, tuple[str, float]] = {}


def sr_studies(pacs: Storescp) -> dict[str, float]:
    """Study UID -> arrival time of its SR (file mtime); each file is parsed once."""
    for path in pacs.directory.glob("SR*"):
        if path not in _seen:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            _seen[path] = (str(ds.StudyInstanceUID), path.stat().st_mtime)
    return dict(_seen.values())


def wait_for_srs(pacs: Storescp, count: int, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = sr_studies(pacs)
        if len(got) >= count:
            return got
        time.sleep(0.1)  # light polling: the bench must not steal the workers' CPU
    raise TimeoutError(f"only {len(sr_studies(pacs))}/{count} SRs arrived")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("var/bundles/demo"))
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--latency-studies", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--untrained", metavar="ARCH", help="use untrained members of ARCH instead")
    parser.add_argument("--size", type=int, default=1024, help="input size with --untrained")
    args = parser.parse_args()
    configure_logging("WARNING")
    root = Path(tempfile.mkdtemp(prefix="scxnn-e2e-"))
    if args.untrained:
        args.bundle = untrained_bundle(args.untrained, args.size, out=root / "bundle").path
    pacs = Storescp(root / "pacs").start()
    config = node_config(
        root / "node",
        allowed_callers=None,
        model={"bundle": str(args.bundle), "devices": [args.device]},
        study={"quiet_seconds": 0},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "outputs": ["sr"],
            }
        ],
        scheduler={"readiness_seconds": 0.1, "delivery_seconds": 0.1},
        worker={"poll_seconds": 0.05},
    )
    (root / "node").mkdir(parents=True, exist_ok=True)
    node = Node(config)
    node.start()
    try:
        warm = sample_copies(root / "warm", 1)
        storescu(config.node.port, *warm)
        wait_for_srs(pacs, 1, 300)  # worker started and warmed up
        latency_files = sample_copies(root / "latency", args.latency_studies)
        latencies = []
        for f in latency_files:
            before = len(sr_studies(pacs))
            sent = time.time()
            storescu(config.node.port, f)
            arrived = wait_for_srs(pacs, before + 1, 300)
            study = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
            latencies.append(arrived[study] - sent)
        burst = sample_copies(root / "burst", args.studies)
        before = len(sr_studies(pacs))
        start = time.time()
        storescu(config.node.port, *burst)
        arrived = wait_for_srs(pacs, before + len(burst), 1800)
        last = max(arrived.values())
        e2e = len(burst) / (last - start)
    finally:
        node.stop()
        pacs.stop()
    bundle = load_bundle(args.bundle)
    engine = InferenceEngine(bundle)
    spec = bundle.manifest.preprocessing
    prepare_instance(burst[0], spec)
    t0 = time.perf_counter()
    for f in burst:
        image = prepare_instance(f, spec).image
        engine.member_logits(np.stack([image]))
    bare = len(burst) / (time.perf_counter() - t0)
    shutil.rmtree(root, ignore_errors=True)
    q = statistics.quantiles(latencies, n=20)
    print(
        f"bundle {bundle.manifest.name} {bundle.manifest.version} "
        f"({bundle.manifest.architecture}, {spec.size} px) on {args.device}"
    )
    print(
        f"latency C-STORE -> SR received, {len(latencies)} studies one at a time: "
        f"p50 {statistics.median(latencies):.2f} s, p95 {q[18]:.2f} s"
    )
    print(
        f"saturated queue, {len(burst)} studies: end to end {e2e:.4f} studies/s; "
        f"bare engine (decode + preprocess + ensemble) {bare:.4f} studies/s; "
        f"node overhead {100 * (1 - e2e / bare):.1f}%"
    )


if __name__ == "__main__":
    main()
