"""The relay's fast path: rows read ahead in a pipeline, produced by one encoder loop.

The fast path must give exactly the messages of the reference encoder
(:meth:`PayloadEncoder.message`: the documented format), keep the per-partition
``esb_prev_nid`` chain, name a bad notification, and its read-ahead must see
every committed notification, release its connection when closed early, and
report a lost Postgres connection as the error the relay retries.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from eventsourcing.persistence import Notification, OperationalError

from esbridge.eventlog.notification_log import open_recorder
from esbridge.relay import reader as relay_reader
from esbridge.relay.reader import read_pages_for_publishing
from esbridge.wire.encoding import (
    CONTENT_TYPE_BINARY,
    PayloadEncoder,
    RowError,
    event_time,
)
from tests.support.relay_support import APP_NAME, db_ids, ledger, write_events

STAMP = b'"timestamp":{"_type_":"datetime_iso","_data_":"'


def _states() -> list[bytes]:
    return [
        b'{"amount":1,' + STAMP + b'2026-11-23T19:00:00.123456+00:00"}}',
        b'{"no":"timestamp here"}',  # the publish time is used
        # The first candidate is not a timestamp (too short): the next one is.
        b"{" + STAMP + b'x"},' + STAMP + b'2026-01-02T03:04:05+00:00"}}',
        b"{" + STAMP + b"unterminated",
        b"\x00\x01binary",
    ]


def _rows(count: int) -> list[tuple[int, bytes, int, bytes, bytes]]:
    states = _states()
    ids = [str(uuid.UUID(int=i * 104729 + 7)) for i in range(7)]
    return [
        (
            10 + i * 3,  # ids with gaps
            ids[i % len(ids)].encode(),
            i + 1,
            f"ledger:Account.Event{i % 3}".encode(),
            states[i % len(states)],
        )
        for i in range(count)
    ]


def _notification(row: tuple[int, bytes, int, bytes, bytes]) -> Notification:
    nid, key, version, topic, state = row
    return Notification(
        id=nid,
        originator_id=uuid.UUID(key.decode()),
        originator_version=version,
        topic=topic.decode(),
        state=state,
    )


@pytest.mark.parametrize("partitions", [1, 3, 8])
@pytest.mark.parametrize("content_type", [None, CONTENT_TYPE_BINARY])
def test_fast_loop_gives_the_reference_encoders_messages(partitions, content_type):
    rows = _rows(60)
    args = (content_type,) if content_type else ()
    reference = PayloadEncoder(APP_NAME, partitions, *args)
    fast = PayloadEncoder(APP_NAME, partitions, *args)
    fast.publish_time = reference.publish_time
    last_ints = [5] * partitions
    expected = [reference.message(_notification(row), last_ints) for row in rows]

    produced = []

    def produce(topic, value, key, partition, headers):
        produced.append((topic, key, value, list(headers.items()), partition))

    last = [b"5"] * partitions
    fast.produce_rows(rows, produce, "the-topic", last, lambda: None)
    assert len(produced) == len(expected)
    for (topic, key, value, headers, partition), (k, v, h, p) in zip(
        produced, expected, strict=True
    ):
        assert (topic, key, value, partition) == ("the-topic", k, v, p)
        assert headers == h  # same names, values and order: the same bytes on the wire
    assert last == [b"%d" % n for n in last_ints]


def test_event_time_is_the_regex_answer():
    import re

    pattern = re.compile(rb'"timestamp":\{"_type_":"datetime_iso","_data_":"([^"]{10,40})"')
    for state in _states():
        match = pattern.search(state)
        assert event_time(state) == (match.group(1) if match else None)


def test_fast_loop_retries_a_full_queue_and_names_a_bad_notification():
    rows = _rows(6)
    nid, key, version, topic, _ = rows[3]
    rows[3] = (nid, key, version, topic, None)  # type: ignore[assignment]
    encoder = PayloadEncoder(APP_NAME, 3)
    full = [True]  # the first produce finds the queue full
    waits = []
    produced = []

    def produce(topic, value, key, partition, headers):
        if full[0]:
            full[0] = False
            raise BufferError("queue full")
        produced.append((headers["esb_nid"], partition, headers["esb_prev_nid"]))

    last = [b"0"] * 3
    with pytest.raises(RowError) as info:
        encoder.produce_rows(rows, produce, "t", last, lambda: waits.append(1))
    assert info.value.nid == nid
    assert waits == [1]
    assert [n for n, _, _ in produced] == [b"%d" % r[0] for r in rows[:3]]
    # The chain covers exactly the messages produced.
    expected_last = [b"0"] * 3
    for n, partition, _ in produced:
        expected_last[partition] = n
    assert last == expected_last

    def refuse(*args, **kwargs):
        raise ValueError("refused")

    with pytest.raises(RowError) as info:
        encoder.produce_rows(rows[:2], refuse, "t", [b"0"] * 3, lambda: None)
    assert info.value.nid == rows[0][0] and isinstance(info.value.cause, ValueError)


def _read_all(recorder, after: int, page_size: int) -> list[list]:
    return [list(page) for page in read_pages_for_publishing(recorder, after, page_size=page_size)]


def test_pipelined_reads_return_every_row_in_order(postgres_db, monkeypatch):
    monkeypatch.setattr(relay_reader, "PAGES_PER_CONNECTION", 3)  # cross connections too
    app = ledger(postgres_db.env)
    write_events(app, 95, per_save=10)
    expected = db_ids(postgres_db.dsn)
    recorder = open_recorder(APP_NAME, postgres_db.env)
    try:
        pages = _read_all(recorder, 0, page_size=10)
        assert [len(p) for p in pages] == [10] * 9 + [5]
        rows = [row for page in pages for row in page]
        assert [(r[0], r[1].decode(), r[2]) for r in rows] == [tuple(e) for e in expected]
        assert all(isinstance(r[3], bytes) and isinstance(r[4], bytes) for r in rows)
        # From a position, and commits made while a read is under way are not lost.
        reader = read_pages_for_publishing(recorder, expected[40][0], page_size=10)
        first = next(reader)
        write_events(app, 30, per_save=10)  # commits after the next page was asked for
        rest = [row for page in reader for row in page]
        seen = [r[0] for r in list(first) + rest]
        later = _read_all(recorder, seen[-1], page_size=10)
        seen += [r[0] for page in later for r in page]
        assert seen == [e[0] for e in db_ids(postgres_db.dsn) if e[0] > expected[40][0]]
    finally:
        recorder.datastore.close()
        app.close()


def test_closing_a_read_early_returns_its_connection(postgres_db):
    app = ledger(postgres_db.env)
    write_events(app, 60)
    env = {**postgres_db.env, "POSTGRES_POOL_SIZE": "1", "POSTGRES_MAX_OVERFLOW": "0"}
    recorder = open_recorder(APP_NAME, env)
    try:
        for _ in range(10):  # with a pool of one, a leaked connection would block here
            reader = read_pages_for_publishing(recorder, 0, page_size=10)
            assert len(next(reader)) == 10  # the next page is read ahead now
            reader.close()
        assert sum(len(p) for p in _read_all(recorder, 0, page_size=10)) == 60
    finally:
        recorder.datastore.close()
        app.close()


def test_a_lost_connection_is_the_error_the_relay_retries(postgres_db):
    app = ledger(postgres_db.env)
    write_events(app, 60)
    recorder = open_recorder(APP_NAME, postgres_db.env)
    try:
        reader = read_pages_for_publishing(recorder, 0, page_size=10)
        assert len(next(reader)) == 10
        with psycopg.connect(postgres_db.dsn, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE '%convert_to(originator_id%' AND pid <> pg_backend_pid()"
            ).fetchall()
        assert killed and all(ok for (ok,) in killed)
        with pytest.raises(OperationalError):
            for _ in reader:
                pass
        # The pool gives a working connection again: reading resumes.
        assert sum(len(p) for p in _read_all(recorder, 0, page_size=10)) == 60
    finally:
        recorder.datastore.close()
        app.close()
