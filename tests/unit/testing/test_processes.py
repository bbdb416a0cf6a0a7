"""An interruption (Ctrl-C) is held while a child process is created, never lost."""

from __future__ import annotations

import pytest

from esbridge.testing.processes import interrupt, spawning


class Stop(KeyboardInterrupt):
    pass


def test_outside_spawning_the_interruption_is_raised_at_once():
    with pytest.raises(Stop):
        interrupt(Stop())


def test_while_spawning_it_is_raised_once_the_child_is_held():
    held = []
    with pytest.raises(Stop), spawning():
        interrupt(Stop())
        held.append("child")  # the rest of the block (assigning the Popen) still runs
    assert held == ["child"]
    with spawning():  # raised once, not again
        pass


def test_an_error_of_the_block_itself_propagates():
    with pytest.raises(ValueError), spawning():
        raise ValueError("Popen failed")
    with spawning():
        pass
