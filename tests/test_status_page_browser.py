"""The status page in a real browser: headless Debian chromium loads it from a running node
after a real flow, and what it renders has every section and no patient data."""

from __future__ import annotations

import os
import uuid

import pydicom
from conftest import DATA
from PIL import Image

from scxnn_node.logs import short_hash
from scxnn_node.testing.http_flow import chromium, node_after_flow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("Queue", "Workers", "Last studies", "Deliveries not sent", "Drift", "Disk")


def test_status_page_in_headless_chromium(tmp_path, small_bundle_dir):
    sample = DATA / "siim_cr_negative.dcm"
    source = pydicom.dcmread(sample, stop_before_pixels=True)
    token_env = f"SCXNN_TEST_RETRY_TOKEN_{uuid.uuid4().hex[:8]}"
    os.environ[token_env] = "browser-token"
    try:
        with node_after_flow(
            tmp_path, small_bundle_dir, [sample], 1, retry_token_env=token_env
        ) as flow:
            dom = chromium(flow.url + "/", "--dump-dom")
            shot = tmp_path / "status.png"
            picture = chromium(flow.url + "/", f"--screenshot={shot}", "--window-size=1100,1300")
    finally:
        del os.environ[token_env]
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "<title>scxnn-node status</title>" in page
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page
    assert short_hash(source.StudyInstanceUID) in page
    assert page.count('<form method="post" action="/deliveries/') == 2  # SR and summary, dead
    for identifier in (
        source.StudyInstanceUID,
        source.SOPInstanceUID,
        source.SeriesInstanceUID,
        str(source.PatientName),
        str(source.PatientID),
    ):
        assert identifier not in page
    assert picture.returncode == 0, picture.stderr[-2000:]
    assert shot.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(shot) as image:
        assert image.size == (1100, 1300)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    # A page with text and tables: many colours (anti-aliased glyphs), not one blank fill.
    assert colours is None or len(colours) > 50
