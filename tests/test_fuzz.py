"""Hostile input, audited from outside: generated UIDs, generated datasets and byte-level
mutations of the shipped chest radiographs go to a running `scxnn-node serve` over real
associations (one node for the module).

Per C-STORE: it is answered, never with 0xA700 while disk and database are fine (0xA700 tells
the sender to retry input that can never be accepted); a Success leaves a row whose spool file
holds that very instance; the node still answers C-ECHO. Once the node is idle: every study it
accepted reached a terminal state (reported, or every instance skipped), never left receiving
or queued. `bench/fuzz.py --count 1000` runs the long version.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from scxnn_node.testing.audit import Auditor, NodeDatabase, wait_settled
from scxnn_node.testing.datasets import Edit, chest_dataset, mutate_file, sample_files, write_part10
from scxnn_node.testing.dcmtk import Storescp
from scxnn_node.testing.node_process import NodeProcess, bundle_version, serve_config
from scxnn_node.testing.peers import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    Sent,
    echo,
    store_files,
)

FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: each step is a live C-STORE
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class FuzzTarget:
    """The running node, its PACS, and the checks every test applies to what it sent."""

    def __init__(self, root: Path, node: NodeProcess, pacs: Storescp, version: str) -> None:
        self.root = root
        self.node = node
        self.pacs = pacs
        self.db = NodeDatabase(node.database_url)
        self.auditor = Auditor(self.db, node.spool_dir, [version], pacs.directory)
        self.numbers = itertools.count()

    def file_for(self, label: str) -> Path:
        return self.root / "sent" / f"{next(self.numbers):05d}-{label}.dcm"

    def send(self, datasets: Sequence[Dataset], label: str) -> list[Sent]:
        files = [write_part10(ds, self.file_for(label)) for ds in datasets]
        return store_files(self.node.port, files, labels=[f.stem for f in files])

    def check_answers(self, sends: Sequence[Sent]) -> None:
        for sent in sends:
            assert sent.status is not None, f"{sent.label}: C-STORE not answered"
            assert sent.status != OUT_OF_RESOURCES, (
                f"{sent.label}: answered 0xA700 (out of resources: retry later) for "
                f"SOP Instance UID {sent.sop_instance_uid!r}, which can never be stored"
            )
        audit = self.auditor.audit(sends, settled=False)
        assert audit.ok, audit.report()
        assert echo(self.node.port), "the node stopped answering C-ECHO"

    def check_finished(self, sends: Sequence[Sent]) -> None:
        assert wait_settled(self.db, 180), f"node still busy: {self.db.counts()}"
        audit = self.auditor.audit(sends)
        assert audit.ok, audit.report()


@pytest.fixture(scope="module")
def target(
    tmp_path_factory: pytest.TempPathFactory, small_bundle_dir: Path
) -> Iterator[FuzzTarget]:
    root = tmp_path_factory.mktemp("fuzz")
    pacs = Storescp(root / "pacs").start()
    config = serve_config(root / "node", small_bundle_dir, pacs_port=pacs.port)
    node = NodeProcess(config, root / "node").start()
    try:
        yield FuzzTarget(root, node, pacs, bundle_version(small_bundle_dir))
    finally:
        node.stop()
        pacs.stop()


# --- UIDs ---------------------------------------------------------------------------------

_component = st.one_of(st.just(0), st.integers(1, 10**18)).map(str)
_examples = itertools.count(1)


def _uid(min_parts: int = 1) -> st.SearchStrategy[str]:
    """A legal UID, digits and dots with no leading zeros, at most 64 characters, that no
    other example sent (a re-sent SOP Instance UID is another property, tested apart)."""
    return st.lists(_component, min_size=min_parts, max_size=10).map(
        lambda parts: ".".join(["1", "2", str(next(_examples)), *parts])[:64].rstrip(".")
    )


legal_uids = _uid()
over_long_uids = st.tuples(_uid(3), st.integers(65, 300)).map(
    lambda t: (t[0] + "." + "1234567890" * 30)[: t[1]].rstrip(".") + "1"
)
odd_characters = st.sampled_from(string.ascii_letters + " -_+/:;,*?!#%&'\"()[]{}<>=~^|`@$\\")
odd_uids = st.tuples(legal_uids, odd_characters, st.integers(0, 64)).map(
    lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
)


def test_legal_uids_are_stored_and_reported(target: FuzzTarget) -> None:
    sends: list[Sent] = []

    @FUZZ
    @given(sop=legal_uids, study=legal_uids)
    def one(sop: str, study: str) -> None:
        batch = target.send([chest_dataset(sop_uid=sop, study_uid=study)], "legal")
        target.check_answers(batch)
        sends.extend(batch)

    one()
    assert any(s.acknowledged for s in sends)
    target.check_finished(sends)


def test_over_long_uids_are_answered_cannot_understand(target: FuzzTarget) -> None:
    @FUZZ
    @given(sop=over_long_uids)
    def one(sop: str) -> None:
        (sent,) = target.send([chest_dataset(sop_uid=sop)], "long")
        assert sent.status == CANNOT_UNDERSTAND, (
            f"a {len(sop)}-character SOP Instance UID answered "
            f"{'no status' if sent.status is None else hex(sent.status)}, expected 0xC000"
        )
        assert echo(target.node.port)

    one()


def test_odd_character_uids_are_refused_or_kept_apart_and_reported(target: FuzzTarget) -> None:
    sends: list[Sent] = []

    @FUZZ
    @given(sop=odd_uids)
    def one(sop: str) -> None:
        batch = target.send([chest_dataset(sop_uid=sop)], "odd")
        target.check_answers(batch)
        for sent in batch:
            assert sent.acknowledged or 0xC000 <= (sent.status or 0) <= 0xCFFF, sent
        sends.extend(batch)

    one()
    target.check_finished(sends)


def test_near_colliding_uids_in_one_study_keep_their_own_files(target: FuzzTarget) -> None:
    sends: list[Sent] = []

    @FUZZ
    @given(base=_uid(2), suffixes=st.lists(odd_characters, min_size=2, max_size=3, unique=True))
    def one(base: str, suffixes: list[str]) -> None:
        study = generate_uid()
        neighbours = [
            chest_dataset(sop_uid=base + suffix, study_uid=study, seed=i)
            for i, suffix in enumerate(suffixes)
        ]
        batch = target.send(neighbours, "near")
        target.check_answers(batch)
        sends.extend(batch)

    one()
    target.check_finished(sends)


# --- datasets -----------------------------------------------------------------------------

OPTIONAL_ELEMENTS = [
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PhotometricInterpretation",
    "PixelData",
    "Rows",
    "BitsStored",
    "PatientID",
]
datasets = st.builds(
    lambda omit, values, size, seed: chest_dataset(omit=omit, size=size, seed=seed, **values),
    omit=st.lists(st.sampled_from(OPTIONAL_ELEMENTS), max_size=3, unique=True),
    values=st.fixed_dictionaries(
        {},
        optional={
            "Modality": st.sampled_from(["DX", "CR", "OT", "CT", ""]),
            "BodyPartExamined": st.sampled_from(["CHEST", "KNEE", "", "chest", "THORAX"]),
            "ViewPosition": st.sampled_from(["PA", "AP", "LL", "LATERAL", ""]),
            "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "RGB", "PALETTE COLOR"]),
            "SOPClassUID": st.sampled_from(
                [
                    "1.2.840.10008.5.1.4.1.1.1",
                    "1.2.840.10008.5.1.4.1.1.1.1.1",
                    "1.2.840.10008.5.1.4.1.1.7",
                    "1.2.840.10008.5.1.4.1.1.2",
                ]
            ),
            "BitsStored": st.sampled_from([1, 8, 12, 16]),
            "NumberOfFrames": st.sampled_from([1, 2]),
            "SeriesInstanceUID": st.sampled_from(["", "1.2.3"]),
            "StudyInstanceUID": st.sampled_from(["", "1.2.3"]),
            "PixelRepresentation": st.sampled_from([0, 1]),
        },
    ),
    size=st.sampled_from([64, 96, 16]),  # mostly analysable: the worker must build an SR
    seed=st.integers(0, 1000),
)


def test_generated_datasets_are_answered_and_every_study_finishes(target: FuzzTarget) -> None:
    sends: list[Sent] = []

    @FUZZ
    @given(ds=datasets)
    def one(ds: Dataset) -> None:
        batch = target.send([ds], "dataset")
        target.check_answers(batch)
        sends.extend(batch)

    one()
    target.check_finished(sends)


# --- bytes --------------------------------------------------------------------------------

edits = st.lists(
    st.builds(
        Edit,
        kind=st.sampled_from(["overwrite", "insert", "delete", "truncate"]),
        # mostly in the header, where lengths, tags and UIDs live; sometimes anywhere
        at=st.one_of(st.integers(0, 2048), st.integers(0, 1 << 21)),
        data=st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=3,
)


def test_byte_mutations_of_real_radiographs_are_answered_and_finish(target: FuzzTarget) -> None:
    sends: list[Sent] = []
    samples = sample_files()
    assert samples

    @FUZZ
    @given(sample=st.sampled_from(samples), changes=edits)
    def one(sample: Path, changes: list[Edit]) -> None:
        mutated = mutate_file(sample, target.file_for("mutated"), changes)
        batch = store_files(target.node.port, [mutated], labels=[mutated.stem])
        target.check_answers(batch)
        sends.extend(batch)

    one()
    target.check_finished(sends)


# --- the defects this harness was written to expose --------------------------------------


def test_uids_differing_in_their_last_character_keep_their_own_files(target: FuzzTarget) -> None:
    study = generate_uid()
    sends = target.send(
        [
            chest_dataset(sop_uid="1.2.3.4.5a", study_uid=study, seed=1),
            chest_dataset(sop_uid="1.2.3.4.5b", study_uid=study, seed=2),
        ],
        "5ab",
    )
    assert [s.status is not None for s in sends] == [True, True]
    audit = target.auditor.audit(sends, settled=False)
    assert audit.count("misattributed") == 0, audit.report()


def test_a_300_character_uid_is_answered_cannot_understand(target: FuzzTarget) -> None:
    uid = ("1.2." + "1234567890" * 30)[:300]
    (sent,) = target.send([chest_dataset(sop_uid=uid)], "uid300")
    assert sent.status == CANNOT_UNDERSTAND, (
        f"answered {'nothing' if sent.status is None else hex(sent.status)}, expected 0xC000"
    )


def test_an_instance_without_series_uid_gets_its_study_reported(target: FuzzTarget) -> None:
    """Neither left queued nor given up as failed: analysed, or reported not analysed."""
    sends = target.send([chest_dataset(omit=["SeriesInstanceUID"])], "noseries")
    target.check_answers(sends)
    assert sends[0].acknowledged or 0xC000 <= (sends[0].status or 0) <= 0xCFFF
    assert wait_settled(target.db, 120)
    audit = target.auditor.audit(sends)
    assert audit.count("stuck") == 0 and audit.count("failed") == 0, audit.report()
