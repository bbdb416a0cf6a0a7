"""``esbridge dev-servers``: real servers a user can reach, stopped and removed on a signal.

Each test runs the command as a user would (a subprocess), with ``TMPDIR`` set
to a directory of its own so that what the servers leave behind can be seen.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import psycopg

from esbridge.testing.dev_servers import ENV_FILE_HEADER
from esbridge.testing.processes import pid_alive, wait_pid_gone
from esbridge.testing.servers import free_port, port_is_open
from tests.support.dev_servers import produce_and_consume_one, read_env_file
from tests.support.relay_support import ESBRIDGE


def test_servers_answer_and_stop_on_ctrl_c_leaving_nothing(start_dev_servers, tmpdir_for_servers):
    env_file = tmpdir_for_servers / "dev.env"
    servers = start_dev_servers("--env-file", str(env_file))
    servers.wait_for("ready; Ctrl-C to stop")

    env = read_env_file(env_file)
    assert servers.out.read_text() == env_file.read_text().removeprefix(ENV_FILE_HEADER)
    assert env["PERSISTENCE_MODULE"] == "eventsourcing.postgres"
    assert env["POSTGRES_HOST"] == "127.0.0.1"
    assert env["KAFKA_BOOTSTRAP_SERVERS"].startswith("127.0.0.1:")
    with psycopg.connect(
        host=env["POSTGRES_HOST"],
        port=int(env["POSTGRES_PORT"]),
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"],
        dbname=env["POSTGRES_DBNAME"],
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert produce_and_consume_one(env["KAFKA_BOOTSTRAP_SERVERS"]) == b"hello"
    pids = servers.pids()
    assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)

    assert servers.stop(signal.SIGINT) == 0, servers.stderr()
    assert "SIGINT: stopping" in servers.stderr()
    assert all(wait_pid_gone(pid, 5) for pid in pids)
    kafka_port = int(env["KAFKA_BOOTSTRAP_SERVERS"].rpartition(":")[2])
    for port in (int(env["POSTGRES_PORT"]), kafka_port):
        assert not port_is_open("127.0.0.1", port)
    assert list(servers.tmpdir.iterdir()) == []  # the servers' files are gone
    assert not env_file.exists()  # its settings point at nothing any more


def test_fixed_ports_sigterm_and_keep(start_dev_servers):
    postgres_port, kafka_port = free_port(), free_port()
    servers = start_dev_servers(
        "--postgres-port", str(postgres_port), "--kafka-port", str(kafka_port), "--keep"
    )
    servers.wait_for("ready; Ctrl-C to stop")
    out = servers.out.read_text()
    assert f"export POSTGRES_PORT={postgres_port}\n" in out
    assert f"export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{kafka_port}\n" in out
    pids = servers.pids()

    assert servers.stop(signal.SIGTERM) == 0, servers.stderr()
    assert all(wait_pid_gone(pid, 5) for pid in pids)
    assert not port_is_open("127.0.0.1", postgres_port)
    assert not port_is_open("127.0.0.1", kafka_port)
    kept = sorted(p.name.rsplit("-", 1)[0] for p in servers.tmpdir.iterdir())
    assert kept == ["esbridge-kafka", "esbridge-pg"]
    assert "files kept in" in servers.stderr()
    assert list(servers.tmpdir.glob("esbridge-pg-*/postgres.log"))


def processes_using(path: Path) -> list[str]:
    """Command lines of running processes that name ``path`` (the servers name their files)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if entry.name.isdigit() and str(path) in cmdline and pid_alive(int(entry.name)):
            found.append(cmdline)
    return found


def test_ctrl_c_while_starting_stops_and_removes_what_started(start_dev_servers):
    servers = start_dev_servers()
    servers.wait_for("starting PostgreSQL and Kafka")
    # PostgreSQL runs and Kafka is being set up when the user gives up waiting.
    deadline = time.monotonic() + 120
    while not list(servers.tmpdir.glob("esbridge-kafka-*")):
        assert servers.process.poll() is None and time.monotonic() < deadline, servers.stderr()
        time.sleep(0.05)
    started = time.monotonic()
    assert servers.stop(signal.SIGINT) == 130, servers.stderr()
    assert time.monotonic() - started < 30
    assert "interrupted while starting" in servers.stderr()
    assert "ready" not in servers.stderr()
    deadline = time.monotonic() + 5  # a process killed a moment ago may take that long to die
    while processes_using(servers.tmpdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_using(servers.tmpdir) == []
    assert list(servers.tmpdir.iterdir()) == []


def run_refused(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [ESBRIDGE, "dev-servers", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "starting" not in done.stderr  # refused before any server started
    return done


def test_a_port_in_use_is_refused_before_anything_starts():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_refused("--kafka-port", str(port))
    assert f"port {port} on 127.0.0.1 (--kafka-port) is already in use" in done.stderr


def test_an_env_file_it_did_not_write_is_left_alone(tmp_path):
    mine = tmp_path / ".env"
    mine.write_text("SECRET=keep me\n")
    done = run_refused("--env-file", str(mine))
    assert "was not written by esbridge dev-servers" in done.stderr
    assert mine.read_text() == "SECRET=keep me\n"


def test_keep_with_containers_is_refused():
    done = run_refused("--backend", "containers", "--keep")
    assert "--keep keeps the files of local servers" in done.stderr
