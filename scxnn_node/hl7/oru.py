"""The ORU^R01 (HL7 v2.5.1) a triage result becomes for a RIS, and what the RIS's ACK says of
it. Built with hl7apy (a maintained library that knows the 2.5.1 message structures and parses
any ACK); every value from a DICOM header is escaped, so a `|` or `^` in it stays data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset

from scxnn_node.config import Hl7Destination
from scxnn_node.findings import PRIVATE_SCHEME
from scxnn_node.logs import hash_uids
from scxnn_node.model.result import StudyResult, Verdict

VERSION = "2.5.1"
#: HL7 table 0027 (priority) codes of the configurable worklist priorities.
PRIORITY_CODES = {"stat": ("S", "STAT"), "asap": ("A", "ASAP"), "routine": ("R", "Routine")}
_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
_ACCEPTED = {"AA", "CA"}  # application / commit accept; AE, AR, CE, CR are rejects


@dataclass(frozen=True)
class StudyHeaders:
    """What the message says of the study, from a received instance's header, as received."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str  # DICOM PN: family^given^middle^prefix^suffix
    accession_number: str
    study_instance_uid: str
    study_datetime: str  # HL7 DTM (YYYYMMDD[HHMMSS]); empty when the header has no date

    @classmethod
    def of(cls, header: Dataset) -> StudyHeaders:
        def text(keyword: str) -> str:
            return str(header.get(keyword, "") or "").strip()

        time = text("StudyTime").split(".")[0]
        date = text("StudyDate")
        return cls(
            patient_id=text("PatientID"),
            issuer_of_patient_id=text("IssuerOfPatientID"),
            patient_name=text("PatientName"),
            accession_number=text("AccessionNumber"),
            study_instance_uid=text("StudyInstanceUID"),
            study_datetime=date + time if date else "",
        )


def escaped(value: str) -> str:
    """`value` as HL7 field data: its delimiters written as escape sequences, line breaks as
    spaces (a segment ends at a carriage return)."""
    value = "".join(_ESCAPES.get(c, c) for c in value)
    return value.replace("\r", " ").replace("\n", " ")


def _coded(code: str, meaning: str, scheme: str = PRIVATE_SCHEME) -> str:
    return f"{escaped(code)}^{escaped(meaning)}^{escaped(scheme)}"


def build_oru(
    result: StudyResult,
    study: StudyHeaders,
    destination: Hl7Destination,
    *,
    model_name: str,
    model_version: str,
    finding_codes: Mapping[str, tuple[str, str, str]],  # finding -> (code, scheme, meaning)
    control_id: str,
    amended: bool,
    now: datetime,
) -> bytes:
    """The ORU^R01 of a result: PID and OBR from the study, a priority in TQ1 and OBR-27, and
    an OBX each for the verdict, the risk tier, every flagged finding, the abnormality score
    and the model. A study not analysed says so too (the RIS learns it was not triaged): its
    verdict, the reason (UIDs hashed) and the model, at the default priority. `amended`: a
    later result of a study already reported (result status C, corrected, instead of F)."""
    analysed = result.verdict is not Verdict.NOT_ANALYSED
    if analysed and result.abnormality_score is None:
        raise ValueError("an analysed result without an abnormality score")
    stamp = now.strftime("%Y%m%d%H%M%S%z")  # with its offset: a RIS need not guess the zone
    status = "C" if amended else "F"
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    msh = message.msh
    msh.msh_3 = escaped(destination.sending_application)
    msh.msh_4 = escaped(destination.sending_facility)
    msh.msh_5 = escaped(destination.receiving_application)
    msh.msh_6 = escaped(destination.receiving_facility)
    msh.msh_7 = stamp
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = escaped(control_id)
    msh.msh_11 = "P"
    msh.msh_12 = VERSION

    results = message.add_group("ORU_R01_PATIENT_RESULT")
    pid = results.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    issuer = f"^^^{escaped(study.issuer_of_patient_id)}" if study.issuer_of_patient_id else ""
    pid.pid_3 = f"{escaped(study.patient_id)}{issuer}"
    family, given = [*study.patient_name.split("^"), "", ""][:2]
    pid.pid_5 = f"{escaped(family)}^{escaped(given)}" if given else escaped(family)

    order = results.add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.obr
    obr.obr_1 = "1"
    obr.obr_3 = escaped(study.accession_number)  # filler order number: the accession number
    obr.obr_4 = _coded("SCXNN-TRIAGE", "Chest radiograph AI triage")
    if study.study_datetime:
        obr.obr_7 = study.study_datetime
    obr.obr_18 = escaped(study.accession_number)
    obr.obr_22 = stamp
    obr.obr_25 = status
    code, meaning = PRIORITY_CODES[destination.priority(result.risk_tier if analysed else None)]
    obr.obr_27 = f"^^^^^{code}"  # TQ-6, for a RIS that still reads the 2.4 field
    timing: Group = order.add_group("ORU_R01_TIMING_QTY")
    timing.tq1.tq1_1 = "1"
    timing.tq1.tq1_9 = f"{code}^{meaning}^HL70485"

    abnormal = result.verdict is Verdict.ABNORMAL
    observations: list[tuple[str, str, str, str]] = [  # value type, identifier, value, flag
        ("HD", _coded("113014", "DICOM Study", "DCM"), escaped(study.study_instance_uid), ""),
        (
            "CWE",
            _coded("verdict", "Triage verdict"),
            _coded(result.verdict.value, result.verdict.value.replace("_", " ")),
            "A" if abnormal else "N",
        ),
    ]
    if not analysed:
        reason = hash_uids(result.reason or "")  # a reason may name an instance by its UID
        observations.append(("ST", _coded("reason", "Reason not analysed"), escaped(reason), ""))
    if analysed and result.risk_tier is not None:
        observations.append(
            (
                "CWE",
                _coded("risk-tier", "Risk tier"),
                _coded(result.risk_tier, result.risk_tier.replace("_", " ")),
                "",
            )
        )
    for finding in result.flagged_findings if analysed else ():
        code_value, scheme, code_meaning = finding_codes.get(
            finding.name, (finding.name, PRIVATE_SCHEME, finding.name)
        )
        value = _coded(code_value, code_meaning, scheme)
        observations.append(("CWE", _coded("finding", "Flagged finding"), value, "A"))
    if analysed:
        observations.append(
            (
                "NM",
                _coded("abnormality-score", "Abnormality score"),
                f"{result.abnormality_score:.6f}",
                "",
            )
        )
    observations.append(
        ("ST", _coded("model", "Model"), escaped(f"{model_name} {model_version}"), "")
    )
    for index, (value_type, identifier, value, flag) in enumerate(observations, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(index)
        obx.obx_2 = value_type
        obx.obx_3 = identifier
        obx.obx_5 = value
        if flag:
            obx.obx_8 = flag
        obx.obx_11 = status
        obx.obx_14 = stamp
    return message.to_er7().encode("utf-8") + b"\r"


def control_id_of(message: bytes) -> str:
    """MSH-10 of an ER7 message (the sender matches the ACK's MSA-2 against it)."""
    msh = message.split(b"\r", 1)[0].decode("utf-8", "replace")
    fields = msh.split(msh[3:4] or "|") if msh.startswith("MSH") else []
    return fields[9] if len(fields) > 9 else ""


def ack_failure(ack: bytes, control_id: str) -> str | None:
    """None when `ack` accepts the message `control_id`, otherwise why it does not: a reject
    (AE, AR, CE, CR with the RIS's text), an ACK of another message, or no readable ACK."""
    text = ack.decode("utf-8", "replace").replace("\n", "\r").strip("\r")
    try:
        parsed = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT)
        code = parsed.msa.msa_1.to_er7()
        acknowledged = parsed.msa.msa_2.to_er7()
        said = parsed.msa.msa_3.to_er7()
    except Exception as exc:  # hl7apy raises its own and plain errors alike on garbage
        return f"unreadable ACK ({type(exc).__name__}): {text[:80]!r}"
    if not code:
        return f"ACK without an acknowledgment code: {text[:80]!r}"
    if acknowledged != control_id:
        return f"ACK of message {acknowledged!r}, not of {control_id!r}"
    if code not in _ACCEPTED:
        return f"RIS answered {code}" + (f": {said}" if said else "")
    return None
