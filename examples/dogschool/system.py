"""The system definition: ``esbridge run examples.dogschool.system:system --app Counters``."""

from eventsourcing.system import System

from examples.dogschool.application import Counters, DogSchool

system = System(pipes=[[DogSchool, Counters]])
