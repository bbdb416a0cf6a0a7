"""The fetch settings that bound a partition's wait (pure logic; the measured effect is
tested in tests/integration/consumer/test_consumer_fairness.py)."""

from __future__ import annotations

from esbridge.consumer.partition_flow import FAIR_FETCH, fair_fetch_config, longest_stalls


def test_adds_the_fair_fetch_settings_to_a_config_without_them() -> None:
    config = {"bootstrap.servers": "b:9092", "group.id": "g"}
    assert fair_fetch_config(config) == {
        "bootstrap.servers": "b:9092",
        "group.id": "g",
        "max.partition.fetch.bytes": 131_072,
        "queued.min.messages": 1_000,
        "fetch.queue.backoff.ms": 20,
    }
    assert config == {"bootstrap.servers": "b:9092", "group.id": "g"}  # not changed in place


def test_the_users_values_win() -> None:
    config = {
        "queued.min.messages": 500,
        "max.partition.fetch.bytes": 1_048_576,
        "fetch.queue.backoff.ms": 1000,
    }
    assert fair_fetch_config(config) == config
    assert FAIR_FETCH["max.partition.fetch.bytes"] != 1_048_576


def test_an_alias_set_by_the_user_is_not_set_again_under_the_other_name() -> None:
    result = fair_fetch_config({"fetch.message.max.bytes": 65_536})
    assert result["fetch.message.max.bytes"] == 65_536
    assert "max.partition.fetch.bytes" not in result


def test_stalls_are_counted_from_the_first_progress_until_each_partition_s_end() -> None:
    samples = [
        (0.0, [0, 0, 0]),
        (5.0, [0, 0, 0]),  # joining the group: not a stall
        (6.0, [10, 0, 0]),
        (7.0, [20, 5, 0]),
        (9.5, [30, 5, 0]),
        (10.0, [30, 10, 7]),  # p0 is done at 30: its wait after that does not count
        (20.0, [30, 10, 8]),  # p1 is done at 10
    ]
    assert longest_stalls(samples, [30, 10, 8]) == [2.5, 3.0, 10.0]


def test_a_partition_that_never_reaches_its_end_stalls_until_the_last_sample() -> None:
    samples = [(0.0, [0, 0]), (1.0, [1, 0]), (2.0, [2, 0]), (4.0, [2, 0])]
    assert longest_stalls(samples, [2, 5]) == [1.0, 3.0]


def test_a_partition_without_backlog_never_stalls() -> None:
    samples = [(0.0, [3, 0]), (1.0, [3, 4]), (9.0, [3, 8])]
    assert longest_stalls(samples, [3, 8]) == [0.0, 8.0]


def test_nothing_consumed_is_one_stall_as_long_as_the_sampling() -> None:
    assert longest_stalls([(1.0, [0, 0]), (4.0, [0, 0])], [5, 5]) == [3.0, 3.0]
