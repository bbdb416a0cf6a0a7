"""Is the configured upstream the application that published the topic? Checked before parking.

A consumer parks a message from another application than its upstream as
foreign (:mod:`.payloads`): right for one forged or stray message among the
upstream's own. But when *every* message disagrees, the configuration is
wrong (``--upstream Shopp`` for a topic of ``Shop``, or the wrong topic), and
parking would fill the dead-letter table with the whole topic. So, until the
consumer has evidence that it reads its upstream's topic, each round is
checked before anything of it is recorded: a round whose payload messages
all come from other applications stops the consumer with
:class:`~esbridge.errors.UpstreamMismatchError`, nothing parked and no offset
committed past them.

A round of at least :data:`NOT_ESBRIDGE_MIN` messages of which none is an
esbridge message at all (no esbridge headers: the topic of another producer,
a wrong ``--topic``) stops the consumer the same way, before any of them is
parked as malformed. Fewer such messages are parked (a stray message on a
fresh consumer is not proof of a wrong topic).

The evidence that ends the check: a message of the upstream itself, or a
tracking position above 0 (this follower processed the upstream's events
before under these tracking names: a typo in the upstream's name gives fresh
names, all at 0). From then on a foreign message is parked as usual.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import Message

from esbridge import wire
from esbridge.errors import UpstreamMismatchError

#: How many messages, none of them esbridge's, make a round proof of a wrong topic.
NOT_ESBRIDGE_MIN = 5


class UpstreamCheck:
    """Refuses a round of messages that all come from other applications (module docstring)."""

    def __init__(self, upstream: str, topic: str) -> None:
        self.upstream = upstream
        self.topic = topic
        self.confirmed = False

    def check(self, messages: Sequence[Message], positions: Mapping[str, int]) -> None:
        """Raise :class:`UpstreamMismatchError` when no message is the upstream's and some are
        another application's (until confirmed, then a no-op)."""
        if self.confirmed:
            return
        if any(position > 0 for position in positions.values()):
            self.confirmed = True
            return
        decoded = list(_kinds(messages))
        apps = Counter(app for app in decoded if app is not _NOT_ESBRIDGE and app is not None)
        if not apps:
            foreign = sum(1 for app in decoded if app is _NOT_ESBRIDGE)
            if foreign >= NOT_ESBRIDGE_MIN and foreign == len(decoded):
                raise not_esbridge_error(self.upstream, self.topic, foreign)
            return  # prompts, a few undecodable messages, or nothing: no evidence either way
        if self.upstream in apps:
            self.confirmed = True
            return
        raise mismatch_error(self.upstream, self.topic, apps)


def mismatch_error(upstream: str, topic: str, apps: Mapping[str, int]) -> UpstreamMismatchError:
    """The error naming what the messages are, and the option that fixes the configuration."""
    names = sorted(apps, key=lambda app: -apps[app])
    seen = ", ".join(f"{apps[app]} from {app!r}" for app in names)
    fix = (
        f"--upstream {names[0]} (upstream={names[0]!r})"
        if len(names) == 1
        else f"--upstream with one of {names}"
    )
    return UpstreamMismatchError(
        f"the messages on topic {topic!r} come from application(s) {names}, but this consumer "
        f"is configured for upstream {upstream!r} ({seen}, none from {upstream!r}): nothing "
        f"was parked or committed. If you meant to follow {names[0]!r}, pass {fix}; if "
        f"{upstream!r} is right, give the topic its relay publishes to (--topic). If another "
        "producer wrote these messages to the topic by mistake, move the consumer group's "
        "offsets past them (kafka-consumer-groups.sh --reset-offsets)",
        upstream=upstream,
        topic=topic,
        applications=names,
    )


def not_esbridge_error(upstream: str, topic: str, count: int) -> UpstreamMismatchError:
    """The error for a round of messages that are not esbridge's at all."""
    return UpstreamMismatchError(
        f"none of the {count} messages read from topic {topic!r} is an esbridge message (no "
        f"esbridge headers): this topic is not published by a relay of {upstream!r}. Give the "
        "topic the relay publishes to (--topic; `esbridge relay` and `esbridge run` print it); "
        "nothing was parked or committed. If another producer wrote these messages to the "
        "topic by mistake, move the consumer group's offsets past them "
        "(kafka-consumer-groups.sh --reset-offsets)",
        upstream=upstream,
        topic=topic,
    )


_NOT_ESBRIDGE = "\x00not esbridge"


def _kinds(messages: Iterable[Message]) -> Iterable[str | None]:
    """Per message: the ``esb_app`` of a payload, ``None`` for a prompt or an esbridge message
    of another version, ``_NOT_ESBRIDGE`` for a message without esbridge headers."""
    for message in messages:
        if message.error() is not None:
            continue
        headers: Any = message.headers()  # consumed header values are bytes
        try:
            payload = wire.decode_payload(headers, message.key())
        except Exception:  # parked as malformed later, if at all
            names = {name for name, _ in headers or ()}
            yield None if wire.H_FORMAT in names else _NOT_ESBRIDGE
            continue
        yield None if payload is None else payload.app
