"""Make docs/status-page.png, the README's picture of the status page: a node on loopback with
the given bundle receives the sample chest studies, delivers to a stand-in PACS (and to an
archive that is down, so the page shows dead deliveries with their retry buttons), and headless
chromium photographs the page.

    .venv/bin/python scripts/status_page_screenshot.py --bundle var/bundles/demo
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

from scxnn_node.testing.http_flow import chromium, node_after_flow

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "scxnn_node" / "samples"
TOKEN_ENV = "SCXNN_SCREENSHOT_RETRY_TOKEN"
MAX_BYTES = 200_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "var" / "bundles" / "demo")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "status-page.png")
    parser.add_argument("--size", default="1100,1400", help="browser window WIDTH,HEIGHT")
    args = parser.parse_args(argv)
    files = [SAMPLES / "nih_dx_no_finding.dcm", SAMPLES / "siim_cr_negative.dcm"]
    os.environ[TOKEN_ENV] = "screenshot"  # only so that the page shows its retry buttons
    with (
        tempfile.TemporaryDirectory(prefix="scxnn-shot-") as tmp,
        node_after_flow(
            Path(tmp),
            args.bundle,
            files,
            2,
            retry_token_env=TOKEN_ENV,
            storage={"min_free_bytes": 1 << 30},  # the default watermark
        ) as flow,
    ):
        shot = Path(tmp) / "page.png"
        run = chromium(flow.url + "/", f"--screenshot={shot}", f"--window-size={args.size}")
        if run.returncode != 0 or not shot.is_file():
            print(run.stderr[-2000:], file=sys.stderr)
            return 1
        png = _small_png(shot.read_bytes())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    print(f"{args.out}: {len(png)} bytes")
    return 0 if len(png) <= MAX_BYTES else 1


def _small_png(data: bytes) -> bytes:
    """The screenshot in a 64-colour palette: the page is flat colours and text."""
    with Image.open(io.BytesIO(data)) as image:
        palette = image.convert("RGB").quantize(colors=64)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
