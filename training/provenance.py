"""Salted fingerprints of a bundle's training data, so that evaluation refuses data it has seen.

A bundle keeps `training/provenance.json`: a random salt (new for every bundle) and, for every
image of the run's train and validation splits (what the members trained on and what fitted
and calibrated the second stage), sha256(salt, kind, value) of its patient id and of its file
content's sha256. Neither ids nor contents are stored, only salted hashes, sorted so that
their order says nothing; whoever holds a patient id or an image can test it, nobody else.

`scxnn-train evaluate` refuses a manifest whose patients or image contents match. File
content catches the same file under another name or patient; a re-encoded copy (another
format or header) is caught only through its patient id.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from scxnn_node.model.bundle import Bundle
from scxnn_node.model.manifest import BundleError, verified_bytes
from training.dataset import ManifestEntry, ManifestError, load_manifest
from training.file_content import file_sha256
from training.run_layout import RESOLVED_MANIFEST

PROVENANCE_FILE = "training/provenance.json"
FORMAT_VERSION = 1
TRAINING_SPLITS = ("train", "val")  # test rows are held out: evaluating on them is the point
SALT_BYTES = 16
PATIENT, IMAGE = "patient", "image"


def fingerprint(salt: bytes, kind: str, value: str) -> str:
    """sha256 over salt, kind and value (NUL-separated so no two inputs run together)."""
    return hashlib.sha256(salt + kind.encode() + b"\0" + value.encode()).hexdigest()


@dataclass(frozen=True)
class TrainingProvenance:
    """The salted fingerprints of a bundle's training patients and image contents."""

    salt: bytes
    patients: frozenset[str]
    images: frozenset[str]

    def to_json(self) -> bytes:
        data = {
            "format": FORMAT_VERSION,
            "hash": "sha256(salt || kind || 0x00 || value); kind 'patient': the patient id, "
            "kind 'image': the sha256 hex of the image file",
            "splits": list(TRAINING_SPLITS),
            "salt": self.salt.hex(),
            "patients": sorted(self.patients),
            "images": sorted(self.images),
        }
        return (json.dumps(data, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, blob: bytes, source: str) -> TrainingProvenance:
        try:
            data = json.loads(blob)
            if data.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT_VERSION}")
            return cls(
                bytes.fromhex(data["salt"]),
                frozenset(map(str, data["patients"])),
                frozenset(map(str, data["images"])),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{source}: unreadable training provenance ({exc})") from None

    def overlap(self, entries: Iterable[ManifestEntry]) -> list[str]:
        """One problem per row whose patient or image content the bundle has seen."""
        problems = []
        for e in entries:
            if fingerprint(self.salt, PATIENT, e.patient_id) in self.patients:
                problems.append(
                    f"row {e.row}, column 'patient_id': a patient the bundle was trained or "
                    "calibrated on"
                )
            if fingerprint(self.salt, IMAGE, file_sha256(e.image)) in self.images:
                problems.append(
                    f"row {e.row}, column 'image': the same file content as an image the "
                    "bundle was trained or calibrated on"
                )
        return problems


def provenance_of(
    entries: Iterable[ManifestEntry], salt: bytes | None = None
) -> TrainingProvenance:
    """Fingerprints of `entries` under `salt` (a fresh random one when not given)."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    entries = list(entries)
    return TrainingProvenance(
        salt,
        frozenset(fingerprint(salt, PATIENT, e.patient_id) for e in entries),
        frozenset(fingerprint(salt, IMAGE, file_sha256(e.image)) for e in entries),
    )


def run_provenance(run_dir: str | Path) -> bytes:
    """The provenance record of a run's train and validation images, as bundle file bytes.
    Every image is read (hashed) once, so they must still be where the run found them."""
    manifest = load_manifest(Path(run_dir) / RESOLVED_MANIFEST, check_files=False)
    seen = [e for e in manifest.entries if e.split in TRAINING_SPLITS]
    missing = [
        f"row {e.row}, column 'image': file not found: {e.image}"
        for e in seen
        if not e.image.is_file()
    ]
    if missing:
        raise ManifestError(manifest.path, ["training images are needed for provenance", *missing])
    return provenance_of(seen).to_json()


def bundle_provenance(bundle: Bundle) -> TrainingProvenance | None:
    """The bundle's training provenance (hash-checked), or None for a bundle without one."""
    if PROVENANCE_FILE not in bundle.manifest.files:
        return None
    blob = verified_bytes(bundle.path, PROVENANCE_FILE, bundle.manifest)
    return TrainingProvenance.from_json(blob, str(bundle.path / PROVENANCE_FILE))
