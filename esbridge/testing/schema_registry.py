"""A real Schema Registry for the tests: Apicurio Registry, from Maven Central, on 127.0.0.1.

The analytics serializers (:mod:`esbridge_connectors.registry`) speak the
Confluent Schema Registry API; their tests need a real implementation of it,
not a fake. Apicurio Registry serves that API under ``/apis/ccompat/v7`` and
is published on Maven Central as a runnable Quarkus application
(``io.apicurio:apicurio-registry-app:<version>:tar.gz:all``, about 110 MB),
so ``mvn`` fetches it like the Kafka jars and the machine's Java 17 runs it
(``-jar apicurio-registry-app-<version>-runner.jar``). It keeps its schemas
in an in-memory H2 database: every start is a fresh, empty registry.

Fetched once into ``ESBRIDGE_CACHE_DIR`` (``make provision`` does it); started
by the ``schema_registry`` fixture on a free port (start-up about 8 s),
stopped by its PID. ``ESBRIDGE_SCHEMA_REGISTRY_URL`` names an existing
registry instead (the fixture then cannot stop or restart it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from esbridge.errors import HarnessError
from esbridge.testing.kafka_dist import cache_dir, java_executable
from esbridge.testing.processes import die_with_parent, spawning, tail, wait_pid_gone
from esbridge.testing.servers import free_port

#: 3.0.9 is the newest release built for Java 17 (3.1 and later need Java 21).
APICURIO_VERSION = "3.0.9"
CCOMPAT_PATH = "/apis/ccompat/v7"

MISSING_REGISTRY = """\
esbridge test harness: cannot run a Schema Registry: {reason}
Provide one in one of two ways:
  1. Java 17+ and Maven (`mvn`), which fetches io.apicurio:apicurio-registry-app:{version}
     (tar.gz, classifier all) from Maven Central into {cache} (`make provision` does it);
  2. name a running registry with the Confluent API: ESBRIDGE_SCHEMA_REGISTRY_URL=http://host:port
"""


def apicurio_home(version: str = APICURIO_VERSION) -> Path:
    """The unpacked Apicurio Registry, fetched with ``mvn`` on first use."""
    home = cache_dir() / f"apicurio-registry-{version}"
    if (home / ".complete").exists():
        return home
    mvn = shutil.which("mvn")
    if mvn is None:
        raise HarnessError(
            MISSING_REGISTRY.format(
                reason="it is not in the cache and there is no `mvn` to fetch it",
                version=version,
                cache=cache_dir(),
            )
        )
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="esbridge-apicurio-") as work:
        result = subprocess.run(
            [
                mvn, "-q", "-B", "dependency:copy",
                f"-Dartifact=io.apicurio:apicurio-registry-app:{version}:tar.gz:all",
                f"-DoutputDirectory={work}",
            ],
            capture_output=True, text=True, timeout=900, cwd=work,
        )  # fmt: skip
        archives = list(Path(work).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise HarnessError(
                MISSING_REGISTRY.format(
                    reason=f"`mvn` could not fetch Apicurio Registry {version}:\n"
                    f"{(result.stdout + result.stderr)[-3000:]}",
                    version=version,
                    cache=cache_dir(),
                )
            )
        staging = Path(work) / "unpacked"
        with tarfile.open(archives[0]) as archive:
            archive.extractall(staging, filter="data")
        if home.exists():
            shutil.rmtree(home)
        shutil.move(str(staging), str(home))
    (home / ".complete").write_text(version)
    return home


class SchemaRegistryServer:
    """One Apicurio Registry process; :attr:`url` is its Confluent-compatible API.

    ``stop()``/``start()`` let a test take the registry away and bring it back
    (its schemas are lost: storage is in memory).
    """

    def __init__(self, version: str = APICURIO_VERSION) -> None:
        self.version = version
        self.home = apicurio_home(version)
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="esbridge-registry-"))
        self.logfile = self.base / "registry.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"
        self.can_control = True
        self.startup_seconds = 0.0

    def describe(self) -> str:
        return f"Apicurio Registry {self.version} (local) at {self.url}"

    def start(self, timeout: float = 150.0) -> None:
        """Start the JVM; ready once the API answers (about 8 s idle, over a minute when loaded)."""
        if self.process is not None and self.process.poll() is None:
            return
        t0 = time.monotonic()
        runner = next(self.home.glob("*-runner.jar"), None)
        if runner is None:
            raise HarnessError(f"no *-runner.jar in {self.home}: delete it to fetch it again")
        cmd = [
            java_executable(),
            "-Xmx384m",
            "-XX:TieredStopAtLevel=1",  # start-up matters more than peak speed here
            "-XX:+UseSerialGC",
            "-Dquarkus.http.host=127.0.0.1",
            f"-Dquarkus.http.port={self.port}",
            "-Dquarkus.log.level=WARN",
            "-Dquarkus.http.access-log.enabled=false",
            "-jar",
            str(runner),
        ]
        with self.logfile.open("ab") as log, spawning():
            self.process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                cwd=self.base,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail("exited during start-up")
            if self._answers():
                self.startup_seconds = time.monotonic() - t0
                return
            time.sleep(0.25)
        self._fail(f"did not answer at {self.url} within {timeout:.0f} s")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/subjects", timeout=2) as response:
                return response.status == 200 and isinstance(json.load(response), list)
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def _fail(self, why: str) -> None:
        exited = self.process.poll() if self.process else None
        self.stop(kill=True)
        state = f" (the JVM exited with code {exited})" if exited is not None else ""
        raise HarnessError(
            f"Apicurio Registry {self.version} (local) {why}{state}\n"
            f"--- tail of {self.logfile} ---\n{tail(self.logfile)}"
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self, kill: bool = False) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=10 if kill else 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        wait_pid_gone(proc.pid, 5)
        self.process = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


class ExternalSchemaRegistry:
    """A registry named by ``ESBRIDGE_SCHEMA_REGISTRY_URL``: used as it is, never stopped."""

    can_control = False

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def describe(self) -> str:
        return f"external Schema Registry at {self.url}"

    def start(self, timeout: float = 90.0) -> None:
        raise HarnessError("an external Schema Registry cannot be started by the harness")

    def stop(self, kill: bool = False) -> None:
        raise HarnessError("an external Schema Registry cannot be stopped by the harness")

    def close(self) -> None:
        pass


def make_schema_registry() -> SchemaRegistryServer | ExternalSchemaRegistry:
    """The registry of ``ESBRIDGE_SCHEMA_REGISTRY_URL``, else a local Apicurio Registry."""
    url = os.environ.get("ESBRIDGE_SCHEMA_REGISTRY_URL")
    if url:
        return ExternalSchemaRegistry(url)
    server = SchemaRegistryServer()
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server
