"""Versioned model bundles: a directory of data the node verifies before it trusts any of it.

Layout:
    manifest.json              what the bundle is, its parameters, and sha256 of every other file
    members/<finding>.safetensors   encoder + head weights of each member
    second_stage.json          the SVM as plain numbers
    temperatures.json          optional: one temperature per member (model/temperature.py)
    safety_net.json            optional: the critical-finding thresholds (model/safety_net.py)
    MODEL_CARD.md              what the bundle is for and what it achieved (from export)
No file is code and nothing is unpickled: loading checks the format version and every hash and
refuses a bundle with a missing, altered or unlisted file, naming it. This module writes
bundles and loads their weights; the manifest and the hash checks need no torch and live in
model/manifest.py.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from scxnn_node.atomic_file import write_bytes_atomically
from scxnn_node.model.manifest import (
    MANIFEST_FILE,
    SECOND_STAGE_FILE,
    BundleError,
    Manifest,
    check_file_set,
    member_file,
    read_manifest,
    sha256_bytes,
    tier_differences,
    verified_bytes,
)
from scxnn_node.model.safety_net import SAFETY_NET_FILE, CriticalSafetyNet
from scxnn_node.model.second_stage import SvmSecondStage
from scxnn_node.model.temperature import TEMPERATURES_FILE, temperatures_from_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its manifest, second stage and member weights, all hash-checked."""

    path: Path
    manifest: Manifest
    second_stage: SvmSecondStage
    member_weights: dict[str, dict[str, torch.Tensor]]
    temperatures: np.ndarray | None = None  # (n_members,); None: probabilities unscaled
    safety_net: CriticalSafetyNet | None = None  # None: no critical-finding rule


def _fsync_write(path: Path, data: bytes) -> None:
    write_bytes_atomically(path, data, durable=True)


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


def load_bundle(bundle_dir: str | Path) -> Bundle:
    """Verify and load a bundle; each file is hashed from the same bytes that are then parsed.
    A finding whose recorded tier differs from the current catalogue is served as recorded,
    with a warning."""
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    check_file_set(root, manifest)
    try:
        stage = SvmSecondStage.from_dict(
            json.loads(verified_bytes(root, SECOND_STAGE_FILE, manifest))
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
            weights[name] = load_safetensors(verified_bytes(root, rel, manifest))
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{root / rel}: not valid safetensors ({exc})") from None
    temperatures: np.ndarray | None = None
    safety_net: CriticalSafetyNet | None = None
    try:
        if TEMPERATURES_FILE in manifest.files:
            rel = TEMPERATURES_FILE
            data = json.loads(verified_bytes(root, rel, manifest))
            temperatures = temperatures_from_dict(data, manifest.findings.names)
        if SAFETY_NET_FILE in manifest.files:
            rel = SAFETY_NET_FILE
            data = json.loads(verified_bytes(root, rel, manifest))
            safety_net = CriticalSafetyNet.from_dict(data)
            strangers = sorted(set(safety_net.findings) - set(manifest.findings.names))
            if strangers:
                raise ValueError(f"thresholds for findings that are not members: {strangers}")
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{root / rel}: {exc}") from None
    for rel in manifest.files:  # any other listed file must also be intact
        if rel != SECOND_STAGE_FILE and not rel.startswith("members/"):
            verified_bytes(root, rel, manifest)
    for warning in tier_differences(manifest):
        log.warning("%s", warning)
    return Bundle(root, manifest, stage, weights, temperatures, safety_net)
