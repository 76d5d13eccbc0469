"""Dataset manifests, masks, importers and the preprocessing cache."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from dicom_factory import chest_pixels, make_dataset, write

from scxnn_node.imaging.preprocess import PreprocessSpec, preprocess_image
from training.cache import CacheError, build_cache
from training.class_mapping import DatasetImportError
from training.dataset import ManifestError, ManifestRow, load_manifest, write_manifest
from training.importers import (
    import_chestx_det,
    import_class_folders,
    import_generic_csv,
    import_siim,
)
from training.masks import decode_siim_rle, encode_siim_rle, read_mask


def _png(path: Path, shape: tuple[int, int] = (40, 50), value: int = 100) -> str:
    """A flat image; its first pixels spell the file's path so that no two files share
    content (a manifest refuses duplicate content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full(shape, value, np.uint8)
    tag = np.frombuffer(hashlib.sha256(str(path).encode()).digest(), np.uint8)
    pixels.flat[: min(tag.size, pixels.size)] = tag[: pixels.size]
    cv2.imwrite(str(path), pixels)
    return path.name


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _manifest_of_pngs(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """A manifest CSV whose rows' images (the first column) are PNG files written beside it."""
    for row in rows:
        _png(path.parent / row[0])
    return _write_csv(path, header, rows)


def test_manifest_reads_labels_masks_and_unknowns(tmp_path: Path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    mask = np.zeros((40, 50), np.uint8)
    mask[5:10, 5:10] = 255
    cv2.imwrite(str(tmp_path / "a_mask.png"), mask)
    path = _write_csv(
        tmp_path / "m.csv",
        ["image", "patient_id", "label_kind", "split", "nodule", "cardiomegaly", "mask_nodule"],
        [
            ["a.png", "p1", "hard", "", "1", "0", "a_mask.png"],
            ["b.png", "p2", "weak", "", "", "0", ""],
        ],
    )
    m = load_manifest(path)
    assert m.findings == ("nodule", "cardiomegaly")  # catalogue order
    a, b = m.entries
    assert a.labels == {"nodule": 1, "cardiomegaly": 0} and a.abnormal == 1
    assert b.labels == {"nodule": None, "cardiomegaly": 0} and b.abnormal is None
    assert b.label_kind == "weak"
    assert read_mask(a.masks["nodule"], (40, 50)).sum() == 25
    assert len(m.sha256) == 64


def test_manifest_validation_names_every_problem(tmp_path: Path):
    _png(tmp_path / "a.png", (40, 50))
    _png(tmp_path / "c.png")
    cv2.imwrite(str(tmp_path / "small_mask.png"), np.full((20, 20), 255, np.uint8))
    path = _write_csv(
        tmp_path / "m.csv",
        ["image", "patient_id", "split", "nodule", "mask_nodule", "pneumonia"],
        [
            ["a.png", "p1", "train", "1", "small_mask.png", ""],  # mask size mismatch
            ["missing.png", "p2", "", "0", "", ""],  # missing file
            ["c.png", "p1", "test", "yes", "", ""],  # bad value; p1 in two splits
        ],
    )
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    text = str(err.value)
    assert "column 'pneumonia': unknown finding" in text
    assert "row 2, column 'mask_nodule': mask size mismatch: mask is 20x20, image is 40x50" in text
    assert "row 3, column 'image': file not found" in text and "missing.png" in text
    assert "row 4, column 'nodule': expected 1, 0 or empty, got 'yes'" in text
    assert "patient 'p1' is in more than one split: train (row 2), test (row 4)" in text
    assert len(err.value.problems) == 5


def test_manifest_refuses_mask_of_absent_finding_and_missing_columns(tmp_path: Path):
    _png(tmp_path / "a.png")
    path = _write_csv(
        tmp_path / "m.csv",
        ["image", "patient_id", "nodule", "mask_nodule"],
        [["a.png", "p1", "0", "rle:1 3"]],
    )
    with pytest.raises(ManifestError, match="a mask for a finding not labelled 1"):
        load_manifest(path)
    bad = _write_csv(tmp_path / "n.csv", ["image", "nodule"], [["a.png", "1"]])
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['patient_id'\]"):
        load_manifest(bad)


def test_automatic_split_is_per_patient_and_weak_labels_train(tmp_path: Path):
    rows = []
    for i in range(60):
        rows.append(
            ManifestRow(
                image=_png(tmp_path / f"i{i}.png"),
                patient_id=f"p{i // 2}",  # two images per patient
                labels={"nodule": i % 3 == 0},
                label_kind="weak" if i >= 50 else "hard",
            )
        )
    m = load_manifest(write_manifest(tmp_path / "m.csv", rows, ["nodule"]))
    split = m.with_automatic_split(seed=3)
    by_patient: dict[str, set[str]] = {}
    for e in split.entries:
        by_patient.setdefault(e.patient_id, set()).add(e.split)
    assert all(len(s) == 1 for s in by_patient.values())
    assert all(e.split == "train" for e in split.entries if e.label_kind == "weak")
    counts = split.split_counts()
    # 25 patients with hard labels: val and test round(2.5) = 2 each, train 21; the 5
    # weak-only patients train too; two images per patient.
    assert counts == {"train": 52, "val": 4, "test": 4}
    assert split.with_automatic_split(seed=3) == split  # explicit splits are kept
    assert m.with_automatic_split(seed=3) == split  # deterministic


def test_siim_rle_matches_hand_example():
    # 3x3, column by column: col 0 = rows 1,2 ; col 1 = row 0 -> flat [0,1,1,1,0,...]
    mask = np.zeros((3, 3), np.uint8)
    mask[1, 0] = mask[2, 0] = mask[0, 1] = 1
    assert encode_siim_rle(mask) == "1 3"
    assert (decode_siim_rle("1 3", (3, 3)) == mask).all()
    mask[2, 2] = 1
    assert encode_siim_rle(mask) == "1 3 4 1"
    assert (decode_siim_rle(encode_siim_rle(mask), (3, 3)) == mask).all()
    with pytest.raises(ValueError, match="runs past the end"):
        decode_siim_rle("5 10", (3, 3))


def test_polygon_json_mask(tmp_path: Path):
    poly = tmp_path / "p.json"
    poly.write_text(json.dumps({"polygons": [[[2, 2], [7, 2], [7, 5], [2, 5]]]}))
    mask = read_mask(str(poly), (10, 10))
    assert mask[2:6, 2:8].all() and mask.sum() == 24


def test_cache_pads_and_resizes_masks_like_images(tmp_path: Path):
    image = np.full((60, 100), 20, np.uint16)
    image[10:30, 60:90] = 3000  # a bright lesion off centre in a wide image
    cv2.imwrite(str(tmp_path / "wide.png"), image)
    lesion = np.zeros((60, 100), np.uint8)
    lesion[10:30, 60:90] = 255
    cv2.imwrite(str(tmp_path / "wide_mask.png"), lesion)
    path = _write_csv(
        tmp_path / "m.csv",
        ["image", "patient_id", "nodule", "mask_nodule"],
        [["wide.png", "p1", "1", "wide_mask.png"]],
    )
    m = load_manifest(path)
    spec = PreprocessSpec(size=50, clahe_tile_grid=2)
    cached = build_cache(m, spec, tmp_path / "cache", progress=False)[2]
    assert cached.image.parent.name == spec.cache_key
    img, mask = cached.load_image(), cached.load_mask("nodule", 50)
    assert (img == preprocess_image(image, spec)).all()
    assert mask.sum() > 0
    assert img[mask == 1].mean() > 3 * img[mask == 0].mean()  # mask sits on the lesion
    # a second call finds everything cached; another spec gets its own directory
    mtime = cached.image.stat().st_mtime_ns
    again = build_cache(m, spec, tmp_path / "cache", progress=False)[2]
    assert again.image.stat().st_mtime_ns == mtime
    other = build_cache(
        m, PreprocessSpec(size=32, clahe_tile_grid=2), tmp_path / "cache", progress=False
    )
    assert other[2].image.parent != cached.image.parent


def test_cache_reports_unreadable_images(tmp_path: Path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = _write_csv(
        tmp_path / "m.csv", ["image", "patient_id", "nodule"], [["broken.png", "p", "0"]]
    )
    with pytest.raises(CacheError, match=r"row 2 \(.*broken.png\): .*not a readable PNG"):
        build_cache(load_manifest(path), PreprocessSpec(size=32), tmp_path / "c", progress=False)


def test_import_class_folders_both_layouts(tmp_path: Path):
    mapping = tmp_path / "map.yaml"
    mapping.write_text(
        "classes: {normal: normal, bacterial_pneumonia: consolidation, "
        "viral_pneumonia: interstitial_opacity}\n"
    )
    root = tmp_path / "folders"
    for cls, n in (("normal", 2), ("bacterial_pneumonia", 2), ("viral_pneumonia", 1)):
        for i in range(n):
            _png(root / cls / f"person{i}_{cls}_{i}.png")
    out = import_class_folders(
        root, mapping, tmp_path / "out" / "m.csv", patient_regex=r"^(person\d+)"
    )
    m = load_manifest(out)
    assert m.findings == ("consolidation", "interstitial_opacity")
    labels = {e.image.name: e.labels for e in m.entries}
    assert labels["person0_bacterial_pneumonia_0.png"] == {
        "consolidation": 1,
        "interstitial_opacity": 0,
    }
    assert labels["person0_viral_pneumonia_0.png"] == {
        "consolidation": 0,
        "interstitial_opacity": 1,
    }
    assert labels["person1_normal_1.png"] == {"consolidation": 0, "interstitial_opacity": 0}
    assert {e.patient_id for e in m.entries} == {"person0", "person1"}

    flat = tmp_path / "flat"
    _png(flat / "images" / "n0.png")
    _png(flat / "images" / "b0.png")
    _write_csv(
        flat / "labels.csv",
        ["image", "label", "original_file"],
        [
            ["images/n0.png", "normal", "IM-0001-0001.jpeg"],
            ["images/b0.png", "bacterial_pneumonia", "person7_bacteria_1.jpeg"],
        ],
    )
    out = import_class_folders(
        flat,
        mapping,
        tmp_path / "flat.csv",
        labels_csv=flat / "labels.csv",
        patient_regex=r"^(person\d+|IM-\d+)",
        patient_column="original_file",
    )
    m = load_manifest(out)
    assert [e.patient_id for e in m.entries] == ["IM-0001", "person7"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: {normal: normal, bacterial_pneumonia: pneumonia}\n")
    with pytest.raises(DatasetImportError, match="are not findings"):
        import_class_folders(root, bad, tmp_path / "x.csv")


def test_import_generic_csv_per_column_and_multilabel(tmp_path: Path):
    _png(tmp_path / "img" / "1.png")
    _png(tmp_path / "img" / "2.png")
    src = _write_csv(
        tmp_path / "chexpert.csv",
        ["Path", "Patient", "Pneumothorax", "Cardiomegaly"],
        [["1.png", "A", "1.0", "-1.0"], ["2.png", "B", "0.0", ""]],
    )
    mapping = tmp_path / "map.yaml"
    mapping.write_text(
        "image_column: Path\npatient_column: Patient\nimage_root: img\nlabel_kind: weak\n"
        "columns: {Pneumothorax: pneumothorax, Cardiomegaly: cardiomegaly}\n"
    )
    m = load_manifest(import_generic_csv(src, mapping, tmp_path / "m.csv"))
    assert [e.labels for e in m.entries] == [
        {"pneumothorax": 1, "cardiomegaly": None},  # -1 (uncertain) is unknown
        {"pneumothorax": 0, "cardiomegaly": None},
    ]
    assert {e.label_kind for e in m.entries} == {"weak"}

    nih = _write_csv(
        tmp_path / "nih.csv",
        ["Image Index", "Finding Labels"],
        [["1.png", "Effusion|Pneumonia"], ["2.png", "No Finding"]],
    )
    mapping.write_text(
        "image_column: Image Index\nimage_root: img\nlabels_column: Finding Labels\n"
        "classes: {Effusion: pleural_effusion, No Finding: normal, Pneumonia: 'other:pneumonia'}\n"
    )
    m = load_manifest(import_generic_csv(nih, mapping, tmp_path / "m2.csv"))
    first, second = m.entries
    assert first.labels == {"pleural_effusion": 1} and first.other_disease == "pneumonia"
    assert second.labels == {"pleural_effusion": 0} and second.abnormal == 0


def test_import_chestx_det_polygons(tmp_path: Path):
    _png(tmp_path / "img" / "36199.png", (64, 64))
    _png(tmp_path / "img" / "36200.png", (64, 64))
    ann = tmp_path / "train.json"
    ann.write_text(
        json.dumps(
            [
                {
                    "file_name": "36199.png",
                    "syms": ["Effusion", "Fracture"],
                    "boxes": [[1, 1, 9, 9], [20, 20, 30, 30]],
                    "polygons": [
                        [[10, 10], [30, 10], [30, 30], [10, 30]],
                        [[40, 40], [50, 40], [50, 50]],
                    ],
                },
                {"file_name": "36200.png", "syms": [], "boxes": [], "polygons": []},
            ]
        )
    )
    mapping = tmp_path / "map.yaml"
    mapping.write_text(
        "classes: {Effusion: pleural_effusion, Fracture: 'other:fracture'}\n"
        "unannotated: normal\n"  # this source's images without syms are stated normal
    )
    m = load_manifest(import_chestx_det(ann, tmp_path / "img", mapping, tmp_path / "out" / "m.csv"))
    first, second = m.entries
    assert first.labels == {"pleural_effusion": 1} and first.other_disease == "fracture"
    mask = read_mask(first.masks["pleural_effusion"], (64, 64))
    assert mask[10:31, 10:31].all() and mask.sum() == 21 * 21
    assert second.abnormal == 0 and not second.masks


def test_import_siim_rle_and_dicom(tmp_path: Path):
    size = 32
    (tmp_path / "dicom" / "sub").mkdir(parents=True)
    for image_id, patient in (("1.2.3", "PA"), ("1.2.4", "PB")):
        ds = make_dataset(chest_pixels(size))
        ds.PatientID = patient
        write(ds, tmp_path / "dicom" / "sub" / f"{image_id}.dcm")
    lesion = np.zeros((size, size), np.uint8)
    lesion[4:8, 10:12] = 1
    lesion2 = np.zeros((size, size), np.uint8)
    lesion2[20:22, 20:25] = 1
    rle = tmp_path / "train-rle.csv"
    rle.write_text(
        "ImageId, EncodedPixels\n"
        f"1.2.3, {encode_siim_rle(lesion)}\n1.2.3, {encode_siim_rle(lesion2)}\n1.2.4, -1\n"
    )
    m = load_manifest(import_siim(rle, tmp_path / "dicom", tmp_path / "m.csv"))
    first, second = m.entries
    assert (first.patient_id, second.patient_id) == ("PA", "PB")
    assert first.labels == {"pneumothorax": 1} and second.labels == {"pneumothorax": 0}
    assert (read_mask(first.masks["pneumothorax"], (size, size)) == (lesion | lesion2)).all()


# --- label semantics: what makes an image normal ------------------------------------------


def test_ignored_class_drops_the_image_instead_of_making_it_normal(tmp_path: Path):
    _png(tmp_path / "img" / "hernia.png")
    _png(tmp_path / "img" / "effusion_hernia.png")
    _png(tmp_path / "img" / "clear.png")
    nih = _write_csv(
        tmp_path / "nih.csv",
        ["Image Index", "Patient ID", "Finding Labels"],
        [
            ["hernia.png", "A", "Hernia"],
            ["effusion_hernia.png", "B", "Effusion|Hernia"],
            ["clear.png", "C", "No Finding"],
        ],
    )
    mapping = tmp_path / "map.yaml"
    mapping.write_text(
        "image_column: Image Index\npatient_column: Patient ID\nimage_root: img\n"
        "labels_column: Finding Labels\n"
        "classes: {Effusion: pleural_effusion, No Finding: normal, Hernia: ignore}\n"
    )
    m = load_manifest(import_generic_csv(nih, mapping, tmp_path / "m.csv"))
    assert [e.image.name for e in m.entries] == ["clear.png"]
    assert m.entries[0].abnormal == 0

    ann = tmp_path / "det.json"
    ann.write_text(
        json.dumps(
            [
                {"file_name": "hernia.png", "syms": ["Hernia"], "polygons": [[]]},
                {"file_name": "clear.png", "syms": ["Effusion"], "polygons": [[]]},
            ]
        )
    )
    det_map = tmp_path / "det.yaml"
    det_map.write_text("classes: {Effusion: pleural_effusion, Hernia: ignore}\n")
    m = load_manifest(import_chestx_det(ann, tmp_path / "img", det_map, tmp_path / "d.csv"))
    assert [e.image.name for e in m.entries] == ["clear.png"]


def test_per_column_import_is_normal_only_when_the_source_says_so(tmp_path: Path):
    for name in ("1.png", "2.png", "3.png"):
        _png(tmp_path / "img" / name)
    src = _write_csv(
        tmp_path / "chexpert.csv",
        ["Path", "Patient", "No Finding", "Fracture", "Pneumothorax", "Cardiomegaly"],
        [
            ["1.png", "A", "", "1.0", "0.0", "0.0"],  # a fracture: unmapped, so unknown
            ["2.png", "B", "1.0", "", "0.0", "0.0"],  # stated normal
            ["3.png", "C", "1.0", "", "1.0", "0.0"],  # a finding wins over No Finding
        ],
    )
    mapping = tmp_path / "map.yaml"
    mapping.write_text(
        "image_column: Path\npatient_column: Patient\nimage_root: img\n"
        "columns: {Pneumothorax: pneumothorax, Cardiomegaly: cardiomegaly}\n"
    )
    m = load_manifest(import_generic_csv(src, mapping, tmp_path / "m.csv"))
    assert [e.abnormal for e in m.entries] == [None, None, 1]  # no normal column: none normal
    assert m.entries[0].labels == {"pneumothorax": 0, "cardiomegaly": 0}  # known absent still
    mapping.write_text(
        "image_column: Path\npatient_column: Patient\nimage_root: img\n"
        "columns: {No Finding: normal, Pneumothorax: pneumothorax, Cardiomegaly: cardiomegaly}\n"
    )
    m = load_manifest(import_generic_csv(src, mapping, tmp_path / "m2.csv"))
    assert [e.abnormal for e in m.entries] == [None, 0, 1]


def test_single_finding_and_unannotated_sources_are_not_normal_by_default(tmp_path: Path):
    _png(tmp_path / "img" / "a.png", (64, 64))
    ann = tmp_path / "det.json"
    ann.write_text(json.dumps([{"file_name": "a.png", "syms": [], "polygons": []}]))
    det_map = tmp_path / "det.yaml"
    det_map.write_text("classes: {Effusion: pleural_effusion}\n")
    m = load_manifest(import_chestx_det(ann, tmp_path / "img", det_map, tmp_path / "d.csv"))
    assert m.entries[0].labels == {"pleural_effusion": 0} and m.entries[0].abnormal is None
    det_map.write_text("classes: {Effusion: pleural_effusion}\nunannotated: normal\n")
    m = load_manifest(import_chestx_det(ann, tmp_path / "img", det_map, tmp_path / "e.csv"))
    assert m.entries[0].abnormal == 0


def test_no_finding_column_decides_normal(tmp_path: Path):
    path = _manifest_of_pngs(
        tmp_path / "m.csv",
        ["image", "patient_id", "nodule", "cardiomegaly", "no_finding"],
        [
            ["a.png", "p1", "0", "0", "1"],  # stated normal
            ["b.png", "p2", "0", "0", "0"],  # source not exhaustive: unknown
            ["c.png", "p3", "0", "0", ""],  # no statement: every column known absent
            ["d.png", "p4", "", "", "1"],  # stated normal, findings not listed one by one
        ],
    )
    m = load_manifest(path)
    assert [e.abnormal for e in m.entries] == [0, None, 0, 0]
    assert [e.no_finding for e in m.entries] == [True, False, None, True]
    assert m.entries[3].labels == {"nodule": 0, "cardiomegaly": 0}  # no finding: each absent
    # written back, the statement survives
    rows = [
        ManifestRow(e.image.name, e.patient_id, e.labels, no_finding=e.no_finding)
        for e in m.entries
    ]
    again = load_manifest(write_manifest(tmp_path / "again.csv", rows, list(m.findings)))
    assert [e.abnormal for e in again.entries] == [0, None, 0, 0]
    bad = _write_csv(
        tmp_path / "bad.csv",
        ["image", "patient_id", "nodule", "no_finding", "other_disease"],
        [["a.png", "p1", "1", "1", ""], ["b.png", "p2", "0", "1", "pneumonia"]],
    )
    with pytest.raises(ManifestError) as err:
        load_manifest(bad)
    assert "row 2, column 'no_finding': 1 (no finding) but nodule is 1" in str(err.value)
    assert "row 3, column 'no_finding': 1 (no finding) but other_disease" in str(err.value)


def test_member_class_never_takes_an_unstated_image_as_normal():
    from scxnn_node.model.result import NORMAL, OTHERS
    from training.dataset import ManifestEntry
    from training.member_targets import member_class

    def entry(labels: dict[str, int | None], no_finding: bool | None) -> ManifestEntry:
        return ManifestEntry(2, Path("x.png"), "p", "hard", "train", labels, no_finding=no_finding)

    assert member_class(entry({"nodule": 0, "cardiomegaly": 0}, False), "nodule") is None
    assert member_class(entry({"nodule": 0, "cardiomegaly": 0}, True), "nodule") == NORMAL
    assert member_class(entry({"nodule": 0, "cardiomegaly": None}, True), "nodule") == NORMAL
    assert member_class(entry({"nodule": 0, "cardiomegaly": 1}, False), "nodule") == OTHERS


def test_importers_warn_when_the_patient_is_the_file_stem(tmp_path: Path, caplog):
    mapping = tmp_path / "map.yaml"
    mapping.write_text("classes: {normal: normal, sick: nodule}\n")
    _png(tmp_path / "ds" / "normal" / "x1.png")
    _png(tmp_path / "ds" / "sick" / "x2.png")
    with caplog.at_level(logging.WARNING, logger="training.importers"):
        import_class_folders(tmp_path / "ds", mapping, tmp_path / "m.csv")
    assert "2 image(s) have no patient id" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.importers"):
        import_class_folders(tmp_path / "ds", mapping, tmp_path / "n.csv", patient_regex="x")
    assert "no patient id" not in caplog.text
    src = _write_csv(tmp_path / "s.csv", ["Path", "Nodule"], [["ds/sick/x2.png", "1"]])
    csv_map = tmp_path / "csv.yaml"
    csv_map.write_text("image_column: Path\ncolumns: {Nodule: nodule}\n")
    with caplog.at_level(logging.WARNING, logger="training.importers"):
        import_generic_csv(src, csv_map, tmp_path / "o.csv")
    assert "1 image(s) have no patient id" in caplog.text


def test_manifest_refuses_duplicate_content_naming_both_rows(tmp_path: Path):
    _png(tmp_path / "a.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    _png(tmp_path / "b.png")
    path = _write_csv(
        tmp_path / "m.csv",
        ["image", "patient_id", "nodule"],
        [["a.png", "p1", "1"], ["b.png", "p2", "0"], ["copy.png", "p3", "1"]],
    )
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert "row 4, column 'image': same content as row 2 (copy.png, a.png)" in str(err.value)
    assert len(err.value.problems) == 1


def test_importers_drop_duplicate_content_with_a_warning(tmp_path: Path, caplog):
    mapping = tmp_path / "map.yaml"
    mapping.write_text("classes: {normal: normal, sick: nodule}\n")
    _png(tmp_path / "ds" / "sick" / "p1_a.png")
    (tmp_path / "ds" / "sick" / "p2_a.png").write_bytes(
        (tmp_path / "ds" / "sick" / "p1_a.png").read_bytes()
    )
    _png(tmp_path / "ds" / "normal" / "p3_b.png")
    with caplog.at_level(logging.WARNING, logger="training.importers"):
        out = import_class_folders(
            tmp_path / "ds", mapping, tmp_path / "m.csv", patient_regex=r"^(p\d)"
        )
    assert "p2_a.png has the same content as" in caplog.text and "p1_a.png" in caplog.text
    assert [e.image.name for e in load_manifest(out).entries] == ["p3_b.png", "p1_a.png"]
    # the same content under two labels cannot be resolved by dropping one
    (tmp_path / "ds" / "normal" / "p4_c.png").write_bytes(
        (tmp_path / "ds" / "sick" / "p1_a.png").read_bytes()
    )
    with pytest.raises(DatasetImportError, match=r"same content .* different labels"):
        import_class_folders(tmp_path / "ds", mapping, tmp_path / "n.csv", patient_regex=r"^(p\d)")


def test_study_column_groups_images_and_stays_with_one_patient(tmp_path: Path):
    from training.studies import group_studies

    path = _manifest_of_pngs(
        tmp_path / "m.csv",
        ["image", "patient_id", "study_id", "nodule", "cardiomegaly"],
        [
            ["a.png", "p1", "s1", "0", "0"],
            ["b.png", "p1", "s1", "1", ""],
            ["c.png", "p2", "", "0", "0"],
            ["d.png", "p2", "", "", "0"],
        ],
    )
    m = load_manifest(path)
    studies = group_studies(m.entries)
    assert [s.study_id for s in studies] == ["s1", "row-4", "row-5"]  # default: one per image
    s1 = studies[0]
    assert [e.row for e in s1.entries] == [2, 3]
    assert s1.labels == {"nodule": 1, "cardiomegaly": None} and s1.abnormal == 1
    assert studies[1].abnormal == 0 and studies[2].abnormal is None
    bad = _write_csv(
        tmp_path / "bad.csv",
        ["image", "patient_id", "study_id", "nodule"],
        [["a.png", "p1", "s1", "0"], ["b.png", "p2", "s1", "0"]],
    )
    with pytest.raises(ManifestError, match=r"study 's1' spans patients: p1 \(row 2\), p2"):
        load_manifest(bad)
