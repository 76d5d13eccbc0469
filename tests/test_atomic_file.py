"""The one atomic-write helper: the target holds the old content or the new, never a torn one."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from scxnn_node.atomic_file import write_atomically, write_bytes_atomically, write_text_atomically


def test_write_replaces_the_content_and_leaves_no_temporary_file(tmp_path: Path):
    target = tmp_path / "sub" / "record.json"  # parents are made
    write_text_atomically(target, "old\n")
    write_bytes_atomically(target, [b"ne", b"w\n"], durable=True)
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]


def test_a_failed_write_keeps_the_old_content_and_removes_its_temporary_file(tmp_path: Path):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_the_temporary_name_keeps_the_suffix_a_codec_is_chosen_by(tmp_path: Path):
    target = tmp_path / "image.png"
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)

    def write_png(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), pixels):  # OpenCV refuses a name without a known suffix
            raise OSError(f"cannot write {tmp}")

    write_atomically(target, write_png)
    assert (cv2.imread(str(target), cv2.IMREAD_GRAYSCALE) == pixels).all()


def test_a_separate_temporary_folder_is_used_and_left_empty(tmp_path: Path):
    staging = tmp_path / "tmp"
    staging.mkdir()
    target = write_bytes_atomically(tmp_path / "a" / "x.dcm", b"DICM", True, staging)
    assert target.read_bytes() == b"DICM"
    assert list(staging.iterdir()) == []
