"""Typed schema of config.yaml: validated on load, unknown keys refused, errors name key and file.

Every key has a default and is documented in the example `config.yaml`. Environment variables
override the file: `SCXNN__SECTION__KEY=value` (double underscores between levels, value parsed
as YAML), e.g. `SCXNN__NODE__PORT=11113` or `SCXNN__MODEL__DEVICES='[cuda:0, cuda:1]'`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from scxnn_node.findings import RiskTier
from scxnn_node.imaging.selection import DEFAULT_BODY_PARTS, DEFAULT_VIEWS, SelectionPolicy
from scxnn_node.model.options import (
    EngineOptions,
    check_backend,
    check_compile_mode,
    check_device,
    check_precision,
)
from scxnn_node.model.result import UNSPECIFIED_TIER

ENV_PREFIX = "SCXNN__"
_M = TypeVar("_M", bound="BaseModel")

# Image storage SOP classes accepted by default: CR, DX (presentation and processing, all three
# flavours), and Secondary Capture (real chest senders use it, see scxnn_node/samples).
DEFAULT_SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
]


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16 or "\\" in value or not value.isprintable():
        raise ValueError("an AE title has 1 to 16 printable characters and no backslash")
    return value


AeTitle = Annotated[str, AfterValidator(_ae_title)]


class TlsSection(_Section):
    enabled: bool = False
    certificate: Path | None = None
    key: Path | None = None
    # Outbound: the peer must chain to this CA alone (pinned; without it, to a system CA).
    # Inbound: a client certificate, when presented, must chain to it.
    ca: Path | None = None
    require_client_certificate: bool = False
    check_hostname: bool = True  # outbound: the peer's certificate must name the host dialled

    @model_validator(mode="after")
    def _trust_is_pinned(self) -> TlsSection:
        if not self.check_hostname and self.ca is None:
            raise ValueError(
                "check_hostname: false needs ca: without a name check only a pinned CA limits "
                "who may answer"
            )
        if self.require_client_certificate and self.ca is None:
            raise ValueError(
                "require_client_certificate needs ca (the CA that issues the callers' certificates)"
            )
        return self


class NodeSection(_Section):
    ae_title: AeTitle = "SCXNN"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=1, le=65535)
    max_associations: int = Field(default=16, ge=1)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    check_called_ae: bool = True  # an association must call ae_title (as dcmtk and Orthanc do)
    # Processes receiving C-STOREs: 1 is the serve process itself; more share the port
    # (SO_REUSEPORT), each with its own database connection, supervised like the workers. Two:
    # with 4 concurrent senders one process is about at storescp --fork, two above it.
    ingest_processes: int = Field(default=2, ge=1, le=64)
    # Processes sending results (the dispatcher): 0 sends from the serve process; one or more
    # take delivery out of the serve process's GIL, each claiming due deliveries under a lease.
    dispatch_processes: int = Field(default=1, ge=0, le=16)
    tls: TlsSection = Field(default_factory=TlsSection)


class AllowedCaller(_Section):
    ae_title: AeTitle
    host: str | None = None  # when set, the association must come from this address
    # When set, the caller must present a TLS client certificate (verified against node.tls.ca)
    # whose subject common name is this: the certificate is tied to the AE title.
    certificate_cn: str | None = None


class StorageSection(_Section):
    spool_dir: Path = Path("var/spool")
    min_free_bytes: int = Field(default=1 << 30, ge=0)  # below this C-STORE answers 0xA700
    max_instance_bytes: int = Field(default=512 << 20, ge=1)  # above this C-STORE answers 0xC000
    rejected_retention_days: float = Field(default=30.0, gt=0)  # rejected/ files then deleted
    rejected_max_bytes: int = Field(default=1 << 30, ge=0)  # rejected/ beyond this: oldest go
    retention_days: float = Field(default=7.0, gt=0)
    # A finished study's files are kept this long after its last instance (None: retention_days).
    amendment_window_days: float | None = Field(default=None, gt=0)


class DatabaseSection(_Section):
    url: str = "sqlite:///var/scxnn.db"


class ModelSection(_Section):
    bundle: Path = Path("var/bundles/demo")
    devices: list[Annotated[str, AfterValidator(check_device)]] = Field(
        default_factory=lambda: ["cpu"], min_length=1
    )
    batch_size: int | None = Field(default=None, ge=1)
    precision: Annotated[str, AfterValidator(check_precision)] = "auto"
    backend: Annotated[str, AfterValidator(check_backend)] = "auto"
    onnx_cache_dir: Path | None = None  # None: onnx-cache/ beside the spool directory
    compile_mode: Annotated[str, AfterValidator(check_compile_mode)] = "default"
    compile_cache_dir: Path | None = None  # None: compile-cache/ beside the spool directory
    member_streams: int = Field(default=1, ge=1, le=13)

    @model_validator(mode="after")
    def _backend_fits_devices(self) -> ModelSection:
        for device in self.devices:  # the same rule EngineOptions applies, at config load
            self.engine_options(device, None)
        return self

    def engine_options(
        self,
        device: str,
        onnx_cache_dir: Path | None,
        compile_cache_dir: Path | None = None,
    ) -> EngineOptions:
        """How a worker on `device` runs its engine."""
        return EngineOptions(
            device=device,
            batch_size=self.batch_size,
            precision=self.precision,
            backend=self.backend,
            onnx_cache_dir=onnx_cache_dir,
            compile_mode=self.compile_mode,
            compile_cache_dir=compile_cache_dir,
            member_streams=self.member_streams,
        )


class StudySection(_Section):
    quiet_seconds: float = Field(default=5.0, ge=0)


class FiltersSection(_Section):
    sop_classes: list[str] = Field(default_factory=lambda: list(DEFAULT_SOP_CLASSES))
    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX", "OT", ""])
    body_parts: list[str] = Field(default_factory=lambda: sorted(DEFAULT_BODY_PARTS), min_length=1)
    views: list[str] = Field(default_factory=lambda: sorted(DEFAULT_VIEWS), min_length=1)


class DicomDestination(_Section):
    """A DICOM peer (PACS, viewer) that receives the SR and summary image by C-STORE."""

    kind: Literal["dicom"] = "dicom"
    name: str
    ae_title: AeTitle
    host: str
    port: int = Field(ge=1, le=65535)
    outputs: list[Literal["sr", "summary"]] = Field(default_factory=lambda: ["sr", "summary"])
    tls: TlsSection = Field(default_factory=TlsSection)


#: What each worklist priority is in HL7 (table 0027: S, A, R).
Hl7Priority = Literal["stat", "asap", "routine"]
_TIER_NAMES = frozenset({t.value for t in RiskTier} | {UNSPECIFIED_TIER})


class Hl7Destination(_Section):
    """A RIS that receives every result as an HL7 v2.5.1 ORU^R01 over MLLP."""

    kind: Literal["hl7"]
    name: str
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = "SCXNN"
    sending_facility: str = ""
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    ack_timeout_seconds: float = Field(default=30.0, gt=0)  # no ACK by then: a failed attempt
    # The order priority a worklist sorts by, per risk tier; a tier not named here (and a
    # definite-normal study) gets default_priority.
    priorities: dict[str, Hl7Priority] = Field(
        default_factory=lambda: {"critical": "stat", "urgent": "asap"}
    )
    default_priority: Hl7Priority = "routine"
    tls: TlsSection = Field(default_factory=TlsSection)

    @field_validator("priorities")
    @classmethod
    def _known_tiers(cls, value: dict[str, Hl7Priority]) -> dict[str, Hl7Priority]:
        unknown = sorted(set(value) - _TIER_NAMES)
        if unknown:
            raise ValueError(f"unknown risk tier(s) {unknown}; known: {sorted(_TIER_NAMES)}")
        return value

    def priority(self, risk_tier: str | None) -> Hl7Priority:
        return self.priorities.get(risk_tier or "", self.default_priority)


class DicomWebDestination(_Section):
    """A DICOMweb service (PACS, VNA, cloud archive) that receives the SR and summary image by
    STOW-RS. Credentials never sit in the config: the password is read, at send time, from the
    environment variable `password_env` names."""

    kind: Literal["dicomweb"]
    name: str
    url: str  # the service root: STOW-RS posts to {url}/studies
    outputs: list[Literal["sr", "summary"]] = Field(default_factory=lambda: ["sr", "summary"])
    timeout_seconds: float = Field(default=30.0, gt=0)  # to connect, and then for the answer
    username: str | None = None  # HTTP basic auth, with the password from password_env
    password_env: str | None = None  # the name of an environment variable, not a password
    ca: Path | None = None  # https: the server must chain to this CA alone (pinned)
    certificate: Path | None = None  # https: the node's client certificate, for servers that ask
    key: Path | None = None

    @field_validator("url")
    @classmethod
    def _service_url(cls, value: str) -> str:
        parts = urlsplit(value)
        # The messages never repeat the URL: it may carry a password someone put there.
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials: use username and password_env")
        if parts.query or parts.fragment:
            raise ValueError("must be the service root, without ?query or #fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _credentials_and_tls_fit(self) -> DicomWebDestination:
        if (self.username is None) != (self.password_env is None):
            raise ValueError("username and password_env go together (HTTP basic auth)")
        https = self.url.startswith("https://")
        for key in ("ca", "certificate", "key"):
            if getattr(self, key) is not None and not https:
                raise ValueError(f"{key} needs an https:// url")
        if (self.certificate is None) != (self.key is None):
            raise ValueError("certificate and key go together (the node's client certificate)")
        return self


def _destination_kind(value: Any) -> str:
    """`kind` of a destination, raw or validated; absent means dicom (the original kind)."""
    if isinstance(value, dict):
        return str(value.get("kind", "dicom"))
    return str(getattr(value, "kind", "dicom"))


# The union's tags, left out of the keys errors name.
_DESTINATION_KINDS = ("dicom", "hl7", "dicomweb")
Destination = Annotated[
    Annotated[DicomDestination, Tag("dicom")]
    | Annotated[Hl7Destination, Tag("hl7")]
    | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(
        _destination_kind,
        custom_error_type="destination_kind",
        custom_error_message="kind must be dicom (the default) or hl7 or dicomweb",
    ),
]


class DeliverySection(_Section):
    max_attempts: int = Field(default=8, ge=1)
    backoff_seconds: float = Field(default=5.0, gt=0)  # doubled after each failure
    max_backoff_seconds: float = Field(default=600.0, gt=0)
    lease_seconds: float = Field(default=600.0, gt=0)  # a claimed delivery is retaken after this


class WorkerSection(_Section):
    lease_seconds: float = Field(default=300.0, gt=0)
    heartbeat_seconds: float = Field(default=30.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_seconds: float = Field(default=10.0, ge=0)  # doubled after each failed attempt
    # The pipeline (worker.py): studies held at once (one in the engine, the next being
    # decoded) and the processes that decode and preprocess them (0: in the worker itself).
    studies_in_flight: int = Field(default=2, ge=1, le=64)
    decode_processes: int = Field(default=1, ge=0, le=64)
    # auto: JPEG / JPEG 2000 decoded on the worker's CUDA device where nvImageCodec is installed
    # (imaging/gpu_decode.py), the CPU otherwise and for everything else; off: always the CPU.
    gpu_decode: Literal["auto", "off"] = "auto"
    # auto: the thesis's preprocessing (window, pad, CLAHE, resize) on the worker's CUDA device,
    # the same pixels as OpenCV's bit for bit (imaging/device_preprocess.py); off: the CPU.
    gpu_preprocess: Literal["auto", "off"] = "auto"


class SchedulerSection(_Section):
    readiness_seconds: float = Field(default=1.0, gt=0)
    lease_recovery_seconds: float = Field(default=15.0, gt=0)
    delivery_seconds: float = Field(default=2.0, gt=0)
    retention_seconds: float = Field(default=3600.0, gt=0)
    disk_check_seconds: float = Field(default=30.0, gt=0)
    housekeeping_seconds: float = Field(default=3600.0, gt=0)


class DriftSection(_Section):
    """Drift watch (scxnn_node/drift.py): live scores and inputs against the bundle's."""

    window_studies: int = Field(default=500, ge=10)  # the newest studies compared
    min_samples: int = Field(default=100, ge=5)  # fewer studies (images) in the window: none
    psi_threshold: float = Field(default=0.25, gt=0)  # population stability index: 0.25 = shift
    unseen_manufacturer_share: float = Field(default=0.2, gt=0, le=1)
    check_seconds: float = Field(default=300.0, gt=0)  # how often the scheduler checks
    repeat_warning_hours: float = Field(default=24.0, gt=0)  # a drift still there: warn again


class HttpSection(_Section):
    """GET /metrics (Prometheus) and GET / (the status page), both read-only; POSTs that retry
    a dead delivery need the token held by the environment variable `retry_token_env` names
    (no variable: retry from the page is off). Loopback by default: another host exposes
    queue state (never patient data) to whoever reaches the port."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    retry_token_env: str | None = None  # the name of an environment variable, not the token


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False


class NodeConfig(_Section):
    node: NodeSection = Field(default_factory=NodeSection)
    allowed_callers: list[AllowedCaller] | None = None  # None: any caller; [] refuses all
    storage: StorageSection = Field(default_factory=StorageSection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    model: ModelSection = Field(default_factory=ModelSection)
    study: StudySection = Field(default_factory=StudySection)
    filters: FiltersSection = Field(default_factory=FiltersSection)
    destinations: list[Destination] = Field(default_factory=list)
    delivery: DeliverySection = Field(default_factory=DeliverySection)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    drift: DriftSection = Field(default_factory=DriftSection)
    http: HttpSection = Field(default_factory=HttpSection)

    @model_validator(mode="after")
    def _certificates_can_be_checked(self) -> NodeConfig:
        tls = self.node.tls
        for index, caller in enumerate(self.allowed_callers or []):
            if caller.certificate_cn is not None and not (tls.enabled and tls.ca is not None):
                raise ValueError(
                    f"allowed_callers[{index}].certificate_cn needs node.tls.enabled and "
                    "node.tls.ca"
                )
        return self

    @field_validator("destinations")
    @classmethod
    def _unique_destinations(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique, got {names}")
        return value

    def onnx_cache_dir(self) -> Path:
        """Where the onnx backend caches exported members (model/onnx_backend.py)."""
        return self.model.onnx_cache_dir or self.storage.spool_dir.parent / "onnx-cache"

    def compile_cache_dir(self) -> Path:
        """Where torch.compile keeps its compiled graphs and kernels between starts."""
        return self.model.compile_cache_dir or self.storage.spool_dir.parent / "compile-cache"

    def engine_options(self, device: str) -> EngineOptions:
        """How a worker of this node on `device` runs its engine, caches included."""
        return self.model.engine_options(device, self.onnx_cache_dir(), self.compile_cache_dir())

    def selection_policy(self, body_parts: list[str] | None = None) -> SelectionPolicy:
        """The image selection policy of the filters section (body parts overridable)."""
        return SelectionPolicy(
            frozenset(body_parts or self.filters.body_parts), frozenset(self.filters.views)
        )

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = [d.name for d in self.destinations]
        raise KeyError(f"no destination named {name!r}; configured: {known}")


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        if not path:
            continue
        target = raw
        for part in path[:-1]:
            existing = target.get(part)
            if not isinstance(existing, dict):
                existing = {}
                target[part] = existing
            target = existing
        try:
            target[path[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment {name}: not a valid value ({exc})") from None
    return raw


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ConfigError names the file otherwise."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def validated(model: type[_M], raw: dict[str, Any], label: str) -> _M:
    """Validate raw config data; ConfigError lists every bad key as section.key: reason."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"] if p not in _DESTINATION_KINDS)
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {message}")
        raise ConfigError(f"{label}: " + "; ".join(problems)) from None


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read and validate a config file (None: defaults), then apply SCXNN__ overrides."""
    label = str(path) if path is not None else "(defaults)"
    raw: Any = read_yaml_mapping(path) if path is not None else {}
    raw = _apply_env(raw, os.environ if environ is None else environ)
    return validated(NodeConfig, raw, label)
