"""A throwaway certificate authority for TLS tests: a CA and the server and client
certificates it issues, made with the openssl command line."""

from __future__ import annotations

import subprocess
from pathlib import Path


class Pki:
    """A throwaway CA issuing server and client certificates with openssl."""

    def __init__(self, directory: Path, name: str = "test-ca") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.cert, self.key = directory / f"{name}.crt", directory / f"{name}.key"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", self.key, "-out", self.cert,
        )  # fmt: skip

    def issue(self, common_name: str, alt_names: str = "IP:127.0.0.1") -> tuple[Path, Path]:
        cert = self.directory / f"{common_name}.crt"
        key = self.directory / f"{common_name}.key"
        csr = self.directory / f"{common_name}.csr"
        extensions = self.directory / f"{common_name}.ext"
        extensions.write_text(
            f"subjectAltName={alt_names}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common_name}",
            "-keyout", key, "-out", csr,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
            "-CAcreateserial", "-days", "2", "-extfile", extensions, "-out", cert,
        )  # fmt: skip
        return cert, key


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
