"""The relay's knobs: keyword arguments of :class:`~esbridge.relay.Relay`, with their defaults.

A frozen dataclass of its own so that the command line (``esbridge relay``)
can list the settings without building a relay.
"""

from __future__ import annotations

from dataclasses import dataclass

from esbridge.relay.lease import DEFAULT_EXPIRY


@dataclass(frozen=True)
class RelayTuning:
    """Knobs of a relay (keyword arguments of :class:`Relay`), with their defaults."""

    #: Notifications read from Postgres per query.
    page_size: int = 2000
    #: Most notifications in one Kafka transaction (one position write each).
    batch_size: int = 50_000
    #: Longest time a transaction stays open while a backlog is published.
    batch_seconds: float = 2.0
    #: Payload mode, adaptive batching: the wait after a transaction that did not fill
    #: a batch while events arrive at ``linger_rate`` or more a second, so that events
    #: written meanwhile share the next one. Fewer, larger transactions cost the broker
    #: (commit markers, transaction log) and the followers (one Postgres commit per
    #: batch) less; below that rate each event is published at once (a few
    #: milliseconds from commit to Kafka). See :mod:`esbridge.relay.pacing`. 0: never wait.
    linger: float = 0.05
    #: Events a second from which the relay lingers after each transaction (it stops
    #: below half of it). 0: always linger.
    linger_rate: float = 2000.0
    #: Fallback polling interval when no NOTIFY arrives.
    poll_interval: float = 1.0
    #: Create missing topics (``partitions`` or 1 partition for prompts).
    create_topics: bool = True
    replication_factor: int | None = None
    #: Compacted topic holding the relay position (default ``<topic>.esbridge-relay-position``).
    position_topic: str | None = None
    #: Start although the position topic holds positions of other relay ids for this
    #: topic: a second relay on purpose (it publishes the log again). False: a relay id
    #: without a position refuses then (RelayIdConflictError), naming the other ids.
    allow_other_relays: bool = False
    #: Prompt mode: minimum seconds between prompts (coalescing) and repeat period.
    prompt_interval: float = 0.05
    prompt_repeat: float = 10.0
    #: Longest backoff between retries of a failed broker or Postgres operation.
    max_retry_delay: float = 10.0
    #: ``init_transactions`` / commit timeouts (seconds).
    init_timeout: float = 60.0
    commit_timeout: float = 60.0
    #: Seconds to wait for Postgres and the broker at start-up (None: for ever, retrying).
    connect_timeout: float | None = None
    #: Publish only while holding this relay id's lease (a Postgres advisory lock,
    #: see :mod:`esbridge.relay.lease`): a second relay with the same id stands by
    #: and takes over when the first stops or dies. False: no lease; a second relay
    #: takes over at once, fencing the first (which stops with RelayFencedError).
    standby: bool = True
    #: Seconds between the checks that the lease is still held.
    lease_check: float = 2.0
    #: Seconds after which Postgres ends the session of a lease holder that made
    #: no check: a hung relay (frozen, deadlocked) loses its lease to a standby.
    #: None: the lease never expires (a hung relay keeps it until killed).
    lease_expiry: float | None = DEFAULT_EXPIRY
    #: Seconds a lease holder may keep failing to reach Kafka before it gives its
    #: lease up, so that a standby that can reach Kafka publishes (it then stands
    #: by itself). None: it keeps the lease, retrying, for as long as it takes.
    lease_yield: float | None = 60.0
    #: Payload mode: give each message an ``esb_deps`` header naming, for the other
    #: partitions, the notification id a consumer must have processed there first
    #: (docs/partitioning.md), so that followers apply the log's order across
    #: partitions. Off by default: it costs the relay a little per message and
    #: makes followers wait for their slowest partition.
    causal_dependencies: bool = False
