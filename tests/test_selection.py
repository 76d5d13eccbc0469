"""View and body-part selection from the header."""

from __future__ import annotations

import pydicom
import pytest
from conftest import DATA
from dicom_factory import chest_pixels, make_dataset
from pydicom.dataset import Dataset

from scxnn_node.imaging.selection import SelectionPolicy, View, assess_eligibility, classify_view


def _ds(**kw) -> Dataset:
    return make_dataset(chest_pixels(64, bits=12), **kw)


@pytest.mark.parametrize("view", ["PA", "AP"])
def test_frontal_views_analysed(view):
    result = assess_eligibility(_ds(view=view))
    assert result.analyse and result.view is View.FRONTAL and not result.flags


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL"])
def test_lateral_views_skipped_with_reason(view):
    result = assess_eligibility(_ds(view=view))
    assert not result.analyse
    assert "lateral" in result.reason


def test_unknown_view_analysed_and_flagged():
    result = assess_eligibility(_ds(view=None))
    assert result.analyse and result.view is View.UNKNOWN
    assert result.flags == ("view_unknown",)


def test_view_code_sequence_lateral():
    ds = _ds(view=None)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "R-10236", "SRT", "left lateral"
    ds.ViewCodeSequence = [item]
    assert classify_view(ds) is View.LATERAL


def test_body_part_allow_list_defaults_to_chest_and_empty():
    assert assess_eligibility(_ds(body_part="CHEST")).analyse
    assert assess_eligibility(_ds(body_part=None)).analyse
    assert assess_eligibility(_ds(body_part="")).analyse
    knee = assess_eligibility(_ds(body_part="KNEE"))
    assert not knee.analyse and "KNEE" in knee.reason


def test_body_part_allow_list_configurable():
    policy = SelectionPolicy.from_body_parts(["chest", "thorax"])
    assert assess_eligibility(_ds(body_part="THORAX"), policy).analyse
    assert not assess_eligibility(_ds(body_part=None), policy).analyse
    with pytest.raises(ValueError, match="body_parts"):
        SelectionPolicy(frozenset())


def test_real_files():
    nih = pydicom.dcmread(DATA / "nih_dx_no_finding.dcm", stop_before_pixels=True)
    siim = pydicom.dcmread(DATA / "siim_cr_negative.dcm", stop_before_pixels=True)
    assert assess_eligibility(nih).view is View.UNKNOWN and assess_eligibility(nih).analyse
    assert assess_eligibility(siim).view is View.FRONTAL and assess_eligibility(siim).analyse


def test_allowed_views_configurable():
    pa_only = SelectionPolicy(body_parts=frozenset({"CHEST"}), views=frozenset({"PA"}))
    assert assess_eligibility(_ds(view="PA"), pa_only).analyse
    ap = assess_eligibility(_ds(view="AP"), pa_only)
    assert not ap.analyse and "'AP'" in ap.reason
    assert not assess_eligibility(_ds(view=None), pa_only).analyse
