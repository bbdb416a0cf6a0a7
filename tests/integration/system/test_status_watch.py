"""``esbridge status --watch`` in a real terminal (tmux): the table and a catch-up bar
appear, update as a running system works off its backlog, and Ctrl-C exits 0.

The rate and ETA of a moving bar are tested in ``tests/unit/system/test_status_watch.py``:
here a follower can work off its backlog between two samples.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esbridge.testing.servers import unique_name
from examples.dogschool.application import Counters, DogSchool
from examples.dogschool.domainmodel import Dog
from tests.support.relay_support import ESBRIDGE, ROOT, subprocess_env

BACKLOG = 10_000  # written twice: the second half arrives after the first was processed
SYSTEM = "examples.dogschool.system:system"


class Tmux:
    """A tmux server of the test's own (its own socket), running one command in a pane."""

    def __init__(self, socket: Path) -> None:
        tmux = shutil.which("tmux")
        assert tmux, "tmux is missing: .ci/run and python -m esbridge.testing.provision install it"
        self.base = [tmux, "-S", str(socket)]

    def __call__(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "watch")

    def wait_for(self, condition: Callable[[str], bool], what: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if condition(screen):
                return screen
            assert time.monotonic() < deadline, f"never {what}:\n{screen}"
            time.sleep(0.2)


def test_watch_redraws_the_table_and_catch_up_bars_and_stops_on_ctrl_c(
    postgres_db: Any, kafka_broker: Any, tmp_path: Path
) -> None:
    school = DogSchool(env=postgres_db.env)

    def write_backlog(first: int) -> None:
        for start in range(first, first + BACKLOG, 2000):
            school.save(*(Dog(f"dog {i}") for i in range(start, start + 2000)))

    write_backlog(0)
    Counters(env=postgres_db.env).close()  # its tables: a follower set up, not yet run
    prefix = unique_name("watch") + "."
    env = subprocess_env(postgres_db, kafka_broker)
    script = tmp_path / "watch.sh"
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if k.isidentifier())
    watch = [ESBRIDGE, "status", SYSTEM, "--topic-prefix", prefix, "--watch", "--interval", "0.5"]
    script.write_text(
        f"{exports}cd {shlex.quote(str(ROOT))}\n"
        f"{shlex.join(watch)}\necho watch-exit=$?\nsleep 600\n"
    )
    tmux = Tmux(tmp_path / "tmux.sock")
    tmux("new-session", "-d", "-s", "watch", "-x", "160", "-y", "40", f"bash {script}")
    try:
        # Nothing runs yet: the whole backlog is behind, no rate.
        screen = tmux.wait_for(
            lambda s: "catch-up" in s or "watch-exit" in s, "showed the catch-up section"
        )
        assert "edge" in screen and "lag (events)" in screen  # the status table
        assert re.search(
            rf"DogSchool -> Counters\s+\[\.{{20}}\]\s+0%  0 / {BACKLOG} events, {BACKLOG} behind",
            screen,
        ), screen
        assert "\x1b" not in screen  # drawn by the terminal, not printed as escape codes

        # The system starts and works the backlog off, then stops.
        def run_until_caught_up(total: int) -> str:
            with (tmp_path / "run.log").open("ab") as log:
                runner = subprocess.Popen(
                    [ESBRIDGE, "run", SYSTEM, "--topic-prefix", prefix],
                    env=env,
                    cwd=ROOT,
                    stderr=log,
                )
            try:
                caught_up = rf"\[#{{20}}\] 100%  caught up at {total}"
                return tmux.wait_for(
                    lambda s: bool(re.search(caught_up, s)), f"caught up at {total}", timeout=300
                )
            finally:
                runner.terminate()
                runner.wait(60)

        run_until_caught_up(BACKLOG)
        # As many events again: the table shows the follower half way, and a new catch-up
        # bar for what is behind (a fast follower can work off a backlog between two
        # samples, so the half-way screen is made, not waited for).
        write_backlog(BACKLOG)
        total = 2 * BACKLOG
        half = rf"DogSchool -> Counters\s+{total}\s+{BACKLOG}\s+{BACKLOG}\s"
        screen = tmux.wait_for(lambda s: bool(re.search(half, s)), "showed half way")
        assert re.search(rf"\[\.{{20}}\]\s+0%  0 / {BACKLOG} events, {BACKLOG} behind", screen)
        screen = run_until_caught_up(total)
        assert re.search(rf"DogSchool -> Counters\s+{total}\s+{total}\s+0\s", screen), screen
        # Ctrl-C: the watch ends, exit status 0.
        tmux("send-keys", "-t", "watch", "C-c")
        screen = tmux.wait_for(lambda s: "watch-exit=" in s, "exited", timeout=30)
        assert "watch-exit=0" in screen, screen
        assert "Traceback" not in screen
    finally:
        school.close()
        subprocess.run([*tmux.base, "kill-server"], capture_output=True, timeout=30)
