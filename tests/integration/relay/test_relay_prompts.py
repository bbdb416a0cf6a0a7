"""Prompt mode: "application X has notifications up to id N", coalesced, waking followers."""

from __future__ import annotations

import json
import threading
import time
import uuid

from confluent_kafka import Consumer, TopicPartition

from tests.support.relay_support import (
    APP_NAME,
    db_ids,
    ledger,
    ledger_relay,
    read_all,
    write_events,
)


def test_publish_available_sends_one_prompt_when_the_log_grew(
    postgres_db, kafka_config, create_topic
):
    app = ledger(postgres_db.env)
    write_events(app, 30)
    topic = create_topic(partitions=1)
    relay = ledger_relay(postgres_db, kafka_config, topic, mode="prompts")
    try:
        assert relay.publish_available() == 1
        assert relay.publish_available() == 0
        write_events(app, 5)
        assert relay.publish_available() == 1
    finally:
        relay.close()
    records = read_all(kafka_config, topic, 2)
    assert [json.loads(r.value or b"") for r in records] == [
        {"app": APP_NAME, "max_nid": 30},
        {"app": APP_NAME, "max_nid": 35},
    ]
    for r in records:
        assert r.key == APP_NAME.encode()
        assert r.headers == {
            "esb_format": "1",
            "esb_kind": "prompt",
            "esb_app": APP_NAME,
            "esb_nid": str(json.loads(r.value or b"")["max_nid"]),
        }


def test_prompts_coalesce_bursts_and_wake_a_follower(postgres_db, kafka_config, create_topic):
    app = ledger(postgres_db.env)
    write_events(app, 10)
    topic = create_topic(partitions=1)
    relay = ledger_relay(
        postgres_db,
        kafka_config,
        topic,
        mode="prompts",
        prompt_interval=0.3,
        poll_interval=30,  # only NOTIFY can wake it in time
        prompt_repeat=60,
    )
    follower = Consumer(
        {
            "bootstrap.servers": kafka_config["bootstrap.servers"],
            "group.id": f"follower-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    follower.assign([TopicPartition(topic, 0, 0)])
    thread = threading.Thread(target=relay.run)
    thread.start()
    commits = 0
    try:
        first = follower.poll(30)
        assert first is not None and json.loads(first.value())["max_nid"] == 10
        # A follower waiting for a prompt is woken soon after a commit.
        for _ in range(3):
            time.sleep(0.5)
            write_events(app, 1)
            commits += 1
            start = time.monotonic()
            msg = follower.poll(10)
            assert msg is not None, "no prompt after a commit"
            assert time.monotonic() - start < 3
            assert json.loads(msg.value())["max_nid"] == db_ids(postgres_db.dsn)[-1][0]
        # A burst of 200 commits is coalesced into a few prompts.
        for _ in range(200):
            write_events(app, 1)
            commits += 1
        expected = db_ids(postgres_db.dsn)[-1][0]
        deadline = time.monotonic() + 20
        while relay.status().position < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay.status().position == expected
    finally:
        relay.stop()
        thread.join(10)
        follower.close()
    assert not thread.is_alive()
    records = read_all(kafka_config, topic, timeout=3)
    prompts = [json.loads(r.value or b"")["max_nid"] for r in records]
    assert prompts == sorted(prompts)
    assert prompts[-1] == expected
    burst_prompts = len(prompts) - 4
    assert 1 <= burst_prompts < 50, f"{burst_prompts} prompts for 200 commits: not coalesced"
