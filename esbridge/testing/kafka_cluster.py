"""A Kafka cluster of several brokers (KRaft) for failover tests, from the harness's jars.

Production Kafka is replicated: each partition has a leader and followers,
a producer's ``acks=all`` waits for the in-sync replicas, and when a broker
dies the controller moves its leaderships (partitions, transaction
coordinators, group coordinators) to the others. Whether exactly-once holds
through that is a question a single broker cannot answer, so the harness can
start a cluster shaped like production: ``brokers`` nodes (3 by default),
each a :class:`~esbridge.testing.local_kafka.LocalKafkaBroker` that is both
broker and controller (a static quorum of all nodes, so one node down leaves
a majority), replication factor 3 for the internal topics
(``__transaction_state``, ``__consumer_offsets``) and for created topics,
``min.insync.replicas=2``.

Tests find the broker that matters and crash it::

    def test_failover(kafka_cluster):
        topic = kafka_cluster.create_topic(partitions=3)
        leader = kafka_cluster.leader(topic, 0)
        kafka_cluster.kill(leader)                    # kill -9
        kafka_cluster.start_broker(leader)            # same address, same data
        kafka_cluster.wait_in_sync()                  # every replica caught up

Every node listens on 127.0.0.1 only; every process is the harness's own and
is ended by its PID. The JVMs are kept small (``heap`` each) so that three
run beside the tests on a small machine.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Mapping
from typing import Any

from esbridge.errors import HarnessError
from esbridge.testing.local_kafka import LocalKafkaBroker, random_cluster_id
from esbridge.testing.servers import KafkaBroker, free_port

TRANSACTION_STATE_TOPIC = "__transaction_state"
CONSUMER_OFFSETS_TOPIC = "__consumer_offsets"

#: Broker settings of every node (``properties`` given to the cluster win).
#: ``broker.session.timeout.ms``: how long the controller waits for a crashed
#: broker's heartbeat before it fences it and moves its leaderships elsewhere;
#: it bounds how long clients wait after a kill -9. Kafka's default is 9 s; the
#: harness uses 3 s (heartbeats every 0.5 s) so that failover tests stay short.
CLUSTER_PROPERTIES: dict[str, str] = {
    "default.replication.factor": "3",
    "min.insync.replicas": "2",
    "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": "2",
    "share.coordinator.state.topic.replication.factor": "3",
    "share.coordinator.state.topic.min.isr": "2",
    "unclean.leader.election.enable": "false",
    "broker.session.timeout.ms": "3000",
    "broker.heartbeat.interval.ms": "500",
}


def java_string_hash(text: str) -> int:
    """Java's ``String.hashCode()`` of ``text`` (over its UTF-16 code units), a signed int32."""
    data = text.encode("utf-16-be")
    h = 0
    for i in range(0, len(data), 2):
        h = (31 * h + (data[i] << 8 | data[i + 1])) & 0xFFFFFFFF
    return h - (1 << 32) if h & 0x80000000 else h


def coordinator_partition(key: str, partitions: int) -> int:
    """The partition of an internal topic that holds ``key``'s coordinator state.

    Kafka places a transactional id in ``__transaction_state`` and a group id
    in ``__consumer_offsets`` by ``Utils.abs(key.hashCode()) % partitions``;
    the leader of that partition is the key's coordinator.
    """
    h = java_string_hash(key)
    return (0 if h == -(1 << 31) else abs(h)) % partitions


class LocalKafkaCluster(KafkaBroker):
    """``brokers`` KRaft nodes (broker + controller each) on 127.0.0.1, replicated 3 ways.

    :meth:`start` and :meth:`stop` act on every node; :meth:`kill`,
    :meth:`stop_broker`, :meth:`start_broker` and :meth:`restart_broker` on
    one, named by its node id (``1`` .. ``brokers``, the ids Kafka reports
    as leaders). A node keeps its ports and data across restarts.
    ``properties``: broker settings that replace :data:`CLUSTER_PROPERTIES`
    and the single broker's, on every node.
    """

    backend = "local cluster"
    replication_factor = 3

    def __init__(
        self,
        brokers: int = 3,
        heap: str = "384m",
        internal_partitions: int = 3,
        properties: Mapping[str, str] | None = None,
    ) -> None:
        if brokers < 1:
            raise HarnessError(f"a cluster needs at least one broker, not {brokers}")
        self._admin: tuple[str, Any] | None = None
        self.nodes: dict[int, LocalKafkaBroker] = {}
        self.internal_partitions = internal_partitions
        self.replication_factor = min(3, brokers)
        ports = {node_id: (free_port(), free_port()) for node_id in range(1, brokers + 1)}
        voters = ",".join(f"{i}@127.0.0.1:{c}" for i, (_, c) in ports.items())
        settings = dict(CLUSTER_PROPERTIES)
        rf = str(self.replication_factor)
        for name in (
            "default.replication.factor",
            "offsets.topic.replication.factor",
            "transaction.state.log.replication.factor",
            "share.coordinator.state.topic.replication.factor",
        ):
            settings[name] = rf
        for name in (
            "min.insync.replicas",
            "transaction.state.log.min.isr",
            "share.coordinator.state.topic.min.isr",
        ):
            settings[name] = str(min(2, brokers))
        settings.update(properties or {})
        cluster_id = random_cluster_id()
        try:
            for node_id, node_ports in ports.items():
                self.nodes[node_id] = LocalKafkaBroker(
                    heap=heap,
                    internal_partitions=internal_partitions,
                    properties={
                        "node.id": str(node_id),
                        "controller.quorum.voters": voters,
                        **settings,
                    },
                    ports=node_ports,
                    cluster_id=cluster_id,
                )
        except BaseException:
            self.close()
            raise
        first = next(iter(self.nodes.values()))
        self.version = first.version
        self.bootstrap_servers = ",".join(n.bootstrap_servers for n in self.nodes.values())
        self.startup_seconds = 0.0

    # -- the whole cluster ------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Start every node that is not running and wait until all serve and are registered.

        The nodes start together: none answers before a majority of the
        controllers runs.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        stopped = [node_id for node_id, node in self.nodes.items() if not node.running]
        if not stopped:
            return
        try:
            for node_id in stopped:
                self.nodes[node_id].spawn()
            for node_id in stopped:
                self.nodes[node_id].wait_started(deadline)
            self.wait_registered(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop(kill=True)
            raise
        self.startup_seconds = time.monotonic() - t0

    def stop(self, kill: bool = False) -> None:
        """Stop every node, cleanly and all at once, or with ``kill=True`` crash them.

        One by one, the last nodes would wait for a controller quorum that is gone.
        """
        if not kill:
            for node in self.nodes.values():
                if node.process is not None and node.running:
                    node.process.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            node.stop(kill=kill)

    def close(self) -> None:
        """Kill every node (its data is removed: no need to shut down cleanly), clean up."""
        self._admin = None
        errors: list[BaseException] = []
        for node in self.nodes.values():
            try:
                node.stop(kill=True)
                node.close()
            except Exception as e:  # close the others all the same
                errors.append(e)
        if errors:
            raise errors[0]

    def describe(self) -> str:
        return (
            f"Apache Kafka {self.version} ({self.backend}, {len(self.nodes)} brokers, "
            f"replication factor {self.replication_factor}) on {self.bootstrap_servers}"
        )

    # -- one broker -------------------------------------------------------

    @property
    def node_ids(self) -> list[int]:
        return list(self.nodes)

    def running(self) -> list[int]:
        """The ids of the nodes whose JVM runs."""
        return [node_id for node_id, node in self.nodes.items() if node.running]

    def pid(self, node_id: int) -> int | None:
        return self.node(node_id).pid

    def node(self, node_id: int) -> LocalKafkaBroker:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise HarnessError(
                f"the cluster has no broker {node_id}; its node ids are {self.node_ids}"
            ) from None

    def kill(self, node_id: int) -> None:
        """Crash broker ``node_id`` (SIGKILL): no clean shutdown, no leadership handed over."""
        self.node(node_id).stop(kill=True)

    def stop_broker(self, node_id: int, kill: bool = False) -> None:
        """Stop broker ``node_id`` cleanly (it hands its leaderships over first), or kill it."""
        self.node(node_id).stop(kill=kill)

    def start_broker(self, node_id: int, timeout: float = 60.0) -> None:
        """Start broker ``node_id`` again and wait until the cluster lists it.

        Its replicas may still be catching up: :meth:`wait_in_sync` waits for them.
        """
        node = self.node(node_id)
        deadline = time.monotonic() + timeout
        node.spawn()
        node.wait_started(deadline)
        self.wait_registered(max(1.0, deadline - time.monotonic()))

    def restart_broker(self, node_id: int, kill: bool = True) -> None:
        """Kill (or stop cleanly) broker ``node_id`` and start it again at once."""
        self.stop_broker(node_id, kill=kill)
        self.start_broker(node_id)

    # -- who leads what ---------------------------------------------------

    def leader(self, topic: str, partition: int = 0, timeout: float = 30.0) -> int:
        """The node id leading ``topic``'s ``partition`` (waiting while it has none)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self._metadata(topic).topics.get(topic)
            if info is not None and partition in info.partitions:
                leader = info.partitions[partition].leader
                if leader >= 0 and leader in self.running():
                    return int(leader)
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"partition {partition} of {topic!r} has no running leader after {timeout} s"
                )
            time.sleep(0.1)

    def coordinator(self, transactional_id: str, timeout: float = 30.0) -> int:
        """The node id of the transaction coordinator of ``transactional_id``.

        The leader of its partition of ``__transaction_state`` (Kafka's own
        placement, :func:`coordinator_partition`); the topic exists once a
        producer has used transactions.
        """
        partition = coordinator_partition(transactional_id, self.internal_partitions)
        return self.leader(TRANSACTION_STATE_TOPIC, partition, timeout)

    def group_coordinator(self, group_id: str, timeout: float = 30.0) -> int:
        """The node id of consumer group ``group_id``'s coordinator (``__consumer_offsets``)."""
        partition = coordinator_partition(group_id, self.internal_partitions)
        return self.leader(CONSUMER_OFFSETS_TOPIC, partition, timeout)

    # -- waiting ----------------------------------------------------------

    def wait_registered(self, timeout: float = 60.0) -> None:
        """Wait until the metadata lists every running node as a broker."""
        deadline = time.monotonic() + timeout
        while True:
            wanted = set(self.running())
            try:
                listed = set(self._metadata().brokers)
            except Exception:  # KafkaException while the nodes boot
                listed = set()
            if wanted <= listed:
                return
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.describe()}: brokers {sorted(wanted - listed)} did not register "
                    f"within {timeout:.0f} s"
                )
            time.sleep(0.1)

    def wait_in_sync(self, timeout: float = 60.0) -> float:
        """Wait until every partition has a leader and all its replicas in sync; the seconds.

        After a broker restarts, its replicas catch up with their leaders;
        until then a partition has fewer in-sync replicas, and another broker
        crash could leave it with fewer than ``min.insync.replicas``.
        """
        t0 = time.monotonic()
        while True:
            lagging = list(self._out_of_sync())
            if not lagging:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise HarnessError(
                    f"{self.describe()}: partitions not in sync after {timeout:.0f} s: "
                    + ", ".join(lagging[:10])
                )
            time.sleep(0.2)

    def _out_of_sync(self) -> Iterator[str]:
        running = set(self.running())
        metadata = self._metadata()
        if not running <= set(metadata.brokers):
            yield "(brokers not registered)"
        for name, topic in metadata.topics.items():
            for number, partition in topic.partitions.items():
                if partition.leader < 0 or set(partition.replicas) - set(partition.isrs):
                    yield f"{name}[{number}]"

    def _metadata(self, topic: str | None = None) -> Any:
        """Metadata from the running brokers (quietly: a dead one is no news to a fault test)."""
        from confluent_kafka.admin import AdminClient

        servers = ",".join(node.bootstrap_servers for node in self.nodes.values() if node.running)
        if not servers:
            raise HarnessError(f"{self.describe()}: no broker runs")
        if self._admin is None or self._admin[0] != servers:
            quiet: dict[str, Any] = {"error_cb": lambda error: None, "log_level": 0}
            self._admin = (servers, AdminClient({"bootstrap.servers": servers, **quiet}))
        return self._admin[1].list_topics(topic, timeout=10)
