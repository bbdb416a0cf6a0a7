"""Step 3 of the data flow: the consumer adapter, Kafka → a follower.

:class:`ConsumerAdapter` (:mod:`.adapter`) consumes a topic and feeds a sink (a
process application, a projection, an outbound call) exactly once. Its parts,
one job each: the Kafka client (:mod:`.client`), rebalances (:mod:`.rebalance`),
committed offsets as hints (:mod:`.offsets`), what it knows of its partitions
(:mod:`.state`), the mode chosen at construction (:mod:`.modes`): messages
as events (:mod:`.payloads`, with :mod:`.trailing` gaps, and a refusal of a
topic of another application, :mod:`.upstream_check`) or prompts to pull
from the upstream log (:mod:`.prompts`); reading that log (:mod:`.upstream`),
waiting out Postgres outages (:mod:`.waiting`), ordering per partition
(:mod:`.reconcile`), batches committed with their tracking records
(:mod:`.batch_commit`, with a warning when messages are parked:
:mod:`.parking_report`), fair fetching between partitions
(:mod:`.partition_flow`), and metrics (:mod:`.metrics`).
"""

from esbridge.consumer.adapter import ConsumerAdapter, ConsumerStatus
from esbridge.names import tracking_names

__all__ = ["ConsumerAdapter", "ConsumerStatus", "tracking_names"]
