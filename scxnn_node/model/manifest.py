"""A bundle's manifest: what the bundle is and the sha256 of every file, read and checked
without torch.

`verify_bundle` hashes every file a manifest lists and refuses a missing, altered or unlisted
one, naming it; loading the weights themselves is model/bundle.py's job. A bundle's finding tiers
are data: one made before the catalogue changed a tier (earlier bundles call atelectasis non-urgent)
is served with the tiers it records, and `tier_differences` names each such finding so that the
CLI and the node can warn about it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scxnn_node.drift_reference import DriftReference
from scxnn_node.findings import THESIS_CATALOGUE, FindingCatalogue
from scxnn_node.imaging.preprocess import PreprocessSpec
from scxnn_node.model.architectures import architecture
from scxnn_node.model.result import BundleIdentity

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SECOND_STAGE_FILE = "second_stage.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
#: What a bundle's thresholds can have been computed at (model/options.py's, less "auto").
SERVING_PRECISIONS = ("fp32", "bf16", "fp16")
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
    # Precision the thresholds were set at (fp32, bf16, fp16); None in bundles that predate it.
    precision: str | None = None
    # The calibration part's distributions (drift watch); None in bundles that predate it.
    drift_reference: DriftReference | None = None

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
        if self.precision is not None and self.precision not in SERVING_PRECISIONS:
            raise BundleError(
                f"manifest.precision must be one of {list(SERVING_PRECISIONS)}, "
                f"got {self.precision!r}"
            )
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
            **({"precision": self.precision} if self.precision is not None else {}),
            **(
                {"drift_reference": self.drift_reference.to_dict()}
                if self.drift_reference is not None
                else {}
            ),
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
            drift = data.get("drift_reference")
            drift_reference = None if drift is None else DriftReference.from_dict(drift)
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
            precision=data.get("precision"),
            drift_reference=drift_reference,
        )


def read_manifest(bundle_dir: str | Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{path}: no manifest.json (is this a bundle directory?)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    return Manifest.from_dict(data)


def verified_bytes(root: Path, rel: str, manifest: Manifest) -> bytes:
    """A listed file's bytes, once their sha256 matches the manifest."""
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


def check_file_set(root: Path, manifest: Manifest) -> None:
    """Refuse a file the manifest does not list, and a manifest that leaves out a part."""
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
    check_file_set(root, manifest)
    for rel in sorted(manifest.files):
        verified_bytes(root, rel, manifest)
    return manifest


def tier_differences(
    manifest: Manifest, catalogue: FindingCatalogue = THESIS_CATALOGUE
) -> list[str]:
    """One warning per finding whose tier in the bundle differs from the current catalogue's
    (findings the catalogue lacks are the bundle's own and not compared)."""
    current = {f.name: f.tier for f in catalogue}
    return [
        f"bundle {manifest.name} {manifest.version}: finding {f.name} has tier {f.tier.value} in "
        f"the bundle but {current[f.name].value} in the current catalogue; served as recorded "
        "(a bundle's tiers are data: export a new bundle to serve the current tiers)"
        for f in manifest.findings
        if f.name in current and current[f.name] is not f.tier
    ]


def utc_now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
