"""The dead-letter command is "retry" ("replay" is the backfill of a range to a topic);
the former names keep working for one release."""

from __future__ import annotations

import pytest

from esbridge.deadletters import retry
from esbridge.deadletters.retry import (
    ReplayResult,
    RetryResult,
    replay_dead_letters,
    retry_dead_letters,
)
from esbridge.deadletters.store import STATUS_REPLAYED


def test_former_result_name_and_field_still_read() -> None:
    assert ReplayResult is RetryResult
    result = RetryResult(retried=[3, 5])
    assert result.replayed == [3, 5]


def test_former_function_name_warns_then_does_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def recording(follower: object, **kwargs: object) -> RetryResult:
        calls.append((follower, kwargs))
        return RetryResult()

    assert retry.retry_dead_letters is retry_dead_letters
    monkeypatch.setattr(retry, "retry_dead_letters", recording)
    with pytest.warns(DeprecationWarning, match="retry_dead_letters"):
        replay_dead_letters("follower", ids=[1])  # type: ignore[arg-type]
    assert calls == [("follower", {"ids": [1], "upstream_classes": None, "max_passes": 10})]


def test_stored_status_keeps_its_value() -> None:
    """A data contract: rows retried before the rename are read the same way."""
    assert STATUS_REPLAYED == "replayed"
