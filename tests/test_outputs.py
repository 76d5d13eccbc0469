"""A study's outputs encoded in a decode process are the outputs encoded in the worker's own
thread, and a decode process that dies under an encode costs nothing but the time to encode
them again here."""

from __future__ import annotations

import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest
from dicom_factory import chest_pixels, make_dataset
from pydicom.uid import generate_uid
from test_consistent_outputs import BUNDLE, CODES, _finding_values, _result, _texts

from scxnn_node.decode_pool import DecodePool
from scxnn_node.dicom.outputs import EncodedOutputs, StudyOutputs
from scxnn_node.model.result import Verdict
from scxnn_node.store.results import SrReference

UIDS = (
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "MediaStorageSOPInstanceUID",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "SeriesDate",
    "SeriesTime",
    "DateOfSecondaryCapture",
    "TimeOfSecondaryCapture",
)


def _outputs(verdict: Verdict = Verdict.ABNORMAL, amends: bool = False) -> StudyOutputs:
    result = _result(verdict)
    source = make_dataset(chest_pixels(96, seed=3), study_uid=result.study_instance_uid)
    predecessor = (
        SrReference(
            result.study_instance_uid,
            generate_uid(),
            "1.2.840.10008.5.1.4.1.1.88.34",
            generate_uid(),
        )
        if amends
        else None
    )
    image = chest_pixels(64, seed=4).astype("uint8")
    return StudyOutputs(result, [source], image, BUNDLE.name, BUNDLE.version, CODES, predecessor)


def _read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _comparable(ds: pydicom.Dataset) -> dict[str, object]:
    """The dataset's top-level attributes but those that name this encoding (UIDs, times)."""
    return {
        e.keyword: e.value if e.VR != "SQ" else len(e.value)
        for e in ds
        if e.keyword not in UIDS and e.keyword != "PixelData"
    }


def _check_same(a: EncodedOutputs, b: EncodedOutputs) -> None:
    sr_a, sr_b = _read(a.sr), _read(b.sr)
    assert _comparable(sr_a) == _comparable(sr_b)
    assert _finding_values(sr_a) == _finding_values(sr_b)
    assert _texts(sr_a) == _texts(sr_b)
    summary_a, summary_b = _read(a.summary), _read(b.summary)
    assert _comparable(summary_a) == _comparable(summary_b)
    assert (summary_a.pixel_array == summary_b.pixel_array).all()
    for encoded, sr, summary in ((a, sr_a, summary_a), (b, sr_b, summary_b)):
        assert encoded.sr_reference.sop_instance_uid == sr.SOPInstanceUID
        assert encoded.sr_reference.series_instance_uid == sr.SeriesInstanceUID
        assert encoded.summary_sop_instance_uid == summary.SOPInstanceUID


@pytest.mark.parametrize("amends", [False, True])
@pytest.mark.parametrize("verdict", [Verdict.ABNORMAL, Verdict.DEFINITE_NORMAL])
def test_outputs_encoded_in_a_decode_process_equal_those_encoded_here(verdict, amends):
    outputs = _outputs(verdict, amends)
    with DecodePool(1) as pool:
        there = pool.encode_outputs(outputs)
    here = DecodePool(0).encode_outputs(outputs)
    _check_same(there, here)
    assert there.sr_reference.sop_instance_uid != here.sr_reference.sop_instance_uid
    predecessors = _read(there.sr).get("PredecessorDocumentsSequence")
    assert (predecessors is not None) == amends


def test_a_study_without_an_analysed_image_has_no_outputs_to_encode():
    outputs = _outputs()
    with pytest.raises(ValueError, match=r"StudyOutputs\.sources"):
        StudyOutputs(outputs.result, [], outputs.image, "b", "1", CODES, None)


def test_a_decode_process_killed_before_an_encode_leaves_it_to_this_thread(caplog):
    outputs = _outputs()
    with DecodePool(1) as pool:
        pool.start()
        for process in list(pool._executor._processes.values()):  # type: ignore[union-attr]
            os.kill(process.pid, signal.SIGKILL)
            process.join(10)
        time.sleep(0.5)  # the pool's manager thread notices the death
        encoded = pool.encode_outputs(outputs)
        assert "died while encoding outputs" in caplog.text
        _check_same(encoded, DecodePool(0).encode_outputs(outputs))
        # The pool starts again for the next submit.
        assert pool.encode_outputs(outputs).sr


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_a_decode_process_killed_under_concurrent_encodes_loses_none(delay, caplog):
    """Four conclusion threads encode through two processes; one process is killed at `delay`
    into the work, in the middle of whatever it holds. Every encode still returns outputs equal
    to the inline ones, and the pool serves again afterwards."""
    outputs = _outputs(amends=True)
    reference = DecodePool(0).encode_outputs(outputs)
    with DecodePool(2) as pool:
        pool.start()
        victim = next(iter(pool._executor._processes.values()))  # type: ignore[union-attr]
        with ThreadPoolExecutor(4) as threads:
            futures = [threads.submit(pool.encode_outputs, outputs) for _ in range(12)]
            time.sleep(delay)
            os.kill(victim.pid, signal.SIGKILL)
            encoded = [future.result(timeout=120) for future in futures]
        assert "died while encoding outputs" in caplog.text  # some were under the kill
        for each in encoded:
            _check_same(each, reference)
        assert len({each.sr_reference.sop_instance_uid for each in encoded}) == 12
        _check_same(pool.encode_outputs(outputs), reference)


def test_start_brings_up_every_decode_process_before_the_first_study():
    """Not one process and the rest on demand in the middle of the first burst: each of a GPU
    worker's decode processes takes seconds to start its decoder."""
    with DecodePool(3) as pool:
        pool.start()
        processes = list(pool._executor._processes.values())  # type: ignore[union-attr]
        assert len(processes) == 3 and all(p.is_alive() for p in processes)
