"""The consumer's fast paths give exactly what the general paths give.

Each fast path of the consumer's hot loop is checked against the slower code
it replaces: header decoding (``wire.decode_payload`` against
``message_kind`` + ``decode_payload_headers``), in-order messages
(``PartitionOrder.advance`` against ``offer``), aggregate copies
(``copy_aggregate`` against ``deepcopy``), the binary insert of stored events
(read back from a real Postgres), and pausing the garbage collector while a
batch is processed (never left paused; nested across threads).
"""

from __future__ import annotations

import copy
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import StoredEvent

from esbridge import wire
from esbridge.consumer.reconcile import PartitionOrder
from esbridge.errors import MessageFormatError
from esbridge.processing.batch_repository import copy_aggregate
from esbridge.processing.pg_binary import use_binary_stored_events
from esbridge.processing.recorder_hook import install_recorder_hook
from esbridge.runtime import gc_pause
from examples.dogschool.application import Counters
from examples.dogschool.domainmodel import Counter, Dog

# -- wire.decode_payload --------------------------------------------------------------


def _headers(**overrides: bytes | None) -> list[tuple[str, bytes | None]]:
    base: dict[str, bytes | None] = {
        "esb_format": b"1",
        "esb_kind": b"payload",
        "esb_app": b"DogSchool",
        "esb_nid": b"42",
        "esb_prev_nid": b"40",
        "esb_topic": b"examples.dogschool.domainmodel:Dog.TrickAdded",
        "esb_version": b"3",
        "content-type": b"application/json",
        "ce_time": b"2026-11-23T19:05:10.430359+00:00",
    }
    base.update(overrides)
    return [(k, v) for k, v in base.items() if v is not None or k in overrides]


def _general(headers: Any, key: bytes | None) -> Any:
    decoded = wire.headers_dict(headers)
    if wire.message_kind(decoded) == wire.KIND_PROMPT:
        return None
    return wire.decode_payload_headers(decoded, key)


CASES: list[tuple[str, Any]] = [
    ("plain", _headers()),
    ("no content type", [h for h in _headers() if h[0] != "content-type"]),
    ("no time", [h for h in _headers() if h[0] != "ce_time"]),
    ("None time", _headers(ce_time=None)),
    ("non-UTF-8 app", _headers(esb_app=b"Dog\xffSchool")),
    ("non-ASCII digits", _headers(esb_nid="\uff14\uff12".encode())),
    ("spaces around a number", _headers(esb_nid=b" 42 ")),
    ("repeated header: last wins", [*_headers(), ("esb_nid", b"43")]),
    ("prompt", [("esb_format", b"1"), ("esb_kind", b"prompt"), ("esb_app", b"A")]),
    ("missing nid", [h for h in _headers() if h[0] != "esb_nid"]),
    ("None nid", _headers(esb_nid=None)),
    ("malformed version", _headers(esb_version=b"three")),
    ("other format version", _headers(esb_format=b"2")),
    ("no format", [h for h in _headers() if h[0] != "esb_format"]),
    ("unknown kind", _headers(esb_kind=b"other")),
    ("no headers", None),
]


@pytest.mark.parametrize("key", [b"bedb310e-9667-4cd8-adda-6ac8377f3d03", None, b"\xff"])
@pytest.mark.parametrize(("name", "headers"), CASES, ids=[c[0] for c in CASES])
def test_decode_payload_matches_the_general_path(name: str, headers: Any, key: Any) -> None:
    try:
        expected: Any = _general(headers, key)
    except MessageFormatError as e:
        with pytest.raises(MessageFormatError) as raised:
            wire.decode_payload(headers, key)
        assert str(raised.value) == str(e)
        return
    got = wire.decode_payload(headers, key)
    assert got == expected
    if got is not None:
        assert type(got) is wire.PayloadHeaders and hash(got) == hash(expected)
        assert vars(got) == vars(expected)


# -- PartitionOrder.advance -------------------------------------------------------------


def test_advance_takes_only_the_in_order_case() -> None:
    order: PartitionOrder[str] = PartitionOrder(10)
    assert not order.advance(10, 9)  # duplicate
    assert not order.advance(13, 12)  # gap: prev 12 > position 10
    assert order.position == 10
    assert order.advance(12, 10)  # 11 went to another partition (or was rolled back)
    assert order.position == 12
    assert order.offer(15, 14, "held", now=0.0).ready == []  # a gap holds 15
    assert not order.advance(14, 12)  # something is held: the general path decides
    offer = order.offer(14, 12, "fills", now=0.0)
    assert [nid for nid, _ in offer.ready] == [14, 15] and order.position == 15
    assert order.advance(16, 15)


# -- copy_aggregate ----------------------------------------------------------------------


class _Custom:
    copies = 0

    def __init__(self) -> None:
        self.items = [1]

    def __deepcopy__(self, memo: dict[int, Any]) -> _Custom:
        _Custom.copies += 1
        new = _Custom()
        new.items = list(self.items)
        return new


class _Slotted:
    __slots__ = ("__dict__", "items")

    def __init__(self) -> None:
        self.items = [1]
        self.name = "x"


class _Shared:
    def __init__(self) -> None:
        self.a = self.b = []  # type: ignore[var-annotated]
        self.nested = {"a": self.a, "self": self}
        self.when = time.time()


def _same_state(one: Any, other: Any) -> None:
    assert type(one) is type(other) and vars(one) == vars(other)


def test_copy_aggregate_is_a_deep_copy() -> None:
    dog = Dog("rex")
    dog.add_trick("roll")
    dog.collect_events()
    counter = Counter("roll")
    counter.increment()
    for original in (dog, counter):
        copied = copy_aggregate(original)
        _same_state(copied, copy.deepcopy(original))
        assert copied is not original
        for name, value in vars(original).items():
            if isinstance(value, (list, dict, set)):
                assert getattr(copied, name) is not value
    copied_dog = copy_aggregate(dog)
    copied_dog.add_trick("sit")
    assert dog.tricks == ["roll"] and copied_dog.tricks == ["roll", "sit"]
    assert dog.version == 2 and copied_dog.version == 3


def test_copy_aggregate_keeps_shared_references_and_customised_copies() -> None:
    shared = _Shared()
    copied = copy_aggregate(shared)
    assert copied.a is copied.b and copied.nested["a"] is copied.a
    assert copied.nested["self"] is copied and copied.a is not shared.a
    before = _Custom.copies
    custom = copy_aggregate(_Custom())
    assert _Custom.copies == before + 1 and custom.items == [1]
    slotted = _Slotted()
    copied_slotted = copy_aggregate(slotted)
    assert copied_slotted.items == [1] and copied_slotted.items is not slotted.items
    assert copied_slotted.name == "x"


# -- binary insert of stored events --------------------------------------------------------


def test_binary_insert_stores_the_same_values(postgres_db: Any) -> None:
    app = Counters(env=postgres_db.env)
    try:
        install_recorder_hook(app)
        recorder: Any = app.recorder
        states = [bytes(range(256)), b"", b'{"a": "\\"quoted\\", {braces}"}', b"\\x00,()"]
        ids = [uuid4() for _ in states]
        events = [
            StoredEvent(i, 1, f'topic,with "quotes" {n}', s)
            for n, (i, s) in enumerate(zip(ids, states, strict=True))
        ]
        recorder.insert_events(events)
        for event in events:
            (stored,) = recorder.select_events(event.originator_id)
            assert stored == event
        with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
            assert use_binary_stored_events(recorder, curs, events)
            mixed = [StoredEvent(str(uuid4()), 1, "t", b"x")]  # a str id for a uuid column
            assert not use_binary_stored_events(recorder, curs, mixed)
        recorder.insert_events(mixed)  # the text path takes it, as the library does
        (stored,) = recorder.select_events(UUID(str(mixed[0].originator_id)))
        assert stored.state == b"x"
    finally:
        app.close()


# -- gc_paused -----------------------------------------------------------------------------


def test_gc_pause_nests_and_always_resumes() -> None:
    assert gc.isenabled()
    with gc_pause.gc_paused():
        assert not gc.isenabled() and gc_pause.paused()
        with gc_pause.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled() and not gc_pause.paused()
    with pytest.raises(RuntimeError), gc_pause.gc_paused():
        raise RuntimeError("a failing batch")
    assert gc.isenabled()
    with gc_pause.gc_paused(enabled=False):
        assert gc.isenabled()


@contextmanager
def collected_generations() -> Iterator[list[int]]:
    """The generations of the collections that run inside the block, in order."""
    collections: list[int] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop":
            collections.append(info["generation"])

    gc.callbacks.append(note)
    try:
        yield collections
    finally:
        gc.callbacks.remove(note)


def test_gc_pause_leaves_a_disabled_collector_alone() -> None:
    gc.disable()
    try:
        with gc_pause.gc_paused():
            assert not gc_pause.paused()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_pauses_of_threads_still_collect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads whose pauses always overlap: a collection runs every MAX_PAUSE seconds."""
    monkeypatch.setattr(gc_pause, "MAX_PAUSE", 0.05)
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            with gc_pause.gc_paused():
                time.sleep(0.03)

    threads = [threading.Thread(target=busy) for _ in range(3)]
    with collected_generations() as collections:
        try:
            for t in threads:
                t.start()
                time.sleep(0.01)  # staggered: some pause is always in progress
            time.sleep(0.5)
            assert 2 in collections  # full collections ran anyway
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert gc.isenabled() and not gc_pause.paused()


def test_a_long_pause_collects_at_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retrying inside a pause (Postgres restarting): checkpoints collect now and then."""
    monkeypatch.setattr(gc_pause, "MAX_PAUSE", 0.05)
    with collected_generations() as collections, gc_pause.gc_paused():
        gc_pause.checkpoint()
        assert collections == []  # too early
        time.sleep(0.06)
        gc_pause.checkpoint()
        assert collections == [2]
        gc_pause.checkpoint()
        assert collections == [2]  # the wait starts again
    gc_pause.checkpoint()  # not paused: nothing to do
    assert gc.isenabled()
