"""Which images to analyse: frontal chest views of an allowed body part.

Policy, not decoding: an image that decodes fine may still be skipped (a lateral view, a knee)
and the reason is recorded so that a study with no usable image gets `not_analysed` with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from pydicom.dataset import Dataset

FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"})
DEFAULT_BODY_PARTS = frozenset({"CHEST", ""})
DEFAULT_VIEWS = frozenset({"PA", "AP", ""})


class View(StrEnum):
    FRONTAL = "frontal"
    LATERAL = "lateral"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class SelectionPolicy:
    """Body parts and View Position values analysed (upper case; "" means absent or empty).

    Lateral views are never analysed (the members are frontal-view models); a view that is
    neither frontal nor lateral counts as "" (unknown) and is analysed, flagged, when "" is in
    `views`.
    """

    body_parts: frozenset[str] = field(default=DEFAULT_BODY_PARTS)
    views: frozenset[str] = field(default=DEFAULT_VIEWS)

    def __post_init__(self) -> None:
        for attr in ("body_parts", "views"):
            normalised = frozenset(str(p).strip().upper() for p in getattr(self, attr))
            if not normalised:
                raise ValueError(f"SelectionPolicy.{attr} must name at least one value")
            object.__setattr__(self, attr, normalised)

    @classmethod
    def from_body_parts(cls, parts: Iterable[str]) -> SelectionPolicy:
        return cls(frozenset(parts))


@dataclass(frozen=True)
class Eligibility:
    """Whether to analyse an image; `reason` says why not, `flags` note doubts when analysed."""

    analyse: bool
    view: View
    reason: str | None = None
    flags: tuple[str, ...] = ()


def classify_view(ds: Dataset) -> View:
    """Frontal, lateral or unknown, from View Position or else the View Code Sequence."""
    position = str(ds.get("ViewPosition", "") or "").strip().upper()
    if position in FRONTAL_VIEWS:
        return View.FRONTAL
    if position in LATERAL_VIEWS:
        return View.LATERAL
    for item in ds.get("ViewCodeSequence", []) or []:
        meaning = str(item.get("CodeMeaning", "")).lower()
        if "lateral" in meaning:
            return View.LATERAL
        if "postero-anterior" in meaning or "antero-posterior" in meaning:
            return View.FRONTAL
    return View.UNKNOWN


def assess_eligibility(ds: Dataset, policy: SelectionPolicy | None = None) -> Eligibility:
    """Decide from the header alone whether an image is a frontal chest radiograph to analyse."""
    policy = policy or SelectionPolicy()
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    view = classify_view(ds)
    if body_part not in policy.body_parts:
        allowed = ", ".join(sorted(p or "(empty)" for p in policy.body_parts))
        return Eligibility(
            False, view, reason=f"body part {body_part!r} is not in the allow-list ({allowed})"
        )
    if view is View.LATERAL:
        return Eligibility(
            False, view, reason="lateral view; only frontal (PA/AP) views are analysed"
        )
    position = str(ds.get("ViewPosition", "") or "").strip().upper()
    key = position if view is View.FRONTAL and position in FRONTAL_VIEWS else ""
    if key not in policy.views:
        return Eligibility(
            False, view, reason=f"view {key or 'unknown'!r} is not in the allowed views"
        )
    if view is View.UNKNOWN:
        return Eligibility(True, view, flags=("view_unknown",))
    return Eligibility(True, view)
