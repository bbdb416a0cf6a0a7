"""Step 3 of the data flow: the consumer adapter, Kafka → a follower.

:class:`ConsumerAdapter` consumes a topic and feeds a sink (a process
application, a projection, an outbound call) exactly once: ordering is
reconciled per partition (:mod:`.reconcile`), batches are committed with their
tracking records (:mod:`.batch_commit`), fetches are kept fair between
partitions (:mod:`.partition_flow`), and metrics kept (:mod:`.metrics`).
"""

from esbridge.consumer.adapter import ConsumerAdapter, ConsumerStatus
from esbridge.names import tracking_names

__all__ = ["ConsumerAdapter", "ConsumerStatus", "tracking_names"]
