"""A certificate authority and a broker certificate, made with ``openssl`` at test time.

Nothing is kept between runs: each secure test broker gets a fresh CA, so no
test depends on a key that lives in the repository.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from esbridge.errors import HarnessError

#: Days the certificates are valid: a test session is far shorter.
DAYS = "2"


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise HarnessError(
            "the secure Kafka broker needs `openssl` to make its certificates "
            "(apt-get install openssl)"
        )
    result = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise HarnessError(f"openssl {args[0]} failed: {result.stderr[-2000:]}")


def make_ca(directory: Path, name: str = "ca") -> Path:
    """A self-signed CA in ``directory``: ``{name}.pem`` (returned) and ``{name}.key``."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", DAYS,
        "-keyout", f"{name}.key", "-out", f"{name}.pem",
        "-subj", f"/CN=esbridge test {name}",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.pem"


@dataclass(frozen=True)
class BrokerTLS:
    """What a TLS listener on 127.0.0.1 needs: a PKCS#12 keystore and the CA that signed it."""

    ca_file: Path
    keystore: Path
    password: str


def make_broker_tls(directory: Path, password: str) -> BrokerTLS:
    """A CA and a certificate for ``127.0.0.1``/``localhost`` signed by it, as a keystore."""
    ca = make_ca(directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
        "-subj", "/CN=127.0.0.1",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "broker.csr", "-CA", ca.name, "-CAkey", "ca.key",
        "-CAcreateserial", "-days", DAYS, "-extfile", "san.ext", "-out", "broker.pem",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key", "-certfile", ca.name,
        "-name", "broker", "-out", "broker.p12", "-passout", f"pass:{password}",
        cwd=directory,
    )  # fmt: skip
    return BrokerTLS(ca, directory / "broker.p12", password)
