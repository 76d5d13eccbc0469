"""The DICOM sender the node meets on loopback: pynetdicom sending each file's bytes exactly as
they are (C-ECHO, C-STORE, and re-sending like a PACS until acknowledged). The PACS that receives
what the node delivers is dcmtk's storescp (testing/dcmtk.py).

Like the rest of the black-box harness (node_process, datasets, audit, chaos) it reaches the
node only from outside: DICOM on loopback sockets here.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import split_dataset

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
NODE_AE = "SCXNN"
PACS_AE = "PACS"


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
