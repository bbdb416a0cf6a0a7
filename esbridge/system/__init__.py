"""Whole systems: an unchanged ``eventsourcing`` ``System`` with Kafka between
its applications.

:class:`~esbridge.system.runner.KafkaRunner` runs one; :mod:`.setup` prepares
tables and topics; :mod:`.parts` builds its relays and consumer adapters;
:mod:`.status` measures lag; :mod:`.supervisor` keeps worker processes running;
:mod:`.applications` constructs applications without leaking resources.
"""
