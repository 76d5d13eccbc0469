"""The triage result as a DICOM Comprehensive 3D SR with TID 1500 (IHE AI Results), via highdicom.

Content: one measurement group (TID 1501) that names the algorithm (bundle name and version),
references the analysed images, and holds the verdict, the risk tier, each finding's call as a
qualitative evaluation and its target probability and the abnormality score as measurements.
Codes outside SNOMED CT / DCM use the private scheme 99SCXNN (documented in README).

A finding's evaluation is what its study reports (StudyResult.reported_call), never a raw member
call that contradicts the verdict: Present (SNOMED 52101004) only in an abnormal study; in a
definite-normal study a member that said target or other disease is recorded as "Below study
operating point" (99SCXNN), since the study as a whole is below the threshold, while its target
probability stays as a measurement; in an abnormal study a critical finding the safety net
fired on, though its member did not say target, is "Flagged by critical safety net". A result
analysed without images whose files retention purged says so in a TEXT item ("Not analysed: N
earlier image(s) no longer held by the node").
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import highdicom as hd
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import validate_value

from scxnn_node import __version__
from scxnn_node.findings import PRIVATE_SCHEME, SNOMED_SCHEME
from scxnn_node.model.manifest import NOT_FOR_CLINICAL_USE
from scxnn_node.model.result import ReportedCall, StudyResult, Verdict
from scxnn_node.store.results import SrReference

MANUFACTURER = "scxnn-node"
# A fixed UID root for this node's device observer (derived once from the project name).
DEVICE_OBSERVER_UID = "2.25.237462098311926830919410873829946371057"

PROCEDURE_CHEST_XRAY = Code("399208008", SNOMED_SCHEME, "Plain chest X-ray")
PRESENT = Code("52101004", SNOMED_SCHEME, "Present")
ABSENT = Code("2667000", SNOMED_SCHEME, "Absent")
UNITLESS = Code("1", "UCUM", "no units")

VERDICT = Code("SCXNN-VERDICT", PRIVATE_SCHEME, "Triage verdict")
VERDICT_VALUES = {
    Verdict.DEFINITE_NORMAL: Code("SCXNN-DEFINITE-NORMAL", PRIVATE_SCHEME, "Definite normal"),
    Verdict.ABNORMAL: Code("SCXNN-ABNORMAL", PRIVATE_SCHEME, "Abnormal"),
}
RISK_TIER = Code("SCXNN-RISK-TIER", PRIVATE_SCHEME, "Risk tier")
ABNORMALITY_SCORE = Code("SCXNN-SCORE", PRIVATE_SCHEME, "Abnormality score")
OPERATING_THRESHOLD = Code("SCXNN-THRESHOLD", PRIVATE_SCHEME, "Operating threshold")
OTHER_DISEASE = Code("SCXNN-OTHER-DISEASE", PRIVATE_SCHEME, "Other disease")
BELOW_OPERATING_POINT = Code("SCXNN-BELOW-OP", PRIVATE_SCHEME, "Below study operating point")
SAFETY_NET_FLAGGED = Code("SCXNN-SAFETY-NET", PRIVATE_SCHEME, "Flagged by critical safety net")
#: The qualitative value each reported call is written as.
REPORTED_VALUES = {
    ReportedCall.TARGET: PRESENT,
    ReportedCall.NORMAL: ABSENT,
    ReportedCall.OTHERS: OTHER_DISEASE,
    ReportedCall.BELOW_OPERATING_POINT: BELOW_OPERATING_POINT,
    ReportedCall.SAFETY_NET: SAFETY_NET_FLAGGED,
}
NOT_ANALYSED_IMAGES = Code("SCXNN-NOT-ANALYSED", PRIVATE_SCHEME, "Images not analysed")


def tier_code(tier: str) -> Code:
    return Code(f"SCXNN-TIER-{tier.upper()}", PRIVATE_SCHEME, tier.replace("_", "-").title())


def purged_note(result: StudyResult) -> str | None:
    """The line every output carries when images of the study were purged before analysis."""
    n = len(result.purged_instances)
    return f"Not analysed: {n} earlier image(s) no longer held by the node" if n else None


def series_description(result: StudyResult, demo: bool) -> str:
    """What worklists show, e.g. 'AI TRIAGE: CRITICAL - pneumothorax' (LO: 64 characters)."""
    if result.verdict is Verdict.DEFINITE_NORMAL:
        text = "AI TRIAGE: DEFINITE NORMAL"
    elif result.verdict is Verdict.NOT_ANALYSED:
        text = "AI TRIAGE: NOT ANALYSED"
    else:
        tier = (result.risk_tier or "unspecified").replace("_", "-").upper()
        flagged = [f.name.replace("_", " ") for f in result.flagged_findings]
        text = f"AI TRIAGE: {tier}" + (f" - {', '.join(flagged)}" if flagged else "")
    if demo:
        text = f"{text[:40]} [DEMO]" if len(text) > 40 else f"{text} [DEMO]"
    return text[:64]


@contextmanager
def without_name_warnings() -> Iterator[None]:
    """highdicom warns about odd person names by quoting them: keep patient data out of logs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


# Patient and study attributes an SR copies from its evidence (Type 2: present, maybe empty).
COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def sanitised_evidence(source: Dataset) -> Dataset:
    """A header copy fit to be copied into a new object: real senders omit Type 2 attributes
    and send values invalid for their VR (an age of "62"); missing ones become empty, invalid
    ones are emptied rather than propagated."""
    ds = Dataset()
    ds.file_meta = getattr(source, "file_meta", Dataset())
    for element in source:
        if element.tag == 0x7FE00010 or element.tag.group == 0x0002:
            continue
        if element.VR in ("AS", "DA", "TM", "DT", "CS", "PN", "LO", "SH", "UI") and element.value:
            try:
                validate_value(element.VR, element.value, config.RAISE)
            except (ValueError, TypeError):
                ds.add_new(element.tag, element.VR, None)
                continue
        ds.add(element)
    for keyword in COPIED_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, None)
    if "Modality" not in ds:  # Type 1, yet omitted by real senders; highdicom reads it
        ds.Modality = "OT"
    return ds


def build_triage_sr(
    result: StudyResult,
    sources: Sequence[Dataset],
    *,
    bundle_name: str,
    bundle_version: str,
    finding_codes: dict[str, tuple[str, str, str]],
    series_instance_uid: str,
    sop_instance_uid: str,
    predecessor: SrReference | None = None,
    series_number: int = 9901,
) -> hd.sr.Comprehensive3DSR:
    """SR for an analysed study. `sources` are the analysed images' headers (pixel data not
    needed); `predecessor` is the earlier SR of this study when this one amends it."""
    if result.verdict is Verdict.NOT_ANALYSED:
        raise ValueError("a not_analysed study gets no SR")
    if not sources:
        raise ValueError("build_triage_sr needs the analysed source images")
    sources = [sanitised_evidence(s) for s in sources]
    demo = result.bundle.demo
    algorithm = hd.sr.AlgorithmIdentification(name=bundle_name, version=bundle_version)
    evaluations = [hd.sr.QualitativeEvaluation(VERDICT, VERDICT_VALUES[result.verdict])]
    if result.risk_tier:
        evaluations.append(hd.sr.QualitativeEvaluation(RISK_TIER, tier_code(result.risk_tier)))
    measurements = [
        hd.sr.Measurement(ABNORMALITY_SCORE, float(result.abnormality_score or 0.0), UNITLESS),
        hd.sr.Measurement(OPERATING_THRESHOLD, float(result.threshold or 0.0), UNITLESS),
    ]
    for finding in result.findings:
        code = Code(*finding_codes[finding.name])
        value = REPORTED_VALUES[result.reported_call(finding)]
        evaluations.append(hd.sr.QualitativeEvaluation(code, value))
        measurements.append(
            hd.sr.Measurement(code, round(float(finding.probabilities["target"]), 6), UNITLESS)
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"SCXNN triage {bundle_name} {bundle_version}"
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(s) for s in sources],
    )
    note = purged_note(result)
    if note:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=NOT_ANALYSED_IMAGES,
                value=note,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID,
            name="SCXNN",
            manufacturer_name=MANUFACTURER,
            model_name=f"{bundle_name} {bundle_version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CHEST_XRAY,
        imaging_measurements=[group],
    )
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"{bundle_name} {bundle_version}"[:64],
        software_versions=[__version__, bundle_version],
        contribution_description=(f"SCXNN triage{' - ' + NOT_FOR_CLINICAL_USE if demo else ''}")[
            :64
        ],
    )
    with without_name_warnings():
        sr = hd.sr.Comprehensive3DSR(
            evidence=list(sources),
            content=report,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            previous_versions=[_previous_version(predecessor)] if predecessor else None,
            contributing_equipment=[equipment],
        )
    sr.SeriesDescription = series_description(result, demo)
    charset = sources[0].get("SpecificCharacterSet")
    if charset:
        sr.SpecificCharacterSet = charset
    sr.CodingSchemeIdentificationSequence = [_private_scheme_identification()]
    return sr


def _previous_version(reference: SrReference) -> Dataset:
    """The attributes highdicom reads from a previous version to name it as a predecessor."""
    ds = Dataset()
    ds.StudyInstanceUID = reference.study_instance_uid
    ds.SeriesInstanceUID = reference.series_instance_uid
    ds.SOPClassUID = reference.sop_class_uid
    ds.SOPInstanceUID = reference.sop_instance_uid
    return ds


def _private_scheme_identification() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "scxnn-node triage codes"
    item.CodingSchemeResponsibleOrganization = "scxnn-node project"
    return item
