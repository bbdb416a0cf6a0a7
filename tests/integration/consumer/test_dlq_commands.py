"""``esbridge dlq show|discard|retry`` against real servers: what they print and exit with.

Two dogs are poisoned: dog 0 ("poison", then "later", held behind it) and
dog 1 ("poison"); a message that is no esbridge message is parked too.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from esbridge.cli import main
from esbridge.deadletters.store import DeadLetterStore
from examples.dogschool.application import DogSchool
from tests.integration.consumer.test_consumer import (
    adapter,
    consume_all,
    fragile_follower,
    relay_all,
    teach,
)
from tests.support.consumer_apps import Fragile, ManualPublisher, populate, verify_mirror

FOLLOWER = "tests.support.consumer_apps:Fragile"


@pytest.fixture
def parked(
    school: DogSchool,
    create_topic: Any,
    kafka_config: dict[str, Any],
    postgres_db: Any,
    monkeypatch: Any,
) -> Any:
    fragile = fragile_follower(postgres_db)
    topic = create_topic(partitions=1)
    dogs = populate(school, 3, 1)
    teach(school, dogs[0], "poison", "later")
    teach(school, dogs[1], "poison")
    relay_all(school, topic, kafka_config)
    ManualPublisher(kafka_config, topic, "DogSchool", 1).send_raw(
        b"not-esbridge", b"\xffraw", [("x", b"y")]
    )
    consume_all(adapter(fragile, topic, kafka_config, retries=1, retry_backoff=0.01))
    for key, value in postgres_db.env.items():
        monkeypatch.setenv(key, value)
    store = DeadLetterStore(fragile.recorder.datastore)  # type: ignore[attr-defined]
    rows = store.list("Fragile")
    assert [(r.key, r.reason) for r in rows] == [
        (str(dogs[0]), "policy_error"),
        (str(dogs[0]), "held_behind"),
        (str(dogs[1]), "policy_error"),
        ("not-esbridge", "malformed_message"),
    ]
    yield fragile, store, rows, dogs, school, topic
    fragile.close()


def test_show_prints_the_error_context_and_the_payload_decoded(parked: Any, capsys: Any) -> None:
    _fragile, _store, rows, dogs, _school, topic = parked
    capsys.readouterr()
    assert main(["dlq", "show", FOLLOWER, str(rows[0].id)]) == 0
    out = capsys.readouterr().out
    assert "reason: policy_error" in out and "attempts: 2" in out
    assert f"kafka: {topic}[0]@6" in out
    assert "Traceback (most recent call last)" in out
    assert "ValueError: cannot learn poison" in out
    assert "  esb_nid: 7" in out  # headers, as text
    assert main(["dlq", "show", FOLLOWER, str(rows[0].id), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    payload = shown["payload"]
    assert payload["class"].endswith("Dog.TrickAdded")
    assert payload["state"]["trick"] == "poison"
    assert payload["state"]["originator_id"] == str(dogs[0])
    assert (shown["kafka_topic"], shown["kafka_partition"], shown["kafka_offset"]) == (topic, 0, 6)
    # Not an esbridge message: its bytes, and why they could not be decoded.
    assert main(["dlq", "show", FOLLOWER, str(rows[3].id), "--json"]) == 0
    raw = json.loads(capsys.readouterr().out)["payload"]
    assert raw["raw_base64"] == "/3Jhdw==" and "not an esbridge event" in raw["decode_error"]
    assert main(["dlq", "show", FOLLOWER, "99999"]) == 1
    assert "Fragile has no dead letter 99999" in capsys.readouterr().err


def test_discard_records_who_when_why_and_never_deletes(parked: Any, capsys: Any) -> None:
    _fragile, store, rows, dogs, _school, _topic = parked
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # --reason is required
        main(["dlq", "discard", FOLLOWER, str(rows[3].id)])
    assert exited.value.code == 2
    assert "the following arguments are required: --reason" in capsys.readouterr().err
    assert main(["dlq", "discard", FOLLOWER, "--reason", "junk"]) == 2
    assert "name the rows to discard" in capsys.readouterr().err
    before = datetime.now(UTC) - timedelta(seconds=5)
    assert (
        main(["dlq", "discard", FOLLOWER, str(rows[3].id), "--reason", "test junk", "--by", "ann"])
        == 0
    )
    assert f"discarded 1 row(s) by ann: [{rows[3].id}]" in capsys.readouterr().out
    [gone] = store.list("Fragile", status="discarded")
    assert (gone.id, gone.discarded_by, gone.discard_reason) == (rows[3].id, "ann", "test junk")
    assert gone.discarded_at is not None and gone.discarded_at >= before
    assert store.count("Fragile") == 3  # out of the counts, still in the table
    assert len(store.list("Fragile", status=None)) == 4
    # Not parked any more: refused, nothing discarded (not even the parked one named with it).
    code = main(["dlq", "discard", FOLLOWER, str(rows[2].id), str(rows[3].id), "--reason", "x"])
    assert code == 1
    assert f"nothing discarded: [{rows[3].id}] are not parked or skipped rows" in (
        capsys.readouterr().err
    )
    assert store.count("Fragile") == 3
    # By key: both of dog 0's rows.
    assert main(["dlq", "discard", FOLLOWER, "--key", str(dogs[0]), "--reason", "bad dog"]) == 0
    assert f"[{rows[0].id}, {rows[1].id}]" in capsys.readouterr().out
    assert [r.id for r in store.list("Fragile")] == [rows[2].id]
    assert main(["dlq", "list", FOLLOWER, "--all"]) == 0
    assert capsys.readouterr().out.count("discarded") == 3
    # A retry never touches discarded rows.
    Fragile.healed = True
    assert main(["dlq", "retry", FOLLOWER]) == 0
    assert f"retried 1 row(s): [{rows[2].id}]" in capsys.readouterr().out
    assert len(store.list("Fragile", status="discarded")) == 3


def test_retry_by_key_and_since_keeps_each_key_in_order(parked: Any, capsys: Any) -> None:
    fragile, store, rows, dogs, school, _topic = parked
    Fragile.healed = True
    capsys.readouterr()
    assert main(["dlq", "retry", FOLLOWER, "--key", str(dogs[1])]) == 0
    assert f"retried 1 row(s): [{rows[2].id}]" in capsys.readouterr().out
    verify_mirror(school, fragile, [dogs[1]])
    # From dog 0's held row on: applying it before the poison it waits behind would
    # break dog 0's order, so it stays parked.
    assert main(["dlq", "retry", FOLLOWER, "--since", str(rows[1].id)]) == 1
    out = capsys.readouterr().out
    assert "retried 0 row(s)" in out
    assert f"left parked behind an earlier parked row of their key: [{rows[1].id}]" in out
    # Every row parked since 2000 (UTC): dog 0's in order; the malformed one can only be
    # inspected, so the exit status is 1.
    assert main(["dlq", "replay", FOLLOWER, "--since", "2000-01-01T00:00:00"]) == 1
    out = capsys.readouterr().out
    assert f"replayed 2 row(s): [{rows[0].id}, {rows[1].id}]" in out
    assert f"row {rows[3].id} failed again: cannot retry: the message is not an esbridge" in out
    verify_mirror(school, fragile, dogs)
    assert [r.reason for r in store.list("Fragile")] == ["malformed_message"]
    with pytest.raises(SystemExit) as exited:
        main(["dlq", "retry", FOLLOWER, "--since", "yesterday"])
    assert exited.value.code == 2
    assert "'yesterday' is neither a row id nor an ISO time" in capsys.readouterr().err
