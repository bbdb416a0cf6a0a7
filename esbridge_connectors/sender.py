"""A reference push sender: signs each delivery and retries it until it gets a 2xx.

It behaves as the intake expects a real sender to behave (a webhook provider,
a callback client): a delivery is re-sent with the same delivery id after a
connection error, a timeout or a 5xx, until a 2xx (or a 4xx, which means
"never retry"). Used by the load tests and ``bench/webhooks.py``; also a
small example of the sender side of the contract.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from esbridge_connectors.signatures import HmacSignature


@dataclass(frozen=True)
class Delivery:
    """One push: its delivery id and JSON body."""

    delivery_id: str
    body: bytes


@dataclass
class SendStats:
    """What a run of :func:`send_all` saw (latencies are of requests answered 2xx)."""

    elapsed: float = 0.0
    requests: int = 0
    retries: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # "recorded", "duplicate", "4xx"...
    latencies: list[float] = field(default_factory=list)

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-quantile (0..1) of 2xx latencies, in seconds."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def send_all(
    url: str,
    deliveries: Sequence[Delivery],
    *,
    signature: HmacSignature | None,
    concurrency: int = 50,
    delivery_header: str = "X-Delivery-Id",
    timeout: float = 30.0,
    retry_delay: float = 0.05,
    give_up_after: float = 120.0,
) -> SendStats:
    """Send every delivery with ``concurrency`` concurrent senders, each until it gets a 2xx/4xx."""
    stats = SendStats()
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    for delivery in deliveries:
        queue.put_nowait(delivery)

    async def sender() -> None:
        # One client (one connection) per sender, like independent senders; a pool
        # shared by 50 tasks costs more CPU in httpx than the server under test.
        async with httpx.AsyncClient(timeout=timeout) as client:
            await send_from(client)

    async def send_from(client: httpx.AsyncClient) -> None:
        while True:
            try:
                delivery = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            deadline = time.monotonic() + give_up_after
            while True:
                headers = dict(signature.sign(delivery.body)) if signature else {}
                headers[delivery_header] = delivery.delivery_id
                headers["Content-Type"] = "application/json"
                started = time.perf_counter()
                stats.requests += 1
                try:
                    response = await client.post(url, content=delivery.body, headers=headers)
                except httpx.TransportError:
                    outcome = "transport_error"
                else:
                    if response.status_code < 300:
                        stats.latencies.append(time.perf_counter() - started)
                        outcome = str(response.json().get("status", response.status_code))
                    else:
                        outcome = str(response.status_code)
                stats.statuses[outcome] = stats.statuses.get(outcome, 0) + 1
                if outcome != "transport_error" and not outcome.startswith("5"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"delivery {delivery.delivery_id} never got a 2xx")
                stats.retries += 1
                await asyncio.sleep(retry_delay)

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    stats.elapsed = time.perf_counter() - started
    return stats
