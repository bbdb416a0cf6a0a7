"""The main job (``make demo``): the orders system, one OS process per application.

It does what the seed's multiprocessing example did, with Kafka in place of
the library's dropped ``Multiprocess`` class: start Postgres and Kafka (the
test harness's provisioning, unless servers are given), run Orders,
Reservations and Payments each in its own ``esbridge run`` process (with N
partitions and W workers if asked), submit a stream of orders, wait until
every order is reserved and paid, report orders/s and the order processing
time (created → paid: min, mean, max, p50, p99), check that every order was
reserved and paid exactly once, print the lag of every edge, and shut
everything down.

The pieces (:class:`SystemProcesses`, :func:`submit_orders`,
:func:`wait_until_paid`, :func:`order_timings`, :func:`count_effects`) are
reused by the tests and by ``bench/orders.py``.

It lives here, not in the ``esbridge`` package, because it is example code:
``esbridge demo`` imports it from a source checkout (the ``examples``
package is not part of the installed distribution).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from eventsourcing.persistence import ApplicationRecorder
from eventsourcing.utils import get_topic

from esbridge.cli import build_parser
from esbridge.cli.run import ESBRIDGE_COMMAND, worker_command
from esbridge.eventlog.notification_log import close_recorder, open_recorder, read_pages
from esbridge.eventlog.remote import TOKEN_VARIABLE
from esbridge.names import SystemTopics
from esbridge.system.runner import SystemRunnerError
from esbridge.system.setup import ensure_topics, setup_system
from esbridge.system.status import edge_statuses, format_table
from esbridge.system.supervisor import Supervisor
from esbridge.system.upstream_logs import variable
from esbridge.testing import make_kafka, make_postgres
from esbridge.testing.servers import free_port
from examples.orders.application import Orders, Payments, Reservations
from examples.orders.domainmodel import Order, Payment, Reservation
from examples.orders.system import system

SYSTEM_PATH = "examples.orders.system:system"
APPS = ("Orders", "Reservations", "Payments")
#: The directory that holds ``examples/``: the worker processes import the system from it
#: (``esbridge run --app-dir``).
SOURCE_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DemoOptions:
    orders: int = 1000
    partitions: int = 1
    rate: float = 0.0  # orders/s offered; 0 = as fast as the Orders application takes them
    mode: str = "payloads"
    workers: int = 1
    timeout: float = 120.0
    batch: int = 10  # orders created per save() (one transaction) by the submitter


@dataclass
class Timings:
    """Order processing times (created → paid), from the orders' own event timestamps."""

    count: int
    first_created: float
    last_paid: float
    durations: list[float] = field(repr=False)

    @property
    def elapsed(self) -> float:
        return max(self.last_paid - self.first_created, 1e-9)

    @property
    def rate(self) -> float:
        return self.count / self.elapsed

    def percentile(self, p: float) -> float:
        ordered = sorted(self.durations)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def lines(self) -> list[str]:
        d = self.durations
        return [
            f"Orders system processed {self.count} orders in {self.elapsed:.3f}s at rate of "
            f"{self.rate:.1f} orders/s, {self.elapsed / self.count:.4f}s each",
            f"Min order processing time: {min(d):.3f}s",
            f"Mean order processing time: {statistics.fmean(d):.3f}s",
            f"Max order processing time: {max(d):.3f}s",
            f"p50 / p99 order processing time: {self.percentile(50):.3f}s / "
            f"{self.percentile(99):.3f}s",
        ]


class Progress:
    """One self-overwriting status line on a terminal (plain lines otherwise)."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out = out
        self.total = total
        self.tty = out.isatty()
        self.last = 0.0

    def show(self, created: int, paid: int, started: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else 2.0):
            return
        self.last = now
        width = 30
        filled = int(width * paid / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        rate = paid / max(now - started, 1e-9)
        line = (
            f"[{bar}] created {created}/{self.total}  paid {paid}/{self.total}  {rate:.0f} orders/s"
        )
        self.out.write(("\r" + line) if self.tty else (line + "\n"))
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def kafka_env(kafka_config: Mapping[str, Any]) -> dict[str, str]:
    """``KAFKA_*`` variables that give worker processes the same librdkafka settings."""
    return {
        "KAFKA_" + key.replace("_", "__").replace(".", "_").upper(): str(value)
        for key, value in kafka_config.items()
    }


#: Settings that say which database an application uses (plain or ``{APP}_``-prefixed).
DATABASE_SETTINGS = ("POSTGRES_", "PERSISTENCE_MODULE")


def prefixed(app: str, env: Mapping[str, str]) -> dict[str, str]:
    """``env``'s settings prefixed with ``app``'s name, as the library reads them first."""
    return {f"{app.upper()}_{key}": value for key, value in env.items()}


def without_databases(env: Mapping[str, str], apps: Sequence[str]) -> dict[str, str]:
    """``env`` without any application's database settings (plain or prefixed)."""
    prefixes = [*DATABASE_SETTINGS, *(f"{a.upper()}_{p}" for a in apps for p in DATABASE_SETTINGS)]
    return {k: v for k, v in env.items() if not k.startswith(tuple(prefixes))}


class LogServices:
    """One ``esbridge serve-log`` per application, on 127.0.0.1, with a token per reader.

    Each follower gets its own token, listed in the token file of each leader it
    follows and allowed to read that leader only: what one team gives another.
    """

    def __init__(self, apps: Sequence[str], directory: Path) -> None:
        self.ports = {app: free_port() for app in apps}
        self.tokens = {app: secrets.token_urlsafe(24) for app in apps}
        self.token_files: dict[str, Path] = {}
        for leader in apps:
            readers = [f for f in system.leads.get(leader, []) if f in apps]
            path = directory / f"{leader.lower()}-tokens.txt"
            path.write_text("".join(f"{self.tokens[f]} {leader}  # {f}\n" for f in readers))
            path.chmod(0o600)
            self.token_files[leader] = path

    def url(self, app: str) -> str:
        return f"http://127.0.0.1:{self.ports[app]}"

    def command(self, app: str) -> list[str]:
        """The ``esbridge serve-log`` command serving ``app``'s log."""
        return [
            *ESBRIDGE_COMMAND, "--log-level", "WARNING", "serve-log",
            f"{get_topic(system.get_app_cls(app))}", "--app-dir", str(SOURCE_ROOT),
            "--bind", f"127.0.0.1:{self.ports[app]}", "--token-file", str(self.token_files[app]),
        ]  # fmt: skip

    def reader_env(self, follower: str) -> dict[str, str]:
        """The token ``follower`` reads its leaders' logs with (``{LEADER}_UPSTREAM_LOG_TOKEN``)."""
        return {
            variable(leader, TOKEN_VARIABLE): self.tokens[follower]
            for leader in system.follows.get(follower, [])
        }

    def wait_healthy(self, timeout: float = 60.0, poll: Callable[[], None] = lambda: None) -> None:
        """Wait until every service answers ``/healthz``."""
        deadline = time.monotonic() + timeout
        for app in self.ports:
            while True:
                try:
                    with urllib.request.urlopen(f"{self.url(app)}/healthz", timeout=2) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                poll()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the log service of {app} did not start in {timeout} s")
                time.sleep(0.1)


class SystemProcesses:
    """The orders system with each application in its own supervised OS process.

    Entering creates the tables and topics, then starts one ``esbridge run
    --app NAME`` process per application and worker; leaving stops them
    (SIGTERM, then SIGKILL). ``kill(app)`` sends SIGKILL to one worker;
    :meth:`poll` starts it again (the supervisor's job in ``esbridge run --supervise``).

    ``databases``: each application's own database settings (plain
    ``POSTGRES_*``), for services with their own databases. Then each worker
    gets only its application's settings (none of another's), reads its
    leaders' logs over HTTP (``esbridge run --upstream-url``) from one
    ``esbridge serve-log`` per application (supervised too, named
    ``serve-log[App]``) with its own token, and :attr:`env` (for this process:
    submitting orders, counting effects) holds every database's settings
    prefixed by the application's name.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        kafka_config: Mapping[str, Any],
        *,
        partitions: int = 1,
        mode: str = "payloads",
        workers: int = 1,
        topic_prefix: str | None = None,
        system_path: str = SYSTEM_PATH,
        apps: Sequence[str] = APPS,
        log_level: str = "WARNING",
        relay_settings: Sequence[str] = (),
        databases: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.env = {**os.environ, **env, **kafka_env(kafka_config)}
        self.services: LogServices | None = None
        self._tokens_dir: tempfile.TemporaryDirectory[str] | None = None
        upstream_urls: list[str] = []
        if databases is not None:
            worker_base = without_databases(self.env, APPS)
            self._tokens_dir = tempfile.TemporaryDirectory(prefix="esbridge-tokens-")
            self.services = LogServices(list(apps), Path(self._tokens_dir.name))
            upstream_urls = [f"{app}={self.services.url(app)}" for app in apps]
            for app in apps:
                self.env.update(prefixed(app, databases[app]))
        self.kafka_config = dict(kafka_config)
        self.partitions = partitions
        self.mode = mode
        self.prefix = topic_prefix or f"esbridge.demo.{uuid.uuid4().hex[:8]}."
        # The command lines `esbridge run --workers N` would give its workers.
        args = build_parser().parse_args(
            ["--log-level", log_level, "run", system_path, "--app-dir", str(SOURCE_ROOT),
             "--topic-prefix", self.prefix, "--partitions", str(partitions), "--mode", mode,
             "--workers", str(workers),
             *(arg for item in relay_settings for arg in ("--relay-set", item)),
             *(arg for item in upstream_urls for arg in ("--upstream-url", item))]
        )  # fmt: skip
        commands = {
            f"{app}[{index}]": worker_command(args, app, index)
            for app in apps
            for index in range(workers)
        }
        if databases is None or self.services is None:
            self.supervisor = Supervisor(commands, restart=True, env=self.env)
            return
        services = self.services
        envs = {
            f"{app}[{index}]": {**databases[app], **services.reader_env(app)}
            for app in apps
            for index in range(workers)
        }
        for app in apps:
            commands[f"serve-log[{app}]"] = services.command(app)
            envs[f"serve-log[{app}]"] = dict(databases[app])
        self.supervisor = Supervisor(commands, restart=True, env=worker_base, envs=envs)

    def setup(self) -> None:
        """Create every application's tables and every leader's topic."""
        setup_system(system, self.env)
        names = SystemTopics(self.prefix)
        ensure_topics(self.kafka_config, {names.topic(n): self.partitions for n in system.leaders})

    def __enter__(self) -> SystemProcesses:
        self.setup()
        self.supervisor.start()
        if self.services is not None:
            try:
                self.services.wait_healthy(poll=self.poll)
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.supervisor.stop()
        if self._tokens_dir is not None:
            self._tokens_dir.cleanup()

    def poll(self) -> None:
        """Restart workers that died (call now and then).

        Raises :class:`~esbridge.system.runner.SystemRunnerError` when a worker stopped on a
        configuration error (restarting it cannot help).
        """
        code = self.supervisor.poll()
        if code is not None:
            raise SystemRunnerError(
                f"a worker process exited with status {code} (its error is printed above)"
            )

    def pids(self) -> dict[str, int]:
        return self.supervisor.pids()

    def kill(self, worker: str) -> int:
        """SIGKILL the worker named ``worker`` (for example ``"Orders[0]"``); its PID."""
        pid = self.pids()[worker]
        os.kill(pid, signal.SIGKILL)
        return pid

    def restarts(self) -> int:
        return sum(w.restarts for w in self.supervisor.workers)

    def last_exit_codes(self) -> dict[str, int | None]:
        """Each worker's last exit code (after leaving: 0 = it stopped gracefully on SIGTERM)."""
        return {w.name: w.exit_codes[-1] if w.exit_codes else None for w in self.supervisor.workers}

    def edge_statuses(self) -> list[Any]:
        """The lag of every edge (see :mod:`esbridge.system.status`)."""
        tracked = self.partitions if self.mode == "payloads" else 1
        relay_ids = SystemTopics(self.prefix).relay_ids(system)
        return edge_statuses(system, self.env, partitions=tracked, relay_ids=relay_ids)


def submit_orders(
    create: Callable[[int], list[uuid.UUID]],
    count: int,
    rate: float,
    batch: int = 1,
    on_progress: Callable[[int], None] = lambda n: None,
) -> list[uuid.UUID]:
    """Create ``count`` orders, ``batch`` per call of ``create``, at ``rate`` orders/s if
    positive (as fast as the Orders application takes them otherwise)."""
    ids: list[uuid.UUID] = []
    started = time.monotonic()
    while len(ids) < count:
        if rate > 0:
            delay = started + len(ids) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        ids.extend(create(min(batch, count - len(ids))))
        on_progress(len(ids))
    return ids


class TopicCounter:
    """Counts the notifications of one event topic in a log, incrementally."""

    def __init__(self, recorder: ApplicationRecorder, topic: str) -> None:
        self.recorder = recorder
        self.topics = [topic]
        self.position = 0
        self.count = 0

    def update(self) -> int:
        for page in read_pages(self.recorder, self.position, topics=self.topics):
            self.count += len(page)
            self.position = page[-1].id
        return self.count

    def close(self) -> None:
        close_recorder(self.recorder)


def paid_counter(env: Mapping[str, str]) -> TopicCounter:
    """Counts the ``Order.Paid`` events in the orders log."""
    return TopicCounter(open_recorder("Orders", env), get_topic(Order.Paid))


def wait_until_paid(
    env: Mapping[str, str],
    expected: int,
    timeout: float,
    tick: Callable[[int], None] = lambda paid: None,
    interval: float = 0.1,
) -> int:
    """Wait until ``expected`` ``Order.Paid`` events are in the orders log; the count."""
    paid = paid_counter(env)
    try:
        return wait_for_count(paid, expected, timeout, tick, interval)
    finally:
        paid.close()


def wait_for_count(
    counter: TopicCounter,
    expected: int,
    timeout: float,
    tick: Callable[[int], None] = lambda n: None,
    interval: float = 0.1,
) -> int:
    """Wait until ``counter`` reaches ``expected``; raise ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while counter.update() < expected:
        tick(counter.count)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {counter.count} of {expected} orders paid after {timeout:.0f} s"
            )
        time.sleep(interval)
    tick(counter.count)
    return counter.count


def drive_orders(
    orders: Any,
    paid: TopicCounter,
    count: int,
    *,
    rate: float = 0.0,
    batch: int = 1,
    timeout: float = 120.0,
    progress: Progress | None = None,
    on_tick: Callable[[], None] = lambda: None,
) -> list[uuid.UUID]:
    """Submit ``count`` orders (in a thread) and wait until they are all paid.

    ``paid`` counts the paid orders already in the log before this call;
    ``on_tick`` runs every ~0.1 s in the calling thread (the demo restarts
    dead workers there). Returns the new orders' ids.
    """
    already = paid.update()
    created = 0
    order_ids: list[uuid.UUID] = []
    failure: list[BaseException] = []

    def on_created(n: int) -> None:
        nonlocal created
        created = n

    def submit() -> None:
        try:
            order_ids.extend(
                submit_orders(orders.create_new_orders, count, rate, batch, on_created)
            )
        except BaseException as e:  # reported in the calling thread
            failure.append(e)

    started = time.monotonic()
    submitter = threading.Thread(target=submit, name="esbridge demo submitter", daemon=True)
    submitter.start()

    def tick(n: int) -> None:
        if failure:
            raise failure[0]
        on_tick()
        if progress is not None:
            progress.show(created, n - already, started)

    wait_for_count(paid, already + count, timeout, tick)
    submitter.join()
    if failure:
        raise failure[0]
    if progress is not None:
        progress.show(created, count, started, force=True)
        progress.done()
    return order_ids


def order_timings(orders: Any, order_ids: Sequence[uuid.UUID]) -> Timings:
    """Created → paid times of the given orders, from their events' timestamps."""
    wanted = {get_topic(Order.Created), get_topic(Order.Paid)}
    created: dict[uuid.UUID, float] = {}
    paid: dict[uuid.UUID, float] = {}
    ids = set(order_ids)
    for page in read_pages(orders.recorder, 0, topics=sorted(wanted)):
        for notification in page:
            if notification.originator_id not in ids:
                continue
            event = orders.mapper.to_domain_event(notification)
            stamp = event.timestamp.timestamp()
            if isinstance(event, Order.Created):
                created[event.originator_id] = stamp
            else:
                paid[event.originator_id] = stamp
    missing = ids - paid.keys()
    if missing:
        raise AssertionError(f"{len(missing)} orders were never paid")
    durations = [paid[i] - created[i] for i in order_ids]
    return Timings(len(order_ids), min(created.values()), max(paid.values()), durations)


@dataclass
class Effects:
    """How many times each order got each effect, counted from the three logs."""

    orders: int
    reserved: Counter[uuid.UUID]
    paid: Counter[uuid.UUID]
    reservations: Counter[uuid.UUID]
    payments: Counter[uuid.UUID]

    def problems(self) -> list[str]:
        """Every deviation from "each order reserved once and paid once"."""
        result = []
        for name, counter in [
            ("Order.Reserved", self.reserved),
            ("Order.Paid", self.paid),
            ("Reservation.Created", self.reservations),
            ("Payment.Created", self.payments),
        ]:
            missing = self.orders - len(counter)
            duplicated = {k: v for k, v in counter.items() if v != 1}
            if missing:
                result.append(f"{missing} orders have no {name}")
            if duplicated:
                result.append(f"{len(duplicated)} orders have {name} more than once")
        return result


def count_effects(env: Mapping[str, str], order_ids: Sequence[uuid.UUID]) -> Effects:
    """Count reservations and payments per order in the three applications' logs."""
    ids = set(order_ids)

    def per_order(
        app_cls: type, topic: str, order_id_of: Callable[[Any], uuid.UUID]
    ) -> Counter[uuid.UUID]:
        app = app_cls(env=dict(env))
        try:
            counter: Counter[uuid.UUID] = Counter()
            for page in read_pages(app.recorder, 0, topics=[topic]):
                for notification in page:
                    order_id = order_id_of(app.mapper.to_domain_event(notification))
                    if order_id in ids:
                        counter[order_id] += 1
            return counter
        finally:
            app.close()

    return Effects(
        orders=len(ids),
        reserved=per_order(Orders, get_topic(Order.Reserved), lambda e: e.originator_id),
        paid=per_order(Orders, get_topic(Order.Paid), lambda e: e.originator_id),
        reservations=per_order(Reservations, get_topic(Reservation.Created), lambda e: e.order_id),
        payments=per_order(Payments, get_topic(Payment.Created), lambda e: e.order_id),
    )


@contextlib.contextmanager
def local_servers(out: TextIO) -> Iterator[tuple[dict[str, str], dict[str, Any]]]:
    """Postgres (fsync on) and Kafka from the test harness's provisioning; closed at the end."""
    out.write("starting PostgreSQL and Kafka ...\n")
    out.flush()
    postgres = make_postgres(fsync=True)
    try:
        kafka = make_kafka()
        try:
            out.write(f"  {postgres.describe()}\n  {kafka.describe()}\n")
            db = postgres.create_database()
            yield dict(db.env), kafka.config()
        finally:
            kafka.close()
    finally:
        postgres.close()


@dataclass
class DemoReport:
    timings: Timings
    effects: Effects
    edges: list[Any]
    restarts: int


def run_demo(
    options: DemoOptions,
    *,
    env: Mapping[str, str] | None = None,
    kafka_config: Mapping[str, Any] | None = None,
    out: TextIO = sys.stderr,
) -> DemoReport:
    """Run the demo; with ``env``/``kafka_config`` None, start (and stop) local servers."""
    if env is None or kafka_config is None:
        with local_servers(out) as (local_env, local_kafka):
            return run_demo(options, env=local_env, kafka_config=local_kafka, out=out)
    with SystemProcesses(
        env,
        kafka_config,
        partitions=options.partitions,
        mode=options.mode,
        workers=options.workers,
    ) as processes:
        orders = Orders(env=processes.env)
        paid = paid_counter(processes.env)
        try:
            out.write(
                f"started {', '.join(APPS)} in {len(APPS) * options.workers} OS processes "
                f"({options.partitions} partition(s), {options.mode}); waiting until a first "
                "order goes through ...\n"
            )
            out.flush()
            drive_orders(orders, paid, 1, timeout=options.timeout, on_tick=processes.poll)
            out.write(
                f"submitting {options.orders} orders"
                f"{f' at {options.rate:g}/s' if options.rate else ''}\n"
            )
            out.flush()
            order_ids = drive_orders(
                orders,
                paid,
                options.orders,
                rate=options.rate,
                batch=options.batch,
                timeout=options.timeout,
                progress=Progress(out, options.orders),
                on_tick=processes.poll,
            )
            edges = processes.edge_statuses()
            restarts = processes.restarts()
            timings = order_timings(orders, order_ids)
            effects = count_effects(processes.env, order_ids)
        finally:
            paid.close()
            orders.close()
    for line in timings.lines():
        out.write(line + "\n")
    problems = effects.problems()
    out.write(
        f"Exactly once: each of the {effects.orders} orders reserved once and paid once\n"
        if not problems
        else "EXACTLY-ONCE VIOLATED: " + "; ".join(problems) + "\n"
    )
    out.write("Lag per edge (leader -> follower):\n")
    out.write(format_table(edges) + "\n")
    if restarts:
        out.write(f"({restarts} worker restart(s) during the run)\n")
    out.flush()
    return DemoReport(timings, effects, edges, restarts)
