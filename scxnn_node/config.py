"""Typed schema of config.yaml: validated on load, unknown keys refused, errors name key and file.

Only the sections the node uses today are here (model, filters); each key is documented in the
example config.yaml at the repository root with its default.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scxnn_node.imaging.selection import DEFAULT_BODY_PARTS
from scxnn_node.model.engine import BACKENDS, PRECISIONS


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    bundle: Path = Path("var/bundles/demo")
    devices: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1)
    batch_size: int | None = Field(default=None, ge=1)
    precision: str = "auto"
    backend: str = "eager"

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[str]) -> list[str]:
        for device in value:
            if not (device == "cpu" or device.startswith("cuda")):
                raise ValueError(f"device {device!r} must be 'cpu' or 'cuda:N'")
        return value

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"must be one of {list(BACKENDS)}")
        return value

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        if value not in PRECISIONS:
            raise ValueError(f"must be one of {list(PRECISIONS)}")
        return value


class FiltersSection(_Section):
    body_parts: list[str] = Field(default_factory=lambda: sorted(DEFAULT_BODY_PARTS), min_length=1)


class NodeConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    filters: FiltersSection = Field(default_factory=FiltersSection)


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate a config file; relative paths in it are relative to the working dir."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return NodeConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {message}")
        raise ConfigError(f"{path}: " + "; ".join(problems)) from None
