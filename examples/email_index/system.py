"""The system definition: ``esbridge run examples.email_index.system:system --app EmailIndex``."""

from eventsourcing.system import System

from examples.email_index.application import EmailIndex, Users

system = System(pipes=[[Users, EmailIndex]])
