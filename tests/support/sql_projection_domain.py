"""A small domain and SQL projection shared by the projection and replay tests.

A module of its own (not a test file) so that a subprocess running the
projection resolves the same event topics as the test that checks it.
"""

from __future__ import annotations

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from esbridge_connectors.sql_projection import SqlProjection, handles


class Dog(Aggregate):
    @event("Registered")
    def __init__(self, name: str) -> None:
        self.name = name
        self.tricks: list[str] = []

    @event("TrickAdded")
    def add_trick(self, trick: str) -> None:
        self.tricks.append(trick)


class DogSchool(Application[object]):
    def register(self, name: str, tricks: int = 0) -> Dog:
        dog = Dog(name)
        for i in range(tricks):
            dog.add_trick(f"trick-{i}")
        self.save(dog)
        return dog


class Base(DeclarativeBase):
    pass


class DogRow(Base):
    __tablename__ = "proj_dogs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    trick_count: Mapped[int] = mapped_column(Integer)


class TrickRow(Base):
    __tablename__ = "proj_tricks"
    dog_id: Mapped[str] = mapped_column(ForeignKey("proj_dogs.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    trick: Mapped[str] = mapped_column(String(200))


class FailureSwitch:
    """Tricks named in ``failing`` make the handler raise (``times`` times, -1 = always)."""

    failing: dict[str, int] = {}
    calls: dict[str, int] = {}


class DogProjection(SqlProjection):
    """Dogs with a trick count (incremented: a duplicate application would show) and tricks."""

    name = "dogs"
    tables = (DogRow, TrickRow)

    @handles(Dog.Registered)
    def registered(self, session: Session, event: Dog.Registered) -> None:
        session.add(DogRow(id=str(event.originator_id), name=event.name, trick_count=0))

    @handles(Dog.TrickAdded)
    def trick_added(self, session: Session, event: Dog.TrickAdded) -> None:
        remaining = FailureSwitch.failing.get(event.trick)
        if remaining is not None and remaining != 0:
            FailureSwitch.calls[event.trick] = FailureSwitch.calls.get(event.trick, 0) + 1
            FailureSwitch.failing[event.trick] = remaining - 1
            raise RuntimeError(f"cannot project trick {event.trick!r}")
        dog = session.get(DogRow, str(event.originator_id))
        assert dog is not None
        dog.trick_count += 1
        session.add(
            TrickRow(
                dog_id=str(event.originator_id), version=event.originator_version, trick=event.trick
            )
        )


def table_contents(engine, names=("proj_dogs", "proj_tricks")) -> dict[str, list[tuple]]:
    """Full contents of the projection's tables, sorted, for comparisons."""
    from sqlalchemy import text

    with engine.connect() as conn:
        return {
            name: sorted(tuple(row) for row in conn.execute(text(f"SELECT * FROM {name}")))
            for name in names
        }


def dog_feed(engine, topic: str, kafka_config: dict, env: dict[str, str], log: bool = True):
    """A :class:`DogProjection` fed from ``topic`` into ``engine``.

    With ``log`` the feed may read the upstream log (``env``) to fill gaps;
    without it a gap is an error, which proves none occurred.
    """
    from esbridge_connectors.sql_projection_kafka import KafkaProjectionFeed
    from esbridge_connectors.upstream import application_mapper

    return KafkaProjectionFeed(
        DogProjection(),
        engine,
        upstream="DogSchool",
        topic=topic,
        kafka_config=kafka_config,
        mapper=application_mapper(DogSchool, env),
        **({"env": env} if log else {}),
    )


class DogNameRow(Base):
    __tablename__ = "proj_dog_names"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    dogs: Mapped[int] = mapped_column(Integer)


class DogNameProjection(SqlProjection):
    """A second projection of the same log (names and how many dogs have each)."""

    name = "dog_names"
    tables = (DogNameRow,)

    @handles(Dog.Registered)
    def registered(self, session: Session, event: Dog.Registered) -> None:
        row = session.get(DogNameRow, event.name)
        if row is None:
            session.add(DogNameRow(name=event.name, dogs=1))
        else:
            row.dogs += 1


def main() -> None:
    """``python -c 'import sql_projection_domain as m; m.main()' URL ENV_JSON``: follow the log.

    Run by the kill -9 test as a subprocess; small pages make it commit often.
    """
    import json
    import sys

    from sqlalchemy import create_engine

    from esbridge_connectors.sql_projection import ProjectionRunner
    from esbridge_connectors.upstream import application_mapper

    url, env = sys.argv[1], json.loads(sys.argv[2])
    runner = ProjectionRunner(
        DogProjection(),
        create_engine(url),
        upstream="DogSchool",
        mapper=application_mapper(DogSchool, env),
        env=env,
        page_size=7,
        poll_interval=0.05,
    )
    print("started", flush=True)
    runner.run_forever()


def main_kafka() -> None:
    """``... m.main_kafka()' URL ENV_JSON TOPIC KAFKA_JSON``: feed the projection from Kafka.

    Run by the Kafka-fed kill -9 test as a subprocess; small pages make it commit often.
    """
    import json
    import sys

    from sqlalchemy import create_engine

    from esbridge_connectors.sql_projection_kafka import KafkaProjectionFeed
    from esbridge_connectors.upstream import application_mapper

    url, env, topic, kafka_config = sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:5]
    feed = KafkaProjectionFeed(
        DogProjection(),
        create_engine(url),
        upstream="DogSchool",
        topic=topic,
        kafka_config=json.loads(kafka_config),
        mapper=application_mapper(DogSchool, env),
        page_size=7,
    )
    print("started", flush=True)
    feed.run()
