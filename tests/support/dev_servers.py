"""Running ``esbridge dev-servers`` as a user would, for the tests of that command.

The fixtures are made available by the conftest of each test directory that uses them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from esbridge.testing.dev_servers import ENV_FILE_HEADER
from tests.support.relay_support import ESBRIDGE


@pytest.fixture
def tmpdir_for_servers() -> Iterator[Path]:
    """The servers' ``TMPDIR``: outside pytest's private tmp, which a server run as another
    user (the harness runs PostgreSQL as ``postgres`` when the tests run as root) cannot enter."""
    path = Path(tempfile.mkdtemp(prefix="esbridge-devtest-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class DevServers:
    """``esbridge dev-servers`` running in a subprocess, its output in files."""

    def __init__(self, tmpdir: Path, *args: str) -> None:
        self.out = tmpdir / "stdout"  # written by this test, not by the servers
        self.err = tmpdir / "stderr"
        self.tmpdir = tmpdir / "servers"
        self.tmpdir.mkdir(mode=0o755)
        self.tmpdir.chmod(0o755)
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                [ESBRIDGE, "dev-servers", *args],
                stdout=out,
                stderr=err,
                env=os.environ | {"TMPDIR": str(self.tmpdir)},
            )

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr():
            exited = self.process.poll()
            assert exited is None, f"exited {exited}:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.stderr()}"
            time.sleep(0.1)

    def stop(self, sig: int, timeout: float = 90) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r", pid (\d+),", self.stderr())]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture
def start_dev_servers(tmpdir_for_servers: Path) -> Iterator[Callable[..., DevServers]]:
    """Factory: ``start_dev_servers(*args)`` runs ``esbridge dev-servers *args``; killed after."""
    started: list[DevServers] = []

    def factory(*args: str) -> DevServers:
        started.append(DevServers(tmpdir_for_servers, *args))
        return started[-1]

    yield factory
    for servers in started:  # a failed test: the servers die with it (parent-death signal)
        servers.kill()


def read_env_file(path: Path) -> dict[str, str]:
    """``export NAME=value`` lines, as a shell that sources the file would see them."""
    text = path.read_text()
    assert text.startswith(ENV_FILE_HEADER)
    return dict(
        re.fullmatch(r"export (\w+)=(\S+)", line).groups()  # type: ignore[union-attr]
        for line in text.splitlines()[1:]
    )


def produce_and_consume_one(bootstrap: str) -> bytes:
    topic = f"devtest-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, b"hello")
    assert producer.flush(30) == 0
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": topic, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                return bytes(msg.value())
    finally:
        consumer.close()
    raise AssertionError(f"nothing consumed from {topic}")
