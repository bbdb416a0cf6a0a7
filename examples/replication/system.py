"""The system definition: ``esbridge run examples.replication.system:system --app Replica``."""

from eventsourcing.system import System

from examples.replication.application import Original, Replica

system = System(pipes=[[Original, Replica]])
