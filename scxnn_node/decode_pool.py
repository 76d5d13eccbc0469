"""Decoding and preprocessing of spooled instances, in processes of their own ahead of the engine;
the same processes encode each triaged study's DICOM outputs after it.

A J2K decode of a 2-3k px radiograph costs a good part of a CPU second; run in the worker's
own thread it leaves the device idle. The worker submits each instance of a claimed study here
and collects `DecodedInstance`s (the preprocessed uint8 image, the header, or why the instance
cannot be used); meanwhile the engine works on the studies decoded before. The processes are
the worker's own children (spawned, so no torch or CUDA state is inherited): they die with it,
even when it is killed with -9, and what comes back over the pipe is plain data. A decode
process that dies (a decoder crash, the OOM killer) breaks only the decodes it had pending: the
pool is started again for the next submit. With `processes=0` every decode runs at submit time,
in the worker's own thread.

A study's SR and summary image cost about 0.1 CPU-s to build and encode, several times a GPU
engine's share of a study; the worker's conclusion threads hand them to these processes
(`encode_outputs`), so that several studies' outputs are built at once, outside the worker's
GIL. An encode that loses its process is done again in the calling thread.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from scxnn_node.dicom.outputs import EncodedOutputs, StudyOutputs
from scxnn_node.imaging.decode import ImageRejected, read_dataset
from scxnn_node.imaging.gpu_decode import enable_gpu_decoding
from scxnn_node.imaging.preprocess import PreprocessSpec
from scxnn_node.imaging.selection import SelectionPolicy
from scxnn_node.lifetime import die_with_parent
from scxnn_node.logs import configure_logging, short_hash
from scxnn_node.triage import PreparedInstance, prepare_instance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodedInstance:
    """One spooled instance after decoding: prepared (analysed or skipped by policy), and the
    reason when the instance itself is unusable (it is then marked so; its study goes on)."""

    prepared: PreparedInstance
    unusable: str | None = None


def identity_problem(ds: Dataset, sop_instance_uid: str, study_instance_uid: str) -> str | None:
    """Why an instance cannot be named in an SR as evidence of its study (None: it can)."""
    for keyword, name in (
        ("StudyInstanceUID", "Study Instance UID"),
        ("SeriesInstanceUID", "Series Instance UID"),
        ("SOPInstanceUID", "SOP Instance UID"),
        ("SOPClassUID", "SOP Class UID"),
    ):
        value = str(ds.get(keyword, "") or "")
        if not value:
            return f"no {name}"
        if not UID(value).is_valid:
            return f"{name} is not a valid UID"
    if str(ds.SOPInstanceUID) != sop_instance_uid:
        return "SOP Instance UID differs from the one it was received as"
    if str(ds.StudyInstanceUID) != study_instance_uid:
        return "Study Instance UID differs from its study's"
    return None


def decode_spooled_instance(
    path: Path,
    sop_instance_uid: str,
    study_instance_uid: str,
    spec: PreprocessSpec,
    policy: SelectionPolicy | None = None,
    preprocess_device: str | None = None,
) -> DecodedInstance:
    """Read, check, select and preprocess one spooled instance. Only MemoryError escapes: a bad
    instance is a fact about that instance, not a failure of its study."""
    try:
        ds = read_dataset(path)
        problem = identity_problem(ds, sop_instance_uid, study_instance_uid)
        if problem is not None:
            raise ValueError(problem)
        return DecodedInstance(prepare_instance(ds, spec, policy, preprocess_device))
    except ImageRejected as exc:
        log.warning("instance %s not analysable: %s", short_hash(sop_instance_uid), exc)
        return DecodedInstance(
            PreparedInstance(study_instance_uid, sop_instance_uid, None, str(exc))
        )
    except MemoryError:
        raise
    except Exception as exc:  # this instance, not the study: the others go on
        reason = f"unusable: {exc}"
        log.warning("instance %s %s", short_hash(sop_instance_uid), reason)
        return DecodedInstance(
            PreparedInstance(study_instance_uid, sop_instance_uid, None, reason), reason
        )


def _process_id_after(seconds: float) -> int:
    """This process's id, after a wait that keeps it from answering for the others."""
    time.sleep(seconds)
    return os.getpid()


def _start_decode_process(
    worker_pid: int,
    log_level: str,
    json_logs: bool,
    gpu_device: int | None,
    preprocess_device: str | None,
) -> None:
    """In each decode process: end with the worker, leave Ctrl-C to it, log as it does, decode
    on the GPU where asked and possible, start the preprocessing device."""
    die_with_parent()
    if os.getppid() != worker_pid:  # the worker died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when its children end
    configure_logging(log_level, json_logs)
    if gpu_device is not None:
        enable_gpu_decoding(gpu_device)
    if preprocess_device is not None:
        from scxnn_node.imaging.device_preprocess import warm_up  # torch only where asked

        warm_up(preprocess_device)


class DecodePool:
    """`processes` decode processes (0: decode inline at submit), started at the first submit.
    Submit from threads that live as long as the pool (the worker's engine and conclusion
    threads): Linux ties a child's death signal to the thread that started it."""

    def __init__(
        self,
        processes: int,
        log_level: str = "INFO",
        json_logs: bool = False,
        gpu_device: int | None = None,  # CUDA device index to decode JPEG / JPEG 2000 on
        preprocess_device: str | None = None,  # torch device to preprocess on ("cuda:0")
    ) -> None:
        self.processes = processes
        self._logging = (log_level, json_logs)
        self.gpu_device = gpu_device
        self.preprocess_device = preprocess_device
        self._executor: ProcessPoolExecutor | None = None
        self._executor_lock = threading.Lock()  # engine and conclusion threads submit
        if processes == 0 and gpu_device is not None:
            enable_gpu_decoding(gpu_device)  # decodes run in this process

    def submit(
        self,
        path: Path,
        sop_instance_uid: str,
        study_instance_uid: str,
        spec: PreprocessSpec,
        policy: SelectionPolicy | None,
    ) -> Future[DecodedInstance]:
        args = (path, sop_instance_uid, study_instance_uid, spec, policy, self.preprocess_device)
        if self.processes == 0:
            done: Future[DecodedInstance] = Future()
            try:
                done.set_result(decode_spooled_instance(*args))
            except MemoryError as exc:
                done.set_exception(exc)
            return done
        try:
            return self._pool().submit(decode_spooled_instance, *args)
        except BrokenProcessPool:
            log.error("a decode process died; starting the decode pool again")
            self._discard()
            return self._pool().submit(decode_spooled_instance, *args)

    def encode_outputs(self, outputs: StudyOutputs) -> EncodedOutputs:
        """`outputs` encoded in a decode process (in this thread with none, or when the process
        died under it)."""
        if self.processes == 0:
            return outputs.encode()
        try:
            return self._pool().submit(outputs.encode).result()
        except BrokenProcessPool:
            log.error("a decode process died while encoding outputs; encoding them here")
            self._discard()
            return outputs.encode()

    def start(self, timeout: float = 300.0) -> None:
        """Start every process now rather than at the first submits, so that no study waits
        for one (a GPU decoder takes seconds to initialise). The stdlib spawns a process for
        each submit that finds none idle, so one round of submits starts them all; rounds of
        short waits go on until each process has answered, that is, finished its start."""
        if self.processes == 0:
            return
        answered: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(answered) < self.processes and time.monotonic() < deadline:
            pool = self._pool()
            rounds = [pool.submit(_process_id_after, 0.2) for _ in range(self.processes)]
            try:
                answered |= {future.result() for future in rounds}
            except BrokenProcessPool:  # one died starting: the pool starts again on demand
                self._discard()
                break
        if len(answered) < self.processes:
            log.warning("%d of %d decode processes started", len(answered), self.processes)

    def _pool(self) -> ProcessPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.processes,
                    mp_context=mp.get_context("spawn"),
                    initializer=_start_decode_process,
                    initargs=(os.getpid(), *self._logging, self.gpu_device, self.preprocess_device),
                )
            return self._executor

    def _discard(self, terminate: bool = False) -> None:
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is None:
            return
        # The stdlib keeps the processes there; a graceful end was seen to hang the worker's
        # exit on a loaded machine, and a decode process holds nothing worth ending gracefully.
        held = getattr(executor, "_processes", None) or {}
        processes = list(held.values()) if terminate else []
        for process in processes:
            process.terminate()
        executor.shutdown(wait=terminate, cancel_futures=True)  # terminated: ends at once

    def close(self) -> None:
        """Cancel the decodes not started and end the processes (a decode under way is lost)."""
        self._discard(terminate=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
