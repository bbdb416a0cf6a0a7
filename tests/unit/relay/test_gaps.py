"""Where the relay cuts a page at a gap, and which ids it reports as late commits.

The waits themselves (Postgres's ``pg_locks``) are tested against a real server in
``tests/integration/relay/test_relay_late_commits.py``.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from esbridge.relay.gaps import GapGuard
from esbridge.relay.metrics import RelayMetrics


def guard(settled: int = 0) -> tuple[GapGuard, CollectorRegistry]:
    registry = CollectorRegistry()
    g = GapGuard("Ledger", None, "public", "ledger_events", RelayMetrics("Ledger", "t", registry))
    g.settled = settled
    return g, registry


def usable(g: GapGuard, position: int, ids: list[int]) -> int:
    return g.usable(position, ids, int)


def test_a_page_without_gaps_is_used_whole() -> None:
    g, _ = guard()
    assert usable(g, 10, [11, 12, 13]) == 3


def test_a_page_is_cut_before_its_first_unsettled_gap() -> None:
    g, _ = guard()
    assert usable(g, 10, [11, 12, 15, 16, 19]) == 2
    assert g.gaps == [(13, 14), (17, 18)]


def test_a_gap_at_the_position_cuts_the_whole_page() -> None:
    g, _ = guard()
    assert usable(g, 10, [12, 13]) == 0


def test_settled_gaps_are_passed_and_later_ones_cut() -> None:
    g, _ = guard(settled=20)
    assert usable(g, 10, [11, 15, 20]) == 3  # every gap at or below 20 is final
    assert usable(g, 10, [11, 15, 20, 23, 24]) == 3  # 21-22 may still commit
    assert g.gaps == [(21, 22)]


def test_ids_that_appear_in_a_recorded_gap_are_late_commits(caplog) -> None:
    g, registry = guard()
    assert usable(g, 10, [11, 14, 15, 18]) == 1  # gaps 12-13 and 16-17
    g.settled = 18  # the writers in progress then have ended
    caplog.set_level(logging.WARNING, logger="esbridge.relay_gaps")
    assert usable(g, 11, [13, 14, 15, 17, 18]) == 5
    assert (
        registry.get_sample_value(
            "esbridge_relay_late_commits_total", {"app": "Ledger", "topic": "t"}
        )
        == 2.0
    )
    assert [r.getMessage() for r in caplog.records] == [
        "relay Ledger: notification ids 13, 17 committed after higher ids (late commits: "
        "writers without the library's table lock, e.g. POSTGRES_ENABLE_DB_FUNCTIONS=y); "
        "published now, in order, since the relay had waited at the gap"
    ]
    assert g.gaps == []
    assert usable(g, 18, [19, 21]) == 1  # a new gap: nothing more counted as late
    assert (
        registry.get_sample_value(
            "esbridge_relay_late_commits_total", {"app": "Ledger", "topic": "t"}
        )
        == 2.0
    )
