"""``esbridge status --watch``: catch-up bars from successive samples, lines when piped,
Ctrl-C exits 0, and one-shot options refused with --watch."""

from __future__ import annotations

import io

import pytest

from esbridge.cli import main
from esbridge.system.status import EdgeStatus
from esbridge.system.status_watch import EdgeCatchUp, watch


def status(upstream_max: int, lag: int) -> EdgeStatus:
    return EdgeStatus(
        leader="A",
        follower="B",
        upstream_max_nid=upstream_max,
        positions={"A": upstream_max - lag},
        lag_events=lag,
        lag_seconds=0.0,
        held_gaps=None,
        dlq=0,
    )


def test_rate_and_eta_come_from_successive_samples_and_new_events_count() -> None:
    edge = EdgeCatchUp()
    assert edge.line(status(1000, 1000), 10.0).endswith("0 / 1000 events, 1000 behind")
    # 2 s later: 400 processed while 200 more were written.
    line = edge.line(status(1200, 800), 12.0)
    assert line == "[######..............]  33%  400 / 1200 events (200/s, ETA 4 s), 800 behind"
    assert edge.line(status(1200, 0), 14.0) == "[####################] 100%  caught up at 1200"
    # A new backlog starts a new count.
    assert edge.line(status(2200, 1000), 20.0).endswith("0 / 1000 events, 1000 behind")


class Samples:
    """Samples to show, then Ctrl-C (as the terminal sends it) during the next sleep."""

    def __init__(self, *statuses: EdgeStatus) -> None:
        self.statuses = list(statuses)
        self.now = 0.0

    def sample(self) -> list[EdgeStatus]:
        return [self.statuses.pop(0)]

    def sleep(self, seconds: float) -> None:
        if not self.statuses:
            raise KeyboardInterrupt
        self.now += seconds

    def clock(self) -> float:
        return self.now


def test_piped_it_prints_a_line_per_edge_per_sample_and_ctrl_c_exits_0() -> None:
    samples = Samples(status(1000, 1000), status(1000, 500))
    out = io.StringIO()
    code = watch(samples.sample, out, 5.0, clock=samples.clock, sleep=samples.sleep)
    assert code == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in out.getvalue()
    assert lines[0].endswith(" A -> B: [....................]   0%  0 / 1000 events, 1000 behind")
    assert lines[1].endswith("500 / 1000 events (100/s, ETA 5 s), 500 behind")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--watch", "--json"], "--json is for one look"),
        (["--watch", "--fail-on-lag"], "--fail-on-lag is for one look"),
        (["--interval", "3"], "--interval is the period of --watch: add --watch"),
        (["--watch", "--interval", "0"], "--interval 0: give a number of seconds above 0"),
    ],
)
def test_options_that_make_no_sense_with_watch_exit_2(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "examples.dogschool.system:system", *options]) == 2
    assert message in capsys.readouterr().err
