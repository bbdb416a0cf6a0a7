"""The Kafka ACLs each esbridge component needs, and no more: as data, and as commands.

With an authorizer (``StandardAuthorizer``, ``allow.everyone.if.no.acl.found=false``)
an operator must grant each principal exactly what its process does. The
names depend on esbridge's naming rules (topics, consumer groups, relay ids,
position topics: :mod:`esbridge.names`), so writing the grants by hand means
repeating those rules, and a wrong one shows only as a refusal at run time.
Here they are derived from the same rules the processes use:
:func:`relay_acls` and :func:`consumer_acls` for one component,
:func:`system_acls` for every application of a system run by ``esbridge run``
(each application's process runs its relay and its consumers), and
:meth:`AclGrant.command` gives the ``kafka-acls.sh`` line (``esbridge acls``
prints them). The minimal sets are proven against a real broker with an
authorizer by ``tests/integration/kafka/test_kafka_security.py``, which grants
exactly these; docs/security.md explains each line.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from eventsourcing.system import System

from esbridge.names import PROMPTS, SystemTopics, default_position_topic

#: The consumer group librdkafka looks up when the relay reads its position (prefixed).
POSITION_GROUP_PREFIX = "esbridge-position-"

_RESOURCE_OPTION = {
    "topic": "--topic",
    "group": "--group",
    "transactional_id": "--transactional-id",
}


@dataclass(frozen=True)
class AclGrant:
    """One ALLOW grant: ``principal`` may do ``operations`` on a resource, and why."""

    principal: str
    resource_type: str  # "topic", "group" or "transactional_id"
    name: str
    operations: tuple[str, ...]
    why: str
    prefixed: bool = False
    optional: bool = False

    def command(self, bootstrap: str = "$KAFKA_BOOTSTRAP_SERVERS") -> str:
        """The ``kafka-acls.sh`` command that adds this grant (``--command-config`` to add)."""
        parts = ["kafka-acls.sh", "--bootstrap-server", bootstrap, "--add"]
        parts += ["--allow-principal", self.principal]
        for operation in self.operations:
            parts += ["--operation", operation]
        parts += [_RESOURCE_OPTION[self.resource_type], self.name]
        if self.prefixed:
            parts += ["--resource-pattern-type", "prefixed"]
        return " ".join(p if p.startswith("$") else shlex.quote(p) for p in parts)


def relay_acls(
    principal: str, topic: str, relay_id: str, *, mode: str = "payloads", exactly_once: bool = True
) -> list[AclGrant]:
    """What a relay publishing ``topic`` needs (topics created beforehand, by an admin)."""
    grants = [AclGrant(principal, "topic", topic, ("WRITE",), "publish the events (or prompts)")]
    if mode == PROMPTS:
        return grants  # an idempotent producer, no transactions, no position topic
    position = default_position_topic(topic)
    grants.append(AclGrant(principal, "topic", position, ("READ", "WRITE"), "the relay's position"))
    if exactly_once:
        grants.append(
            AclGrant(
                principal,
                "transactional_id",
                relay_id,
                ("WRITE",),
                "exactly-once transactions",
            )
        )
    grants.append(
        AclGrant(
            principal,
            "group",
            POSITION_GROUP_PREFIX,
            ("DESCRIBE",),
            "reading the position at start (librdkafka looks up the group's coordinator)",
            prefixed=True,
        )
    )
    return grants


def consumer_acls(
    principal: str, topic: str, group: str, *, mode: str = "payloads"
) -> list[AclGrant]:
    """What a consumer adapter reading ``topic`` in ``group`` needs."""
    grants = [
        AclGrant(principal, "topic", topic, ("READ",), "fetch the messages"),
        AclGrant(principal, "group", group, ("READ",), "join the group, commit offsets"),
    ]
    if mode != PROMPTS:
        grants.append(
            AclGrant(
                principal,
                "topic",
                default_position_topic(topic),
                ("READ",),
                "what the relay published to each partition, so that lost trailing "
                "messages are held and reported",
                optional=True,
            )
        )
    return grants


def system_acls(
    system: System,
    names: SystemTopics,
    modes: Mapping[str, str],
    principal_of: Callable[[str], str],
) -> dict[str, list[AclGrant]]:
    """The grants of each application's process under ``esbridge run``, by application.

    ``modes``: each leader's relay mode; ``principal_of``: an application's
    principal (e.g. ``User:orders``).
    """
    result: dict[str, list[AclGrant]] = {}
    for name in system.nodes:
        principal = principal_of(name)
        grants: list[AclGrant] = []
        if name in system.leaders:
            mode = modes.get(name, "payloads")
            grants += relay_acls(principal, names.topic(name), names.relay_id(name), mode=mode)
        for leader in system.follows.get(name, ()):
            mode = modes.get(leader, "payloads")
            group = names.group(leader, name)
            grants += consumer_acls(principal, names.topic(leader), group, mode=mode)
        result[name] = _merged(grants)
    return result


def _merged(grants: list[AclGrant]) -> list[AclGrant]:
    """Drop a grant another already gives (the relay's and a consumer's position-group)."""
    seen: set[tuple[str, str, str, tuple[str, ...], bool]] = set()
    result = []
    for g in grants:
        key = (g.principal, g.resource_type, g.name, g.operations, g.prefixed)
        if key not in seen:
            seen.add(key)
            result.append(g)
    return result
