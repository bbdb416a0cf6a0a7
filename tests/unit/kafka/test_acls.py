"""``esbridge acls``: the grants of each application's process, named as the processes name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from esbridge.cli import main
from esbridge.kafka.acls import system_acls
from esbridge.names import SystemTopics
from examples.orders.system import system

SYSTEM_PATH = "examples.orders.system:system"


def grants_of(app: str, modes: dict[str, str]) -> set[tuple[str, str, tuple[str, ...], bool]]:
    names = SystemTopics("esbridge.")
    acls = system_acls(system, names, modes, lambda a: f"User:{a.lower()}")
    return {(g.resource_type, g.name, g.operations, g.prefixed) for g in acls[app]}


def test_an_application_gets_its_relay_s_grants_and_one_consumer_s_per_upstream() -> None:
    modes = dict.fromkeys(system.leaders, "payloads")
    assert grants_of("Reservations", modes) == {
        ("topic", "esbridge.reservations", ("WRITE",), False),
        ("topic", "esbridge.reservations.esbridge-relay-position", ("READ", "WRITE"), False),
        ("transactional_id", "esbridge.relay.reservations", ("WRITE",), False),
        ("group", "esbridge-position-", ("DESCRIBE",), True),
        ("topic", "esbridge.orders", ("READ",), False),
        ("group", "esbridge.reservations.orders", ("READ",), False),
        ("topic", "esbridge.orders.esbridge-relay-position", ("READ",), False),
    }


def test_a_prompting_leader_needs_no_transactions_and_no_position() -> None:
    modes = {**dict.fromkeys(system.leaders, "payloads"), "Orders": "prompts"}
    assert grants_of("Orders", modes) >= {("topic", "esbridge.orders", ("WRITE",), False)}
    assert not any(kind == "transactional_id" for kind, *_ in grants_of("Orders", modes))
    assert ("topic", "esbridge.orders.esbridge-relay-position", ("READ",), False) not in (
        grants_of("Payments", modes)
    )


def test_the_command_prints_kafka_acls_lines_and_json(capsys: Any) -> None:
    assert (
        main(["acls", SYSTEM_PATH, "--topic-prefix", "shop.", "--principal", "User:svc-{app}"]) == 0
    )
    out = capsys.readouterr().out
    assert "# Payments (User:svc-payments): its relay and consumers" in out
    assert (
        "kafka-acls.sh --bootstrap-server $KAFKA_BOOTSTRAP_SERVERS --add --allow-principal "
        "User:svc-payments --operation WRITE --transactional-id shop.relay.payments"
    ) in out.splitlines()
    assert main(["acls", SYSTEM_PATH, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["application"] for r in rows} == {"Orders", "Reservations", "Payments"}
    assert all(r["principal"] == f"User:{r['application'].lower()}" for r in rows)


def test_a_principal_without_the_application_is_refused(capsys: Any) -> None:
    assert main(["acls", SYSTEM_PATH, "--principal", "User:shop"]) == 2
    assert "names no application" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["Orders=sideways"])
def test_an_unknown_mode_is_refused(mode: str, capsys: Any) -> None:
    assert main(["acls", SYSTEM_PATH, "--mode", mode]) == 2
