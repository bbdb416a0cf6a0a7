"""Webhook intake throughput and latency, against a bare uvicorn endpoint measured in the same run.

    python bench/webhooks.py [--deliveries 4000] [--senders 50] [--runs 3] [--workers 1]

Starts its own Postgres (``esbridge.testing.make_postgres``; or the external
one named by ``ESBRIDGE_POSTGRES_DSN`` with ``ESBRIDGE_BACKEND=external``),
then serves, each in its own uvicorn subprocess on 127.0.0.1:

* the baseline: a Starlette endpoint that reads the body and answers 200
  (no signature check, no database): the cost of HTTP + uvicorn + the sender;
* the intake: :class:`WebhookIntake` with HMAC verification, recording each
  delivery (and its receipt) in Postgres, 20 % of the deliveries duplicates.

The same sender (``esbridge_connectors.sender``, ``--senders`` concurrent
connections) drives both. Prints requests/s and p50/p99 latency of each run,
the medians, and the intake/baseline ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from esbridge_connectors.sender import Delivery, SendStats, send_all
from esbridge_connectors.signatures import HmacSignature
from esbridge_connectors.webhooks import FieldSource, WebhookIntake

HERE = Path(__file__).resolve().parent
SIGNATURE = HmacSignature(secrets=["bench-secret"])


class Payment(Aggregate):
    @event("Received")
    def __init__(self, ref: str, amount: int) -> None:
        self.ref = ref
        self.amount = amount


class Payments(Application[uuid.UUID]):
    pass


def receive_payment(app: Payments, payload: Any, delivery_id: str) -> Payment:
    return Payment(payload["ref"], payload["amount"])


def make_intake() -> WebhookIntake[Payments]:
    """uvicorn factory of the measured intake (settings from the environment)."""
    return WebhookIntake(
        Payments(),
        {"payment.received": receive_payment},
        delivery_id=FieldSource.from_header("X-Delivery-Id"),
        kind=FieldSource.from_body("type"),
        signature=SIGNATURE,
        max_concurrency=int(os.environ.get("INTAKE_CONCURRENCY", "16")),
    )


def make_baseline() -> Starlette:
    """uvicorn factory of the baseline: read the body, answer 200."""

    async def hello(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"status": "recorded"})

    return Starlette(routes=[Route("/webhooks", hello, methods=["POST"])])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(factory: str, env: dict[str, str], workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    child_env = os.environ | env | {"PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    command = [
        sys.executable, "-m", "esbridge_connectors.webhooks", factory, "--port", str(port),
        "--ops-port", str(free_port()), "--log-level", "warning", "--workers", str(workers),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=child_env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{factory} did not start")
        try:
            httpx.post(f"{url}/webhooks", content=b"{}", timeout=1)
            return process, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{factory} did not answer within 30 s") from None
            time.sleep(0.05)


def deliveries(run: int, n: int) -> list[Delivery]:
    rng = random.Random(run)
    distinct = [
        Delivery(
            f"run{run}-{i}",
            json.dumps({"type": "payment.received", "ref": f"r{run}-{i}", "amount": i}).encode(),
        )
        for i in range(int(n * 0.8))
    ]
    sends = distinct + [rng.choice(distinct) for _ in range(n - len(distinct))]
    rng.shuffle(sends)
    return sends


def measure(url: str, run: int, n: int, senders: int, signed: bool) -> SendStats:
    return asyncio.run(
        send_all(
            f"{url}/webhooks",
            deliveries(run, n),
            signature=SIGNATURE if signed else None,
            concurrency=senders,
        )
    )


def line(name: str, stats: SendStats) -> str:
    return (
        f"{name:9s} {stats.requests_per_second:8.0f} req/s"
        f"  p50 {stats.percentile(0.5) * 1e3:7.1f} ms"
        f"  p99 {stats.percentile(0.99) * 1e3:7.1f} ms  {dict(sorted(stats.statuses.items()))}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=4000)
    parser.add_argument("--senders", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()

    from esbridge.testing import make_postgres

    postgres = make_postgres()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        db = postgres.create_database()
        env = db.env | {"POSTGRES_POOL_SIZE": "16", "POSTGRES_MAX_OVERFLOW": "4"}
        Payments(env=env).close()  # create the tables
        baseline, baseline_url = serve("webhooks:make_baseline", env, args.workers)
        intake, intake_url = serve("webhooks:make_intake", env, args.workers)
        processes += [baseline, intake]
        print(
            f"{args.deliveries} deliveries per run (20 % duplicates), {args.senders} senders, "
            f"{args.workers} uvicorn worker(s), {args.runs} runs"
        )
        results: dict[str, list[SendStats]] = {"baseline": [], "intake": []}
        for run in range(args.runs):
            for name, url in (("baseline", baseline_url), ("intake", intake_url)):
                stats = measure(url, run, args.deliveries, args.senders, signed=name == "intake")
                results[name].append(stats)
                print(f"run {run + 1}  " + line(name, stats), flush=True)
        rps = {k: statistics.median(s.requests_per_second for s in v) for k, v in results.items()}
        p99 = {k: statistics.median(s.percentile(0.99) for s in v) for k, v in results.items()}
        print(
            f"median    baseline {rps['baseline']:.0f} req/s (p99 {p99['baseline'] * 1e3:.1f} ms)"
            f" | intake {rps['intake']:.0f} req/s (p99 {p99['intake'] * 1e3:.1f} ms)"
            f" | ratio intake/baseline {rps['intake'] / rps['baseline']:.3f}"
        )
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        postgres.close()


if __name__ == "__main__":
    main()
