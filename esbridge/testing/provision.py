"""Provision what the test harness and the demo need: ``python -m esbridge.testing.provision``.

Installs missing system packages when it may (running as root with apt-get:
Java 17, Maven, the PostgreSQL server, tmux for the test of ``esbridge status
--watch`` in a real terminal), then fetches the Apache Kafka jars, Apache Avro's Java
jars and Apicurio Registry (a Schema Registry) into the cache. Prints what it found; exits
non-zero with one clear message when something cannot be provided.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from esbridge.errors import HarnessError
from esbridge.testing.avro_jars import AVRO_VERSION, avro_libs
from esbridge.testing.kafka_dist import cache_dir, java_executable, kafka_libs
from esbridge.testing.local_postgres import find_pg_bin
from esbridge.testing.schema_registry import APICURIO_VERSION, apicurio_home

_apt_updated = False


def may_install() -> bool:
    return (
        os.geteuid() == 0
        and shutil.which("apt-get") is not None
        and os.environ.get("ESBRIDGE_NO_APT", "") != "1"
    )


def apt_install(*packages: str) -> None:
    global _apt_updated
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        _apt_updated = True
    print(f"provision: apt-get install {' '.join(packages)}", flush=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def ensure_postgres() -> None:
    if find_pg_bin() is None and may_install():
        apt_install("postgresql")
    pg_bin = find_pg_bin()
    print(f"provision: PostgreSQL server binaries: {pg_bin or 'MISSING'}", flush=True)


def ensure_kafka() -> None:
    if not os.environ.get("KAFKA_HOME"):
        if shutil.which("java") is None and may_install():
            apt_install("openjdk-17-jre-headless")
        if shutil.which("mvn") is None and may_install():
            apt_install("maven")
    java_executable()
    libs, version = kafka_libs()
    print(f"provision: Apache Kafka {version} jars: {libs}", flush=True)


def ensure_schema_registry() -> None:
    """Apicurio Registry (Maven Central), for the analytics serializers' tests."""
    home = apicurio_home(APICURIO_VERSION)
    print(f"provision: Apicurio Registry {APICURIO_VERSION}: {home}", flush=True)


def ensure_avro() -> None:
    """Apache Avro's Java jars, for the Java reader of docs/analytics-pipelines.md."""
    print(f"provision: Apache Avro {AVRO_VERSION} jars: {avro_libs()}", flush=True)


def ensure_podman() -> None:
    """podman + runc, for the testcontainers pass of ``make test`` where no Docker engine runs."""
    missing = [p for p in ("podman", "runc") if shutil.which(p) is None]
    if missing and may_install():
        apt_install(*missing)
    print(f"provision: podman: {shutil.which('podman') or 'MISSING'}", flush=True)


def ensure_tmux() -> None:
    """tmux: a real terminal for the test of ``esbridge status --watch``."""
    if shutil.which("tmux") is None and may_install():
        apt_install("tmux")
    print(f"provision: tmux: {shutil.which('tmux') or 'MISSING'}", flush=True)


def main() -> int:
    try:
        if not os.environ.get("ESBRIDGE_POSTGRES_DSN"):
            ensure_postgres()
        if not os.environ.get("ESBRIDGE_KAFKA_BOOTSTRAP"):
            ensure_kafka()
            ensure_avro()
        if not os.environ.get("ESBRIDGE_SCHEMA_REGISTRY_URL"):
            ensure_schema_registry()
        ensure_podman()
        ensure_tmux()
    except HarnessError as e:
        print(str(e), file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"provision: {e}", file=sys.stderr)
        return 2
    print(f"provision: cache directory {cache_dir()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
