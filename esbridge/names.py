"""Every name that crosses a process boundary, in one place.

Relays, consumers, status probes and the processes of one system find each
other only by names: Kafka topics, consumer groups, transactional (relay) ids,
tracking names in the followers' databases, the relay's position topic, lease
keys and tables. Two processes that derive a name differently do not fail,
they silently miss each other (a consumer that tracks under another name
reprocesses everything), so the rules live here and nowhere else.

These names are a contract like the message format (:mod:`esbridge.wire`),
versioned by :data:`NAMES_VERSION` and documented in ``docs/message-format.md``.
Change one only by adding a new version, with a migration for stored names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from eventsourcing.system import System

#: Version of these naming rules (bump with a migration when one changes). 2: a
#: stand-alone relay's default id follows the system's rule (:func:`default_relay_id`);
#: a relay started under its version 1 id is refused with that id to pass.
NAMES_VERSION = 2

# -- modes: how a relay publishes and a consumer reads (``--mode``) ---------

#: Each notification published as a message carrying the stored event.
PAYLOADS = "payloads"
#: A small "new events up to N" message; consumers pull the events from the log.
PROMPTS = "prompts"
MODES = (PAYLOADS, PROMPTS)

# -- a relay ----------------------------------------------------------------

#: The position readers' consumer groups (never joined, but librdkafka looks up
#: their coordinator): the relay needs DESCRIBE on groups with this prefix.
POSITION_GROUP_PREFIX = "esbridge-position-"


def default_relay_id(app_name: str, topic: str) -> str:
    """The relay id (``transactional.id``, position key, lease key) of ``app_name`` on ``topic``.

    The one rule for ``esbridge relay`` and ``esbridge run``: for a topic named
    ``{prefix}{app}`` (lower case), as every system topic is, ``{prefix}relay.{app}``
    (so ``esbridge.shop`` gives ``esbridge.relay.shop`` whichever command
    relays it); for any other topic, ``{topic}.relay.{app}``. Two commands
    that derived different ids for one topic each published the whole log
    into it (names version 1).
    """
    app = app_name.lower()
    if topic.endswith(app):
        return f"{topic[: len(topic) - len(app)]}relay.{app}"
    return f"{topic}.relay.{app}"


def default_position_topic(topic: str) -> str:
    """The compacted topic where the relay of ``topic`` keeps its position."""
    return f"{topic}.esbridge-relay-position"


def lease_name(relay_id: str) -> str:
    """The text hashed into a relay's advisory-lock key (:mod:`esbridge.relay.lease`)."""
    return f"esbridge.relay:{relay_id}"


# -- a consumer -------------------------------------------------------------


def tracking_names(upstream: str, partitions: int) -> list[str]:
    """The tracking names of a consumer of ``upstream`` on a topic of ``partitions``.

    The one rule for every sink (process application, SQL projection, outbound
    calls). One partition (and prompt mode): the upstream application's name,
    the library's own name, so a system moves between runners without
    reprocessing. ``N > 1``: ``"{upstream}#{p}/{N}"`` per partition ``p`` (the
    count is part of the name because the partition of an aggregate depends on it).
    """
    if partitions <= 1:
        return [upstream]
    return [f"{upstream}#{p}/{partitions}" for p in range(partitions)]


def tracking_name(upstream: str, partition: int, partitions: int) -> str:
    """The tracking name of ``partition`` of ``partitions`` (see :func:`tracking_names`)."""
    return tracking_names(upstream, partitions)[partition]


#: The dead-letter table, in the follower's own database.
DEAD_LETTER_TABLE = "esbridge_dead_letters"

# -- a whole system ---------------------------------------------------------

DEFAULT_PREFIX = "esbridge."


@dataclass(frozen=True)
class SystemTopics:
    """Names derived from a system, shared by every process that runs it.

    One topic per leader (``{prefix}{leader}``, lower case), one consumer group
    per edge (``{prefix}{follower}.{leader}``), one relay id per leader
    (``{prefix}relay.{leader}``: the relay's transactional id, so a restarted
    relay fences its zombie).
    """

    prefix: str = DEFAULT_PREFIX

    def topic(self, leader: str) -> str:
        return f"{self.prefix}{leader.lower()}"

    def group(self, leader: str, follower: str) -> str:
        return f"{self.prefix}{follower.lower()}.{leader.lower()}"

    def relay_id(self, leader: str) -> str:
        """``{prefix}relay.{leader}``: :func:`default_relay_id` of the leader's topic."""
        return default_relay_id(leader, self.topic(leader))

    def relay_ids(self, system: System) -> dict[str, str]:
        """The relay id of every leader of ``system`` (for ``edge_statuses``)."""
        return {leader: self.relay_id(leader) for leader in system.leaders}
