"""The whole node against the bare engine, in one run: SCP, queue, pipelined worker, dispatcher
to a loopback storescp (the PACS stand-in). The sender and the PACS are dcmtk's storescu and
storescp, or pynetdicom's where dcmtk is not installed (--peers).

    .venv/bin/python bench/e2e.py --small                     # CPU check: small arch, 256 px
    .venv/bin/python bench/e2e.py --untrained densenet121 --size 1024 --studies 4 \
        --latency-studies 1                                   # CPU: about 20 s a study
    python3 bench/e2e.py --untrained densenet121 --size 1024 --device cuda:0 --studies 200 \
        --source-px 2500 --j2k --decode-processes 6 --studies-in-flight 4 --json-out e2e.json

Latency: studies sent one at a time, each waited for; p50/p95 from the end of the study's last
C-STORE to its SR's arrival at the PACS. The node waits study.quiet_seconds for more instances
before it queues a study, so that wait is printed separately (latency minus quiet).
Saturated queue: all studies sent at once, or with --arrival-seconds S the first ones at once
and the rest one every S seconds, so that the SCP receives while the worker works (S below the
engine's time a study keeps the queue full; the bench says if it ran dry). Node time per study
is the steady rate, (last SR - first SR) / (n - 1), which leaves out the pipeline filling and
the quiet wait; studies/s over the whole burst is printed too. Engine time per study is
measured in the same run after the node stopped: the same engine options, on the same
preprocessed images, in passes of as many studies as the worker holds (its largest batch).
Node overhead = (node time per study - engine time per study) / engine time per study.
Decode + preprocess time per study (what the decode processes take off the engine's path) is
printed as well. The figures depend on the machine's load: say what else ran.
"""

from __future__ import annotations

import argparse
import json
import os
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

from scxnn_node.config import NodeSection
from scxnn_node.logs import configure_logging
from scxnn_node.node import Node, ProcessRole
from scxnn_node.testing.dcmtk import Storescp
from scxnn_node.testing.loopback import node_config
from scxnn_node.testing.node_process import cpu_seconds, descendants
from scxnn_node.testing.pynetdicom_peers import Storescu, pick
from scxnn_node.testing.samples import SAMPLE_DX
from scxnn_node.triage import prepare_instance

_seen: dict[Path, tuple[str, float] | None] = {}  # None: a received file that is not an SR


def sr_studies(pacs: Storescp) -> dict[str, float]:
    """Study UID -> arrival time of its SR (file mtime); each file is parsed once. An SR is told
    by its Modality: pynetdicom's storescp does not name every SR class `SR*` as dcmtk does."""
    for path in pacs.directory.iterdir():
        if path not in _seen:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # still being written: read it on the next poll
                continue
            is_sr = ds.get("Modality") == "SR"
            _seen[path] = (str(ds.StudyInstanceUID), path.stat().st_mtime) if is_sr else None
    return dict(found for found in _seen.values() if found)


def wait_for_srs(pacs: Storescp, count: int, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = sr_studies(pacs)
        if len(got) >= count:
            return got
        time.sleep(0.1)  # light polling: the bench must not steal the workers' CPU
    raise TimeoutError(f"only {len(sr_studies(pacs))}/{count} SRs arrived")


def source_template(source_px: int | None, j2k: bool) -> pydicom.Dataset:
    """The shipped chest DX, optionally resized to `source_px` (12-bit, as a CR/DX detector
    gives) and JPEG 2000 compressed, so that decoding costs what it costs at a site."""
    import cv2
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(SAMPLE_DX)
    if source_px:
        pixels = cv2.resize(ds.pixel_array, (source_px, source_px), interpolation=cv2.INTER_CUBIC)
        ds.PixelData = (pixels.astype(np.uint16) << 4).tobytes()
        ds.Rows = ds.Columns = source_px
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
    if j2k:
        ds.compress(JPEG2000Lossless)
    return ds


def study_files(template: pydicom.Dataset, directory: Path, count: int) -> list[Path]:
    """`count` one-instance studies: the template with new UIDs (pixels shared, not re-encoded)."""
    from pydicom.uid import generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        template.StudyInstanceUID = generate_uid()
        template.SeriesInstanceUID = generate_uid()
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        path = directory / f"{i:05d}.dcm"
        template.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send(storescu: Storescu, port: int, *files: Path) -> None:
    run = storescu(port, *files)
    if run.returncode != 0:
        raise RuntimeError(f"storescu exit {run.returncode}: {run.stderr[-2000:]}")


def send_concurrently(storescu: Storescu, port: int, files: list[Path], senders: int) -> None:
    """`files` split over `senders` storescu processes (one association each) at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    shares = [files[i::senders] for i in range(senders) if files[i::senders]]
    with ThreadPoolExecutor(len(shares)) as pool:
        for done in [pool.submit(send, storescu, port, *share) for share in shares]:
            done.result()


def cpu_by_process(node: Node) -> dict[tuple[str, str], float]:
    """CPU seconds so far of each of the node's processes, keyed (role, name): serve (this
    process: the SCP when it is the only ingest process, the scheduler, the dispatcher without
    dispatch processes, and the bench's own polling), each ingest, dispatch and worker process,
    and each worker's decode processes together. The DICOM peers are left out."""
    cpu = {("serve", "serve"): cpu_seconds(os.getpid())}
    for name, role, pid in node.process_ids():
        cpu[(role.value, name)] = cpu_seconds(pid)
        if role == ProcessRole.WORKER:
            cpu[("decode", f"decode processes of {name}")] = sum(
                cpu_seconds(child) for child in descendants(pid)
            )
    return cpu


def by_role(cpu: dict[tuple[str, str], float]) -> dict[str, float]:
    roles = dict.fromkeys(("serve", "ingest", "dispatch", "worker", "decode"), 0.0)
    for (role, _name), seconds in cpu.items():
        roles[role] += seconds
    return roles


def pipeline_seconds(node: Node) -> tuple[float, float]:
    """Seconds the node's live workers' engines ran and waited for decoding, as of their last
    liveness beat, which comes every second at most: one is waited for."""
    from scxnn_node.store.db import Database
    from scxnn_node.store.workers import live_workers

    time.sleep(1.5)
    db = Database(node.config.database.url)
    try:
        with db.session() as session:
            live = live_workers(session)
    finally:
        db.dispose()
    return sum(w.pipeline.engine for w in live), sum(w.pipeline.decode_wait for w in live)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    # Imported here, not at the top: the node's ingest and decode processes start by importing
    # this module (multiprocessing's spawn re-imports __main__), and torch, torchvision and
    # scipy cost each of them seconds and most of a gigabyte, which the node's own processes
    # (started from scxnn_node.cli) do not pay.
    from scxnn_node.model.bundle import load_bundle
    from scxnn_node.model.engine import InferenceEngine
    from training.untrained import untrained_bundle

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("var/bundles/demo"))
    parser.add_argument("--untrained", metavar="ARCH", help="use untrained members of ARCH instead")
    parser.add_argument("--size", type=int, default=1024, help="input size with --untrained")
    parser.add_argument(
        "--small",
        action="store_true",
        help="quick check: --untrained densenet_small --size 256, 12 studies, 3 one at a time",
    )
    parser.add_argument("--studies", type=int, default=40, help="saturated-queue studies")
    parser.add_argument("--latency-studies", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet-seconds", type=float, default=1.0, help="study.quiet_seconds")
    parser.add_argument("--studies-in-flight", type=int, default=2)
    parser.add_argument("--decode-processes", type=int, default=1)
    parser.add_argument("--source-px", type=int, default=None, help="resize the sample (12-bit)")
    parser.add_argument("--j2k", action="store_true", help="JPEG 2000 lossless instances")
    parser.add_argument(
        "--peers",
        choices=("auto", "dcmtk", "pynetdicom"),
        default="auto",
        help="sender and PACS: dcmtk's storescu/storescp, else pynetdicom's (auto)",
    )
    parser.add_argument("--backend", default="auto", help="model.backend")
    parser.add_argument("--batch-size", type=int, default=None, help="model.batch_size")
    parser.add_argument("--member-streams", type=int, default=1, help="model.member_streams")
    parser.add_argument(
        "--workers-per-device",
        type=int,
        default=1,
        help="workers sharing the device (model.devices lists it that often): their CPU work "
        "(decode collection, SR, commits) runs side by side while the device computes",
    )
    parser.add_argument("--gpu-decode", choices=("auto", "off"), default="auto")
    parser.add_argument("--gpu-preprocess", choices=("auto", "off"), default="auto")
    parser.add_argument(
        "--ingest-processes",
        type=int,
        default=NodeSection.model_fields["ingest_processes"].default,
        help="node.ingest_processes (default: the node's)",
    )
    parser.add_argument(
        "--dispatch-processes",
        type=int,
        default=NodeSection.model_fields["dispatch_processes"].default,
        help="node.dispatch_processes (default: the node's; 0 sends from the serve process)",
    )
    parser.add_argument(
        "--senders", type=int, default=1, help="concurrent storescu senders for the burst"
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=1.0,
        help="scheduler.readiness_seconds and delivery_seconds (the node's defaults: 1 and 2); "
        "the worker polls at half of it. On 2 cores 0.1 s polls cost the engine 8-12 %%",
    )
    parser.add_argument(
        "--arrival-seconds",
        type=float,
        default=None,
        help="send the burst while the node works on it: the first studies (those in flight, and "
        "one more) at once, then one every S seconds. With S under the engine's time a study the "
        "queue stays full: the node's overhead while its SCP is receiving",
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.small:
        args.untrained, args.size = args.untrained or "densenet_small", 256
        args.studies, args.latency_studies = min(args.studies, 12), min(args.latency_studies, 3)
    configure_logging("WARNING")
    root = Path(tempfile.mkdtemp(prefix="scxnn-e2e-"))
    if args.untrained:
        args.bundle = untrained_bundle(args.untrained, args.size, out=root / "bundle").path
    template = source_template(args.source_px, args.j2k)
    pacs_class, storescu, peers = pick(args.peers)
    print(f"DICOM peers: {peers} storescu and storescp", flush=True)
    pacs = pacs_class(root / "pacs").start()
    config = node_config(
        root / "node",
        node={
            "ingest_processes": args.ingest_processes,
            "dispatch_processes": args.dispatch_processes,
        },
        allowed_callers=None,
        model={
            "bundle": str(args.bundle),
            "devices": [args.device] * args.workers_per_device,
            "backend": args.backend,
            "batch_size": args.batch_size,
            "member_streams": args.member_streams,
        },
        study={"quiet_seconds": args.quiet_seconds},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "outputs": ["sr"],
            }
        ],
        scheduler={"readiness_seconds": args.poll_seconds, "delivery_seconds": args.poll_seconds},
        worker={
            "poll_seconds": args.poll_seconds / 2,
            "studies_in_flight": args.studies_in_flight,
            "decode_processes": args.decode_processes,
            "gpu_decode": args.gpu_decode,
            "gpu_preprocess": args.gpu_preprocess,
        },
    )
    (root / "node").mkdir(parents=True, exist_ok=True)
    node = Node(config)
    started = time.monotonic()
    node.start()
    try:
        # One study per worker, all at once: every worker started and warmed up.
        warm = study_files(template, root / "warm", args.workers_per_device)
        send(storescu, config.node.port, *warm)
        wait_for_srs(pacs, len(warm), 600)
        start_s = time.monotonic() - started
        print(f"node started, first SR of each worker's first study in {start_s:.1f} s", flush=True)
        latencies = []
        for f in study_files(template, root / "latency", args.latency_studies):
            before = len(sr_studies(pacs))
            send(storescu, config.node.port, f)
            stored = time.time()  # storescu returned: the last C-STORE was answered
            arrived = wait_for_srs(pacs, before + 1, 600)
            study = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
            latencies.append(arrived[study] - stored)
        if latencies:  # printed now too: a step killed by its time limit keeps these
            print(
                f"latencies (s, last C-STORE -> SR): {[round(x, 2) for x in latencies]}", flush=True
            )
        burst = study_files(template, root / "burst", args.studies)
        before = len(sr_studies(pacs))
        pipeline_before = pipeline_seconds(node)
        cpu_before = cpu_by_process(node)
        start = time.time()
        if args.arrival_seconds is None:
            send_concurrently(storescu, config.node.port, burst, args.senders)
        else:
            head = args.studies_in_flight * args.workers_per_device + 1
            send_concurrently(storescu, config.node.port, burst[:head], args.senders)
            for i, f in enumerate(burst[head:], start=1):
                time.sleep(max(0.0, start + i * args.arrival_seconds - time.time()))
                send(storescu, config.node.port, f)
        last_sent = time.time()
        results_by_last_send = len(sr_studies(pacs)) - before
        arrived = wait_for_srs(pacs, before + len(burst), 3600)
        cpu_after = cpu_by_process(node)
        pipeline_after = pipeline_seconds(node)
        burst_uids = {
            str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in burst
        }
        times = sorted(t for uid, t in arrived.items() if uid in burst_uids)
    finally:
        node.stop()
        pacs.stop()
    node_per_study = (times[-1] - times[0]) / max(1, len(times) - 1)
    engines_ran = pipeline_after[0] - pipeline_before[0]
    engines_waited_for_decoding = pipeline_after[1] - pipeline_before[1]
    # The SCP received during this share of the timed span (first SR to last); the node's rate
    # over the SRs that arrived while it was still receiving.
    receiving_share = min(1.0, max(0.0, (last_sent - times[0]) / max(1e-9, times[-1] - times[0])))
    waiting_at_last_send = len(burst) - results_by_last_send
    while_receiving = [t for t in times if t <= last_sent]
    node_per_study_receiving = (
        (while_receiving[-1] - while_receiving[0]) / (len(while_receiving) - 1)
        if len(while_receiving) >= 3
        else None
    )
    whole_burst = len(times) / (times[-1] - start)
    print(f"node steady rate {1 / node_per_study:.2f} studies/s over {len(times)}", flush=True)

    bundle = load_bundle(args.bundle)
    spec = bundle.manifest.preprocessing
    engine = InferenceEngine(bundle, config.engine_options(args.device))
    print(f"bare engine ready in {engine.start_seconds:.1f} s", flush=True)
    # Decoded here on the CPU: a sample of the burst (a 2500 px JPEG 2000 costs about half a CPU
    # second), repeated to the burst's length for the engine.
    sample = burst[:8]
    t0 = time.perf_counter()
    images = [prepare_instance(f, spec).image for f in sample]
    decode_per_study = (time.perf_counter() - t0) / len(sample)
    stack = np.stack([images[i % len(images)] for i in range(len(burst))])  # type: ignore[misc]
    engine.member_logits(stack[: args.studies_in_flight])  # warm-up
    t0, cpu0 = time.perf_counter(), time.process_time()
    for first in range(0, len(stack), args.studies_in_flight):
        engine.member_logits(stack[first : first + args.studies_in_flight])
    engine_per_study = (time.perf_counter() - t0) / len(stack)
    engine_cpu_per_study = (time.process_time() - cpu0) / len(stack)
    # A process restarted during the burst is left out of the per-process figures.
    cpu_per_process = {
        key: (cpu_after[key] - cpu_before[key]) / len(burst)
        for key in cpu_before
        if key in cpu_after
    }
    cpu_per_study = by_role(cpu_per_process)
    # One process serves one study at a time on one core at most (GIL): the busiest bounds the
    # node's rate however many cores there are. Decode processes are a pool; left out.
    (busiest_role, busiest), busiest_s = max(
        ((key, seconds) for key, seconds in cpu_per_process.items() if key[0] != "decode"),
        key=lambda item: item[1],
    )
    node_cpu = sum(cpu_per_study.values()) - engine_cpu_per_study
    shutil.rmtree(root, ignore_errors=True)

    overhead = (node_per_study - engine_per_study) / engine_per_study
    syntax = template.file_meta.TransferSyntaxUID.name
    figures = {
        "bundle": f"{bundle.manifest.name} {bundle.manifest.version}",
        "architecture": bundle.manifest.architecture,
        "size": spec.size,
        "device": args.device,
        "dicom_peers": peers,
        "source": {"px": template.Rows, "transfer_syntax": syntax},
        "worker": {
            "workers": args.workers_per_device,
            "studies_in_flight": args.studies_in_flight,
            "decode_processes": args.decode_processes,
            "gpu_decode": args.gpu_decode,
            "gpu_preprocess": args.gpu_preprocess,
            "engine_backend": engine.backend,
            "engine_batch_size": engine.batch_size,
            "member_streams": args.member_streams,
        },
        "ingest_processes": args.ingest_processes,
        "dispatch_processes": args.dispatch_processes,
        "senders": args.senders,
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "quiet_seconds": args.quiet_seconds,
        "poll_seconds": args.poll_seconds,
        "node_start_to_first_srs_s": start_s,
        "bare_engine_start_s": engine.start_seconds,
        "latency_studies": len(latencies),
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p95_s": percentile(latencies, 95) if latencies else None,
        "latency_minus_quiet_p50_s": (
            statistics.median(latencies) - args.quiet_seconds if latencies else None
        ),
        "latency_minus_quiet_p95_s": (
            percentile(latencies, 95) - args.quiet_seconds if latencies else None
        ),
        "saturated_studies": len(times),
        "node_studies_per_s": 1 / node_per_study,
        "node_studies_per_s_whole_burst": whole_burst,
        "node_s_per_study": node_per_study,
        "engine_s_per_study": engine_per_study,
        "engine_studies_per_s": 1 / engine_per_study,
        "decode_preprocess_s_per_study": decode_per_study,
        "node_overhead": overhead,
        # Over the burst, all workers: engine passes, and the engine waiting for decoding.
        "engines_ran_s": engines_ran,
        "engines_waited_for_decoding_s": engines_waited_for_decoding,
        "arrival_seconds": args.arrival_seconds,
        "receiving_share_of_timed_span": receiving_share,
        "node_s_per_study_while_receiving": node_per_study_receiving,
        "node_overhead_while_receiving": (
            (node_per_study_receiving - engine_per_study) / engine_per_study
            if node_per_study_receiving
            else None
        ),
        "studies_waiting_or_in_flight_at_last_send": waiting_at_last_send,
        # CPU seconds a study in the burst, by role (load-independent, unlike the rates):
        "cpu_s_per_study": cpu_per_study,
        "cpu_s_per_study_by_process": {name: v for (_role, name), v in cpu_per_process.items()},
        "busiest_process": busiest,
        "busiest_process_cpu_s_per_study": busiest_s,
        "engine_cpu_s_per_study": engine_cpu_per_study,
        # All the node's CPU a study but the engine's: what bounds studies/s on a GPU box.
        "node_cpu_s_per_study_without_engine": node_cpu,
    }
    print(
        f"bundle {figures['bundle']} ({bundle.manifest.architecture}, {spec.size} px) on "
        f"{args.device}; instances {template.Rows} px {figures['source']['transfer_syntax']}; "
        f"{args.workers_per_device} worker(s), each {args.studies_in_flight} studies in flight and "
        f"{args.decode_processes} decode processes (GPU decode {args.gpu_decode}, GPU "
        f"preprocessing {args.gpu_preprocess}); engine "
        f"{engine.backend}, batch {engine.batch_size}; {args.senders} sender(s), "
        f"{args.ingest_processes} ingest process(es), {args.dispatch_processes} dispatch "
        "process(es); "
        f"load average {figures['load_average_1m']:.1f} on {os.cpu_count()} CPUs"
    )
    if latencies:
        print(
            f"latency last C-STORE -> SR received, {len(latencies)} studies one at a time: "
            f"p50 {figures['latency_p50_s']:.2f} s, p95 {figures['latency_p95_s']:.2f} s "
            f"(study.quiet_seconds {args.quiet_seconds:.1f} s of it; without it p50 "
            f"{figures['latency_minus_quiet_p50_s']:.2f} s, p95 "
            f"{figures['latency_minus_quiet_p95_s']:.2f} s)"
        )
    print(
        f"saturated queue, {len(times)} studies: node {1 / node_per_study:.3f} studies/s "
        f"({node_per_study:.3f} s a study; {whole_burst:.3f} studies/s over the whole burst); "
        f"engine alone {1 / engine_per_study:.3f} studies/s ({engine_per_study:.3f} s a study); "
        f"node overhead {100 * overhead:.1f} % of engine time; decode + preprocess "
        f"{decode_per_study:.3f} s a study (in the decode processes, off the engine's path)"
    )
    print(
        f"over the burst the workers' engines ran {engines_ran:.2f} s and waited for decoding "
        f"{engines_waited_for_decoding:.2f} s"
        + (
            f" ({100 * engines_waited_for_decoding / engines_ran:.1f} % of their running time)"
            if engines_ran > 0
            else ""
        )
    )
    if args.arrival_seconds is not None:
        print(
            f"arrivals: one study every {args.arrival_seconds:.1f} s after the first; the SCP "
            f"received during {100 * receiving_share:.0f} % of the timed span, and "
            f"{waiting_at_last_send} studies were waiting or in flight at the last send"
            + ("" if waiting_at_last_send > 1 else " (the queue ran dry: lower --arrival-seconds)")
        )
        if node_per_study_receiving:
            over = (node_per_study_receiving - engine_per_study) / engine_per_study
            print(
                f"while receiving ({len(while_receiving)} SRs before the last send): node "
                f"{node_per_study_receiving:.3f} s a study, overhead {100 * over:.1f} % of "
                "engine time"
            )
    roles = ", ".join(f"{role} {seconds:.3f}" for role, seconds in cpu_per_study.items())
    print(
        f"CPU seconds a study in the burst: {roles} (worker includes the engine: "
        f"{engine_cpu_per_study:.3f} alone); the node without the engine {node_cpu:.3f} CPU-s "
        + (
            f"a study, so at most {os.cpu_count() / node_cpu:.1f} studies/s on "
            f"{os.cpu_count()} CPUs"
            if node_cpu > 0
            else "a study: less than the engine's own variation between its two runs"
        )
    )
    print(
        f"busiest process: {busiest} ({busiest_role}), {busiest_s:.3f} CPU-s a study, so at most "
        f"{1 / max(busiest_s, 1e-9):.0f} studies/s by it alone (worker includes the engine)"
    )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
