"""The seeds' systems as runnable examples, written in today's ``eventsourcing`` 9.5 API.

Each package defines its applications and a ``system`` (an unchanged
``eventsourcing.system.System``) plus ``checks.py``: the seed's own assertions
as a function of a started runner, so the same checks run under the library's
``SingleThreadedRunner`` and under esbridge's ``KafkaRunner``.
"""
