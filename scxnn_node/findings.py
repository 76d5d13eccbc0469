"""The finding catalogue: which findings the ensemble looks for, their codes and risk tiers.

The catalogue is data: a bundle's manifest carries its own list, and `FindingCatalogue.from_dicts`
rebuilds it. `THESIS_CATALOGUE` is the thesis's 13 findings, the default for training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class RiskTier(StrEnum):
    """Risk tiers of the thesis, most urgent first."""

    CRITICAL = "critical"
    URGENT = "urgent"
    NON_URGENT = "non_urgent"
    CARDIOMEGALY = "cardiomegaly"

    @property
    def rank(self) -> int:
        """0 is the most urgent tier."""
        return list(RiskTier).index(self)


#: Coding scheme designator for findings SNOMED CT has no exact concept for (documented in README).
PRIVATE_SCHEME = "99SCXNN"
SNOMED_SCHEME = "SCT"


@dataclass(frozen=True)
class FindingCode:
    """A coded concept (value, scheme designator, meaning) as DICOM SR content items need."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        for attr in ("value", "scheme", "meaning"):
            if not isinstance(getattr(self, attr), str) or not getattr(self, attr):
                raise ValueError(f"FindingCode.{attr} must be a non-empty string")


@dataclass(frozen=True)
class Finding:
    """One finding the ensemble has a member for."""

    name: str
    tier: RiskTier
    code: FindingCode

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or not self.name
            or not self.name.replace("_", "").isalnum()
        ):
            raise ValueError(
                f"Finding.name must be a non-empty identifier of letters, digits and '_', "
                f"got {self.name!r}"
            )
        if not isinstance(self.tier, RiskTier):
            raise ValueError(f"Finding.tier of {self.name!r} must be a RiskTier, got {self.tier!r}")

    @property
    def label(self) -> str:
        """Human-readable name, e.g. 'pleural effusion'."""
        return self.name.replace("_", " ")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tier": self.tier.value,
            "code": {
                "value": self.code.value,
                "scheme": self.code.scheme,
                "meaning": self.code.meaning,
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        try:
            tier = RiskTier(data["tier"])
        except KeyError as exc:
            raise ValueError(f"finding {data.get('name')!r}: missing key {exc}") from None
        except ValueError:
            raise ValueError(
                f"finding {data.get('name')!r}: tier {data['tier']!r} is not one of "
                f"{[t.value for t in RiskTier]}"
            ) from None
        code = data.get("code")
        if not isinstance(code, dict):
            raise ValueError(f"finding {data.get('name')!r}: 'code' must be an object")
        return cls(
            name=data.get("name", ""),
            tier=tier,
            code=FindingCode(
                code.get("value", ""), code.get("scheme", ""), code.get("meaning", "")
            ),
        )


class FindingCatalogue(Sequence[Finding]):
    """An ordered, non-empty list of findings with unique names; the order is the member order."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        findings = tuple(findings)
        if not findings:
            raise ValueError("a finding catalogue needs at least one finding")
        names = [f.name for f in findings]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"finding names must be unique; repeated: {duplicates}")
        self._findings = findings
        self._index = {f.name: i for i, f in enumerate(findings)}

    def __getitem__(self, index: int) -> Finding:  # type: ignore[override]
        return self._findings[index]

    def __len__(self) -> int:
        return len(self._findings)

    def __iter__(self) -> Iterator[Finding]:
        return iter(self._findings)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FindingCatalogue) and self._findings == other._findings

    def __hash__(self) -> int:
        return hash(self._findings)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self._findings]

    def index_of(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown finding {name!r}; known: {self.names}") from None

    def get(self, name: str) -> Finding:
        return self._findings[self.index_of(name)]

    def subset(self, names: Sequence[str]) -> FindingCatalogue:
        """The named findings, in catalogue order."""
        wanted = set(names)
        for name in wanted:
            self.index_of(name)
        return FindingCatalogue([f for f in self._findings if f.name in wanted])

    def to_dicts(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self._findings]

    @classmethod
    def from_dicts(cls, items: Sequence[dict[str, Any]]) -> FindingCatalogue:
        if not isinstance(items, list | tuple):
            raise ValueError("findings must be a list of objects")
        return cls([Finding.from_dict(item) for item in items])


def _finding(name: str, tier: RiskTier, snomed: str | None, meaning: str) -> Finding:
    if snomed is not None:
        return Finding(name, tier, FindingCode(snomed, SNOMED_SCHEME, meaning))
    return Finding(name, tier, FindingCode(f"SCXNN-{name.upper()}", PRIVATE_SCHEME, meaning))


# SNOMED CT only where the concept matches exactly; the rest use the private scheme. Tiers are
# thesis Table 1's (its right column continues "Urgent" with advanced tuberculosis and
# atelectasis before "Non-urgent" starts at support device).
THESIS_CATALOGUE = FindingCatalogue(
    [
        _finding("pneumothorax", RiskTier.CRITICAL, "36118008", "Pneumothorax"),
        _finding("pneumoperitoneum", RiskTier.CRITICAL, None, "Pneumoperitoneum"),
        _finding("mediastinal_widening", RiskTier.CRITICAL, None, "Mediastinal widening"),
        _finding("pleural_effusion", RiskTier.CRITICAL, "60046008", "Pleural effusion"),
        _finding("nodule", RiskTier.URGENT, None, "Pulmonary nodule"),
        _finding("consolidation", RiskTier.URGENT, "95436008", "Lung consolidation"),
        _finding("active_tuberculosis", RiskTier.URGENT, None, "Active tuberculosis"),
        _finding("advanced_tuberculosis", RiskTier.URGENT, None, "Advanced tuberculosis"),
        _finding("atelectasis", RiskTier.URGENT, "46621007", "Atelectasis"),
        _finding("support_device", RiskTier.NON_URGENT, None, "Support device"),
        _finding("pleural_calcification", RiskTier.NON_URGENT, None, "Pleural calcification"),
        _finding("interstitial_opacity", RiskTier.NON_URGENT, None, "Interstitial opacity"),
        _finding("cardiomegaly", RiskTier.CARDIOMEGALY, "8186001", "Cardiomegaly"),
    ]
)
