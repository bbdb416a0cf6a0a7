"""``esbridge dev-servers --backend containers``: the same servers, in containers."""

from __future__ import annotations

import signal

import psycopg

from esbridge.testing.servers import port_is_open
from tests.support.dev_servers import produce_and_consume_one


def test_containers_answer_and_are_removed_on_ctrl_c(start_dev_servers):
    servers = start_dev_servers("--backend", "containers")
    servers.wait_for("ready; Ctrl-C to stop", timeout=300)
    env = dict(
        line.removeprefix("export ").split("=", 1) for line in servers.out.read_text().splitlines()
    )
    dsn = " ".join(
        f"{key}={env[f'POSTGRES_{key.upper()}']}"
        for key in ("host", "port", "user", "password", "dbname")
    )
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("esbridge",)
    assert produce_and_consume_one(env["KAFKA_BOOTSTRAP_SERVERS"]) == b"hello"

    assert servers.stop(signal.SIGINT) == 0, servers.stderr()
    assert not port_is_open("127.0.0.1", int(env["POSTGRES_PORT"]))
    assert not port_is_open("127.0.0.1", int(env["KAFKA_BOOTSTRAP_SERVERS"].rpartition(":")[2]))
