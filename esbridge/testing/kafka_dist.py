"""Where the Apache Kafka jars come from: ``KAFKA_HOME``, or Maven Central via ``mvn``.

The jars are fetched once into a cache directory that survives between runs
(``ESBRIDGE_CACHE_DIR``, default ``~/.cache/esbridge``), so only the first run
on a machine downloads them (about 45 MB).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from esbridge.errors import HarnessError

DEFAULT_KAFKA_VERSION = "4.1.1"
SLF4J_VERSION = "2.0.17"
LOG4J_VERSION = "2.24.3"

MISSING_KAFKA = """\
esbridge test harness: cannot run an Apache Kafka broker: {reason}
Provide Kafka in one of three ways:
  1. Java 17+ (apt-get install openjdk-17-jre-headless) and either Maven (`mvn`, which fetches
     org.apache.kafka:kafka_2.13 from Maven Central into {cache}) or an unpacked Apache Kafka
     4.x distribution named by KAFKA_HOME;
  2. run a Docker engine (or podman's Docker API): the testcontainers backend is then used;
  3. name an existing broker: ESBRIDGE_KAFKA_BOOTSTRAP=host:port (transactions enabled).
"""

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>esbridge.harness</groupId><artifactId>kafka-jars</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId>
      <version>{slf4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId>
      <version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version></dependency>
  </dependencies>
</project>
"""


def cache_dir() -> Path:
    return Path(os.environ.get("ESBRIDGE_CACHE_DIR", Path.home() / ".cache" / "esbridge"))


def kafka_version() -> str:
    return os.environ.get("ESBRIDGE_KAFKA_VERSION", DEFAULT_KAFKA_VERSION)


def java_executable() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise HarnessError(
            MISSING_KAFKA.format(reason="no `java` on PATH (and no JAVA_HOME)", cache=cache_dir())
        )
    return java


def kafka_libs() -> tuple[Path, str]:
    """The directory of Kafka's jars and the Kafka version, fetching them if needed."""
    home = os.environ.get("KAFKA_HOME")
    if home:
        libs = Path(home) / "libs"
        jars = sorted(libs.glob("kafka_2.13-*.jar"))
        if not jars:
            raise HarnessError(
                MISSING_KAFKA.format(
                    reason=f"KAFKA_HOME={home} has no libs/kafka_2.13-*.jar", cache=cache_dir()
                )
            )
        version = jars[0].name.removeprefix("kafka_2.13-").removesuffix(".jar")
        return libs, version
    version = kafka_version()
    libs = cache_dir() / f"kafka-{version}" / "libs"
    if (libs / f"kafka_2.13-{version}.jar").exists() and (libs / ".complete").exists():
        return libs, version
    fetch_with_maven(version, libs)
    return libs, version


def fetch_with_maven(version: str, libs: Path) -> None:
    """Fetch ``org.apache.kafka:kafka_2.13:version`` and its runtime dependencies."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise HarnessError(
            MISSING_KAFKA.format(
                reason="no Kafka jars in the cache, no KAFKA_HOME, and no `mvn` to fetch them",
                cache=cache_dir(),
            )
        )
    libs.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="esbridge-mvn-") as work:
        pom = Path(work) / "pom.xml"
        pom.write_text(POM.format(kafka=version, slf4j=SLF4J_VERSION, log4j=LOG4J_VERSION))
        staging = Path(work) / "libs"
        result = subprocess.run(
            [
                mvn, "-q", "-B", "-f", str(pom),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
            ],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if result.returncode != 0:
            raise HarnessError(
                MISSING_KAFKA.format(
                    reason=f"`mvn` could not fetch Kafka {version}:\n"
                    f"{(result.stdout + result.stderr)[-3000:]}",
                    cache=cache_dir(),
                )
            )
        # slf4j 1.x comes in transitively; the 2.x API pinned above must win.
        for old in staging.glob("slf4j-api-1.*.jar"):
            old.unlink()
        if libs.exists():
            shutil.rmtree(libs)
        shutil.move(str(staging), str(libs))
    (libs / ".complete").write_text(version)
