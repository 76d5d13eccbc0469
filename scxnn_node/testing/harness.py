"""Black-box harness: runs `scxnn-node serve` as a subprocess and audits it from outside.

It reaches the node only the way an auditor would: the command line (`serve --config`,
`status --json`), DICOM on loopback sockets, the database read with plain SQL (tables instances,
studies, jobs, results, deliveries), the spool files and what the receiving PACS got. It imports
nothing of the node itself, so it keeps working while the node's internals change. The fuzz,
chaos and load runs (bench/) and their short versions (tests/) share it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import split_dataset
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
NODE_AE = "SCXNN"
PACS_AE = "PACS"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"}
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SERVE = (sys.executable, "-m", "scxnn_node.cli", "serve")


def is_success(status: int | None) -> bool:
    """Success, or a warning (0xB000-0xBFFF): the receiver has the object."""
    return status is not None and (status == SUCCESS or 0xB000 <= status <= 0xBFFF)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll until predicate() is truthy; its value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:.0f} s")
        time.sleep(interval)


# --- processes, seen through /proc --------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state, ppid, pgrp, ..."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def process_group(pgid: int) -> list[int]:
    """Live processes of a process group (the node and every process it started)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return sorted(members)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident memory of these processes together (VmRSS)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# --- the node and its PACS ---------------------------------------------------------------


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def serve_config(
    root: Path,
    bundle: Path,
    *,
    database_url: str | None = None,
    pacs_port: int | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A config.yaml (as a dict) for a node whose state lives under `root`, on a free port,
    with short timings so that a study goes through in about a second; `sections` override."""
    raw: dict[str, Any] = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": free_port()},
        "allowed_callers": [{"ae_title": PACS_AE}],
        "storage": {"spool_dir": str(root / "spool"), "min_free_bytes": 0},
        "database": {"url": database_url or f"sqlite:///{root / 'node.db'}"},
        "model": {"bundle": str(bundle)},
        "study": {"quiet_seconds": 0.5},
        "destinations": []
        if pacs_port is None
        else [
            {
                "name": "pacs",
                "ae_title": PACS_AE,
                "host": "127.0.0.1",
                "port": pacs_port,
                "outputs": ["sr", "summary"],
            }
        ],
        "delivery": {"backoff_seconds": 0.5, "max_backoff_seconds": 2.0, "max_attempts": 1000},
        "scheduler": {
            "readiness_seconds": 0.2,
            "delivery_seconds": 0.3,
            "lease_recovery_seconds": 0.5,
        },
        "worker": {"poll_seconds": 0.2, "lease_seconds": 4, "heartbeat_seconds": 1},
        "logging": {"level": "WARNING"},
    }
    return _merge(raw, sections)


class NodeProcess:
    """`scxnn-node serve --config FILE` in a process group of its own; its output goes to
    serve.log under `root`. Every process the node starts (workers) shares the group."""

    def __init__(self, config: dict[str, Any], root: Path) -> None:
        self.config = config
        self.root = root
        self.config_path = root / "config.json"  # JSON is YAML
        self.process: subprocess.Popen | None = None
        self.starts = 0
        atexit.register(self.kill)  # an interrupted run leaves no node behind

    @property
    def port(self) -> int:
        return int(self.config["node"]["port"])

    @property
    def caller_ae(self) -> str:
        """An AE title the node lets in (the first of allowed_callers)."""
        callers = self.config.get("allowed_callers")
        return str(callers[0]["ae_title"]) if callers else PACS_AE

    @property
    def database_url(self) -> str:
        return str(self.config["database"]["url"])

    @property
    def spool_dir(self) -> Path:
        return Path(self.config["storage"]["spool_dir"])

    @property
    def log_path(self) -> Path:
        return self.root / "serve.log"

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def start(self, timeout: float = 180.0) -> NodeProcess:
        """Start serve and return once it answers C-ECHO."""
        self.write_config()
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1} at {time.ctime()}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [*SERVE, "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not echo(self.port, aet=self.caller_ae, timeout=2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"scxnn-node serve did not start:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self) -> list[int]:
        """The serve process and every live process it started."""
        return process_group(self.process.pid) if self.process is not None else []

    def helpers(self) -> dict[int, str]:
        """Processes the node started (workers, and any other service it runs apart), by pid;
        multiprocessing's resource tracker is left out."""
        if self.process is None:
            return {}
        found = {pid: command_line(pid) for pid in self.pids() if pid != self.process.pid}
        return {pid: cmd for pid, cmd in found.items() if "resource_tracker" not in cmd}

    def kill(self) -> None:
        """kill -9 the serve process, then what is left of its group, as systemd does when a
        service's main process dies."""
        if self.process is None:
            return
        pgid = self.process.pid
        _signal(pgid, signal.SIGKILL)
        self.process.wait(30)
        for pid in process_group(pgid):
            _signal(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not process_group(pgid), 10, 0.05)
        self.process = None

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM and wait; kill -9 if it does not stop in time."""
        if self.process is None:
            return
        _signal(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self.kill()

    def memory(self) -> int:
        return rss_bytes(self.pids())

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Another scxnn-node command on this node's config (e.g. "status", "--json")."""
        self.write_config()
        return subprocess.run(
            [sys.executable, "-m", "scxnn_node.cli", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        run = self.cli("status", "--json")
        if run.returncode != 0:
            raise RuntimeError(f"scxnn-node status failed: {run.stderr[-2000:]}")
        return json.loads(run.stdout)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


class LoopbackPacs:
    """dcmtk storescp on a loopback port standing in for the PACS; keeps what it receives."""

    def __init__(self, directory: Path, port: int | None = None, aet: str = PACS_AE) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.aet = aet
        self.process: subprocess.Popen | None = None
        atexit.register(self.stop)

    def start(self) -> LoopbackPacs:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["storescp", "-aet", self.aet, "+xa", "-od", str(self.directory), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: echo(self.port, aec=self.aet, timeout=2), 30, 0.1)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def received(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.is_file())


# --- DICOM as a sender sees it -----------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One C-STORE made: the UIDs the node will read from the bytes, and its answer."""

    label: str
    sop_instance_uid: str | None  # None: the bytes carry no SOP Instance UID pydicom can read
    study_instance_uid: str | None
    status: int | None  # None: no response (association refused, aborted or timed out)

    @property
    def acknowledged(self) -> bool:
        return is_success(self.status)


def read_uids(path: Path) -> tuple[str | None, str | None]:
    """(SOP Instance UID, Study Instance UID) of a file as the node's parser reads them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            sop, study = ds.get("SOPInstanceUID"), ds.get("StudyInstanceUID")
            return (str(sop) if sop else None), (str(study) if study else None)
    except Exception:
        return None, None


class _RawSending:
    """pynetdicom sends a file's dataset bytes as they are (no decode, no re-encode) while at
    least one sender is inside; the library setting is process-wide, so it is counted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.saved = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if self.users == 0:
                self.saved = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
                pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
            self.users += 1
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = self.saved


_raw_sending = _RawSending()


def _client(aet: str, timeout: float) -> AE:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def echo(port: int, aet: str = PACS_AE, aec: str = NODE_AE, timeout: float = 10.0) -> bool:
    """True if a C-ECHO on a fresh association is answered with Success."""
    ae = _client(aet, timeout)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == SUCCESS
    finally:
        if assoc.is_established:
            assoc.release()


def store_files(
    port: int,
    files: Sequence[Path],
    *,
    labels: Sequence[str] | None = None,
    aet: str = PACS_AE,
    aec: str = NODE_AE,
    timeout: float = 30.0,
) -> list[Sent]:
    """C-STORE Part 10 files over one association, each file's dataset bytes exactly as they
    are on disk; one Sent per file (status None for those never answered)."""
    labels = list(labels) if labels is not None else [f.name for f in files]
    metas = [split_dataset(f)[0] for f in files]
    ae = _client(aet, timeout)
    pairs = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas})
    for sop_class, syntax in pairs[:128]:
        ae.add_requested_context(sop_class, [syntax])
    statuses: list[int | None] = []
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if assoc.is_established:
        try:
            with _raw_sending():
                for path in files:
                    if not assoc.is_established:
                        statuses.append(None)
                        continue
                    try:
                        answer = assoc.send_c_store(path)
                        statuses.append(int(answer.Status) if "Status" in answer else None)
                    except Exception:  # no context for it, or the peer went away
                        statuses.append(None)
        finally:
            if assoc.is_established:
                assoc.release()
    statuses.extend([None] * (len(files) - len(statuses)))
    return [
        Sent(label, *read_uids(path), status)
        for label, path, status in zip(labels, files, statuses, strict=True)
    ]


# --- what is sent: generated chest images, and byte-level mutations -----------------------


def chest_pixels(size: int, seed: int) -> np.ndarray:
    """A 12-bit chest-like picture: a bright body, two dark lungs, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((x - 0.5) / 0.42) ** 6 + ((y - 0.55) / 0.48) ** 6))
    lungs = sum(np.exp(-(((x - cx) / 0.14) ** 2 + ((y - 0.5) / 0.28) ** 2)) for cx in (0.33, 0.67))
    image = 2600 * body - 1500 * lungs + 300 + rng.normal(0, 60, (size, size))
    return np.clip(image, 0, 4095).astype(np.uint16)


def chest_dataset(
    *,
    sop_uid: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    omit: Iterable[str] = (),
    size: int = 96,
    seed: int = 0,
    **values: Any,
) -> Dataset:
    """A single-frame DX chest PA (Explicit VR Little Endian) with file meta; `values` set or
    replace elements by keyword, `omit` leaves elements out (e.g. "SeriesInstanceUID")."""
    pixels = chest_pixels(size, seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "Audit^Synthetic"
    ds.PatientID = "AUDIT-1"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", "A1"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        for keyword in omit:
            if keyword in ds:
                delattr(ds, keyword)
    return ds


def _legal_uid(value: Any) -> str | None:
    text_value = str(value) if isinstance(value, str) else ""
    return text_value if 0 < len(text_value) <= 64 and "\\" not in text_value else None


def write_part10(ds: Dataset, path: Path) -> Path:
    """Write as a Part 10 file whatever the values (over-long or odd UIDs included). The file
    meta names the dataset's SOP class and instance where they are usable as such (the C-STORE
    command carries them), a stand-in otherwise; the dataset is written as it is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _legal_uid(ds.get("SOPClassUID")) or DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = _legal_uid(ds.get("SOPInstanceUID")) or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    head, body = DicomBytesIO(), DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_file_meta_info(head, meta, enforce_standard=True)
        write_dataset(body, ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + body.getvalue())
    return path


@dataclass(frozen=True)
class Edit:
    """One byte-level change to a dataset: overwrite, insert or delete at an offset (taken
    modulo the dataset's length), or truncate there."""

    kind: str  # overwrite | insert | delete | truncate
    at: int
    data: bytes = b""


def mutate_file(source: Path, target: Path, edits: Sequence[Edit]) -> Path:
    """`source` with its dataset bytes (not its file meta, which the C-STORE command needs)
    changed by `edits`, written to `target`."""
    raw = source.read_bytes()
    _, offset = split_dataset(source)
    body = bytearray(raw[offset:])
    for edit in edits:
        at = edit.at % (len(body) + 1)
        if edit.kind == "overwrite":
            body[at : at + len(edit.data)] = edit.data
        elif edit.kind == "insert":
            body[at:at] = edit.data
        elif edit.kind == "delete":
            del body[at : at + max(1, len(edit.data))]
        elif edit.kind == "truncate":
            del body[at:]
        else:
            raise ValueError(f"unknown edit {edit.kind!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(raw[:offset] + bytes(body))
    return target


def bundle_version(bundle: Path) -> str:
    """The version a bundle's manifest declares (what the node's jobs and SRs carry)."""
    return str(json.loads((bundle / "manifest.json").read_text())["version"])


def sample_files() -> list[Path]:
    """The real chest radiographs shipped with the node."""
    return sorted(SAMPLES.glob("*.dcm"))


# --- the database, read with plain SQL -----------------------------------------------------


class NodeDatabase:
    """The node's tables read with plain SELECTs; nothing here writes."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url, poolclass=NullPool)

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            table: {
                r["state"]: r["n"]
                for r in self.rows(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            }
            for table in ("instances", "studies", "jobs", "deliveries")
        }

    def busy(self) -> bool:
        """True while the node still has work it can make progress on: a study receiving, a
        job ready or claimed, a delivery pending."""
        counts = self.counts()
        return bool(
            counts["studies"].get("receiving")
            or counts["jobs"].get("ready")
            or counts["jobs"].get("claimed")
            or counts["deliveries"].get("pending")
        )

    def dispose(self) -> None:
        self.engine.dispose()


def wait_settled(db: NodeDatabase, timeout: float, polls: int = 3) -> bool:
    """Wait until the node has nothing left to do (`polls` looks in a row); False on timeout.
    A study queued with no job left to run counts as settled: it is stuck, not busy."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        quiet = quiet + 1 if not db.busy() else 0
        if quiet >= polls:
            return True
        time.sleep(0.3)
    return False


# --- the audit -----------------------------------------------------------------------------

# stuck: left receiving or queued with nothing left to move it; failed: the node gave up on the
# study (no SR, no not-analysed verdict), waiting for an operator's retry.
COUNTERS = (
    "lost",
    "misattributed",
    "duplicated",
    "stuck",
    "failed",
    "stale",
    "wrong_bundle",
    "unanswered",
)


@dataclass
class Audit:
    """What the auditor found: one line per defect under each counter."""

    findings: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in COUNTERS})
    acknowledged: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, counter: str, line: str) -> None:
        self.findings[counter].append(line)

    def count(self, counter: str) -> int:
        return len(self.findings[counter])

    @property
    def ok(self) -> bool:
        return not any(self.findings.values())

    def merge(self, other: Audit) -> None:
        for counter in COUNTERS:
            self.findings[counter].extend(other.findings[counter])
        self.acknowledged += other.acknowledged
        self.notes.extend(other.notes)

    def summary(self, runs: int) -> str:
        """`runs N, lost 0, misattributed 0, duplicated 0, stuck 0, ...`"""
        counts = ", ".join(f"{c.replace('_', ' ')} {self.count(c)}" for c in COUNTERS)
        return f"runs {runs}, {counts}"

    def report(self, limit: int = 12) -> str:
        lines = [f"{self.acknowledged} acknowledged instances audited"]
        for counter in COUNTERS:
            for line in self.findings[counter][:limit]:
                lines.append(f"  {counter}: {line}")
            if self.count(counter) > limit:
                lines.append(f"  {counter}: ... {self.count(counter) - limit} more")
        lines.extend(f"  note: {note}" for note in self.notes[:limit])
        return "\n".join(lines)


def _header(path: Path) -> Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None


def _versions(ds: Dataset) -> set[str]:
    """The Software Versions an object names (the node puts its bundle version there)."""
    value = ds.get("SoftwareVersions")
    if value is None:
        return set()
    values = [value] if isinstance(value, str) else list(value)
    return {str(v).strip() for v in values}


def _short(uid: str | None) -> str:
    """A UID short enough for a report line, still telling near neighbours apart."""
    if uid is None or len(uid) <= 40:
        return repr(uid)
    return f"'{uid[:12]}...{uid[-14:]}' ({len(uid)} chars)"


class Auditor:
    """Checks the node's state against the rules, from outside:
    - every acknowledged instance has its row, and the row's spool file holds that instance;
    - every study with analysable instances is reported, with a current result for exactly
      the instances it holds (never left receiving or queued, never given up as failed);
    - one result per (study, instance set, bundle), made under a live lease by that bundle;
    - the outbox files, the database and the PACS name the same SR and summary UIDs.
    """

    def __init__(
        self,
        db: NodeDatabase,
        spool_dir: Path,
        bundle_versions: Iterable[str],
        pacs_dir: Path | None = None,
    ) -> None:
        self.db = db
        self.spool_dir = spool_dir
        self.bundle_versions = set(bundle_versions)
        self.pacs_dir = pacs_dir

    def audit(
        self,
        sends: Sequence[Sent],
        *,
        expect_answers: bool = True,
        settled: bool = True,
        everything: bool = False,
    ) -> Audit:
        """Audit `sends` and the studies they touch (every study when `everything`). With
        `expect_answers`, a C-STORE with no response is a defect (not during chaos, where the
        node is killed under the senders). With `settled`, studies must be finished."""
        found = Audit()
        instances = {r["sop_instance_uid"]: r for r in self.db.rows("SELECT * FROM instances")}
        scope = self._check_instances(found, sends, instances, expect_answers)
        if everything:
            scope |= {r["study_instance_uid"] for r in instances.values()}
        if settled:
            self._check_studies(found, scope, instances)
        self._check_results(found, scope, settled)
        return found

    def _check_instances(
        self,
        found: Audit,
        sends: Sequence[Sent],
        instances: Mapping[str, dict[str, Any]],
        expect_answers: bool,
    ) -> set[str]:
        studies: set[str] = set()
        checked: set[str] = set()
        for sent in sends:
            if sent.status is None and expect_answers:
                found.add("unanswered", f"{sent.label}: C-STORE got no response")
            if not sent.acknowledged:
                continue
            found.acknowledged += 1
            uid = sent.sop_instance_uid
            if uid is None:
                found.notes.append(f"{sent.label}: acknowledged; its bytes carry no readable UID")
                continue
            if uid in checked:
                continue
            checked.add(uid)
            row = instances.get(uid)
            if row is None:
                found.add("lost", f"{sent.label}: {_short(uid)} acknowledged, no instance row")
                continue
            studies.add(row["study_instance_uid"])
            if row["study_instance_uid"] != sent.study_instance_uid:
                found.add(
                    "misattributed",
                    f"{sent.label}: row of {_short(uid)} names study "
                    f"{_short(row['study_instance_uid'])}, sent {_short(sent.study_instance_uid)}",
                )
            if not row["path"]:
                continue  # purged after retention
            path = self.spool_dir / row["path"]
            held = read_uids(path)[0] if path.is_file() else None
            if not path.is_file():
                found.add("lost", f"{sent.label}: {_short(uid)} row names missing {row['path']}")
            elif held != uid:
                found.add(
                    "misattributed",
                    f"{sent.label}: row of {_short(uid)} points at {row['path']}, "
                    f"which holds {_short(held)}",
                )
        return studies

    def _check_studies(
        self, found: Audit, scope: set[str], instances: Mapping[str, dict[str, Any]]
    ) -> None:
        studies = {r["study_instance_uid"]: r for r in self.db.rows("SELECT * FROM studies")}
        jobs = self.db.rows("SELECT * FROM jobs ORDER BY id")
        stored: dict[str, set[str]] = defaultdict(set)
        for row in instances.values():
            if row["state"] == "stored":
                stored[row["study_instance_uid"]].add(row["sop_instance_uid"])
        done_sets: dict[str, list[set[str]]] = defaultdict(list)
        last_job: dict[str, dict[str, Any]] = {}
        for job in jobs:
            last_job[job["study_instance_uid"]] = job
            if job["state"] == "done":
                done_sets[job["study_instance_uid"]].append(set(json.loads(job["instance_uids"])))
        for study_uid in sorted(scope):
            if not stored.get(study_uid):
                continue  # every instance skipped by the filters: nothing to analyse
            study = studies.get(study_uid)
            state = study["state"] if study else "(no study row)"
            job = last_job.get(study_uid)
            why = (
                f"last job {job['id']} {job['state']}"
                + (f": {job['last_error'][:160]}" if job.get("last_error") else "")
                if job
                else "no job"
            )
            if state == "failed":
                found.add("failed", f"study {_short(study_uid)} given up ({why})")
            elif state != "reported":
                found.add("stuck", f"study {_short(study_uid)} left {state} ({why})")
            elif stored[study_uid] not in done_sets.get(study_uid, []):
                found.add(
                    "stuck",
                    f"study {_short(study_uid)} reported, but no result covers its "
                    f"{len(stored[study_uid])} stored instances ({why})",
                )

    def _check_results(self, found: Audit, scope: set[str], settled: bool) -> None:
        jobs = {r["id"]: r for r in self.db.rows("SELECT * FROM jobs")}
        results = [
            r for r in self.db.rows("SELECT * FROM results ORDER BY id")
            if r["study_instance_uid"] in scope
        ]
        deliveries: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for d in self.db.rows("SELECT * FROM deliveries ORDER BY id"):
            deliveries[d["result_id"]].append(d)
        pacs = self._pacs_objects(scope)
        per_input: dict[tuple[str, str, str], list[int]] = defaultdict(list)
        by_output: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        for result in results:
            job = jobs.get(result["job_id"])
            if job is None or job["state"] != "done":
                state = "missing" if job is None else job["state"]
                found.add("stale", f"result {result['id']} belongs to job in state {state}")
            if job is not None:
                key = (job["study_instance_uid"], job["instance_set"], job["bundle_version"])
                per_input[key].append(result["id"])
                if job["bundle_version"] not in self.bundle_versions:
                    found.add(
                        "wrong_bundle",
                        f"result {result['id']} from bundle {job['bundle_version']}, "
                        f"node runs {sorted(self.bundle_versions)}",
                    )
            for uid_key in ("sr_sop_instance_uid", "summary_sop_instance_uid"):
                if result[uid_key]:
                    by_output[result[uid_key]] = (result, job)
            for delivery in deliveries.get(result["id"], []):
                self._check_delivery(found, result, job, delivery, pacs, settled)
        for (study_uid, _, version), ids in per_input.items():
            if len(ids) > 1:
                found.add(
                    "duplicated",
                    f"study {_short(study_uid)}: results {ids} for one instance set, bundle "
                    f"{version}",
                )
        pacs_srs: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        for uid, (name, ds) in pacs.items():
            owner = by_output.get(uid)
            if owner is None:
                found.add("stale", f"PACS holds {name} ({_short(uid)}) that no result names")
                continue
            result, job = owner
            if str(ds.get("StudyInstanceUID", "")) != result["study_instance_uid"]:
                found.add("misattributed", f"PACS {name} is in another study than its result")
            if job is not None and str(ds.get("SOPClassUID", "")) in SR_CLASSES:
                key = (job["study_instance_uid"], job["instance_set"], job["bundle_version"])
                pacs_srs[key].add(uid)
                self._check_bundle(found, f"PACS {name}", ds, job)
        for (study_uid, _, _), uids in pacs_srs.items():
            if len(uids) > 1:
                found.add(
                    "duplicated",
                    f"study {_short(study_uid)}: PACS holds {len(uids)} SRs for one input",
                )

    def _check_delivery(
        self,
        found: Audit,
        result: dict[str, Any],
        job: dict[str, Any] | None,
        delivery: dict[str, Any],
        pacs: Mapping[str, tuple[str, Dataset]],
        settled: bool,
    ) -> None:
        expected = result[
            "sr_sop_instance_uid" if delivery["kind"] == "sr" else "summary_sop_instance_uid"
        ]
        what = f"delivery {delivery['id']} ({delivery['kind']} of result {result['id']})"
        if settled and delivery["state"] != "sent":
            found.add("stuck", f"{what} left {delivery['state']}: {delivery['last_error']}")
        path = self.spool_dir / delivery["path"]
        ds = _header(path) if path.is_file() else None
        if ds is not None:
            held = str(ds.get("SOPInstanceUID", ""))
            if held != expected:
                found.add(
                    "stale",
                    f"{what}: outbox file holds {_short(held)}, the result names "
                    f"{_short(expected)}",
                )
            if str(ds.get("StudyInstanceUID", "")) != result["study_instance_uid"]:
                found.add("misattributed", f"{what}: outbox file is in another study")
            if job is not None and delivery["kind"] == "sr":
                self._check_bundle(found, what, ds, job)
        if delivery["state"] == "sent" and self.pacs_dir is not None and expected not in pacs:
            found.add("lost", f"{what} marked sent, the PACS has no {_short(expected)}")

    def _check_bundle(self, found: Audit, what: str, ds: Dataset, job: dict[str, Any]) -> None:
        versions = _versions(ds)
        if versions and job["bundle_version"] not in versions:
            found.add(
                "wrong_bundle",
                f"{what}: SR made by {sorted(versions)} for a job of bundle "
                f"{job['bundle_version']}",
            )

    def _pacs_objects(self, scope: set[str]) -> dict[str, tuple[str, Dataset]]:
        """SOP Instance UID -> (file name, header) of what the PACS holds for these studies."""
        out: dict[str, tuple[str, Dataset]] = {}
        if self.pacs_dir is None or not self.pacs_dir.is_dir():
            return out
        for path in sorted(self.pacs_dir.iterdir()):
            ds = _header(path) if path.is_file() else None
            if ds is not None and str(ds.get("StudyInstanceUID", "")) in scope:
                out[str(ds.get("SOPInstanceUID", ""))] = (path.name, ds)
        return out


class MemoryPeak:
    """Samples the resident memory of a node's process tree in the background; `peak` holds
    the highest total seen."""

    def __init__(self, node: NodeProcess, interval: float = 0.2) -> None:
        self.node = node
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.node.memory())

    def __enter__(self) -> MemoryPeak:
        self.peak = self.node.memory()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()



# --- senders and faults ----------------------------------------------------------------------


def send_until_acknowledged(
    port: int, files: Sequence[Path], deadline: float, pause: float = 0.5
) -> list[Sent]:
    """Send like a PACS does: whatever is not acknowledged is sent again, on a new
    association, until it is or `deadline` (monotonic) passes. Every attempt is returned."""
    attempts: list[Sent] = []
    waiting = list(files)
    while waiting:
        sends = store_files(port, waiting)
        attempts.extend(sends)
        waiting = [f for f, s in zip(waiting, sends, strict=True) if not s.acknowledged]
        if waiting and time.monotonic() > deadline:
            break
        if waiting:
            time.sleep(pause)
    return attempts


@dataclass(frozen=True)
class ChaosPlan:
    """How hard one chaos run pushes: senders, studies, and faults while they send."""

    senders: int = 3
    studies_per_sender: int = 6
    instances_per_study: int = 3  # 1 to this many
    faults: int = 6
    resend_chance: float = 0.3  # an acknowledged instance sent again (a PACS retrying)
    amend_chance: float = 0.2  # a later instance for an earlier study (an amended SR)
    image_size: int = 64
    settle_seconds: float = 300.0
    seed: int = 0
    shuffle_faults: bool = True  # False: the faults in the order given, round robin


FAULTS = (
    "kill_serve",  # kill -9 the serve process (and its group, as systemd does), restart it
    "kill_helper",  # kill -9 one process the node started (a worker, or another service)
    "pause_mid_job",  # SIGSTOP the worker holding a claimed job past its lease, then SIGCONT
    "pacs_down",  # the destination goes away for a few seconds
    "restart",  # SIGTERM, then start again
    "switch_bundle",  # kill -9, restart with the other bundle
)


class ChaosRun:
    """One chaos run: senders on several associations while faults hit the node and its
    PACS; then everything is healed, the node left to finish, and audited."""

    def __init__(
        self,
        root: Path,
        bundles: Sequence[Path],
        plan: ChaosPlan,
        database_url: str | None = None,
        faults: Sequence[str] = FAULTS,
    ) -> None:
        self.root = root
        self.bundles = list(bundles)
        self.plan = plan
        self.faults = [f for f in faults if f != "switch_bundle" or len(self.bundles) > 1]
        self.rng = np.random.default_rng(plan.seed)
        self.pacs = LoopbackPacs(root / "pacs")
        config = serve_config(
            root / "node",
            self.bundles[0],
            database_url=database_url,
            pacs_port=self.pacs.port,
            model={"devices": ["cpu", "cpu"]},  # two workers: one can take over the other's job
            worker={"lease_seconds": 3, "heartbeat_seconds": 0.5, "max_attempts": 50},
            node={"max_associations": 32},
        )
        self.node = NodeProcess(config, root / "node")
        self.sends: list[Sent] = []
        self.injected: list[str] = []
        self._lock = threading.Lock()
        self._paused: set[int] = set()

    # senders

    def _files(self, sender: int) -> Iterator[list[Path]]:
        """Per study: its instances; sometimes a re-send or a late instance of an earlier
        study of this sender."""
        rng = np.random.default_rng(self.plan.seed * 1000 + sender)
        earlier: list[tuple[str, list[Path]]] = []
        folder = self.root / "sent" / f"sender{sender}"
        for number in range(self.plan.studies_per_sender):
            study = generate_uid()
            count = int(rng.integers(1, self.plan.instances_per_study + 1))
            files = [
                write_part10(
                    chest_dataset(
                        study_uid=study, size=self.plan.image_size, seed=int(rng.integers(1 << 30))
                    ),
                    folder / f"{number:03d}-{i}.dcm",
                )
                for i in range(count)
            ]
            yield files
            earlier.append((study, files))
            if rng.random() < self.plan.resend_chance:
                yield [earlier[int(rng.integers(len(earlier)))][1][0]]
            if rng.random() < self.plan.amend_chance:
                old_study, _ = earlier[int(rng.integers(len(earlier)))]
                late = folder / f"{number:03d}-late.dcm"
                yield [write_part10(chest_dataset(study_uid=old_study, seed=number), late)]

    def _sender(self, sender: int) -> None:
        rng = np.random.default_rng(self.plan.seed * 7919 + sender)
        for files in self._files(sender):
            sends = send_until_acknowledged(self.node.port, files, time.monotonic() + 240)
            with self._lock:
                self.sends.extend(sends)
            time.sleep(float(rng.uniform(0.0, 0.6)))

    # faults

    def _fault(self, name: str) -> None:
        node, pacs = self.node, self.pacs
        if name in ("kill_serve", "switch_bundle"):
            node.kill()
            self._paused.clear()  # SIGKILL ends stopped processes too
            time.sleep(float(self.rng.uniform(0, 1)))
            if name == "switch_bundle":
                current = self.bundles.index(Path(node.config["model"]["bundle"]))
                following = self.bundles[(current + 1) % len(self.bundles)]
                node.config["model"]["bundle"] = str(following)
            node.start()
        elif name == "restart":
            node.stop()
            self._paused.clear()
            node.start()
        elif name == "kill_helper":
            helpers = sorted(node.helpers())
            if helpers:
                _signal(helpers[int(self.rng.integers(len(helpers)))], signal.SIGKILL)
            else:
                name = "kill_helper (none running)"
        elif name == "pause_mid_job":
            name = self._pause_mid_job()
        elif name == "pacs_down":
            pacs.stop()
            time.sleep(float(self.rng.uniform(1, 4)))
            pacs.start()
        self.injected.append(name)

    def _pause_mid_job(self) -> str:
        """SIGSTOP the worker that holds a claimed job (its pid is in the lease owner) until
        the lease has expired and another worker has had time to take the job over."""
        db = NodeDatabase(self.node.database_url)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                for job in db.rows("SELECT id, lease_owner FROM jobs WHERE state = 'claimed'"):
                    pid = _owner_pid(job["lease_owner"])
                    if pid is None or pid not in self.node.helpers():
                        continue
                    _signal(pid, signal.SIGSTOP)
                    self._paused.add(pid)
                    lease = float(self.node.config["worker"]["lease_seconds"])
                    with contextlib.suppress(TimeoutError):
                        wait_until(lambda j=job["id"]: _job_state(db, j) == "done", lease * 4)
                    time.sleep(0.5)
                    _signal(pid, signal.SIGCONT)
                    self._paused.discard(pid)
                    return "pause_mid_job"
                time.sleep(0.01)
            return "pause_mid_job (no claimed job of a worker seen)"
        finally:
            db.dispose()

    def _chaos(self, period: float) -> None:
        """Every fault of the plan, spread over the run (also after the senders are done:
        then they hit processing and delivery)."""
        for number in range(self.plan.faults):
            time.sleep(float(self.rng.uniform(0.3, period)))
            pick = (
                int(self.rng.integers(len(self.faults)))
                if self.plan.shuffle_faults
                else number % len(self.faults)
            )
            self._fault(self.faults[pick])

    # the run

    def run(self) -> Audit:
        self.pacs.start()
        self.node.start()
        try:
            senders = [
                threading.Thread(target=self._sender, args=(i,), daemon=True)
                for i in range(self.plan.senders)
            ]
            chaos = threading.Thread(target=self._chaos, args=(3.0,), daemon=True)
            for thread in senders:
                thread.start()
            chaos.start()
            for thread in senders:
                thread.join()
            chaos.join()
            return self._heal_and_audit()
        finally:
            self.node.stop()
            self.pacs.stop()

    def _heal_and_audit(self) -> Audit:
        for pid in list(self._paused):
            _signal(pid, signal.SIGCONT)
        if not self.pacs.running:
            self.pacs.start()
        if not self.node.alive():
            self.node.start()
        db = NodeDatabase(self.node.database_url)
        try:
            settled = wait_settled(db, self.plan.settle_seconds)
            versions = [bundle_version(b) for b in self.bundles]
            audit = Auditor(db, self.node.spool_dir, versions, self.pacs.directory).audit(
                self.sends, expect_answers=False, everything=True
            )
        finally:
            db.dispose()
        if not settled:
            audit.notes.append(f"not settled after {self.plan.settle_seconds:.0f} s")
        if not self.node.helpers():
            audit.notes.append("no process left under serve: a killed worker was not replaced")
        audit.notes.append("faults: " + (", ".join(self.injected) or "none"))
        return audit


def _job_state(db: NodeDatabase, job_id: int) -> str:
    rows = db.rows("SELECT state FROM jobs WHERE id = :id", id=job_id)
    return str(rows[0]["state"]) if rows else "missing"


def _owner_pid(lease_owner: str | None) -> int | None:
    """The pid in a lease owner such as `host:1234:cpu`, if it has one."""
    for part in (lease_owner or "").split(":"):
        if part.isdigit():
            return int(part)
    return None
