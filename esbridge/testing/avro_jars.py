"""Apache Avro's Java jars, for the test that reads an analytics topic from Java.

The analytics pipelines page (docs/analytics-pipelines.md) shows a topic in
the Schema Registry wire format read by a program that is not Python:
``examples/analytics_reader/AnalyticsReader.java``, run with the machine's
Java 17 as a single source file. It needs Kafka's Java client, which the
harness's Kafka jars already hold (with jackson and slf4j), and Apache Avro
(``org.apache.avro:avro``), which this module fetches with ``mvn`` from Maven
Central into ``ESBRIDGE_CACHE_DIR`` once (``make provision`` does it), without
the jackson and slf4j jars that Kafka's directory provides: one version of
each on the classpath.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from esbridge.errors import HarnessError
from esbridge.testing.kafka_dist import cache_dir, kafka_libs

AVRO_VERSION = "1.12.0"

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>esbridge.harness</groupId><artifactId>avro-jars</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.avro</groupId><artifactId>avro</artifactId>
      <version>{avro}</version>
      <exclusions>
        <exclusion><groupId>com.fasterxml.jackson.core</groupId><artifactId>*</artifactId></exclusion>
        <exclusion><groupId>org.slf4j</groupId><artifactId>*</artifactId></exclusion>
      </exclusions>
    </dependency>
  </dependencies>
</project>
"""


def avro_libs(version: str = AVRO_VERSION) -> Path:
    """The directory of Avro's jars (and its dependencies but jackson and slf4j)."""
    libs = cache_dir() / f"avro-{version}" / "libs"
    if (libs / ".complete").exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise HarnessError(
            f"esbridge test harness: no Apache Avro {version} jars in {libs.parent} and no "
            "`mvn` to fetch them from Maven Central: install Maven (apt-get install maven) "
            "and run `make provision`"
        )
    libs.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="esbridge-avro-") as work:
        pom = Path(work) / "pom.xml"
        pom.write_text(POM.format(avro=version))
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
        if result.returncode != 0 or not (staging / f"avro-{version}.jar").exists():
            raise HarnessError(
                f"esbridge test harness: `mvn` could not fetch org.apache.avro:avro:{version}:\n"
                f"{(result.stdout + result.stderr)[-3000:]}"
            )
        if libs.exists():
            shutil.rmtree(libs)
        shutil.move(str(staging), str(libs))
    (libs / ".complete").write_text(version)
    return libs


def avro_reader_classpath() -> str:
    """Avro's jars, then Kafka's (kafka-clients, jackson, slf4j, compression codecs)."""
    libs, _version = kafka_libs()
    return f"{avro_libs()}/*:{libs}/*"
