"""Prompt mode: the topic's messages only say "there is more"; events come from the upstream log.

On a prompt (or every ``prompt_interval`` seconds) the owner of the prompt
partition pulls from the upstream log from its tracking position, in large
pages, and records them in batches: the library's ``pull_and_process``
without one transaction per event. It records under the upstream
application's name, exactly like the library's runners.
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer, Message

from esbridge.consumer.modes import Mode, ModeContext
from esbridge.consumer.offsets import commit_offsets
from esbridge.names import PROMPTS
from esbridge.runtime import gc_pause


class PromptMode(Mode):
    """Pulls from the upstream log when prompted (see the module docstring)."""

    name = PROMPTS
    checks_offsets = False  # the offsets of prompts skip no event

    def __init__(self, context: ModeContext) -> None:
        super().__init__(context)
        self._prompted = True
        self._last_pull = 0.0

    def tracking_names(self, partitions: int) -> list[str]:
        return [self.context.upstream]

    def tracking_name(self, partition: int) -> str:
        return self.context.assignment.names[0]

    def assigned(self) -> None:
        self._prompted = True

    def caught_up(self, consumer: Consumer) -> bool:
        return not self._prompted

    def round(self, consumer: Consumer, messages: list[Message]) -> int:
        context = self.context
        for message in messages:
            error = message.error()
            if error is None:
                self._prompted = True
            else:
                context.client.check(error)  # a missing ACL stops it, as in payload mode
        parts = context.assignment.parts
        if not parts:
            return len(messages)
        now = time.monotonic()
        if not self._prompted and now - self._last_pull < context.tuning.prompt_interval:
            return len(messages)
        self._prompted = False
        self._last_pull = now
        pulled = self._pull()
        for part in parts.values():
            for m in messages:
                if m.partition() == part.number:
                    part.last_offset = max(part.last_offset, m.offset() or 0)
        commit_offsets(consumer, context.assignment, asynchronous=True, only=set(parts))
        context.update_gauges()
        return len(messages) + pulled

    def _pull(self) -> int:
        """Pull everything after the tracking position from the upstream log; returns events."""
        context = self.context
        upstream_log = context.upstream_log
        assert upstream_log is not None
        positions = context.assignment.positions
        name = context.assignment.names[0]
        positions[name] = context.position(name)
        total = 0
        while not context.stop.is_set():
            page = upstream_log.page_after(positions[name])
            if not page:
                break
            with gc_pause.gc_paused(context.tuning.pause_gc):
                steps = [context.steps.step_from_notification(n, name) for n in page]
                if not context.commit(steps):
                    break
            total += len(page)
            if len(page) < context.tuning.page_size:
                break
        return total
