"""Shared fixtures: small bundles built with the real writers, and the demo bundle."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from scxnn_node.model.bundle import write_bundle
from scxnn_node.store.db import Database
from training.untrained import untrained_parts

DATA = Path(__file__).resolve().parents[1] / "scxnn_node" / "samples"
SMALL_FINDINGS = ("pneumothorax", "nodule", "cardiomegaly")


def build_random_bundle(out: Path, names=SMALL_FINDINGS, size: int = 64) -> Path:
    """A bundle of untrained small members and an SVM fitted on random logits."""
    manifest, states, stage = untrained_parts("densenet_small", size, names)
    manifest = replace(manifest, name="test-bundle", version="1.2.3", intended_use="tests")
    write_bundle(out, manifest, states, stage)
    return out


@pytest.fixture(scope="session")
def small_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_bundle(tmp_path_factory.mktemp("bundles") / "small")


@pytest.fixture(scope="session")
def demo_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo bundle built by the real CLI at a test-sized scale."""
    from training.cli import main

    out = tmp_path_factory.mktemp("demo") / "bundle"
    code = main(
        [
            "--log-level",
            "WARNING",
            "--no-progress",
            "demo-bundle",
            "--out",
            str(out),
            "--count",
            "60",
            "--epochs",
            "1",
        ]
    )
    assert code == 0
    return out


def _postgres_admin_url() -> str:
    url = os.environ.get("SCXNN_TEST_POSTGRES_URL")
    if not url:
        pytest.fail(
            "SCXNN_TEST_POSTGRES_URL is not set: run the tests with `make test` (it starts a "
            "throwaway PostgreSQL with scripts/postgres.sh) or point it at a server"
        )
    return url


@contextmanager
def _fresh_postgres_database() -> Iterator[str]:
    import psycopg

    admin = _postgres_admin_url()
    name = f"scxnn_test_{uuid.uuid4().hex[:12]}"
    plain = admin.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield admin.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each supported kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.db'}"
        return
    with _fresh_postgres_database() as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database: what several nodes on several hosts share."""
    with _fresh_postgres_database() as url:
        yield url


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """An empty node database of each supported kind (a test file may define its own)."""
    database = Database(database_url)
    database.create_schema()
    yield database
    database.dispose()


class SmallFilesystem:
    """Real file systems (tmpfs) of a chosen size under a test's directory, to fill: a disk
    that fills, with the kernel's own ENOSPC."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: list[Path] = []

    def mount(self, size_bytes: int, name: str = "fs") -> Path:
        point = self.root / name
        point.mkdir()
        run = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if run.returncode:
            pytest.skip(f"cannot mount a tmpfs ({run.stderr.strip()}): full-disk tests need root")
        self.mounted.append(point)
        return point

    @staticmethod
    def resize(point: Path, size_bytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(point)], check=True)

    @staticmethod
    def fill(point: Path) -> Path:
        """Write zeros until the kernel says the file system is full."""
        filler = point / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            block = bytes(1 << 16)
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    if len(block) == 1:
                        return filler
                    block = block[: len(block) // 2]
        finally:
            os.close(fd)

    def unmount_all(self) -> None:
        for point in self.mounted:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[SmallFilesystem]:
    filesystems = SmallFilesystem(tmp_path)
    yield filesystems
    filesystems.unmount_all()
