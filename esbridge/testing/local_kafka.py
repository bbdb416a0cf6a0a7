"""A real Apache Kafka broker (KRaft, single node) run from its jars with the machine's Java."""

from __future__ import annotations

import base64
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from esbridge.errors import HarnessError
from esbridge.testing.kafka_dist import java_executable, kafka_libs
from esbridge.testing.processes import (
    die_with_parent,
    run_tool,
    spawning,
    tail,
    wait_pid_gone,
)
from esbridge.testing.servers import KafkaBroker, free_port, wait_for_port

SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={log_dir}
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions={internal_partitions}
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions={internal_partitions}
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.consumer.min.session.timeout.ms=1000
group.min.session.timeout.ms=1000
log.retention.hours=-1
log.segment.bytes=67108864
"""


def random_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding.

    Like Kafka's own ``Uuid.randomUuid()``, never one that starts with ``-``: the
    storage tool would read it as an option (``-t -x...``) and refuse to format
    (one draw in 64).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class LocalKafkaBroker(KafkaBroker):
    """A single-node KRaft broker and controller listening on 127.0.0.1 only.

    Ports are chosen once, so a restart keeps the address and the data
    (``log.dirs`` lives in a temporary directory removed by :meth:`close`).
    ``properties``: broker settings that replace the harness's (for a test that
    needs a broker configured otherwise, e.g. one that cannot do transactions).
    ``storage_args``: more arguments of ``kafka-storage format`` (for example
    ``--add-scram``, the only way to give a KRaft broker its first SASL user).
    ``ports``: the client and controller ports, when ``properties`` name them.
    ``cluster_id``: the id of a cluster this node is one of (its storage is
    formatted for the static quorum ``controller.quorum.voters`` of
    ``properties`` names); ``None``: a cluster of its own (a standalone quorum).
    """

    backend = "local"

    def __init__(
        self,
        heap: str = "768m",
        internal_partitions: int = 4,
        properties: Mapping[str, str] | None = None,
        storage_args: Sequence[str] = (),
        ports: tuple[int, int] | None = None,
        cluster_id: str | None = None,
    ) -> None:
        self.java = java_executable()
        self.libs, self.version = kafka_libs()
        self.port, self.controller_port = ports or (free_port(), free_port())
        self.bootstrap_servers = f"127.0.0.1:{self.port}"
        self.base = Path(tempfile.mkdtemp(prefix="esbridge-kafka-"))
        self.config_file = self.base / "server.properties"
        self.logfile = self.base / "kafka.log"
        self.heap = heap
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0
        try:
            self.config_file.write_text(
                SERVER_PROPERTIES.format(
                    port=self.port,
                    controller_port=self.controller_port,
                    log_dir=self.base / "data",
                    internal_partitions=internal_partitions,
                )
                + "".join(f"{name}={value}\n" for name, value in (properties or {}).items())
            )
            shutil.copy(Path(__file__).with_name("log4j2.xml"), self.base / "log4j2.xml")
            self._format_storage(storage_args, cluster_id)
        except BaseException:  # failed or interrupted (Ctrl-C): leave no directory behind
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    def _java(self, *args: str) -> list[str]:
        return [
            self.java,
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",
            "-Xshare:auto",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.base / 'log4j2.xml'}",
            "-Dkafka.logs.dir=" + str(self.base),
            "-cp",
            f"{self.libs}/*",
            *args,
        ]

    def _format_storage(self, extra: Sequence[str], cluster_id: str | None) -> None:
        if cluster_id is not None:  # one node of a static quorum: no --standalone
            result = run_tool(
                self._java(
                    "kafka.tools.StorageTool", "format",
                    "-t", cluster_id, "-c", str(self.config_file), *extra,
                ),
                timeout=120,
            )  # fmt: skip
            self._check_format(result)
            return
        result = run_tool(
            self._java(
                "kafka.tools.StorageTool", "format",
                "-t", random_cluster_id(),
                "-c", str(self.config_file),
                "--standalone",
                *extra,
            ),
            timeout=120,
        )  # fmt: skip
        if result.returncode != 0 and "--standalone" in result.stderr:
            result = run_tool(
                self._java(
                    "kafka.tools.StorageTool", "format",
                    "-t", random_cluster_id(), "-c", str(self.config_file), *extra,
                ),
                timeout=120,
            )  # fmt: skip
        self._check_format(result)

    @staticmethod
    def _check_format(result: subprocess.CompletedProcess[str]) -> None:
        if result.returncode != 0:
            raise HarnessError(
                f"formatting Kafka storage failed:\n{result.stdout}\n{result.stderr[-3000:]}"
            )

    def start(self, timeout: float = 60.0) -> None:
        if self.running:
            return
        t0 = time.monotonic()
        self.spawn()
        self.wait_started(t0 + timeout)
        self.startup_seconds = time.monotonic() - t0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> None:
        """Start the JVM without waiting for it (the nodes of a cluster start together)."""
        if self.running:
            return
        with self.logfile.open("ab") as log, spawning():
            self.process = subprocess.Popen(
                self._java("kafka.Kafka", str(self.config_file)),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                cwd=self.base,
            )

    def wait_started(self, deadline: float) -> None:
        """Wait until the spawned JVM serves metadata (by ``deadline``, monotonic), or fail.

        A KRaft broker opens its client listener only once it caught up with
        the metadata log, so a node of a cluster answers only once a quorum
        of its controllers runs.
        """
        timeout = max(1.0, deadline - time.monotonic())
        if not wait_for_port("127.0.0.1", self.port, timeout):
            self._fail(f"did not listen on 127.0.0.1:{self.port} within {timeout:.0f} s")
        try:
            self.wait_ready(max(1.0, deadline - time.monotonic()))
        except HarnessError as e:
            self._fail(str(e))

    def _fail(self, why: str) -> None:
        exited = self.process.poll() if self.process else None
        self.stop(kill=True)
        state = f" (the JVM exited with code {exited})" if exited is not None else ""
        raise HarnessError(
            f"Apache Kafka {self.version} (local) {why}{state}\n"
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
                proc.wait(timeout=10 if kill else 60)
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
