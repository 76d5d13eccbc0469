"""The long fuzz run: hostile input to a real `scxnn-node serve`, audited from outside.

    .venv/bin/python bench/fuzz.py --count 1000
    .venv/bin/python bench/fuzz.py --count 200 --seed 7 --kinds odd,near

Each case is one association carrying one to three C-STOREs of one kind:
  legal     legal UIDs of every length up to 64
  long      SOP Instance UIDs of 65 to 300 characters
  odd       a UID with a letter, space, backslash or punctuation somewhere
  near      two or three UIDs in one study that differ only in an odd last character
  dataset   chest images with elements left out or set to unusual values
  mutation  the shipped radiographs with bytes overwritten, inserted, deleted or cut off
After each case the node must still answer C-ECHO. At the end, once the node is idle, the
audit checks that every Success left a row whose spool file holds that instance and that every
study reached a terminal state. Printed: per kind, how the C-STOREs were answered; then the
audit's counters (tests/test_fuzz.py is the short version).
"""

from __future__ import annotations

import argparse
import shutil
import string
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

# `python bench/X.py` puts bench/ first on sys.path, where bench/training.py would shadow the
# training package; the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
from training.untrained import untrained_bundle

KINDS = ("legal", "long", "odd", "near", "dataset", "mutation")
ODD = string.ascii_letters + " -_+/:;,*?!#%&'\"()[]{}<>=~^|`@$\\"
OMITTABLE = [
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
]
UNUSUAL = {
    "Modality": ["CT", "", "CR", "OT"],
    "BodyPartExamined": ["KNEE", "", "chest", "THORAX"],
    "ViewPosition": ["LL", "LATERAL", "", "AP"],
    "PhotometricInterpretation": ["MONOCHROME1", "RGB", "PALETTE COLOR"],
    "SOPClassUID": [
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.2",
    ],
    "BitsStored": [1, 8, 16],
    "NumberOfFrames": [2],
    "SeriesInstanceUID": ["", "1.2.3"],
    "PixelRepresentation": [1],
}


class CaseMaker:
    """Random cases of each kind, as Part 10 files under `folder`."""

    def __init__(self, folder: Path, seed: int) -> None:
        self.folder = folder
        self.rng = np.random.default_rng(seed)
        self.number = 0

    def _path(self, kind: str) -> Path:
        self.number += 1
        return self.folder / f"{self.number:06d}-{kind}.dcm"

    def legal_uid(self) -> str:
        parts = [str(int(self.rng.integers(0, 10**12))) for _ in range(self.rng.integers(1, 9))]
        return ".".join(["1", "2", str(self.number), *parts])[: int(self.rng.integers(8, 65))]

    def _odd(self) -> str:
        return ODD[int(self.rng.integers(len(ODD)))]

    def make(self, kind: str) -> list[Path]:
        rng = self.rng
        if kind == "legal":
            uid = self.legal_uid().rstrip(".")
            return [write_part10(chest_dataset(sop_uid=uid), self._path(kind))]
        if kind == "long":
            length = int(rng.integers(65, 301))
            uid = (self.legal_uid() + "." + "1234567890" * 30)[:length].rstrip(".") + "1"
            return [write_part10(chest_dataset(sop_uid=uid), self._path(kind))]
        if kind == "odd":
            uid = self.legal_uid()
            at = int(rng.integers(len(uid) + 1))
            uid = uid[:at] + self._odd() + uid[at:]
            return [write_part10(chest_dataset(sop_uid=uid), self._path(kind))]
        if kind == "near":
            base, study = self.legal_uid().rstrip("."), generate_uid()
            suffixes = {self._odd() for _ in range(int(rng.integers(2, 4)))}
            return [
                write_part10(
                    chest_dataset(sop_uid=base + s, study_uid=study, seed=i), self._path(kind)
                )
                for i, s in enumerate(sorted(suffixes))
            ]
        if kind == "dataset":
            omit = [OMITTABLE[i] for i in rng.choice(len(OMITTABLE), int(rng.integers(0, 3)))]
            values = {
                key: choices[int(rng.integers(len(choices)))]
                for key, choices in UNUSUAL.items()
                if rng.random() < 0.15
            }
            size = int(rng.choice([16, 64, 96]))
            ds = chest_dataset(omit=omit, size=size, seed=int(rng.integers(1000)), **values)
            return [write_part10(ds, self._path(kind))]
        if kind == "mutation":
            samples = sample_files()
            sample = samples[int(rng.integers(len(samples)))]
            edits = [
                Edit(
                    str(rng.choice(["overwrite", "insert", "delete", "truncate"])),
                    int(rng.integers(0, 2048) if rng.random() < 0.8 else rng.integers(0, 1 << 21)),
                    rng.bytes(int(rng.integers(1, 9))),
                )
                for _ in range(int(rng.integers(1, 4)))
            ]
            return [mutate_file(sample, self._path(kind), edits)]
        raise ValueError(kind)


def answer_name(status: int | None) -> str:
    if status is None:
        return "no answer"
    if status == 0:
        return "success"
    if status == OUT_OF_RESOURCES:
        return "0xA700"
    if status == CANNOT_UNDERSTAND:
        return "0xC000"
    return f"0x{status:04X}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--count", type=int, default=200, help="cases (associations)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    root = Path(tempfile.mkdtemp(prefix="scxnn-fuzz-"))
    bundle = untrained_bundle("densenet_small", 64, ["pneumothorax", "nodule"], out=root / "b")
    pacs = Storescp(root / "pacs").start()
    node = NodeProcess(serve_config(root / "node", bundle.path, pacs_port=pacs.port), root / "node")
    node.start()
    maker = CaseMaker(root / "sent", args.seed)
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    sends: list[Sent] = []
    echo_failures = 0
    started = time.monotonic()
    try:
        for number in range(args.count):
            kind = kinds[number % len(kinds)]
            batch = store_files(node.port, maker.make(kind))
            sends.extend(batch)
            answers[kind].update(answer_name(s.status) for s in batch)
            if not echo(node.port):
                echo_failures += 1
        sending = time.monotonic() - started
        db = NodeDatabase(node.database_url)
        settled = wait_settled(db, 600)
        auditor = Auditor(db, node.spool_dir, [bundle_version(bundle.path)], pacs.directory)
        audit = auditor.audit(sends)
        status = node.status()
        db.dispose()
    finally:
        node.stop()
        pacs.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{args.count} cases, {len(sends)} C-STOREs in {sending:.0f} s (seed {args.seed})")
    for kind in kinds:
        counts = ", ".join(f"{name} {n}" for name, n in sorted(answers[kind].items()))
        print(f"  {kind:<9} {counts}")
    print(f"C-ECHO failures after a case: {echo_failures}")
    print(f"node idle at the end: {settled}; status: {status['studies']} {status['jobs']}")
    print(audit.report())
    print(audit.summary(1))


if __name__ == "__main__":
    main()
