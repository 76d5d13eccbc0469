"""Versioned model bundles: a directory of data the node verifies before it trusts any of it.

Layout:
    manifest.json              what the bundle is, its parameters, and sha256 of every other file
    members/<finding>.safetensors   encoder + head weights of each member
    second_stage.json          the SVM as plain numbers
No file is code and nothing is unpickled: loading checks the format version and every hash and
refuses a bundle with a missing, altered or unlisted file, naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from scxnn_node.findings import FindingCatalogue
from scxnn_node.imaging.preprocess import PreprocessSpec
from scxnn_node.model.member import architecture
from scxnn_node.model.result import BundleIdentity
from scxnn_node.model.second_stage import SvmSecondStage

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SECOND_STAGE_FILE = "second_stage.json"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(Exception):
    """A bundle that cannot be trusted or used; the message names the file or key."""


def member_file(finding: str) -> str:
    return f"members/{finding}.safetensors"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class OperatingPoint:
    """SVM score threshold chosen on validation data for a target sensitivity."""

    target_sensitivity: float
    threshold: float
    validation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < float(self.target_sensitivity) <= 1.0:
            raise BundleError(
                "operating_point.target_sensitivity must be in (0, 1], got "
                f"{self.target_sensitivity!r}"
            )
        if not isinstance(self.threshold, int | float) or self.threshold != self.threshold:
            raise BundleError(f"operating_point.threshold must be a number, got {self.threshold!r}")
        if not isinstance(self.validation, dict):
            raise BundleError("operating_point.validation must be an object")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_sensitivity": self.target_sensitivity,
            "threshold": self.threshold,
            "validation": self.validation,
        }


@dataclass(frozen=True)
class TrainingData:
    description: str
    manifest_sha256: str

    def __post_init__(self) -> None:
        if not _SHA256.match(self.manifest_sha256):
            raise BundleError("training_data.manifest_sha256 must be 64 lower-case hex digits")

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "manifest_sha256": self.manifest_sha256}


@dataclass(frozen=True)
class Manifest:
    """Everything a node needs to know about a bundle except the weights themselves."""

    name: str
    version: str
    created: str
    demo: bool
    intended_use: str
    findings: FindingCatalogue
    preprocessing: PreprocessSpec
    architecture: str
    operating_point: OperatingPoint
    training_data: TrainingData
    changelog: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.name or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", self.name):
            raise BundleError(f"manifest.name must be a simple identifier, got {self.name!r}")
        if not _SEMVER.match(self.version):
            raise BundleError(f"manifest.version must be semantic (X.Y.Z), got {self.version!r}")
        if not isinstance(self.demo, bool):
            raise BundleError("manifest.demo must be true or false")
        try:
            architecture(self.architecture)
        except ValueError as exc:
            raise BundleError(f"manifest.architecture: {exc}") from None
        for rel, digest in self.files.items():
            if not _SHA256.match(str(digest)):
                raise BundleError(f"manifest.files[{rel!r}] is not a sha256 hex digest")

    @property
    def identity(self) -> BundleIdentity:
        return BundleIdentity(self.name, self.version, self.demo)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "demo": self.demo,
            "intended_use": self.intended_use,
            "findings": self.findings.to_dicts(),
            "preprocessing": self.preprocessing.to_dict(),
            "architecture": self.architecture,
            "operating_point": self.operating_point.to_dict(),
            "training_data": self.training_data.to_dict(),
            "changelog": list(self.changelog),
            "files": dict(sorted(self.files.items())),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise BundleError("manifest.json must hold a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"manifest.format_version is {version!r}; this node reads format {FORMAT_VERSION}"
            )
        required = (
            "name",
            "version",
            "created",
            "demo",
            "intended_use",
            "findings",
            "preprocessing",
            "architecture",
            "operating_point",
            "training_data",
            "files",
        )
        missing = [k for k in required if k not in data]
        if missing:
            raise BundleError(f"manifest.json is missing keys {missing}")
        try:
            findings = FindingCatalogue.from_dicts(data["findings"])
            preprocessing = PreprocessSpec.from_dict(data["preprocessing"])
            op = data["operating_point"]
            operating_point = OperatingPoint(
                target_sensitivity=op["target_sensitivity"],
                threshold=op["threshold"],
                validation=op.get("validation", {}),
            )
            td = data["training_data"]
            training_data = TrainingData(td["description"], td["manifest_sha256"])
        except BundleError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"manifest.json: {exc}") from None
        if not isinstance(data["files"], dict):
            raise BundleError("manifest.files must map relative paths to sha256 digests")
        return cls(
            name=data["name"],
            version=data["version"],
            created=data["created"],
            demo=data["demo"],
            intended_use=data["intended_use"],
            findings=findings,
            preprocessing=preprocessing,
            architecture=data["architecture"],
            operating_point=operating_point,
            training_data=training_data,
            changelog=tuple(data.get("changelog", ())),
            files=dict(data["files"]),
            format_version=version,
        )


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its manifest, second stage and member weights, all hash-checked."""

    path: Path
    manifest: Manifest
    second_stage: SvmSecondStage
    member_weights: dict[str, dict[str, torch.Tensor]]


def _fsync_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_bundle(
    out_dir: str | Path,
    manifest: Manifest,
    member_states: dict[str, dict[str, torch.Tensor]],
    second_stage: SvmSecondStage,
    extra_files: dict[str, bytes] | None = None,
) -> Manifest:
    """Write a new bundle directory; bundles are immutable, so an existing one is refused.

    `extra_files` (relative path -> bytes) are records such as validation metrics; they are
    hashed and verified like the weights but never executed or unpickled.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise BundleError(
            f"{out} already exists and is not empty; a new version needs a new directory"
        )
    names = manifest.findings.names
    if sorted(member_states) != sorted(names):
        raise BundleError(
            f"member weights given for {sorted(member_states)}, manifest lists {names}"
        )
    expected_features = 3 * len(names)
    if second_stage.n_features != expected_features:
        raise BundleError(
            f"second stage takes {second_stage.n_features} features; {len(names)} members give "
            f"{expected_features}"
        )
    files: dict[str, str] = {}
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        for p in sorted(tmp.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    for name in names:
        blob = save_safetensors({k: v.contiguous() for k, v in member_states[name].items()})
        _fsync_write(tmp / member_file(name), blob)
        files[member_file(name)] = sha256_bytes(blob)
    stage_blob = json.dumps(second_stage.to_dict()).encode()
    _fsync_write(tmp / SECOND_STAGE_FILE, stage_blob)
    files[SECOND_STAGE_FILE] = sha256_bytes(stage_blob)
    for rel, blob in sorted((extra_files or {}).items()):
        if (
            rel in files
            or rel == MANIFEST_FILE
            or ".." in Path(rel).parts
            or Path(rel).is_absolute()
        ):
            raise BundleError(f"extra bundle file {rel!r} is not a free relative path")
        _fsync_write(tmp / rel, blob)
        files[rel] = sha256_bytes(blob)
    final = Manifest(**{**manifest.__dict__, "files": files})
    _fsync_write(tmp / MANIFEST_FILE, (json.dumps(final.to_dict(), indent=2) + "\n").encode())
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # the bundle appears whole or not at all
    return final


def read_manifest(bundle_dir: str | Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{path}: no manifest.json (is this a bundle directory?)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    return Manifest.from_dict(data)


def _verified_bytes(root: Path, rel: str, manifest: Manifest) -> bytes:
    path = root / rel
    if rel not in manifest.files:
        raise BundleError(f"{path}: file is not listed in manifest.json")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: missing or unreadable ({exc.strerror})") from None
    if sha256_bytes(data) != manifest.files[rel]:
        raise BundleError(f"{path}: sha256 does not match manifest.json (file altered or corrupt)")
    return data


def _check_file_set(root: Path, manifest: Manifest) -> None:
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    present.discard(MANIFEST_FILE)
    unlisted = sorted(present - set(manifest.files))
    if unlisted:
        raise BundleError(f"{root / unlisted[0]}: file is not listed in manifest.json")
    needed = {member_file(n) for n in manifest.findings.names} | {SECOND_STAGE_FILE}
    unlisted_needed = sorted(needed - set(manifest.files))
    if unlisted_needed:
        raise BundleError(f"manifest.json does not list {unlisted_needed[0]}")


def verify_bundle(bundle_dir: str | Path) -> Manifest:
    """Check format version and every hash; raise BundleError naming the first bad file."""
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    _check_file_set(root, manifest)
    for rel in sorted(manifest.files):
        _verified_bytes(root, rel, manifest)
    return manifest


def load_bundle(bundle_dir: str | Path) -> Bundle:
    """Verify and load a bundle; each file is hashed from the same bytes that are then parsed."""
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    _check_file_set(root, manifest)
    try:
        stage = SvmSecondStage.from_dict(
            json.loads(_verified_bytes(root, SECOND_STAGE_FILE, manifest))
        )
    except (ValueError, json.JSONDecodeError) as exc:
        raise BundleError(f"{root / SECOND_STAGE_FILE}: {exc}") from None
    if stage.n_features != 3 * len(manifest.findings):
        raise BundleError(
            f"{root / SECOND_STAGE_FILE}: takes {stage.n_features} features, the manifest's "
            f"{len(manifest.findings)} members give {3 * len(manifest.findings)}"
        )
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for name in manifest.findings.names:
        rel = member_file(name)
        try:
            weights[name] = load_safetensors(_verified_bytes(root, rel, manifest))
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{root / rel}: not valid safetensors ({exc})") from None
    for rel in manifest.files:  # any other listed file must also be intact
        if rel != SECOND_STAGE_FILE and not rel.startswith("members/"):
            _verified_bytes(root, rel, manifest)
    return Bundle(root, manifest, stage, weights)


def utc_now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
