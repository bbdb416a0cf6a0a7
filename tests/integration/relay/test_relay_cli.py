"""The ``esbridge relay`` command: configuration errors, metrics, graceful stop."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request

from esbridge.testing.servers import free_port
from tests.support.relay_support import (
    ESBRIDGE,
    ROOT,
    db_ids,
    ledger,
    read_all,
    subprocess_env,
    write_events,
)


def test_wrong_configuration_exits_2_with_a_clear_message(postgres_db, kafka_broker, create_topic):
    ledger(postgres_db.env)
    topic = create_topic(partitions=3)
    env = subprocess_env(postgres_db, kafka_broker)
    cases = [
        (["NoSuchApp", "--topic", topic], "nosuchapp_events"),
        (["no.such.module:App", "--topic", topic], "cannot import application"),
        (["Ledger", "--topic", topic, "--partitions", "4"], "has 3 partitions"),
        (["Ledger", "--topic", topic, "--set", "pagesize=3"], "expected NAME=VALUE"),
        # A missing topic is created only when allowed, however that is said.
        (
            ["Ledger", "--topic", f"{topic}-x", "--partitions", "3", "--no-create-topics"],
            "does not exist",
        ),
        (
            ["Ledger", "--topic", f"{topic}-x", "--partitions", "3", "--set", "create_topics=no"],
            "does not exist",
        ),
    ]
    for args, message in cases:
        done = subprocess.run(
            [ESBRIDGE, "relay", *args], env=env, cwd=ROOT, capture_output=True, timeout=120
        )
        assert done.returncode == 2, done.stderr.decode()[-2000:]
        assert message in done.stderr.decode(), done.stderr.decode()[-2000:]
    env.pop("KAFKA_BOOTSTRAP_SERVERS")
    done = subprocess.run(
        [ESBRIDGE, "relay", "Ledger"], env=env, cwd=ROOT, capture_output=True, timeout=60
    )
    assert done.returncode == 2 and b"KAFKA_BOOTSTRAP_SERVERS" in done.stderr
    # No broker where it is said to be: --connect-timeout bounds the wait (default: for ever).
    env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run(
        [ESBRIDGE, "relay", "Ledger", "--connect-timeout", "3"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr.decode()[-2000:]
    assert b"no Kafka broker answered" in done.stderr
    assert time.monotonic() - started < 30


def test_serves_metrics_and_stops_on_sigint(postgres_db, kafka_broker, create_topic, tmp_path):
    app = ledger(postgres_db.env)
    write_events(app, 500)
    topic = create_topic(partitions=2)
    port = free_port()
    config = tmp_path / "client.properties"
    config.write_text(
        f"# librdkafka settings\nbootstrap.servers={kafka_broker.bootstrap_servers}\n"
    )
    env = subprocess_env(postgres_db, kafka_broker)
    env.pop("KAFKA_BOOTSTRAP_SERVERS")  # from the properties file instead
    relay = subprocess.Popen(
        [
            ESBRIDGE,
            "relay",
            "tests.support.relay_support:Ledger",
            "--topic",
            topic,
            "--kafka-config",
            str(config),
            "--metrics-port",
            str(port),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        last = db_ids(postgres_db.dsn)[-1][0]
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                text = ""
            if f'esbridge_relay_position{{app="Ledger",topic="{topic}"}} {float(last)}' in text:
                break
            time.sleep(0.2)
        assert f'esbridge_relay_published_total{{app="Ledger",topic="{topic}"}} 500.0' in text
        assert f'esbridge_relay_lag{{app="Ledger",topic="{topic}"}} 0.0' in text
        relay.send_signal(signal.SIGINT)
        assert relay.wait(30) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    assert len(read_all(kafka_broker.config(), topic, 500)) == 500


def test_imports_the_application_from_the_current_directory_and_logs_only_json(
    postgres_db, kafka_broker, create_topic, tmp_path
):
    """The case of a user's own project: ``esbridge relay shop:Ledger`` run in its
    directory (a console script does not put it on the Python path by itself), with
    ``--log-format json``: every line on stderr is one JSON object, librdkafka's
    own lines included (here a configuration warning it always gives)."""
    write_events(ledger(postgres_db.env), 200)
    topic = create_topic(partitions=2)
    (tmp_path / "shop.py").write_text(
        "from eventsourcing.application import Application\n\n\n"
        "class Ledger(Application):\n    pass\n"
    )
    env = subprocess_env(postgres_db, kafka_broker)
    env.pop("PYTHONPATH")
    env["KAFKA_SASL_USERNAME"] = "nobody"  # librdkafka warns: no sasl.mechanism to use it
    relay = subprocess.Popen(
        [ESBRIDGE, "--log-format", "json", "relay", "shop:Ledger", "--topic", topic],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert len(read_all(kafka_broker.config(), topic, 200)) == 200
        relay.send_signal(signal.SIGINT)
        _, err = relay.communicate(timeout=30)
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    assert relay.returncode == 0, err.decode()[-2000:]
    records = [json.loads(line) for line in err.decode().splitlines()]  # each line is JSON
    confwarn = [
        r
        for r in records
        if r["logger"] == "esbridge.librdkafka" and r["msg"].startswith("CONFWARN")
    ]
    assert confwarn and all(r["level"] == "WARNING" for r in confwarn), records
    assert all("sasl.username" in r["msg"] for r in confwarn), confwarn
    assert any(r["msg"].startswith("relay Ledger stopped at notification") for r in records)
