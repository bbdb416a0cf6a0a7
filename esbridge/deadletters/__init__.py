"""Messages that could not be processed: parked, never lost.

The policy (:mod:`.policy`) says how often a failing message is tried and
whether it is then parked, skipped or stops the consumer; the store
(:mod:`.store`) keeps parked messages in the follower's own database;
:mod:`.inspection` shows one whole (``esbridge dlq show``); :mod:`.retry` runs
them through their follower again once the cause is fixed (``esbridge dlq
retry``).
"""
