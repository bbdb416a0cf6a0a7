"""Prometheus metrics and status snapshots shared by relays and consumers.

Each component registers its own metrics (``esbridge_relay_*``,
``esbridge_consumer_*``) in a registry it is given, so several components in
one process (the system runner) do not collide, and tests can read values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)


def serve_metrics(
    port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> None:
    """Serve ``/metrics`` for Prometheus on ``addr:port`` in a daemon thread."""
    start_http_server(port, addr=addr, registry=registry)
