"""Running an unchanged ``eventsourcing.system.System`` with Kafka as the transport.

The library's runners connect applications inside one Python process. The
:class:`KafkaRunner` connects them through Kafka instead, so the same
``System`` definition runs in one process (development, tests) or spread over
OS processes and machines (``esbridge run``), with the same application
classes and the same tracking records:

* every *leader*'s notification log is published by one :class:`~esbridge.relay.Relay`
  to one topic (payloads, or prompts: configurable per leader);
* every *follower* consumes each of its leaders' topics through a consumer
  adapter, which records new events and the tracking record in one transaction.

Naming is derived from the system (see :class:`SystemTopics`): one topic per
leader, one consumer group per edge (leader → follower), one transactional id
per relay. All processes of a system must use the same prefix.

Which parts run in *this* process is chosen with ``apps`` (the applications
whose relays and consumers run here; default all), ``run_relays`` and
``run_consumers``: ``esbridge run --app Orders`` is ``KafkaRunner(system,
apps=["Orders"])``. Several worker processes of one application share each
topic's partitions through the edge's consumer group; each runs the
application's relay too, but one log has one publisher: the relay that holds
the relay id's lease (:mod:`esbridge.relay.lease`) publishes, the others stand
by and take over when it stops or dies.

It behaves like the library's runners where code written for them relies on
it: the applications are constructed with the runner (so ``get()`` works
before ``start()``), ``start()`` twice raises the library's
``RunnerAlreadyStartedError``, ``watch_for_errors()`` is the
``MultiThreadedRunner``'s. Where Kafka makes it differ (catching up at start,
a failing policy), docs/systems.md says how and why.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from eventsourcing.application import Application
from eventsourcing.system import Runner, RunnerAlreadyStartedError, System

from esbridge.errors import (
    ApplicationNotFoundError,
    ConfigurationError,
    EsbridgeError,
    SystemConfigurationError,
    SystemRunnerError,
)
from esbridge.eventlog.notification_log import close_recorder
from esbridge.eventlog.remote import RemoteNotificationLog
from esbridge.kafka.config import kafka_config_from_env
from esbridge.names import DEFAULT_PREFIX, MODES, PAYLOADS, PROMPTS, SystemTopics
from esbridge.runtime.persistence import require_postgres, require_postgres_app
from esbridge.system.loading import kind_of
from esbridge.system.parts import PartSettings, make_consumer, make_relay
from esbridge.system.setup import construct_app, ensure_topics, system_env
from esbridge.system.status import (
    EdgeProbe,
    EdgeStatus,
    decoding_app,
    read_only_app,
    relay_holder,
)
from esbridge.system.upstream_logs import check_upstream_readable, log_services

logger = logging.getLogger("esbridge.runner")

TApp = TypeVar("TApp")

RELAY_MODES = MODES

#: Seconds between two looks at the components in :meth:`KafkaRunner.watch_for_errors`.
WATCH_INTERVAL = 0.05

#: Set to a directory to profile every relay and consumer thread with cProfile (see
#: :meth:`RunningComponent._run_profiled`): a diagnostic aid, off by default.
PROFILE_DIR_ENV = "ESBRIDGE_PROFILE_DIR"

#: Appended to the error for applications not stored in Postgres: where a runner's settings
#: come from.
ENV_ADVICE = (
    ", in the environment or in KafkaRunner's env= argument (os.environ updated with it), "
    "for example KafkaRunner(system, env=postgres_db.env, kafka_config=kafka_config) in a "
    "test with esbridge's pytest fixtures"
)


def load_system(path: str) -> System:
    """The ``System`` named by ``"package.module:attribute"``.

    Raises :class:`ConfigurationError` naming what could not be imported, so
    a typo in a deployment fails at start, before anything is consumed.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"system path {path!r} is not of the form 'package.module:attribute' "
            "(for example 'examples.orders.system:system')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigurationError(
            f"cannot import module {module_name!r} of system {path!r}: {e}. "
            "Check the name, and that the module's directory is on the Python path "
            "(esbridge run adds the current directory, or give --app-dir)."
        ) from e
    except Exception as e:  # the module itself raised while importing
        raise ConfigurationError(
            f"importing module {module_name!r} of system {path!r} failed: {type(e).__name__}: {e}"
        ) from e
    try:
        system = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(
            f"module {module_name!r} has no attribute {attribute!r} (system path {path!r})"
        ) from None
    if not isinstance(system, System):
        raise ConfigurationError(
            f"{path!r} is {kind_of(system)}, not an eventsourcing.system.System: name the "
            "System object (package.module:system)"
        )
    check_importable(system)
    return system


def check_importable(system: System) -> None:
    """Every application class of ``system`` can be resolved from its topic."""
    for name in system.nodes:
        try:
            system.get_app_cls(name)
        except Exception as e:
            raise ConfigurationError(
                f"application {name!r} of the system cannot be imported from "
                f"{system.nodes[name]!r}: {type(e).__name__}: {e}"
            ) from e


class Component(Protocol):
    """What the runner needs of a relay or a consumer adapter."""

    def run(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> Any: ...


@dataclass
class RunningComponent:
    """A relay or consumer adapter running in a thread of this process."""

    kind: str  # "relay" or "consumer"
    leader: str
    follower: str | None
    component: Component
    thread: threading.Thread = field(init=False)
    error: BaseException | None = None
    #: True once ``error`` was raised to the runner's caller: it is raised once.
    reported: bool = False

    def describe(self) -> str:
        if self.follower is None:
            return f"relay of {self.leader}"
        return f"consumer {self.leader} -> {self.follower}"

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self._run, name=f"esbridge {self.describe()}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        try:
            profile_dir = os.environ.get(PROFILE_DIR_ENV)
            if profile_dir:
                self._run_profiled(profile_dir)
            else:
                self.component.run()
        except BaseException as e:
            self.error = e
            logger.exception("%s failed", self.describe())

    def _run_profiled(self, directory: str) -> None:
        """``component.run()`` under cProfile; the stats go to ``directory`` when it returns.

        For finding where a worker's time goes: cProfile sees only the thread it
        runs in, so each relay and consumer thread gets its own profile file
        (``{pid}-{kind}-{leader}-{follower}.prof``, read with ``pstats``).
        """
        import cProfile

        profile = cProfile.Profile()
        name = f"{os.getpid()}-{self.kind}-{self.leader}-{self.follower or ''}.prof"
        profile.enable()
        try:
            self.component.run()
        finally:
            profile.disable()
            os.makedirs(directory, exist_ok=True)
            profile.dump_stats(os.path.join(directory, name))


class KafkaRunner(Runner[Any]):
    """Runs an ``eventsourcing`` ``System`` with relays and consumer adapters over Kafka.

    As the library's runners do, it constructs its applications when it is
    constructed (after every configuration check that needs no server: an
    application not stored in Postgres is refused before any is built), and
    starts no thread and contacts no broker before :meth:`start`.

    ``relay_modes``: ``"payloads"`` or ``"prompts"`` for every leader, or a
    mapping per leader (leaders not named get payloads). ``partitions``: how
    many partitions each topic is created with (existing topics are used as they are).

    A follower run here reads each leader's log from the leader's database
    (``{LEADER}_POSTGRES_*`` settings win), or, when ``env`` (or
    ``os.environ``) has ``UPSTREAM_LOG_URL`` (``{LEADER}_UPSTREAM_LOG_URL``
    wins), over HTTP from that ``esbridge serve-log`` with the token in
    ``[{LEADER}_]UPSTREAM_LOG_TOKEN``: then the leader's database is never
    opened here (:mod:`esbridge.system.upstream_logs`).
    A follower with neither is refused by :meth:`start`, before anything runs.
    """

    def __init__(
        self,
        system: System,
        env: Mapping[str, str] | None = None,
        *,
        kafka_config: Mapping[str, Any] | None = None,
        apps: Sequence[str] | None = None,
        topic_prefix: str = DEFAULT_PREFIX,
        partitions: int | Mapping[str, int] = 1,
        relay_modes: str | Mapping[str, str] = PAYLOADS,
        exactly_once: bool = True,
        run_relays: bool = True,
        run_consumers: bool = True,
        create_topics: bool = True,
        worker_id: str | None = None,
        relay_options: Mapping[str, Any] | None = None,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(system, env=dict(env) if env is not None else None)
        self.full_env = system_env(env)
        self.kafka_config = dict(kafka_config or kafka_config_from_env(self.full_env))
        if not self.kafka_config.get("bootstrap.servers"):
            raise ConfigurationError(
                "no Kafka brokers configured: set KAFKA_BOOTSTRAP_SERVERS "
                "(or pass kafka_config={'bootstrap.servers': ...})"
            )
        self.names = SystemTopics(topic_prefix)
        self.partitions = resolve_partitions(system, partitions)
        self.exactly_once = exactly_once
        self.run_relays = run_relays
        self.run_consumers = run_consumers
        self.create_topics = create_topics
        self.worker_id = worker_id
        self.relay_options = dict(relay_options or {})
        self.consumer_options = dict(consumer_options or {})
        self.local = list(apps) if apps is not None else list(system.nodes)
        self.relay_modes = resolve_relay_modes(system, relay_modes)
        check_local_apps(system, self.local)
        if not run_relays and set(self.local) >= set(system.nodes) and system.leaders:
            raise ConfigurationError(
                f"this runner runs every application of the system without relays: leaders "
                f"{list(system.leaders)} would have no relay, and their followers would never "
                "receive an event. Run the relays (run_relays=True), or run only some "
                "applications here (apps=[...]) and their relays elsewhere."
            )
        #: What this runner's relays and consumers are built from.
        self.settings = PartSettings(
            system=system,
            env=self.full_env,
            kafka_config=self.kafka_config,
            names=self.names,
            relay_modes=self.relay_modes,
            partitions=self.partitions,
            exactly_once=exactly_once,
            worker_id=worker_id,
            relay_options=self.relay_options,
            consumer_options=self.consumer_options,
            log_services=log_services(self.read_remotely(), self.full_env),
        )
        self.components: list[RunningComponent] = []
        self._probes: list[EdgeProbe] | None = None
        #: True once stopped (or once a start failed): the applications are closed.
        self.is_stopped = False
        remote = set(self.settings.log_services)
        self.apps: dict[str, Application[Any]] = construct_apps(
            system, self.local, [n for n in self.leaders_used() if n not in remote], self.full_env
        )

    # -- the Runner interface ------------------------------------------------

    def start(self) -> None:
        """Start the relays and consumers of this process's applications.

        Creates the topics first (unless ``create_topics=False``). A start
        that fails stops what it had started and closes the applications: the
        failure is what the caller sees, and a runner starts once (as the
        library's: a second ``start()`` raises ``RunnerAlreadyStartedError``).
        """
        self._check_can_start()
        super().start()
        try:
            for leader, follower in self.consumed_here():
                if leader not in self.settings.log_services and leader not in self.apps:
                    check_upstream_readable(leader, follower, self.full_env)
            if self.create_topics:
                ensure_topics(
                    self.kafka_config,
                    {self.names.topic(n): self.partitions_of(n) for n in self.leaders_used()},
                )
            for leader in self.relayed_here():
                self._start(RunningComponent("relay", leader, None, self._make_relay(leader)))
            for leader, follower in self.consumed_here():
                component = self._make_consumer(leader, follower)
                self._start(RunningComponent("consumer", leader, follower, component))
        except BaseException:
            self._stop_all()  # the failure to start is what the caller must see
            raise

    def _check_can_start(self) -> None:
        """Refuse a second start, as the library's runners do (with the remedy said)."""
        if self.is_started:
            raise RunnerAlreadyStartedError(
                "this KafkaRunner was started already"
                + (" and then stopped" if self.is_stopped else "")
                + ": a runner starts once. Construct a new KafkaRunner to run the system "
                "again (it resumes where this one stopped)"
            )
        if self.is_stopped:
            raise ConfigurationError(
                "this KafkaRunner was stopped before it started: its applications are "
                "closed. Construct a new KafkaRunner"
            )

    def watch_for_errors(self, timeout: float | None = None) -> bool:
        """Wait until a relay or consumer failed, then stop: the library's ``watch_for_errors``.

        As the ``MultiThreadedRunner``'s: returns False after ``timeout``
        seconds (None: waits for ever) if nothing failed; else stops the
        runner, which raises the failure (see :meth:`stop`), or returns True if
        that failure was raised already (by :meth:`wait_idle`, say).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not any(r.error is not None for r in self.components):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(WATCH_INTERVAL)
        self.stop()
        return True

    def stop(self) -> None:
        """Stop consumers, then relays, then close the applications (idempotent).

        Then raises, as :meth:`raise_failures` does, if a relay or consumer had
        failed before ``stop()`` and its failure was not raised yet (by
        :meth:`wait_idle`, say): a test cannot pass while one of them is dead.
        Everything is stopped and closed first. Errors of components while they
        stop are logged only.
        """
        failure = self._stop_all()
        if failure is not None:
            raise failure

    def __exit__(self, *args: object, **kwargs: Any) -> None:
        """Stop; raise a component's failure unless the with-block is raising already.

        Then the propagating exception is kept (it is often the consequence: an
        assertion on a follower that processed nothing) and the failure is
        logged and added to it as a note.
        """
        raising = args[1] if len(args) > 1 else None
        if not isinstance(raising, BaseException):
            self.stop()
            return
        failure = self._stop_all()
        if failure is not None:
            logger.error("%s (while the with-block raised %s)", failure, type(raising).__name__)
            raising.add_note(f"KafkaRunner: {type(failure).__name__}: {failure}")

    def _stop_all(self) -> ComponentFailure | None:
        """Stop and close everything; the failure of components that had failed, unreported."""
        failed = [r for r in self.components if r.error is not None and not r.reported]
        for running in reversed(self.components):
            try:
                running.component.stop()
            except Exception:
                logger.exception("stopping %s failed", running.describe())
        for running in reversed(self.components):
            running.thread.join(timeout=30)
            if running.thread.is_alive():
                logger.error("%s did not stop within 30 s", running.describe())
        self.components.clear()
        for probe in self._probes or []:
            probe.close()
            if probe.leader in self.settings.log_services:
                close_recorder(probe.upstream)  # a remote log: its HTTP connections
        self._probes = None
        for app in self.apps.values():
            app.close()
        self.apps.clear()
        self.is_stopped = True
        return failure_of(failed)

    def get(self, cls: type[TApp]) -> TApp:
        """The application ``cls`` run by this runner (from construction until :meth:`stop`)."""
        name = getattr(cls, "name", cls.__name__)
        app = self.apps.get(name)
        if app is None:
            raise ApplicationNotFoundError(self._not_here(name), application=name)
        assert isinstance(app, cls)
        return app

    def _not_here(self, name: str) -> str:
        """Why :meth:`get` has no application ``name``: each cause has its own remedy."""
        if name not in self.system.nodes:
            return f"application {name!r} is not in the system (it has {list(self.system.nodes)})"
        if name not in self.local:
            return (
                f"application {name!r} is not run by this runner (apps={self.local} excludes "
                "it): it runs in another process, or add it to apps=[...]"
            )
        return f"application {name!r} is closed: this runner was stopped"

    # -- what runs here --------------------------------------------------------

    def relayed_here(self) -> list[str]:
        if not self.run_relays:
            return []
        return [name for name in self.system.leaders if name in self.local]

    def consumed_here(self) -> list[tuple[str, str]]:
        if not self.run_consumers:
            return []
        return [
            (leader, follower) for leader, follower in self.system.edges if follower in self.local
        ]

    def leaders_used(self) -> list[str]:
        """Leaders whose topics this process publishes to or consumes from."""
        return leaders_used(self.system, self.local)

    def read_remotely(self) -> list[str]:
        """Leaders consumed here whose relays do not run here: those a log service may serve."""
        return sorted({leader for leader, _ in self.consumed_here() if leader not in self.local})

    def topics_used(self) -> list[str]:
        return [self.names.topic(name) for name in self.leaders_used()]

    def partitions_of(self, leader: str) -> int:
        """The partition count of ``leader``'s topic."""
        return self.settings.partitions_of(leader)

    def tracking_partitions(self, leader: str) -> int:
        """How many tracking names a follower of ``leader`` records (prompts: one)."""
        return 1 if self.relay_modes[leader] == PROMPTS else self.partitions_of(leader)

    # -- health ----------------------------------------------------------------

    def failures(self) -> list[str]:
        """Descriptions of relays and consumers that stopped with an error."""
        return [describe_failure(r) for r in self.components if r.error is not None]

    def raise_failures(self) -> None:
        """Raise if a relay or consumer stopped with an error (see :func:`failure_of`)."""
        failure = failure_of([r for r in self.components if r.error is not None])
        if failure is not None:
            raise failure

    def is_alive(self) -> bool:
        """True while every relay and consumer thread runs."""
        return all(r.thread.is_alive() for r in self.components)

    def wait_idle(self, timeout: float = 30.0, interval: float = 0.05) -> None:
        """Wait until every follower run here has processed everything its leaders logged.

        Raises :class:`SystemRunnerError` if a relay or consumer failed, and
        ``TimeoutError`` naming the lagging edges after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        probes = self.probes()
        while True:
            self.raise_failures()
            lagging = {
                f"{p.leader} -> {p.follower}": n for p in probes if (n := p.backlog().count) > 0
            }
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"followers still behind after {timeout} s (unprocessed events: {lagging}); "
                    f"failures: {self.failures() or 'none'}"
                )
            time.sleep(interval)

    def probes(self) -> list[EdgeProbe]:
        """Lag probes of the edges whose follower runs here (built once)."""
        if self._probes is None:
            self._probes = [
                EdgeProbe(
                    leader,
                    follower,
                    self.apps[follower],
                    self.full_env,
                    self.tracking_partitions(leader),
                    self._remote_log(leader),
                )
                for leader, follower in self.consumed_here()
            ]
        return self._probes

    def _remote_log(self, leader: str) -> RemoteNotificationLog | None:
        """``leader``'s log through its log service, when it has one (None: its database)."""
        service = self.settings.log_services.get(leader)
        return None if service is None else service.log(leader)

    def statuses(self) -> list[EdgeStatus]:
        """The status of every edge consumed here (see :mod:`esbridge.system.status`)."""
        result = []
        holders: dict[str, str | None] = {}  # one lease lookup per leader, not per edge
        for probe in self.probes():
            remote = probe.leader in self.settings.log_services
            opened = decoding_app if remote else read_only_app  # a remote leader: no database
            leader_app = self.apps.get(probe.leader) or opened(
                self.system, probe.leader, self.full_env
            )
            try:
                status = probe.status(leader_app, self._held_gaps(probe.leader, probe.follower))
                if probe.leader not in holders:  # the lease is in the leader's database
                    holders[probe.leader] = (
                        None
                        if remote
                        else relay_holder(leader_app, self.names.relay_id(probe.leader))
                    )
                status.relay = holders[probe.leader]
                result.append(status)
            finally:
                if probe.leader not in self.apps:
                    leader_app.close()
        return result

    def _held_gaps(self, leader: str, follower: str) -> int | None:
        """Partitions the edge's consumer holds behind a gap (None: not consumed here).

        Reads only the consumer's in-memory gap bookkeeping: its full
        ``status()`` also asks librdkafka for watermarks, which must not be
        called from another thread while the consumer thread polls.
        """
        for running in self.components:
            if running.leader == leader and running.follower == follower:
                held = getattr(running.component, "held_partitions", None)
                if callable(held):
                    return len(held())
                return None
        return None

    # -- construction of relays and consumers ----------------------------------

    def _start(self, running: RunningComponent) -> None:
        self.components.append(running)
        running.start()

    def _make_relay(self, leader: str) -> Component:
        return make_relay(self.settings, leader)

    def _make_consumer(self, leader: str, follower: str) -> Component:
        return make_consumer(self.settings, self.apps[follower], leader, follower)


def construct_apps(
    system: System, names: Sequence[str], leaders: Sequence[str], env: Mapping[str, str]
) -> dict[str, Application[Any]]:
    """The applications ``names``, constructed; all closed again if one cannot be.

    Refuses first, before any is built, an application run here or a leader
    whose log is read here (``leaders``) that ``env`` does not store in
    Postgres (the library's default, in memory, would leave every follower
    idle and ``wait_idle()`` satisfied); then each constructed application
    whose class chose other storage.
    """
    for name in leaders:  # relays and consumers read their logs by name
        require_postgres(name, env, advice=ENV_ADVICE)
    apps: dict[str, Application[Any]] = {}
    try:
        for name in names:
            apps[name] = construct_app(system, name, env)
            # Its class env may choose its storage: what counts is what it was built with.
            require_postgres_app(apps[name], advice=ENV_ADVICE)
    except BaseException:
        for app in apps.values():
            app.close()
        raise
    return apps


def resolve_relay_modes(system: System, modes: str | Mapping[str, str]) -> dict[str, str]:
    """The relay mode of every leader; refuses unknown modes and leaders without a relay.

    ``modes`` is one mode for all, or a mapping by leader name where ``"*"``
    gives the mode of leaders not named.
    """
    if isinstance(modes, str):
        modes = {"*": modes}
    default = modes.get("*", PAYLOADS)
    unknown = [name for name in modes if name not in system.nodes and name != "*"]
    if unknown:
        raise ConfigurationError(
            f"relay modes name applications that are not in the system: {unknown} "
            f"(the system has {list(system.nodes)})"
        )
    result = {}
    for name in system.leaders:
        mode = modes.get(name, default)
        if mode not in RELAY_MODES:
            followers = system.leads[name]
            raise ConfigurationError(
                f"leader {name!r} has no relay (mode {mode!r}): its followers {followers} "
                f"would never receive its events. Choose one of {RELAY_MODES}."
            )
        result[name] = mode
    return result


def resolve_partitions(system: System, partitions: int | Mapping[str, int]) -> dict[str, int]:
    """Partition counts by leader name, ``"*"`` for leaders not named (default 1)."""
    values = {"*": partitions} if isinstance(partitions, int) else {"*": 1, **partitions}
    unknown = [name for name in values if name != "*" and name not in system.leaders]
    if unknown:
        raise ConfigurationError(
            f"partitions are given for {unknown}, which are not leaders of the system "
            f"(its leaders are {list(system.leaders)})"
        )
    bad = {name: n for name, n in values.items() if not isinstance(n, int) or n < 1}
    if bad:
        raise ConfigurationError(f"partition counts must be positive integers, got {bad}")
    return values


def leaders_used(system: System, apps: Iterable[str]) -> list[str]:
    """Leaders whose topics ``apps`` publish to (their own) or consume from."""
    local = set(apps)
    leaders = {leader for leader, follower in system.edges if follower in local}
    leaders.update(name for name in system.leaders if name in local)
    return sorted(leaders)


def check_local_apps(system: System, names: Iterable[str]) -> None:
    for name in names:
        if name not in system.nodes:
            raise ConfigurationError(
                f"application {name!r} is not in the system (it has {list(system.nodes)})"
            )


#: What :meth:`KafkaRunner.raise_failures` raises.
ComponentFailure = SystemRunnerError | SystemConfigurationError


def describe_failure(running: RunningComponent) -> str:
    """``"consumer A -> B: ErrorClass: message"``."""
    return f"{running.describe()}: {type(running.error).__name__}: {running.error}"


def failure_of(failed: Sequence[RunningComponent]) -> ComponentFailure | None:
    """The error to raise for the ``failed`` components (which are then marked reported).

    :class:`SystemConfigurationError` (a :class:`ConfigurationError`) when
    one of them refused its configuration (restarting cannot help:
    ``esbridge run`` exits with status 2), else :class:`SystemRunnerError`
    (a runtime failure: a restart resumes). Both are exception groups of
    the components' own exceptions, so no traceback is lost; the message
    names each failed component and its error.
    """
    failed = [r for r in failed if r.error is not None]
    if not failed:
        return None
    for running in failed:
        running.reported = True
    message = "; ".join(describe_failure(r) for r in failed)
    errors = [as_exception(r.error) for r in failed if r.error is not None]
    names = [r.describe() for r in failed]
    if any(isinstance(e, ConfigurationError) for e in errors):
        return SystemConfigurationError(message, errors, components=names)
    return SystemRunnerError(message, errors, components=names)


def as_exception(error: BaseException) -> Exception:
    """``error`` itself, or an :class:`EsbridgeError` caused by it if it is not an ``Exception``.

    An ``ExceptionGroup`` holds only ``Exception`` instances, and a component's
    thread may have ended on a ``SystemExit`` or ``KeyboardInterrupt``.
    """
    if isinstance(error, Exception):
        return error
    wrapped = EsbridgeError(f"{type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


def run_until(stop: Callable[[], bool], runner: KafkaRunner, interval: float = 0.5) -> None:
    """Block until ``stop()`` is true or a relay or consumer fails (then raise)."""
    while not stop():
        runner.raise_failures()
        if not runner.is_alive():
            runner.raise_failures()
            ended = [r.describe() for r in runner.components if not r.thread.is_alive()]
            raise SystemRunnerError(
                "a relay or consumer thread ended unexpectedly",
                [EsbridgeError(f"{name} ended without an error") for name in ended],
                components=ended,
            )
        time.sleep(interval)
