"""pynetdicom standing in for dcmtk's storescp and storescu where dcmtk is not installed (the lent
GPU machine has none): the same calls as scxnn_node.testing.dcmtk, each peer a process of its own
as dcmtk's are, so that the node's process carries neither the sender's work nor the PACS's.
The tests keep using dcmtk; benchmarks choose with `pick`.

    python -m scxnn_node.testing.pynetdicom_peers PORT CALLING_AE CALLED_AE FILE...   # storescu
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from scxnn_node.testing import dcmtk

# The directory above the package, for the sender's interpreter where the node is not installed.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


class Storescp(dcmtk.Storescp):
    """pynetdicom's storescp app as the PACS: any storage class in any transfer syntax. It names
    files `<prefix>.<SOP Instance UID>` from a table that lacks some SR classes (a Comprehensive
    3D SR arrives as `UN.*`), so tell an SR by its Modality, not by its file name."""

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "pynetdicom", "storescp", "-q",
            "-aet", self.aet, "-od", str(self.directory), str(self.port),
        ]


def storescu(
    port: int, *files: Path, aet: str = "PACS", aec: str = "SCXNN"
) -> subprocess.CompletedProcess:
    """C-STORE `files` over one association from a process of its own (testing.peers.store_files:
    each file's bytes as they are, in its own transfer syntax). Exit status 1 unless every file
    was acknowledged; the others are listed on stderr."""
    path = os.pathsep.join(filter(None, [_PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", __name__, str(port), aet, aec, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": path},
    )


Storescu = Callable[..., subprocess.CompletedProcess]


def pick(kind: str = "auto") -> tuple[type[dcmtk.Storescp], Storescu, str]:
    """(Storescp, storescu, name) of dcmtk, or of pynetdicom; 'auto' takes dcmtk where both its
    tools are on PATH."""
    if kind == "auto":
        try:
            dcmtk.dcmtk_tool("storescp"), dcmtk.dcmtk_tool("storescu")
            kind = "dcmtk"
        except FileNotFoundError:
            kind = "pynetdicom"
    if kind == "dcmtk":
        return dcmtk.Storescp, dcmtk.storescu, "dcmtk"
    if kind == "pynetdicom":
        return Storescp, storescu, "pynetdicom"
    raise ValueError(f"unknown DICOM peers {kind!r}: auto, dcmtk or pynetdicom")


def main(argv: list[str]) -> int:
    from scxnn_node.testing.peers import store_files

    port, aet, aec, *files = argv
    sent = store_files(int(port), [Path(f) for f in files], aet=aet, aec=aec)
    failed = [f"{s.label}: status {s.status}" for s in sent if not s.acknowledged]
    print("\n".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
